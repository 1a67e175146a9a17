"""Near copies: a perceptual hash that a lossy copy of an image keeps.

The pixel digest (:func:`~dicomnode.training.data.pixel_digest`) knows an image again only
when its decoded pixels are the same. A JPEG re-encoding, a smaller export or another
window of the same radiograph changes them. :func:`near_hash` keeps the coarse picture: the
signs, against their median, of the 255 lowest spatial frequencies (the 16 x 16 corner of
the DCT of a 32 x 32 box-filtered thumbnail, less its mean). Two images are near copies when
their hashes differ in fewer bits than a threshold.

No fixed threshold serves every folder (measured on the shipped models' folders: the nearest
two distinct knee crops differ in 36 bits, JPEG or half-size copies of one in at most 18;
two distinct hand phantoms in 14). :func:`near_threshold` therefore sets it per training
folder, at half the distance of its nearest two distinct images: no two images the model
trained on are near copies of each other by it (unless they are: see below), and a copy is
called near only when it is far nearer to a training image than any two distinct training
images are to each other.

Within one folder, :func:`earlier_copies` names the files that are near copies of another
file of the same folder (filed twice, under two labels or for two patients): nearer to it
than a third of the median distance of the folder's images to their nearest other
(:func:`copy_limit`; measured: knee 60 bits, so 20; hand phantoms 36, so 12; spine phantoms
80, so 27; the nearest two distinct images of each lie beyond it). Such pairs do not set the
folder's threshold: its distinct images do.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Sequence

import numpy as np
import numpy.typing as npt
from PIL import Image
from scipy.fft import dctn

from dicomnode.values import FloatArray

NEAR_HASH = (
    "signs against their median of the 255 lowest DCT frequencies (16 x 16 less the mean) "
    "of a 32 x 32 box-filtered thumbnail, 64 hex digits"
)
"""What :func:`near_hash` keeps of an image."""
NEAR_COPY = "a lossy re-encoding, a resize or another window, by a perceptual hash"
"""What a near copy is, in the words of warnings."""
THUMBNAIL = 32
FREQUENCIES = 16
BITS = 256
"""Bits of a hash (the last always clear)."""
PAIRS = 1 << 22
"""Pairs of hashes compared at a time (a distance of 8 bytes each: 32 MiB), whatever the
folder's size."""

COPY_SHARE = 3
"""Two images of one folder are near copies of each other when they are this many times
nearer than the folder's median image is to its nearest other (:func:`copy_limit`)."""

Signs = npt.NDArray[np.float32]
Distances = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


def near_hash(pixels: FloatArray) -> str:
    """The :data:`NEAR_HASH` of decoded [0, 1] pixels (2-D)."""
    picture = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))
    thumbnail = picture.resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX)
    frequencies = dctn(np.asarray(thumbnail, dtype=np.float64), norm="ortho")
    lowest = frequencies[:FREQUENCIES, :FREQUENCIES].ravel()[1:]
    bits = np.append(lowest > np.median(lowest), False)
    return np.packbits(bits).tobytes().hex()


def signs(hashes: Collection[str]) -> Signs:
    """``hashes`` as an (N, 256) array of each bit's sign (+1 set, -1 clear), for
    :func:`distances` (1 KiB a hash: 300 MiB for a folder of 300,000 images)."""
    raw = np.frombuffer(b"".join(bytes.fromhex(h) for h in hashes), dtype=np.uint8)
    bits = np.unpackbits(raw.reshape(len(hashes), BITS // 8), axis=1)
    return bits.astype(np.float32) * 2 - 1


def distances(one: Signs, others: Signs) -> Distances:
    """(len(one), len(others)) bits in which each hash of ``one`` differs from each of
    ``others``: two hashes' signs agree in 256 less their differing bits and disagree in
    those, so the distances of a block are one matrix product (exact in float32: every sum
    is an integer of at most 256)."""
    agreement = one @ others.T
    return np.rint((BITS - agreement) / 2).astype(np.int64)


def nearest(one: Signs, others: Signs) -> Distances:
    """Each hash of ``one``'s distance to the nearest of ``others`` (256, more than any,
    when ``others`` is empty)."""
    if not len(others):
        return np.full(len(one), 256, dtype=np.int64)
    step = _rows(others)
    parts = [distances(one[s : s + step], others).min(axis=1) for s in range(0, len(one), step)]
    return np.concatenate([np.zeros(0, dtype=np.int64), *parts])


def _rows(others: Signs) -> int:
    """How many hashes to compare with all of ``others`` at a time (:data:`PAIRS`)."""
    return max(1, PAIRS // max(1, len(others)))


def _against_itself(folder: Signs) -> Iterator[tuple[int, Distances]]:
    """``folder``'s distances to itself in blocks of :data:`PAIRS`: (first row, block)."""
    step = _rows(folder)
    for start in range(0, len(folder), step):
        yield start, distances(folder[start : start + step], folder)


def nearest_distinct(hashes: Collection[str]) -> Distances:
    """Each distinct hash's distance to the nearest other distinct hash (256 when there is
    no other): the one O(N^2) pass behind :func:`threshold_of` and :func:`copy_limit`."""
    parts = [np.zeros(0, dtype=np.int64)]
    for start, block in _against_itself(signs(sorted(set(hashes)))):
        rows = np.arange(len(block))
        block[rows, start + rows] = 256  # each hash against itself
        parts.append(block.min(axis=1, initial=256))
    return np.concatenate(parts)


def threshold_of(nearest: Distances) -> int:
    """Half the distance of the nearest two distinct hashes of a training folder that are
    not near copies of each other (:func:`copy_limit`), rounded down, from its
    :func:`nearest_distinct`: a hash nearer than that to one of them is a near copy (0,
    none, with fewer than two distinct hashes). A folder that holds near copies of its own
    images thus keeps the threshold its distinct images give, and a held-out copy of a
    training image counts as the near copy it is."""
    distinct = nearest[nearest >= copy_limit(nearest)]
    least = int(distinct.min(initial=256))
    return 0 if least == 256 else least // 2


def near_threshold(hashes: Collection[str]) -> int:
    """:func:`threshold_of` the folder of ``hashes``."""
    return threshold_of(nearest_distinct(hashes))


def copy_limit(nearest: Distances) -> int:
    """Distance under which two images of one folder are near copies of each other: under
    1/:data:`COPY_SHARE` of the median of its :func:`nearest_distinct` (0, none, with fewer
    than two distinct images)."""
    if len(nearest) < 2:
        return 0
    return math.ceil(float(np.median(nearest)) / COPY_SHARE)


def earlier_copies(hashes: Sequence[str], limit: int) -> npt.NDArray[np.intp]:
    """For each of ``hashes``, the index of the nearest earlier one less than ``limit`` bits
    away, or -1 (none)."""
    found = np.full(len(hashes), -1, dtype=np.intp)
    if limit <= 0 or not hashes:
        return found
    columns = np.arange(len(hashes))
    for start, block in _against_itself(signs(hashes)):
        rows = np.arange(len(block))
        block[columns[None, :] >= (start + rows)[:, None]] = 256  # only earlier hashes
        best = block.argmin(axis=1)
        close = block[rows, best] < limit
        found[start + rows[close]] = best[close]
    return found


def near_copies(hashes: Sequence[str], trained_on: Signs, threshold: int) -> BoolArray:
    """Which of ``hashes`` are near copies of the hashes whose :func:`signs` are
    ``trained_on`` (nearer than ``threshold``; the signs made once for a list asked about
    many times)."""
    if threshold <= 0 or not hashes:
        return np.zeros(len(hashes), dtype=bool)
    return nearest(signs(hashes), trained_on) < threshold
