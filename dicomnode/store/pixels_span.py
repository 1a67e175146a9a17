"""Where a stored file's Pixel Data lies, found without reading it, and whether it is whole.

A sender can deliver a dataset cut short (a truncated file sent as it is): its Pixel Data
declares more bytes than follow, or its fragments end before their sequence delimiter.
Read up to the pixel data, such a dataset parses; the node would store and acknowledge
it, every analysis would fail, and the whole copy sent again would be a duplicate of it.
The element's header and, when encapsulated, its items' headers are read here (a few
bytes each; the pixel data itself is skipped over), with no state shared between
threads.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from pydicom.uid import UID

from dicomnode.errors import IncompleteInstanceError

PIXEL_DATA = (0x7FE0, 0x0010)
_ITEM, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


def pixel_data_span(fp: BinaryIO, size: int, transfer_syntax: str) -> tuple[int, int] | None:
    """The (first, end) byte offsets of the Pixel Data value that starts at ``fp``'s
    position, as a read with ``stop_before_pixels`` leaves it; None when no Pixel Data
    starts there, or the dataset is deflated (its offsets are not the file's).

    Raises :class:`IncompleteInstanceError` when the value runs past ``size`` bytes.
    """
    syntax = UID(transfer_syntax)
    if syntax.is_deflated:
        return None
    order = "<" if syntax.is_little_endian else ">"
    start = fp.tell()
    head = fp.read(8)
    if len(head) < 8 or struct.unpack(order + "HH", head[:4]) != PIXEL_DATA:
        return None
    if syntax.is_implicit_VR:
        (length,), first = struct.unpack(order + "L", head[4:8]), start + 8
    elif head[4:6] in _LONG_VRS:
        more = fp.read(4)
        if len(more) < 4:
            raise IncompleteInstanceError("the dataset is incomplete: it ends in its Pixel Data")
        (length,), first = struct.unpack(order + "L", more), start + 12
    else:
        (length,), first = struct.unpack(order + "H", head[6:8]), start + 8
    if length != _UNDEFINED:
        if first + length > size:
            raise IncompleteInstanceError(
                f"the dataset is incomplete: its Pixel Data declares {length} bytes, "
                f"{max(0, size - first)} were received"
            )
        return first, first + length
    return first, _fragments_end(fp, first, size, order)


def _fragments_end(fp: BinaryIO, position: int, size: int, order: str) -> int:
    """The offset after the sequence delimiter of encapsulated Pixel Data at ``position``."""
    while True:
        fp.seek(position)
        head = fp.read(8)
        if len(head) < 8:
            raise IncompleteInstanceError(
                "the dataset is incomplete: its encapsulated Pixel Data ends before its "
                "sequence delimiter"
            )
        group, element, length = struct.unpack(order + "HHL", head)
        if (group, element) == _SEQUENCE_END:
            return position + 8
        if (group, element) != _ITEM or length == _UNDEFINED:
            raise IncompleteInstanceError(
                "the dataset is malformed: its encapsulated Pixel Data holds something "
                f"other than items ({group:04X},{element:04X})"
            )
        position += 8 + length
        if position > size:
            raise IncompleteInstanceError(
                "the dataset is incomplete: a fragment of its encapsulated Pixel Data "
                "declares more bytes than were received"
            )
