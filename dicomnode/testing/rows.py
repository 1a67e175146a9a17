"""Database rows of received images, written directly (tests of what reads them: the
scheduler, status, retention, history), with defaults for every column a test does not care
about."""

from __future__ import annotations

from typing import Any

from dicomnode.db.schema import Instance
from dicomnode.db.session import utcnow

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
EXPLICIT_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


def instance_row(sop_instance_uid: str, association_id: str, **columns: Any) -> Instance:
    """The row of a DX image ``sop_instance_uid`` received over ``association_id`` just now,
    of study ``1.2.3`` (series ``1.2.3.1``), a 1-byte file that is nowhere; ``columns``
    override any of that."""
    values: dict[str, Any] = {
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.1",
        "sop_class_uid": DX_STORAGE,
        "transfer_syntax_uid": EXPLICIT_LITTLE_ENDIAN,
        "path": f"/nowhere/{sop_instance_uid}.dcm",
        "size": 1,
        "calling_ae": "MOD",
        "received_at": utcnow(),
    }
    values.update(columns)
    return Instance(sop_instance_uid=sop_instance_uid, association_id=association_id, **values)
