"""The ``dicomnode phantoms`` command (wired into :mod:`dicomnode.cli` by the lead)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dicomnode.errors import ConfigError
from dicomnode.training.phantoms.dataset import FORMATS, write_phantom_folder

__all__ = ["phantoms_command"]


def phantoms_command(
    out: Path, body_part: str, count: int, seed: int, size: int, formats: Sequence[str]
) -> Path:
    """Write a labelled folder of synthetic hand or spine radiographs with lesion masks.

    ``dicomnode phantoms --body-part hand|spine --count N --seed S --size 512
    --format dcm|png --out DIR`` (``--format`` repeatable; DICOM DX by default). The folder has
    ``0/`` (normal) and ``1/`` (abnormal) images named
    ``P<patient>_<index>``, ``masks/`` with the lesion mask of each abnormal
    image, and ``phantoms.csv`` (``id,label,body_part,view,laterality,lesion,mask``).
    Train on it with ``group_pattern: '^(?P<group>P\\d{6})_\\d+$'`` so that
    both images of a synthetic patient stay in one fold.

    Parameters
    ----------
    out:
        Output folder (created if missing).
    body_part:
        ``hand`` or ``spine`` (any case).
    count:
        Number of images, at least 1 (two per synthetic patient).
    seed:
        The same seed writes the same folder.
    size:
        Rows = columns of each image, 64 to 4096.
    formats:
        ``dcm`` and/or ``png``; empty means ``dcm`` (DICOM DX).

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    ConfigError
        If an argument is invalid.
    """
    chosen = tuple(f.strip().lower().lstrip(".") for f in formats) or ("dcm",)
    unknown = sorted(set(chosen) - set(FORMATS))
    if unknown:
        raise ConfigError(f"unknown format(s) {', '.join(unknown)}; use png and/or dcm")
    return write_phantom_folder(
        Path(out),
        body_part=body_part.strip().upper(),
        count=count,
        seed=seed,
        size=size,
        formats=chosen,
    )
