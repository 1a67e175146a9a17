"""Encode the node's own rejection note (IHE IOCM): a Key Object Selection document that
withdraws result objects made from images the PACS rejected.

Its Document Title is the title of the rejection note that the node received ("Rejected for
Patient Safety Reasons", ...), so an archive that supports IOCM hides the objects it lists as
it hid the images; its Key Object Description says why, and the node is its device observer.
"""

from __future__ import annotations

from collections.abc import Sequence

import pydicom
from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from highdicom.sr import DeviceObserverIdentifyingAttributes, ObserverContext
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicomnode.encode.sc import series_description
from dicomnode.errors import EncodeError
from dicomnode.uids import derived_uid
from dicomnode.values import REJECTION_TITLES, ModelIdentity, Placement


def encode_ko(
    objects: Sequence[pydicom.Dataset],
    code: str,
    placement: Placement,
    model: ModelIdentity,
    *,
    uid_root: str,
    description: str,
) -> pydicom.Dataset:
    """Encode a rejection note listing ``objects`` (headers of the node's result objects, all
    of one study) under the title of DCM ``code`` (a key of
    :data:`~dicomnode.values.REJECTION_TITLES`).

    ``model``: the model whose results they are (the series description names it);
    ``description``: the Key Object Description (why; at most 1024 characters).

    Raises :class:`EncodeError` for no objects, an unknown title, or what highdicom refuses.
    """
    if not objects:
        raise EncodeError("a rejection note needs at least one object to reject")
    if code not in REJECTION_TITLES:
        raise EncodeError(f"{code} is not the title of a rejection note")
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=derived_uid(uid_root, "device", placement.manufacturer),
            name=placement.manufacturer[:64],
            manufacturer_name=placement.manufacturer[:64],
            model_name=placement.manufacturer[:64],
        ),
    )
    try:
        content = KeyObjectSelection(
            document_title=Code(code, "DCM", REJECTION_TITLES[code]),
            referenced_objects=list(objects),
            observer_device_context=observer,
            description=description[:1024],
        )
        return KeyObjectSelectionDocument(
            evidence=list(objects),
            content=content,
            series_instance_uid=placement.series_uid,
            series_number=placement.series_number,
            sop_instance_uid=placement.sop_uid,
            instance_number=placement.instance_number,
            manufacturer=placement.manufacturer,
            series_description=series_description("AI rejection note", model),
            software_versions=placement.software_version,
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise EncodeError(f"cannot encode the rejection note: {exc}") from exc
