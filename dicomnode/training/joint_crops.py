"""Knee-joint crops of whole radiographs, labelled per side (``label-export --joints``).

A knee model grades a joint-centred crop (``knee-kl``'s training crops are), but a hospital
holds whole films, often both knees on one, and a grade per knee in its sheet (a row per
accession number and ``laterality``). :func:`crop_joints` finds each film's joints with a
model's knee localiser, exactly as the node does (the same decoding, the same boxes, the
same side: the knee on the viewer's left is the right one unless Patient Orientation says
the film is mirrored), and takes each joint whose side has a row: the row of that side, or
on a film of one joint, a row without a side. A joint the localiser is unsure of (the reasons
the SR gives), or one without a side (a lateral or turned film), is left out and counted.

Each crop is written as a 16-bit grey PNG, ``<patient>_<SOP Instance UID>_<side>.png`` under
``<out>/<label>/``, where ``<patient>`` is the hash of the Patient ID that
``group_by: patient_id`` uses: ``group_pattern: ^(?P<group>patient-[0-9a-f]+)_`` keeps a
patient's films and knees in one fold. The pixels are the node's (its window, its
orientation), so a model trained on them sees what the node will give it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from dicomnode.errors import ImagingError, ModelError
from dicomnode.imaging.pixels import read_image_file
from dicomnode.models.card import load_card
from dicomnode.models.localise import Joint, KneeLocaliser, crop_region
from dicomnode.training.labelled import (
    Export,
    Labelled,
    LabelRow,
    LabelSheet,
    Matched,
    Shown,
    refuse_full,
    rows_by_key,
    unused_lines,
    write_manifest,
)
from dicomnode.values import FloatArray

CROP_GROUP_PATTERN = r"^(?P<group>patient-[0-9a-f]+)_"
"""The ``group_pattern`` of a folder of crops: the patient part of their names."""

Keep = Callable[[Labelled, FloatArray], None]


def model_localiser(model_dir: Path) -> KneeLocaliser:
    """The knee localiser of the model in ``model_dir`` (its sha256 checked).

    Raises
    ------
    ModelError
        When the card has none.
    """
    from dicomnode.inference import load_localiser

    localiser = load_localiser(model_dir, load_card(model_dir))
    if localiser is None:
        raise ModelError(
            f"{model_dir} has no knee localiser (its card's preprocessing.localiser is none): "
            "--joints needs a knee model's, such as models/knee-kl"
        )
    return localiser


def crop_joints(
    sheet: LabelSheet,
    export: Export,
    localiser: KneeLocaliser,
    keep: Keep,
    shown: Shown = iter,
) -> Matched:
    """Each joint of each film the sheet names, with its side's label, given to ``keep``
    with its crop; what matched and what did not (``shown``: see :data:`Shown`)."""
    by_key = rows_by_key(sheet)
    images: list[Labelled] = []
    used: set[int] = set()
    left_out: Counter[str] = Counter()
    unmatched = 0
    for file in shown(export.files):
        rows = by_key.get(file.key(sheet.key), [])
        if not rows:
            unmatched += 1
            continue
        try:
            image = read_image_file(export.root / file.path)
        except ImagingError as exc:  # its header was read; its pixels are not usable
            left_out[f"a film whose pixels cannot be used ({str(exc).split(' (')[0]})"] += 1
            continue
        joints = localiser.locate(image)
        if not joints:
            left_out["a film on which no knee joint was found"] += 1
        for joint in joints:
            row, reason = _row_of(joint, rows, len(joints))
            if row is None:
                left_out[reason] += 1
                continue
            side = joint.laterality or ""
            name = f"{file.patient or 'no-patient-id'}_{file.key('sop_instance_uid')}_{side}.png"
            crop = Labelled(file, row.label, row.line, name, joint)
            keep(crop, crop_region(image.pixels, joint.region))
            images.append(crop)
            used.add(row.line)
    return Matched(
        tuple(images),
        unused_lines(sheet, used),
        unmatched,
        left_out=tuple(sorted(left_out.items())),
    )


def _row_of(joint: Joint, rows: list[LabelRow], joints: int) -> tuple[LabelRow | None, str]:
    """The row that grades ``joint``, or why none does."""
    if joint.uncertain:
        why = "; ".join(reason.split(" (")[0] for reason in joint.reasons)  # no figures
        return None, f"a joint the localiser is unsure of ({why})"
    if joint.laterality is None:
        return None, "a joint without a side (a lateral or turned film)"
    sided = [row for row in rows if row.laterality == joint.laterality]
    if sided:
        return sided[0], ""  # one label a key and side: the sheet refuses two
    whole = [row for row in rows if not row.laterality]
    if whole and joints == 1:
        return whole[0], ""
    return None, "a joint whose side has no row (a row of the film grades it only alone)"


def write_joint_crops(
    sheet: LabelSheet, export: Export, model_dir: Path, out: Path | None, shown: Shown = iter
) -> Matched:
    """The joints of the films of ``export``, found by the localiser of the model in
    ``model_dir``, cropped into ``out`` with the manifest (None: counted, nothing written).

    Raises
    ------
    ConfigError
        When ``out`` holds anything.
    ModelError
        When the model has no knee localiser.
    """
    localiser = model_localiser(model_dir)
    if out is None:
        return crop_joints(sheet, export, localiser, lambda _image, _pixels: None, shown)
    refuse_full(out)
    matched = crop_joints(sheet, export, localiser, png_writer(out), shown)
    write_manifest(matched, out)
    return matched


CROP_LEVELS = 65535
"""The crops' grey levels (16-bit PNG): a film's 10 to 16 stored bits, windowed, lose nothing
a model could see (8 bits would round the node's pixels to steps of 1/255)."""


def png_writer(out: Path) -> Keep:
    """Write each crop as a 16-bit grey PNG under ``out/<label>/``."""

    def write(image: Labelled, pixels: FloatArray) -> None:
        target = out / str(image.label) / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        grey = np.rint(np.clip(pixels, 0.0, 1.0) * CROP_LEVELS).astype(np.uint16)
        Image.fromarray(grey).save(target)

    return write
