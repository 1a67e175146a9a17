"""Model cards: ``models/<name>/model.yaml``.

A card says everything the node needs to run a model and everything a user
needs to judge it. It is validated on load; a card that fails validation, or
whose weights do not match their sha256, is refused with a message that names
the field.

Example::

    name: knee-kl
    version: 1.0.0
    description: Kellgren-Lawrence grade of the knee joint
    body_parts: [KNEE]
    architecture: {name: efficientnet_lite0, params: {}}
    input: {size: [224, 224], channels: 3, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}
    preprocessing: {resize: stretch}
    classes:
      - {index: 0, name: KL0, code: {value: KL0, scheme: 99DICOMNODE, meaning: KL grade 0}}
    gradcam: {target_layer: conv_head, method: gradcam}
    weights: {file: model.safetensors, sha256: "<64 hex>"}
    localiser: {file: localiser.safetensors, sha256: "<64 hex>", threshold: 0.5}  # optional
    temperature: 1.0
    test_time_flip: false   # optional: classify each input and its mirror, and average
    intended_use: ...
    training_data: ...
    reader_note: ""   # optional: a note every SR of the model gives the reader
    metrics: {balanced_accuracy: 0.7}
    synthetic_training_data: false
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicomnode.errors import ModelError
from dicomnode.validation import describe_validation_error, read_yaml_mapping
from dicomnode.values import BodyPart, CodedClass, ModelIdentity

CARD_FILE = "model.yaml"

CamMethod = Literal["gradcam", "hirescam", "layercam"]
"""The class activation map methods a model card may name."""

CAM_METHOD_NAMES: dict[str, str] = {
    "gradcam": "Grad-CAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
}
"""How outputs name each method."""

LAYER_SEPARATOR = "+"
"""Joins several layers of one network in a card's ``gradcam.target_layer``."""


MEMBER_SEPARATOR = ","
"""Separates the members' entries in an ensemble card's ``gradcam.target_layer``."""


MIRROR_NOTE = ", mean with the left-right mirror's map (test-time flip)"
"""How outputs' explanation ends for a card with ``test_time_flip``."""

MIRRORED_NETWORK_NOTE = ", of the mean of the input's and its mirror's logits (test-time flip)"
"""How another explainer's description ends for a card with ``test_time_flip`` (SHAP, say,
explains the network that averages each input with its mirror)."""

MAX_CAM_SHIFT = 32
"""The largest ``gradcam.shift`` (input pixels) a card may ask for."""


def split_layers(layer_path: str) -> tuple[str, ...]:
    """The layers of ``"a+b"`` (one or more dotted paths, whitespace ignored)."""
    return tuple(part.strip() for part in layer_path.split(LAYER_SEPARATOR))


def split_members(target_layer: str) -> tuple[str, ...]:
    """One entry per ensemble member of ``"a+b,a+b"`` (a single network has one entry)."""
    return tuple(part.strip() for part in target_layer.split(MEMBER_SEPARATOR))


def shift_offsets(shift: int) -> tuple[tuple[int, int], ...]:
    """The (dx, dy) input shifts a shift-averaged map is made of; ``(0, 0)`` first.

    ``shift`` 0: the input alone. Otherwise 13 copies: the 3 x 3 grid of
    shifts of 0 and +-``shift // 2`` pixels along each axis, and shifts of
    +-``shift`` along each axis alone.

    Raises
    ------
    ModelError
        If ``shift`` is negative.
    """
    if shift < 0:
        raise ModelError(f"a Grad-CAM shift must be at least 0 pixels, got {shift}")
    if shift == 0:
        return ((0, 0),)
    half = shift // 2
    near = [(dx, dy) for dy in (0, -half, half) for dx in (0, -half, half)]
    far = [(shift, 0), (-shift, 0), (0, shift), (0, -shift)]
    return tuple(dict.fromkeys(near + far))


def describe_explanation(method: str, layer_path: str, shift: int = 0) -> str:
    """What the outputs say about the explanation: ``"LayerCAM at blocks.2+blocks.4"``.

    An ensemble whose members share their layers says so once: ``"LayerCAM at
    blocks.4, weighted mean of 5 members' maps"``. A shift-averaged map says
    how: ``"..., mean of 13 copies shifted up to 4 px"``.
    """
    name = CAM_METHOD_NAMES.get(method, method)
    per_member = split_members(layer_path.replace(" ", ""))
    if len(per_member) > 1 and len(set(per_member)) == 1:
        text = f"{name} at {per_member[0]}, weighted mean of {len(per_member)} members' maps"
    else:
        text = f"{name} at {MEMBER_SEPARATOR.join(per_member)}"
    if shift:
        text += f", mean of {len(shift_offsets(shift))} copies shifted up to {shift} px"
    return text


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CodeSpec(_Frozen):
    """A coded concept (value, coding scheme designator, meaning)."""

    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)


class ClassSpec(_Frozen):
    index: int = Field(ge=0)
    name: str = Field(min_length=1)
    code: CodeSpec


def classes_in_order(classes: tuple[ClassSpec, ...]) -> tuple[ClassSpec, ...]:
    """Refuse class lists whose indices are not 0, 1, ... in order (cards and recipes)."""
    if [c.index for c in classes] != list(range(len(classes))):
        raise ValueError("class indices must be 0, 1, ... in order")
    return classes


class ArchitectureSpec(_Frozen):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class InputSpec(_Frozen):
    size: tuple[int, int] = (224, 224)
    channels: Literal[1, 3] = 3
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    @model_validator(mode="after")
    def _norm_lengths(self) -> InputSpec:
        for key in ("mean", "std"):
            values = getattr(self, key)
            if len(values) not in (1, self.channels):
                raise ValueError(f"input.{key} needs 1 or {self.channels} values")
        if min(self.std) <= 0:
            raise ValueError("input.std values must be positive")
        if min(self.size) < 16:
            raise ValueError("input.size must be at least 16x16")
        return self


class PreprocessingSpec(_Frozen):
    """How a prepared image becomes a model input.

    ``resize``: ``stretch`` (resize to input size) or ``letterbox`` (keep the
    aspect ratio, pad with black). ``localiser``: ``none`` (the whole image is
    one region) or ``knee`` (find each knee joint and grade it separately).
    """

    resize: Literal["stretch", "letterbox"] = "stretch"
    localiser: Literal["none", "knee"] = "none"


class GradCamSpec(_Frozen):
    """The class activation map every finding carries.

    ``target_layer``: a dotted layer path, several joined by ``+`` (their maps
    are averaged), and for an ensemble one such entry per member,
    comma-separated. ``method``: ``gradcam`` (default), ``hirescam`` or
    ``layercam`` (see :mod:`dicomnode.explain.gradcam`). ``shift``: 0 (one
    pass), or the largest input shift in pixels of a shift-averaged map
    (:func:`shift_offsets`).
    """

    target_layer: str = Field(min_length=1)
    method: CamMethod = "gradcam"
    shift: int = Field(default=0, ge=0, le=MAX_CAM_SHIFT)

    @property
    def description(self) -> str:
        """How outputs name the explanation (``"LayerCAM at blocks.2+blocks.4"``)."""
        return describe_explanation(self.method, self.target_layer, self.shift)


class WeightsSpec(_Frozen):
    file: str = "model.safetensors"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class LocaliserSpec(_Frozen):
    """The joint localiser of a card with ``preprocessing.localiser: knee``.

    ``file``: its safetensors file beside the card; ``sha256``: the file's
    checksum; ``threshold``: the heatmap peak height below which a joint is
    reported as uncertain (see :mod:`dicomnode.models.localise`).
    """

    file: str = "localiser.safetensors"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    threshold: float = Field(default=0.5, gt=0, lt=1)


ENSEMBLE = "ensemble"
"""The architecture of an ensemble card: ``architecture.params.members`` lists its members
(name, params, and maybe their own input); ``gradcam.target_layer`` their layers,
comma-separated."""

MEMBER_INPUT = "input"
"""The key of an ensemble member's own input in the card's ``architecture.params.members``
(present on every member, or on none: then they share the card's ``input``)."""

RAW_GREY_MEAN = (0.0,)
RAW_GREY_STD = (1.0,)
"""The ``input`` normalisation of an ensemble whose members give their own input: none (the
grey image in [0, 1] as it is; each member normalises it itself)."""


class EnsembleMember(_Frozen):
    """A member of an ensemble card: a sibling model directory and its per-class weights."""

    path: str
    class_weights: tuple[float, ...]


READER_NOTE_MAX = 1024
"""The most characters of a card's ``reader_note``."""


class ModelCard(_Frozen):
    """The validated content of a ``model.yaml``."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,47}$")
    version: str = Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+-]{0,31}$")
    description: str = ""
    body_parts: tuple[BodyPart, ...] = Field(min_length=1)
    architecture: ArchitectureSpec
    input: InputSpec = InputSpec()
    preprocessing: PreprocessingSpec = PreprocessingSpec()
    classes: tuple[ClassSpec, ...] = Field(min_length=2)
    gradcam: GradCamSpec
    weights: WeightsSpec
    localiser: LocaliserSpec | None = None
    temperature: float = Field(default=1.0, gt=0)
    test_time_flip: bool = Field(
        default=False,
        description="classify each input and its left-right mirror, and average (logits and maps)",
    )
    finding_class_minimum: int = Field(
        default=1, ge=0, description="first class index that counts as a positive finding"
    )
    intended_use: str = Field(min_length=1)
    training_data: str = Field(min_length=1)
    reader_note: str = Field(
        default="",
        max_length=READER_NOTE_MAX,
        description="said to the reader in every SR of the model (a known limitation, say)",
    )
    metrics: dict[str, Any] = Field(default_factory=dict)
    recipe: dict[str, Any] = Field(default_factory=dict)
    trained: str = ""
    synthetic_training_data: bool

    @field_validator("classes")
    @classmethod
    def _indices_in_order(cls, classes: tuple[ClassSpec, ...]) -> tuple[ClassSpec, ...]:
        return classes_in_order(classes)

    @field_validator("body_parts")
    @classmethod
    def _body_parts_once(cls, parts: tuple[BodyPart, ...]) -> tuple[BodyPart, ...]:
        repeated = sorted({part for part in parts if parts.count(part) > 1})
        if repeated:
            raise ValueError(f"body_parts lists {', '.join(repeated)} more than once")
        return parts

    @model_validator(mode="after")
    def _localiser_block(self) -> ModelCard:
        wanted = self.preprocessing.localiser != "none"
        if wanted and self.localiser is None:
            raise ValueError(
                f"preprocessing.localiser {self.preprocessing.localiser!r} needs a localiser "
                "block (file, sha256, threshold)"
            )
        if not wanted and self.localiser is not None:
            raise ValueError("a localiser block needs preprocessing.localiser: knee")
        return self

    @model_validator(mode="after")
    def _members_own_inputs_take_raw_grey(self) -> ModelCard:
        members = self.architecture.params.get("members")
        if self.architecture.name != ENSEMBLE or not isinstance(members, list):
            return self
        if any(isinstance(m, dict) and MEMBER_INPUT in m for m in members) and (
            set(self.input.mean) != set(RAW_GREY_MEAN) or set(self.input.std) != set(RAW_GREY_STD)
        ):
            raise ValueError(
                "an ensemble whose members give their own input takes the grey image as it is: "
                "input.mean [0.0] and input.std [1.0] (each member normalises it itself)"
            )
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def coded_classes(self) -> tuple[CodedClass, ...]:
        return tuple(
            CodedClass(c.index, c.name, c.code.value, c.code.scheme, c.code.meaning)
            for c in self.classes
        )


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_card(directory: Path, *, verify: bool = True) -> ModelCard:
    """Read and validate ``directory/model.yaml``; check the weights' sha256 when ``verify``."""
    path = directory / CARD_FILE
    raw = read_yaml_mapping(path, "model card", ModelError)
    try:
        card = ModelCard.model_validate(raw)
    except ValidationError as exc:
        raise ModelError(
            f"model card {path} is invalid: {describe_validation_error(exc, '(card)')}"
        ) from exc
    if verify:
        verify_weights(directory, card)
    return card


def verify_weights(directory: Path, card: ModelCard) -> None:
    """Refuse weights (and a localiser) that are missing or whose sha256 differs from the card."""
    _verify_file(directory / card.weights.file, card.weights.sha256, f"model {card.name}: weights")
    if card.localiser is not None:
        path = directory / card.localiser.file
        _verify_file(path, card.localiser.sha256, f"model {card.name}: localiser")


def _verify_file(path: Path, sha256: str, what: str) -> None:
    if not path.is_file():
        raise ModelError(f"{what} file {path} is missing")
    actual = sha256_of(path)
    if actual != sha256:
        raise ModelError(
            f"{what} {path.name} have sha256 {actual}, the card says {sha256}; refusing to load"
        )


def identity(card: ModelCard) -> ModelIdentity:
    """The identity every output of ``card`` carries."""
    return ModelIdentity(
        name=card.name,
        version=card.version,
        sha256=card.weights.sha256,
        synthetic_training_data=card.synthetic_training_data,
        description=card.description,
        explanation=card.gradcam.description + (MIRROR_NOTE if card.test_time_flip else ""),
        reader_note=card.reader_note,
        explanation_method=card.gradcam.method,
        body_parts=card.body_parts,
        intended_use=card.intended_use,
    )


def write_card(directory: Path, card: ModelCard) -> Path:
    """Write ``card`` as ``directory/model.yaml`` (used by training and tests)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = card.model_dump(mode="json")
    if data.get("localiser") is None:
        data.pop("localiser", None)  # cards without a localiser read as before
    if not data["gradcam"].get("shift"):
        data["gradcam"].pop("shift", None)  # nor do cards with one-pass maps
    if not data.get("reader_note"):
        data.pop("reader_note", None)  # nor do cards without a note to the reader
    path = directory / CARD_FILE
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def check_new_version(card: ModelCard, version: str) -> None:
    """Refuse ``version`` for a revised ``card`` when it is the card's own.

    Raises
    ------
    ModelError
        If ``version`` is the card's own: what the card says changed, so its
        version must too.
    """
    if version == card.version:
        raise ModelError(
            f"model {card.name} is version {version} already: a changed card needs a new version"
        )


def write_revision(
    directory: Path, card: ModelCard, version: str, note: str = "", **fields: Any
) -> Path:
    """Write ``card`` again under a new ``version`` with ``fields`` replaced (same weights).

    The recipe the card records follows: its model version becomes ``version``
    and ``note`` is appended to its notes. The written card is read back, so
    it validates and its weights still match. Returns the card's path.

    Raises
    ------
    ModelError
        If ``version`` is the card's own: what the card says changed, so its
        version must too.
    """
    check_new_version(card, version)
    recipe = dict(fields.pop("recipe", card.recipe))
    if recipe:
        recipe["notes"] = " ".join(part for part in (recipe.get("notes", ""), note) if part)
        if isinstance(recipe.get("model"), dict):
            recipe["model"] = {**recipe["model"], "version": version}
    updated = card.model_copy(update={**fields, "version": version, "recipe": recipe})
    path = write_card(directory, type(card).model_validate(updated.model_dump()))
    load_card(directory)
    return path
