"""UIDs the node creates, all under ``node.uid_root``.

They are derived deterministically (a hash of what the object is), so
processing or sending something again produces the same UIDs and a PACS never
receives a duplicate object. The parts are joined with a unit separator before
hashing, so that ("1.0.1", "11") and ("1.0.11", "1") name different objects.
"""

from __future__ import annotations

from pydicom.uid import generate_uid

_SEPARATOR = "\x1f"


def derived_uid(root: str, *parts: str) -> str:
    """A UID under ``root`` determined by ``parts``."""
    return str(generate_uid(prefix=root, entropy_srcs=[_SEPARATOR.join(["dicomnode", *parts])]))


def sc_series_uid(root: str, study_uid: str, model: str, version: str, side: str = "") -> str:
    """One overlay series per study, model version and side (series-level Laterality)."""
    return derived_uid(root, "sc-series", study_uid, model, version, side)


def sc_instance_uid(
    root: str, source_sop_uid: str, model: str, version: str, region: int = 0
) -> str:
    return derived_uid(root, "sc", source_sop_uid, model, version, str(region))


def pr_series_uid(root: str, study_uid: str, model: str, version: str, side: str = "") -> str:
    """One presentation state series per study, model version and side, as the overlays'."""
    return derived_uid(root, "pr-series", study_uid, model, version, side)


def pr_instance_uid(root: str, source_sop_uid: str, model: str, version: str) -> str:
    return derived_uid(root, "pr", source_sop_uid, model, version)


def sr_series_uid(root: str, study_uid: str, model: str, version: str) -> str:
    return derived_uid(root, "sr-series", study_uid, model, version)


def sr_instance_uid(root: str, study_uid: str, model: str, version: str, sequence: int) -> str:
    return derived_uid(root, "sr", study_uid, model, version, str(sequence))


def ko_series_uid(root: str, study_uid: str, model: str, version: str) -> str:
    """The series of the node's rejection notes of a study and model version."""
    return derived_uid(root, "ko-series", study_uid, model, version)


def ko_instance_uid(
    root: str, study_uid: str, model: str, version: str, sequence: int, code: str
) -> str:
    """The rejection note (of title ``code``) made by a round of a study's report."""
    return derived_uid(root, "ko", study_uid, model, version, str(sequence), code)


def transaction_uid(root: str) -> str:
    """A storage commitment request's Transaction UID: new for each request, never derived
    (a request made again, or for the same objects later, is another transaction)."""
    return str(generate_uid(prefix=root))
