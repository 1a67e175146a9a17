"""The source header as the encoders copy it into the results.

Archives hold headers that do not conform: a birth date of ``00000000`` or
``1965-01-01``, a study time of ``25:00``, a Patient's Sex of ``female``.
highdicom refuses to copy such values, and a PACS may refuse objects that
carry them. The results copy a cleaned header instead: a date, time or
date-time that does not parse is emptied (an ACR-NEMA ``1965.01.01`` becomes
``19650101``), and so is a Patient's Sex other than M, F or O (``f``, ``MALE``,
``FEMALE`` and ``OTHER`` become their letters). Several values in a single-valued
text attribute (``Doe\\John``) are joined by a space, and an attribute written with
another VR than the standard's (a Study Date as LO) gets the standard's. A
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
from highdicom.valuerep import _check_specific_character_set as check_character_set
from pydicom.charset import _encode_string_impl as encode_with
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import DA, DT, TM

log = logging.getLogger(__name__)

_PARSERS: dict[str, Callable[[str], Any]] = {"DA": DA, "TM": TM, "DT": DT}
_SEXES = frozenset({"M", "F", "O"})
_SEX_WORDS = {"MALE": "M", "FEMALE": "F", "OTHER": "O"}


def conformant_header(source: pydicom.Dataset, present: Iterable[str] = ()) -> pydicom.Dataset:
    """``source``, or a copy of it with its non-conformant values fixed (see the module).

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
    for tag, element in fixes.items():
        if element is None:
            del fixed[tag]
        else:
            fixed[tag] = element
    for keyword in missing:
        setattr(fixed, keyword, None)
    cleaned = sorted(
        pydicom.datadict.keyword_for_tag(t) or str(t) for t in fixes if t != CHARACTER_SET
    )
    if cleaned:  # a character set written another way is no fault of the source's
        log.warning(
            "sop=%s: non-conformant %s cleaned in the results' copy of the header",
            source.get("SOPInstanceUID", ""),
            ", ".join(cleaned),
        )
    return fixed


def _fixes(source: pydicom.Dataset) -> dict[BaseTag, DataElement | None]:
    """The top-level elements to replace, as their replacements (None: removed)."""
    fixes: dict[BaseTag, DataElement | None] = {}
    for element in source:
        if element.tag.is_private or element.VR == "SQ" or element.tag == CHARACTER_SET:
            continue
        vr = _dictionary_vr(element.tag) or element.VR
        if element.VR not in _STRINGS or vr not in _STRINGS:
            vr = element.VR  # only text changes VR as it is: bytes or numbers would not fit
        value = _cleaned(element.tag, vr, element.value)
        if vr != element.VR or value is not element.value:
            fixes[element.tag] = DataElement(element.tag, vr, value)
    if CHARACTER_SET in source:
        charsets = _character_sets(source)
        if charsets is not _KEEP:
            fixes[CHARACTER_SET] = (
                None if charsets is None else DataElement(CHARACTER_SET, "CS", charsets)
            )
    return fixes


def _dictionary_vr(tag: BaseTag) -> str | None:
    """The standard's VR of ``tag`` (a source may write a date as LO), None when it has
    none or several."""
    try:
        vr = pydicom.datadict.dictionary_VR(tag)
    except KeyError:
        return None
    return None if " or " in vr else vr


def _single_valued(tag: BaseTag) -> bool:
    try:
        return bool(pydicom.datadict.dictionary_VM(tag) == "1")
    except KeyError:
        return False


def _cleaned(tag: BaseTag, vr: str, value: Any) -> Any:
    """``value`` itself when conformant, else its fixed value (None: emptied)."""
    if isinstance(value, MultiValue) and len(value) > 1 and _single_valued(tag) and vr in _TEXT:
        value = " ".join(str(one).strip() for one in value if str(one).strip())  # "Doe\John"
    if vr == "DA" and isinstance(value, str) and _DOTTED_DATE.match(value.strip()):
        value = value.strip().replace(".", "")  # ACR-NEMA 1965.01.01
    if vr in _PARSERS and not _parses(value, _PARSERS[vr]):
        return None
    if tag == _SEX_TAG and value not in (None, ""):
        sex = str(value).strip().upper()
        fixed = sex if sex in _SEXES else _SEX_WORDS.get(sex)
        return value if fixed == value else fixed
    return value


_WORDS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
"""The VRs whose text Specific Character Set decides."""
_TEXT = _WORDS | frozenset({"AE", "CS"})
_STRINGS = _TEXT | frozenset({"AS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"})
_KEEP = "keep"
_DOTTED_DATE = re.compile(r"^\d{4}\.\d{2}\.\d{2}$")
_SEX_TAG = pydicom.tag.Tag("PatientSex")
CHARACTER_SET = pydicom.tag.Tag("SpecificCharacterSet")
UTF8 = "ISO_IR 192"


def _character_sets(source: pydicom.Dataset) -> list[str] | str | None:
    """The Specific Character Set the results' copy needs: :data:`_KEEP` the source's,
    None for none (the default repertoire, ``ISO_IR 6`` or empty, which highdicom refuses
    to see written), or the terms to write.

    An empty first value (``\\ISO 2022 IR 87``, as Japanese and Korean systems write it)
    means ISO 2022 IR 6 (PS3.3 C.12.1.1.2), which highdicom wants written out. Terms
    highdicom refuses (Korean ``ISO 2022 IR 149``, which it misspells; a single code
    extension; ``\\ISO 2022 IR 58``, which it does not count as one) become UTF-8: the copy
    holds the values decoded, and UTF-8 writes every one of them.
    """
    value = source.get("SpecificCharacterSet")
    terms = [str(v or "") for v in value] if isinstance(value, MultiValue) else [str(value or "")]
    if all(term in _DEFAULT_REPERTOIRE for term in terms):
        return None
    fixed = ["ISO 2022 IR 6", *terms[1:]] if len(terms) > 1 and not terms[0] else terms
    try:
        check_character_set(fixed if len(fixed) > 1 else fixed[0])
    except (ValueError, TypeError):
        return UTF8
    return _KEEP if fixed == terms else fixed


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


_DEFAULT_REPERTOIRE = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})


def fit_character_set(made: pydicom.Dataset) -> pydicom.Dataset:
    """``made`` (an SC or SR), its Specific Character Set turned to UTF-8 when the one it
    copied from the source cannot write all of its text.

    The results hold the node's own words too (``node.institution_name``, a model's
    reader note and class meanings): a German institution name under the default
    repertoire, or a "≥" under Latin-1, would be written as "?" or as invalid bytes.
    The values are text already, so only the declared set changes.
    """
    declared = made.get("SpecificCharacterSet") or ""
    terms = [str(v or "") for v in declared] if isinstance(declared, MultiValue) else [declared]
    if terms == [UTF8]:
        return made
    codecs = [
        "ascii" if term in _DEFAULT_REPERTOIRE else convert_encodings([term])[0] for term in terms
    ]
    if not all(_writes(text, codecs) for text in _texts(made)):
        made.SpecificCharacterSet = UTF8
    return made


def _texts(dataset: pydicom.Dataset) -> Iterable[str]:
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                yield from _texts(item)
        elif element.VR in _WORDS and element.value is not None:
            values = element.value if isinstance(element.value, MultiValue) else [element.value]
            yield from (str(value) for value in values)


def _writes(text: str, codecs: list[str]) -> bool:
    """True when every character of ``text`` is in one of ``codecs`` (code extensions
    switch between them within a value)."""
    return text.isascii() or all(
        any(_encodes(character, codec) for codec in codecs) for character in text
    )


def _encodes(character: str, codec: str) -> bool:
    """As pydicom writes it: its own encoders for the Japanese sets (``ISO_IR 13`` is JIS X
    0201 only, though Python's shift_jis codec has kanji too)."""
    try:
        encode_with(character, codec)
    except (UnicodeError, LookupError, ValueError):
        return False
    return True


_REQUEST_TYPE_2 = (
    "ReferencedStudySequence",
    "AccessionNumber",
    "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "RequestedProcedureCodeSequence",
)
_ACCESSION = ("AccessionNumber", "IssuerOfAccessionNumberSequence")
_REQUEST_COPIED = (
    *_REQUEST_TYPE_2,
    "IssuerOfAccessionNumberSequence",
    "ReasonForTheRequestedProcedure",
)


def referenced_requests(sources: Iterable[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The Referenced Request Sequence items of a report on ``sources`` (PS3.3 C.17.2).

    A report answers the orders its images were made for: one item per request in the
    sources' Request Attributes Sequences, and one per Accession Number of a source without
    them that no such request names already. Each item holds the study and the Type 2
    attributes, empty where the source has no value, so a RIS files the report under its
    order. Sources without either give no item: the report then answers no known request
    (the sequence is Type 1C).
    """
    cleaned = [conformant_header(source) for source in sources]  # "A\B" accession cleaned
    items: list[pydicom.Dataset] = []
    for source in cleaned:
        for request in source.get("RequestAttributesSequence") or []:
            _add_request(items, _request_item(source, conformant_header(request)))
    for source in cleaned:
        accession = str(source.get("AccessionNumber") or "").strip()
        if accession and not any(str(i.AccessionNumber or "") == accession for i in items):
            _add_request(items, _request_item(source, pydicom.Dataset()))
    return items


def _add_request(items: list[pydicom.Dataset], item: pydicom.Dataset) -> None:
    if _request_key(item) not in {_request_key(known) for known in items}:
        items.append(item)


def _request_key(item: pydicom.Dataset) -> tuple[str, str, str]:
    return (
        str(item.StudyInstanceUID),
        str(item.AccessionNumber or ""),
        str(item.RequestedProcedureID or ""),
    )


def _request_item(source: pydicom.Dataset, request: pydicom.Dataset) -> pydicom.Dataset:
    """The item of one request: its own values; the source's Accession Number (and its
    issuer) where the request names none, as most senders keep the accession at the top."""
    item = pydicom.Dataset()
    item.StudyInstanceUID = request.get("StudyInstanceUID") or source.StudyInstanceUID
    own_accession = bool(str(request.get("AccessionNumber") or "").strip())
    for keyword in _REQUEST_COPIED:
        value = request.get(keyword) or None
        if value is None and not own_accession and keyword in _ACCESSION:
            value = source.get(keyword) or None
        if value is not None or keyword in _REQUEST_TYPE_2:
            setattr(item, keyword, copy.deepcopy(value))
    return item
