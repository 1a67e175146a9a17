"""The source header as the encoders copy it into the results.

Archives hold headers that do not conform: a birth date of ``00000000`` or
``1965-01-01``, a study time of ``25:00``, a Patient's Sex of ``female``.
highdicom refuses to copy such values, and a PACS may refuse objects that
carry them. The results copy a cleaned header instead: a date, time or
date-time that does not parse is emptied, and so is a Patient's Sex other
than M, F or O (``MALE``, ``FEMALE`` and ``OTHER`` become their letters). A
Specific Character Set whose first value is empty (``\\ISO 2022 IR 87``, as
Japanese and Korean systems write it) gets that value's meaning, ``ISO 2022
IR 6``, written out, and one that highdicom does not know becomes UTF-8. All
of these are Type 2 in the modules the results copy, so an empty value is
conformant. The stored original is never changed. Only the keywords fixed are
logged, never the values (they are patient data).
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pydicom
from highdicom.enum import SpecificCharacterSetValues
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import DA, DT, TM

log = logging.getLogger(__name__)

_PARSERS: dict[str, Callable[[str], Any]] = {"DA": DA, "TM": TM, "DT": DT}
_SEXES = frozenset({"M", "F", "O"})
_SEX_WORDS = {"MALE": "M", "FEMALE": "F", "OTHER": "O"}


def conformant_header(source: pydicom.Dataset, present: Iterable[str] = ()) -> pydicom.Dataset:
    """``source``, or a copy of it with its non-conformant values emptied (see the module).

    ``present``: keywords the copy must hold, empty when ``source`` lacks them (the Type 2
    attributes an encoder reads). ``source`` itself is returned when nothing needs fixing.
    """
    fixes = _fixes(source)
    missing = [keyword for keyword in present if keyword not in source]
    if not fixes and not missing:
        return source
    fixed = copy.deepcopy(source)  # pydicom.Dataset(source) would share, and alter, its elements
    if CHARACTER_SET in fixes:
        fixed.decode()  # every text value read in the source's character set first
    for tag, value in fixes.items():
        fixed[tag].value = value
    for keyword in missing:
        setattr(fixed, keyword, None)
    if fixes:
        log.warning(
            "sop=%s: non-conformant %s cleaned in the results' copy of the header",
            source.get("SOPInstanceUID", ""),
            ", ".join(sorted(pydicom.datadict.keyword_for_tag(tag) or str(tag) for tag in fixes)),
        )
    return fixed


def _fixes(source: pydicom.Dataset) -> dict[BaseTag, Any]:
    """The top-level elements to change, with their new values."""
    fixes: dict[BaseTag, Any] = {}
    for element in source:
        if element.VR in _PARSERS and not _parses(element.value, _PARSERS[element.VR]):
            fixes[element.tag] = None
    sex = str(source.get("PatientSex") or "").strip().upper()
    if sex and sex not in _SEXES:
        fixes[pydicom.tag.Tag("PatientSex")] = _SEX_WORDS.get(sex)
    charsets = _character_sets(source)
    if charsets is not None:
        fixes[CHARACTER_SET] = charsets
    return fixes


CHARACTER_SET = pydicom.tag.Tag("SpecificCharacterSet")
UTF8 = "ISO_IR 192"


def _character_sets(source: pydicom.Dataset) -> list[str] | str | None:
    """The Specific Character Set the results' copy needs, or None to keep the source's.

    An empty first value (``\\ISO 2022 IR 87``, as Japanese and Korean systems write it)
    means ISO 2022 IR 6 (PS3.3 C.12.1.1.2), which highdicom wants written out. A term
    highdicom does not know (``ISO 2022 IR 149``, Korean, which it misspells) becomes
    UTF-8: the copy holds the values decoded, and UTF-8 writes every one of them.
    """
    value = source.get("SpecificCharacterSet")
    if value is None:
        return None
    terms = [str(v or "") for v in value] if isinstance(value, MultiValue) else [str(value)]
    fixed = ["ISO 2022 IR 6", *terms[1:]] if len(terms) > 1 and not terms[0] else terms
    known = {member.value for member in SpecificCharacterSetValues}
    if not all(term in known for term in fixed):
        return UTF8
    if fixed == terms:
        return None
    return fixed


def _parses(value: Any, parser: Callable[[str], Any]) -> bool:
    """True when every value of a DA, TM or DT element parses (an empty one does)."""
    values = list(value) if isinstance(value, MultiValue) else [value]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for one in values:
            if one in (None, ""):
                continue
            try:
                parser(str(one))
            except (ValueError, TypeError, OverflowError):
                return False
    return True


_CREATION_TIMES = (
    ("ContentDate", "ContentTime"),
    ("InstanceCreationDate", "InstanceCreationTime"),
    ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"),
)
_OFFSET = re.compile(r"^([+-])(\d{2})(\d{2})$")


def stamp_in_source_zone(
    made: pydicom.Dataset, source: pydicom.Dataset, now: datetime | None = None
) -> None:
    """Write ``made``'s creation dates and times in the source's time zone, when it names one.

    A source with Timezone Offset From UTC (``+0100``) has its dates and times in that
    zone, and the copied Study Date and Time stay so: the result gets the same offset,
    and the moments it was made are written in it. Without one, DICOM times are local
    time: the node's clock (set ``TZ`` to the hospital's zone where the node runs in a
    container).
    """
    offset = _offset(source.get("TimezoneOffsetFromUTC"))
    if offset is None:
        return
    moment = (now or datetime.now(UTC)).astimezone(timezone(offset))
    for date_keyword, time_keyword in _CREATION_TIMES:
        if date_keyword in made:
            setattr(made, date_keyword, moment.strftime("%Y%m%d"))
            setattr(made, time_keyword, moment.strftime("%H%M%S.%f"))
    made.TimezoneOffsetFromUTC = str(source.TimezoneOffsetFromUTC).strip()


def _offset(value: object) -> timedelta | None:
    match = _OFFSET.match(str(value or "").strip())
    if match is None:
        return None
    sign = -1 if match.group(1) == "-" else 1
    hours, minutes = int(match.group(2)), int(match.group(3))
    if hours > 14 or minutes > 59:
        return None
    return sign * timedelta(hours=hours, minutes=minutes)
