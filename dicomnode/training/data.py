"""Labelled image folders, a decode-once cache, and the augmenting dataset.

Layout: ``<data_dir>/<class index>/<file>``, also in sub-folders of a class
folder (a PACS export's ``PATIENT/STUDY/SERIES/``). Each file is decoded once with
:func:`dicomnode.imaging.pixels.read_image_file` into one array file under
``cache_dir`` (keyed by a hash of the folder, the file list, the files' sizes and
modification times and the cached shape), so later epochs, folds and runs never
decode again; the :func:`pixel_digest` and :func:`~dicomnode.training.near.near_hash` of
every decoded image are kept beside it (``digests-<key>.json``, :func:`image_fingerprints`),
for the list of the images a model trained on (:mod:`dicomnode.training.fingerprint`). The
array is
``uint8`` when that holds the decoded pixels exactly (8-bit sources), else
``float32``. Images keep their size when every file of the folder has the same
one; a folder of several sizes (a hospital's, say) is cached at the model input
size, each image fitted by the recipe's ``preprocessing.resize`` exactly as the
node fits it (letterboxed images are not stretched in training).

Every sample reaches the model through :func:`dicomnode.imaging.tensor.to_input`,
the node's own path, so validation inputs are the numbers the node computes.
Augmentation acts before it, on the [0, 1] pixels, with torch ops.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import torch
import torch.nn.functional as F
from pydicom.errors import InvalidDicomError
from torch.utils.data import Dataset

from dicomnode.errors import ConfigError, ImagingError
from dicomnode.imaging.tensor import to_input
from dicomnode.models.card import InputSpec, PreprocessingSpec
from dicomnode.training.config import AugmentConfig
from dicomnode.training.folds import joined_groups
from dicomnode.training.masks import LesionMasks, has_masks, mask_rows
from dicomnode.training.near import (
    NEAR_COPY,
    NEAR_HASH,
    copy_limit,
    earlier_copies,
    near_hash,
    nearest_distinct,
    threshold_of,
)
from dicomnode.values import FloatArray, PreparedImage

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".webp", ".jpg", ".jpeg", ".dcm", ".dicom", ""})
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class LabelledImages:
    """The files of a labelled folder, in a stable order.

    ``paths[i]`` has class ``labels[i]`` and belongs to patient ``groups[i]``.
    """

    root: Path
    paths: tuple[Path, ...]
    labels: IntArray
    groups: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int]) -> LabelledImages:
        """The images at ``indices``, in that order."""
        index = np.asarray(indices, dtype=np.int64)
        return LabelledImages(
            self.root,
            tuple(self.paths[i] for i in indices),
            self.labels[index],
            tuple(self.groups[i] for i in indices),
        )

    def class_counts(self, num_classes: int) -> IntArray:
        counts: IntArray = np.bincount(self.labels, minlength=num_classes).astype(np.int64)
        return counts


def group_of(stem: str, pattern: str) -> str:
    """The patient (group) id of a file stem: the ``group`` match of ``pattern``."""
    match = re.match(pattern, stem)
    if match is None or not match.group("group"):
        raise ConfigError(f"file name {stem!r} does not match group_pattern {pattern!r}")
    return match.group("group")


def _class_files(folder: Path, root: Path) -> list[Path]:
    """The image files of a class folder and its sub-folders, sorted; others skipped, named.

    A PACS export nests its files (``PATIENT/STUDY/SERIES/``) and names them by UID
    or number. A file is taken by :func:`may_be_an_image`; hidden files and folders
    are ignored; DICOMDIRs, other files, links to folders (not followed) and broken
    links are skipped with a warning that names them. A taken file that is neither
    DICOM nor a picture (a ``README``) is named when the images are decoded.
    """
    files, links = walk_files(folder)
    skipped = [p for p in files if not may_be_an_image(p)]
    _warn_skipped(skipped, folder, root, "files that are not images (PNG, WebP, JPEG, DICOM)")
    _warn_skipped(links, folder, root, "links to folders (not followed) or broken links")
    left_out = set(skipped)
    return [p for p in files if p not in left_out]


def walk_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """Every file under ``folder`` (hidden ones aside), and the links not followed."""
    files: list[Path] = []
    links: list[Path] = []
    for current, folders, names in os.walk(folder):
        here = Path(current)
        kept = [d for d in sorted(folders) if not d.startswith(".")]
        links.extend(here / d for d in kept if (here / d).is_symlink())
        folders[:] = [d for d in kept if not (here / d).is_symlink()]
        for name in names:
            if name.startswith("."):
                continue
            path = here / name
            (files if path.is_file() else links).append(path)
    return sorted(files), sorted(links)


NUMBERED_SUFFIX = re.compile(r"\.\d+")
"""The last part of a name like ``1.2.826.0.1.3680043.8.498.17.320``: a UID, read as DICOM."""
DICOM_EXPORT_SUFFIXES = frozenset({".ima"})
"""Other suffixes of DICOM exports (Siemens ``.IMA``)."""


def may_be_an_image(path: Path) -> bool:
    """Taken by its suffix (:data:`IMAGE_SUFFIXES`, a number, :data:`DICOM_EXPORT_SUFFIXES`)
    or the ``DICM`` marker; never a ``DICOMDIR``."""
    from dicomnode.imaging.pixels import has_dicom_marker

    if path.name.upper() == "DICOMDIR":
        return False
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES or suffix in DICOM_EXPORT_SUFFIXES:
        return True
    if NUMBERED_SUFFIX.fullmatch(suffix):
        return True
    try:
        return has_dicom_marker(path)
    except OSError:
        return True  # unreadable: named with the reason when the images are decoded


def _warn_skipped(paths: Sequence[Path], folder: Path, root: Path, what: str) -> None:
    if paths:
        logger.warning(
            "skipped %d %s under %s: %s",
            len(paths),
            what,
            _relative(folder, root),
            listed([_relative(p, root) for p in paths]),
        )


def listed(items: Sequence[str]) -> str:
    """The first :data:`MAX_LISTED` of ``items`` joined by ``; ``, and how many more."""
    more = f"; and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return "; ".join(items[:MAX_LISTED]) + more


MASK_FOLDER = "masks"
"""The folder of lesion masks beside the class folders (``dicomnode phantoms`` writes it)."""


def _unexpected_folders(data_dir: Path, num_classes: int) -> list[str]:
    """Folders of ``data_dir`` that are neither class folders ``0..k-1`` nor hold masks.

    Hidden folders are ignored; the mask folders are :data:`MASK_FOLDER` and the
    top folders of the masks its :data:`~dicomnode.training.masks.MASKS_FILE` names.
    """
    expected = {str(index) for index in range(num_classes)} | {MASK_FOLDER}
    if has_masks(data_dir):
        expected |= {Path(row["mask"]).parts[0] for row in mask_rows(data_dir)}
    return sorted(
        p.name
        for p in data_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in expected
    )


def patient_group(path: Path) -> str:
    """The patient (group) id of a DICOM file: a hash of its Patient ID.

    Groups stay in memory (fold assignment); the hash keeps the ID itself out of
    anything printed about them. Files without the DICOM preamble are read as the
    node reads them.

    Raises
    ------
    ConfigError
        When the file is not DICOM or has no Patient ID.
    """
    try:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
        except InvalidDicomError:
            header = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["PatientID"], force=True
            )
        patient = str(header.get("PatientID", "") or "").strip()
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"{path}: not a DICOM file ({exc})") from exc
    if not patient:
        raise ConfigError(f"{path}: no DICOM Patient ID (not DICOM, or its header has none)")
    return hashed(patient)


def hashed(patient_id: str) -> str:
    """The group of a Patient ID: ``patient-`` and 16 hex digits of its sha256."""
    return "patient-" + hashlib.sha256(patient_id.encode("utf-8")).hexdigest()[:16]


SINGLETON_WARNING = 20
"""A training folder of at least this many files, each its own patient, is warned about."""


def warn_if_each_file_is_a_patient(images: LabelledImages, group_by: str) -> bool:
    """Log a warning (and return True) when every file of a large folder is its own patient.

    Then no fold can keep a patient's images together: a folder named by UID
    or accession number with ``group_by: filename`` looks like this.
    """
    if group_by != "filename" or len(images) < SINGLETON_WARNING:
        return False  # one image per Patient ID is a fact, not a naming problem
    if len(set(images.groups)) < len(images):
        return False
    logger.warning(
        "each of the %d files is a patient of its own (group_by: filename): if patients have "
        "several images, name the files so that group_pattern finds the patient, or use "
        "DICOM files with group_by: patient_id, else the folds mix a patient's images",
        len(images),
    )
    return True


def warn_of_repeated_images(
    images: LabelledImages, found: Fingerprints, assignment: IntArray | None = None
) -> int:
    """Log a warning when files of the folder hold the same image (their
    :func:`pixel_digest`), and another when they hold near copies of one image (a lossy
    copy, a resize or another window: :attr:`Fingerprints.repeats`), filed under two
    labels (the labels disagree) or for two patients (with the folds' ``assignment``: how
    many the split put in another fold than their copy, where a fold's figures count an
    image its model trained on). Returns how many files repeat another's image."""
    same = _Repeats(images, assignment, "the same image as")
    near = _Repeats(
        images, assignment, "a near copy of the image of", f" ({NEAR_COPY}: check them)"
    )
    for index, earlier, exact in found.repeats:
        (same if exact else near).add(index, earlier)
    return same.warn() + near.warn()


def split_groups(images: LabelledImages, found: Fingerprints, group_copies: bool) -> Sequence[str]:
    """The groups the split keeps in one fold: each file's patient, and with
    ``group_copies`` the patients of files that hold one image joined
    (:attr:`Fingerprints.repeats`, :func:`~dicomnode.training.folds.joined_groups`)."""
    if not group_copies:
        return images.groups
    return joined_groups(images.groups, [(index, earlier) for index, earlier, _ in found.repeats])


@dataclass
class _Repeats:
    """Files that repeat another's image in one way (:func:`warn_of_repeated_images`)."""

    images: LabelledImages
    assignment: IntArray | None
    hold: str
    how: str = ""
    relabelled: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)
    split: int = 0

    def add(self, index: int, earlier: int) -> None:
        images, assignment = self.images, self.assignment
        one, other = (_relative(images.paths[i], images.root) for i in (index, earlier))
        pair = f"{one} = {other}"
        if images.labels[index] != images.labels[earlier]:
            self.relabelled.append(pair)
        elif images.groups[index] != images.groups[earlier]:
            self.elsewhere.append(pair)
            self.split += int(assignment is not None and assignment[index] != assignment[earlier])

    def warn(self) -> int:
        if self.relabelled:
            logger.warning(
                "%d files hold %s another file of another class%s (their labels disagree; "
                "keep one): %s",
                len(self.relabelled),
                self.hold,
                self.how,
                listed(self.relabelled),
            )
        if self.elsewhere:
            hint = " (group_copies: true keeps each in one fold with its copy)"
            folds = (
                f"; {self.split} of them in another fold than their copy, whose figures then "
                f"count an image its model trained on{hint if self.split else ''}"
                if self.assignment is not None
                else ""
            )
            logger.warning(
                "%d files hold %s another patient's file%s (the folds may split them; keep "
                "one): %s%s",
                len(self.elsewhere),
                self.hold,
                self.how,
                listed(self.elsewhere),
                folds,
            )
        return len(self.relabelled) + len(self.elsewhere)


def warn_if_one_patient_dominates(images: LabelledImages, folds: int) -> bool:
    """Log a warning (and return True) when one patient holds more than a fold's share.

    The fold that holds that patient is then larger than the others, and the
    rest of the folds smaller: an anonymised export that gave every file the same
    Patient ID (``ANONYMOUS``), or a file-name pattern that matched too little,
    looks like this.
    """
    if folds < 2 or not len(images):
        return False
    largest = max(Counter(images.groups).values())
    if largest <= len(images) / folds:
        return False
    logger.warning(
        "one patient holds %d of the %d images, more than a fold's share (%d): the folds "
        "cannot be balanced. An anonymised export that gives every file the same Patient ID, "
        "or a group_pattern that matches too little of the file names, looks like this",
        largest,
        len(images),
        len(images) // folds,
    )
    return True


def scan_folder(
    data_dir: Path,
    num_classes: int,
    group_pattern: str,
    group_by: str = "filename",
    *,
    every_class: bool = True,
) -> LabelledImages:
    """List ``data_dir/<0..num_classes-1>/`` image files (:func:`_class_files`).

    Each file's patient (group) comes from its name (``group_pattern``) or, with
    ``group_by="patient_id"``, from its DICOM Patient ID (:func:`patient_group`).

    Raises
    ------
    ConfigError
        When ``data_dir`` has a folder that is not a class folder (``00``,
        ``extra``, a class index the classes do not reach; mask folders and
        hidden ones aside), when it has no image at all or, with
        ``every_class`` (training: a class without images cannot be learned),
        when a class folder is missing or empty; without it (evaluation) such a
        class is warned about and left out of the figures.
    """
    if not data_dir.is_dir():
        raise ConfigError(f"data_dir {data_dir} is not a directory")
    unexpected = _unexpected_folders(data_dir, num_classes)
    if unexpected:
        raise ConfigError(
            f"{data_dir} has folders that are not class folders 0..{num_classes - 1}: "
            f"{', '.join(unexpected)} (each class folder is named by its class index; "
            "move the others out of data_dir)"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for index in range(num_classes):
        folder = data_dir / str(index)
        files = _class_files(folder, data_dir) if folder.is_dir() else []
        if not files:
            _absent_class(folder, index, every_class=every_class)
        paths.extend(files)
        labels.extend([index] * len(files))
    if not paths:
        raise ConfigError(f"{data_dir} has no images in class folders 0..{num_classes - 1}")
    groups = (
        _patient_groups(paths, data_dir)
        if group_by == "patient_id"
        else tuple(group_of(p.stem, group_pattern) for p in paths)
    )
    return LabelledImages(data_dir, tuple(paths), np.asarray(labels, dtype=np.int64), groups)


def _patient_groups(paths: Sequence[Path], root: Path) -> tuple[str, ...]:
    """Every file's :func:`patient_group`; one error names every file that has none."""
    groups: list[str] = []
    unusable: list[str] = []
    for path in paths:
        try:
            groups.append(patient_group(path))
        except ConfigError as exc:
            unusable.append(str(exc).replace(str(path), _relative(path, root), 1))
    if unusable:
        purpose = "grouped by patient (group_by: patient_id)"
        raise ConfigError(unusable_message(unusable, len(paths), root, purpose))
    return tuple(groups)


def _absent_class(folder: Path, index: int, *, every_class: bool) -> None:
    """Refuse (``every_class``) or warn about a class folder that is missing or empty."""
    if every_class:
        raise ConfigError(
            f"class folder {folder} is missing or has no images: a class without images "
            "cannot be learned"
        )
    logger.warning(
        "class folder %s is missing or has no images: class %d is left out of the figures",
        folder,
        index,
    )


def cache_key(
    images: LabelledImages, shape: tuple[int, int] | None = None, resize: str | None = None
) -> str:
    """Hash of the folder, its relative file list, the files' sizes and modification times,
    the cached shape and how images were fitted: another folder, or a file changed in
    place, is decoded again.

    ``shape`` is ``None`` for what does not depend on it (the pixel digests); ``resize``
    is ``None`` when the images keep their native size (every recipe reading them shares
    the cache), else the mode that fitted them.
    """
    digest = hashlib.sha256(str(images.root.resolve()).encode())
    for path in images.paths:
        relative = path.relative_to(images.root).as_posix()
        stat = path.stat()
        digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    if shape is not None:
        digest.update(f"shape={shape}".encode())
    if resize is not None:
        digest.update(f" resize={resize}".encode())
    return digest.hexdigest()[:24]


PIXEL_DIGEST = (
    "sha256 of the decoded pixels (rows and columns, then every pixel rounded to 1/65535 "
    "as little-endian uint16), first 16 hex digits"
)
"""What :func:`pixel_digest` hashes: the same image is the same digest whatever file holds
it (a copy, another name, a lossless re-encoding, a 16-bit PNG of the node's pixels)."""


def pixel_digest(pixels: FloatArray) -> str:
    """The :data:`PIXEL_DIGEST` of decoded [0, 1] pixels."""
    levels = np.rint(np.clip(pixels, 0.0, 1.0) * 65535.0).astype("<u2")
    digest = hashlib.sha256(f"{levels.shape[0]}x{levels.shape[1]}\n".encode())
    digest.update(levels.tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Fingerprints:
    """Each image's :func:`pixel_digest` and :func:`~dicomnode.training.near.near_hash`,
    in the order of its :class:`LabelledImages`."""

    digests: tuple[str, ...]
    near: tuple[str, ...]

    @classmethod
    def of(cls, pixels: Sequence[FloatArray]) -> Fingerprints:
        return cls(tuple(map(pixel_digest, pixels)), tuple(map(near_hash, pixels)))

    @cached_property
    def _nearest(self) -> npt.NDArray[np.int64]:
        """:func:`~dicomnode.training.near.nearest_distinct`, computed once."""
        return nearest_distinct(self.near)

    @cached_property
    def near_threshold(self) -> int:
        """:func:`~dicomnode.training.near.threshold_of` these images, computed once (a run
        writes a list per fold of one folder)."""
        return threshold_of(self._nearest)

    @cached_property
    def repeats(self) -> tuple[tuple[int, int, bool], ...]:
        """(image, the earlier image it repeats, whether by the same pixels) for each image
        that repeats an earlier one: the first with the same :func:`pixel_digest`, else the
        nearest earlier near copy (:func:`~dicomnode.training.near.earlier_copies` under the
        folder's :func:`~dicomnode.training.near.copy_limit`)."""
        copies = earlier_copies(self.near, copy_limit(self._nearest))
        first: dict[str, int] = {}
        found: list[tuple[int, int, bool]] = []
        for index, digest in enumerate(self.digests):
            earlier = first.setdefault(digest, index)
            if earlier != index:
                found.append((index, earlier, True))
            elif copies[index] >= 0:
                found.append((index, int(copies[index]), False))
        return tuple(found)


def image_fingerprints(
    images: LabelledImages,
    cache_dir: Path | None = None,
    purpose: str = "hashed (fix or remove them)",
) -> Fingerprints:
    """:class:`Fingerprints` of every file of ``images``, in order; kept in ``cache_dir``
    (``digests-<key>.json``, written with the pixel cache) so a folder is decoded once.

    Raises
    ------
    ConfigError
        Naming every file that cannot be decoded (they "cannot be ``purpose``").
    """
    path = None if cache_dir is None else cache_dir / f"digests-{cache_key(images)}.json"
    kept = _read_fingerprints(path)
    if kept is not None:
        return kept
    logger.info("hashing the pixels of %d images", len(images))
    digests: list[str] = []
    near: list[str] = []
    unusable: list[str] = []
    for file in images.paths:
        try:
            pixels = _decode(file, images.root)
        except ConfigError as exc:
            unusable.append(str(exc))
            continue
        digests.append(pixel_digest(pixels))
        near.append(near_hash(pixels))
    if unusable:
        raise ConfigError(unusable_message(unusable, len(images), images.root, purpose))
    found = Fingerprints(tuple(digests), tuple(near))
    if path is not None:
        _write_fingerprints(path, found)
    return found


def _read_fingerprints(path: Path | None) -> Fingerprints | None:
    """The kept fingerprints, or None (none kept, or kept before the near hashes were)."""
    if path is None or not path.is_file():
        return None
    kept = json.loads(path.read_text(encoding="utf-8"))
    if kept.get("near_hash") != NEAR_HASH:
        return None
    return Fingerprints(tuple(kept["digests"]), tuple(kept["near"]))


def _write_fingerprints(path: Path, found: Fingerprints) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    kept = {
        "digest": PIXEL_DIGEST,
        "digests": list(found.digests),
        "near_hash": NEAR_HASH,
        "near": list(found.near),
    }
    temporary.write_text(json.dumps(kept), encoding="utf-8")
    temporary.replace(path)


MAX_LISTED = 10
"""The most unusable files one error names."""


def read_labelled(path: Path, root: Path | None = None) -> PreparedImage:
    """Decode one file of a training or evaluation folder; an unusable file is named in the error.

    Raises
    ------
    ConfigError
        When the file cannot be read or is not an image the node processes;
        the message gives its path (relative to ``root`` when given) and the reason.
    """
    from dicomnode.imaging.pixels import read_image_file

    try:
        return read_image_file(path)
    except ImagingError as exc:
        hint = "" if path.suffix else NO_SUFFIX_HINT
        raise ConfigError(f"{_relative(path, root)}: {exc}{hint}") from exc


NO_SUFFIX_HINT = (
    " (a file without a suffix is read as DICOM or a picture: move a README or other "
    "note out of the class folder)"
)


def _relative(path: Path, root: Path | None) -> str:
    if root is None:
        return str(path)
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _decode(path: Path, root: Path) -> FloatArray:
    return read_labelled(path, root).pixels


def _fit(pixels: FloatArray, shape: tuple[int, int], resize: str) -> FloatArray:
    """Resize to ``shape`` (the model input) as :func:`to_input` does with ``resize``."""
    if pixels.shape == shape:
        return pixels
    tensor, _ = to_input(pixels, shape, 1, (0.0,), (1.0,), resize)
    fitted: FloatArray = tensor[0].numpy()
    return fitted


def _exact_uint8(pixels: FloatArray) -> bool:
    quantised = np.rint(pixels * 255.0).astype(np.uint8)
    return bool(np.array_equal(quantised.astype(np.float32) / np.float32(255.0), pixels))


class PixelCache:
    """All images of a :class:`LabelledImages` as one (N, H, W) array on disk (memory-mapped).

    Use :meth:`build` to open or create it. ``pixels(i)`` returns float32 [0, 1].
    """

    def __init__(self, array: np.ndarray[tuple[int, int, int], np.dtype[np.generic]]) -> None:
        self.array = array

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def pixels(self, index: int) -> FloatArray:
        raw = np.asarray(self.array[index])
        if raw.dtype == np.uint8:
            scaled: FloatArray = raw.astype(np.float32) / np.float32(255.0)
            return scaled
        return raw.astype(np.float32, copy=False)

    @classmethod
    def build(
        cls,
        images: LabelledImages,
        cache_dir: Path,
        input_size: tuple[int, int],
        resize: str = "stretch",
    ) -> PixelCache:
        """Open the cache for ``images`` or decode every file once to create it.

        Images keep their native size when they all share one. Otherwise each
        is brought to ``input_size`` as :func:`to_input` does with ``resize``
        (the recipe's ``preprocessing.resize``), so that a letterboxed recipe
        trains on the letterboxed images the node feeds its model, not on
        stretched ones; :func:`to_input` then leaves them as they are.
        """
        native = _common_size(images)
        shape = native or input_size
        key = cache_key(images, shape, None if native else resize)
        for dtype in ("uint8", "float32"):
            path = cache_dir / f"pixels-{key}-{dtype}.npy"
            if path.is_file():
                logger.info("pixel cache hit", extra={"cache": str(path)})
                return cls(np.load(path, mmap_mode="r"))
        return cls(np.load(_write_cache(images, cache_dir, key, shape, resize), mmap_mode="r"))


def unusable_message(
    unusable: list[str],
    total: int,
    root: Path,
    purpose: str = "used for training (fix or remove them; nothing was cached)",
) -> str:
    """One error for every file of a folder that cannot be decoded (the first few named)."""
    return f"{len(unusable)} of {total} files in {root} cannot be {purpose}: {listed(unusable)}"


def _common_size(images: LabelledImages) -> tuple[int, int] | None:
    """The images' size when every file has the same one, else ``None``.

    Sizes come from the file headers (PIL for raster files, Rows and Columns
    for DICOM), so the decision costs no decoding and does not change between
    runs. A file whose header cannot be read counts as differing; decoding
    then names it when it is unusable.
    """
    sizes = {_header_size(path) for path in images.paths}
    return sizes.pop() if len(sizes) == 1 else None


def _header_size(path: Path) -> tuple[int, int] | None:
    """(rows, columns) of an image file from its header, or ``None`` when unreadable."""
    if path.suffix.lower() in (".png", ".webp", ".jpg", ".jpeg"):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                return (image.height, image.width)
        except (UnidentifiedImageError, OSError):
            return None
    from dicomnode.imaging.pixels import read_dicom

    try:
        header = read_dicom(path, stop_before_pixels=True)  # with or without the preamble
        return (int(header.Rows), int(header.Columns))
    except (ImagingError, AttributeError, TypeError, ValueError):
        return None


def _write_cache(
    images: LabelledImages, cache_dir: Path, key: str, shape: tuple[int, int], resize: str
) -> Path:
    """Decode every file into ``float32`` then keep ``uint8`` when that is exact; keep the
    decoded images' :class:`Fingerprints` beside it."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger.info("decoding %d images into the pixel cache", len(images))
    stack = np.empty((len(images), *shape), dtype=np.float32)
    unusable: list[str] = []
    digests: list[str] = []
    near: list[str] = []
    for i, path in enumerate(images.paths):
        try:
            decoded = _decode(path, images.root)
        except ConfigError as exc:
            unusable.append(str(exc))
            continue
        digests.append(pixel_digest(decoded))
        near.append(near_hash(decoded))
        pixels = _fit(decoded, shape, resize)
        if pixels.shape != shape:
            raise ConfigError(f"{path.name} has shape {pixels.shape}, the cache expects {shape}")
        stack[i] = pixels
    if unusable:
        raise ConfigError(unusable_message(unusable, len(images), images.root))
    exact = all(_exact_uint8(stack[i]) for i in range(len(stack)))
    dtype = "uint8" if exact else "float32"
    data = np.rint(stack * 255.0).astype(np.uint8) if exact else stack
    final = cache_dir / f"pixels-{key}-{dtype}.npy"
    temporary = final.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(temporary, data)
    temporary.replace(final)
    found = Fingerprints(tuple(digests), tuple(near))
    _write_fingerprints(cache_dir / f"digests-{cache_key(images)}.json", found)
    (cache_dir / f"pixels-{key}.json").write_text(
        json.dumps(
            {"root": str(images.root), "count": len(images), "shape": list(shape), "dtype": dtype}
        ),
        encoding="utf-8",
    )
    return final


def augment_pixels(
    pixels: torch.Tensor, settings: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """Randomly change a (1, H, W) or (N, 1, H, W) image in [0, 1]; returns the same shape.

    Photometric changes (gamma, contrast, brightness) first, then one affine
    warp (rotation, scale, translation, optional horizontal flip) with
    reflected borders.
    """
    batch = pixels if pixels.dim() == 4 else pixels[None]
    count = batch.shape[0]
    out = _photometric(batch, settings, generator, count)
    out = _geometric(out, settings, generator, count)
    return out if pixels.dim() == 4 else out[0]


def augment_with_mask(
    pixels: torch.Tensor, mask: torch.Tensor, settings: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`augment_pixels` of a (1, H, W) image, and the same warp of its (1, H, W) mask.

    The random draws are those of :func:`augment_pixels`: the image comes out
    the same as without a mask.
    """
    changed = _photometric(pixels[None], settings, generator, 1)
    both = _geometric(torch.cat([changed, mask[None]], 1), settings, generator, 1)
    return both[0, :1], both[0, 1:]


def _uniform(low: float, high: float, count: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator)


def _photometric(batch: torch.Tensor, s: AugmentConfig, g: torch.Generator, n: int) -> torch.Tensor:
    gamma = _uniform(*s.gamma, n, g).view(n, 1, 1, 1)
    contrast = _uniform(1 - s.contrast, 1 + s.contrast, n, g).view(n, 1, 1, 1)
    brightness = _uniform(-s.brightness, s.brightness, n, g).view(n, 1, 1, 1)
    out = batch.clamp(0.0, 1.0).pow(gamma)
    return ((out - 0.5) * contrast + 0.5 + brightness).clamp_(0.0, 1.0)


def _geometric(batch: torch.Tensor, s: AugmentConfig, g: torch.Generator, n: int) -> torch.Tensor:
    angle = _uniform(-s.rotation_deg, s.rotation_deg, n, g) * (math.pi / 180.0)
    zoom = _uniform(*s.scale, n, g)
    shift = _uniform(-s.translate, s.translate, 2 * n, g).view(n, 2) * 2.0
    flip = torch.ones(n)
    if s.horizontal_flip:
        flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, shift[:, 0]], 1),
            torch.stack([sin * flip, cos, shift[:, 1]], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(
        batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Cached images -> (normalised (C, H, W) tensor, label), optionally augmented.

    Augmentation is seeded per (seed, epoch, index): a run is reproducible and
    a resumed run sees the same images as an uninterrupted one. Call
    :meth:`set_epoch` before each epoch. With ``masks``, :meth:`masked` also
    gives each image's lesion mask, warped and resized as the image was.
    """

    def __init__(
        self,
        cache: PixelCache,
        labels: IntArray,
        indices: Sequence[int],
        spec: InputSpec,
        preprocessing: PreprocessingSpec,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        masks: LesionMasks | None = None,
    ) -> None:
        self.cache = cache
        self.labels = labels
        self.indices = tuple(int(i) for i in indices)
        self.spec = spec
        self.preprocessing = preprocessing
        self.augment = augment if augment is not None and augment.enabled else None
        self.seed = seed
        self.epoch = 0
        self.masks = masks

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        index = self.indices[item % len(self.indices)]
        pixels = self.cache.pixels(index)
        if self.augment is not None:
            image = torch.from_numpy(pixels.copy())[None]
            pixels = augment_pixels(image, self.augment, self._generator(item))[0].numpy()
        return self._input(pixels), int(self.labels[index])

    def masked(self, item: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Item ``item`` and its (H, W) boolean mask in input geometry (all False: none)."""
        index = self.indices[item % len(self.indices)]
        pixels = torch.from_numpy(self.cache.pixels(index).copy())[None]
        shape = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        found = self.masks.mask(index, shape) if self.masks is not None else np.zeros(shape, bool)
        mask = torch.from_numpy(found)[None].float()
        if self.augment is not None:
            pixels, mask = augment_with_mask(pixels, mask, self.augment, self._generator(item))
        resize = self.preprocessing.resize
        fitted, _ = to_input(mask[0].numpy(), self.spec.size, 1, (0.0,), (1.0,), resize)
        return self._input(pixels[0].numpy()), int(self.labels[index]), fitted[0] >= 0.5

    def _generator(self, item: int) -> torch.Generator:
        """The augmentation of ``item``: its image's, and another for each repeat of it (items
        ``p + k * len(self)`` are the ``k``-th repeat of position ``p`` in a balanced epoch)."""
        repeat, position = divmod(item, len(self.indices))
        seed = _item_seed(self.seed, self.epoch, self.indices[position])
        return torch.Generator().manual_seed((seed + repeat * 7_919_317) % (2**63 - 1))

    def _input(self, pixels: FloatArray) -> torch.Tensor:
        spec = self.spec
        tensor, _ = to_input(
            pixels, spec.size, spec.channels, spec.mean, spec.std, self.preprocessing.resize
        )
        return tensor


class MaskedView(Dataset[tuple[torch.Tensor, int, torch.Tensor]]):
    """An :class:`ImageDataset` whose items carry their masks (:meth:`ImageDataset.masked`)."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        return self.dataset.masked(item)


def _item_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 100_003 + index) % (2**63 - 1)
