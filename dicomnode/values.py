"""Frozen value objects passed between the stages of the node.

Arrays inside these objects are never modified after construction; treat them
as read-only. ``eq=False`` keeps numpy arrays out of generated comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


class BodyPart(StrEnum):
    """Body parts the node routes to models."""

    HAND = "HAND"
    KNEE = "KNEE"
    SPINE = "SPINE"


class Priority(IntEnum):
    """In which order waiting work is done: an image's analysis, its study's report and the
    sends of its results; higher first, then the order they became due."""

    LOW = 0
    """A sender's background work (priors prefetched, an archive migrated)."""
    MEDIUM = 1
    HIGH = 2
    """An urgent study (an emergency department's modality, a C-STORE sent HIGH)."""


STORE_PRIORITY = {0x0000: Priority.MEDIUM, 0x0001: Priority.HIGH, 0x0002: Priority.LOW}
"""The C-STORE request's Priority (0000,0700) and the priority it gives."""


REJECTION_TITLES: dict[str, str] = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
}
"""The Document Titles (DCM code value: meaning) that make a Key Object Selection a rejection
note (IHE IOCM), the received ones and the node's own."""


@dataclass(frozen=True)
class OwnWindow:
    """A window the node chose for an image (LINEAR_EXACT, PS3.3 C.11.2.1.3.2): modality
    values from ``center - width / 2`` to ``center + width / 2`` span black to white."""

    center: float
    width: float


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """A radiograph ready for display and for a model.

    Attributes
    ----------
    pixels:
        ``float32`` array of shape (rows, columns), values in [0, 1], after the
        Modality LUT, VOI LUT/window and photometric/presentation inversion,
        so that 0 is displayed black and 1 white (bone is bright).
    laterality:
        ``"L"``, ``"R"`` or ``None`` (from ImageLaterality/Laterality).
    source:
        A short human description of where the pixels came from (file name or
        SOP Instance UID); never patient data.
    row_direction:
        The patient direction along a row, left to right on the screen: the
        first value of Patient Orientation (``"L"`` on an AP or PA film in the
        standard display, ``"R"`` when it is shown mirrored); ``""`` when the
        header does not say.
    own_window:
        The window the node chose itself because the header has no usable one
        (its 0.5-99.5 % percentiles of modality values); ``None`` when the
        header's window or VOI LUT was used, or for a colour image.
    """

    pixels: FloatArray
    laterality: str | None = None
    source: str = ""
    row_direction: str = ""
    own_window: OwnWindow | None = None

    @property
    def rows(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def columns(self) -> int:
        return int(self.pixels.shape[1])

    def shape_within(self, max_size: int) -> tuple[int, int]:
        """(rows, columns) scaled by one factor so the longest side is at most ``max_size``.

        ``max_size`` 0 (or an image already small enough) gives the image's own
        shape. The overlay and the heatmaps behind it are made at this shape.
        """
        longest = max(self.rows, self.columns)
        if max_size <= 0 or longest <= max_size:
            return self.rows, self.columns
        scale = max_size / longest
        return max(1, round(self.rows * scale)), max(1, round(self.columns * scale))


@dataclass(frozen=True)
class Placement:
    """Where a result object sits in its study, and what made it: its series and SOP
    Instance UIDs and numbers, and the node (General Equipment module; the SR's algorithm
    manufacturer too)."""

    series_uid: str
    sop_uid: str
    series_number: int
    instance_number: int
    software_version: str
    manufacturer: str = "dicomnode"


@dataclass(frozen=True)
class ModelIdentity:
    """What every output says about the algorithm that produced it."""

    name: str
    version: str
    sha256: str
    synthetic_training_data: bool
    description: str = ""
    explanation: str = "Grad-CAM"
    reader_note: str = ""
    explanation_method: str = "gradcam"
    body_parts: tuple[BodyPart, ...] = ()
    intended_use: str = ""


@dataclass(frozen=True)
class Region:
    """A rectangle in original pixel coordinates (x0, y0 inclusive; x1, y1 exclusive)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


@dataclass(frozen=True)
class CodedClass:
    """One output class of a model with the coded concept that names it in the SR."""

    index: int
    name: str
    code_value: str
    coding_scheme: str
    code_meaning: str


@dataclass(frozen=True, eq=False)
class Finding:
    """One classified region of one image.

    Attributes
    ----------
    predicted:
        The class with the highest probability.
    probabilities:
        One probability per class, in card order, summing to 1.
    heatmap:
        Grad-CAM for ``predicted``, ``float32`` in [0, 1], over the whole image
        at the shape of its overlay (:meth:`PreparedImage.shape_within` the
        predictor's ``heatmap_size``; the image's own shape by default); zero
        outside ``region``.
    peak:
        (column, row) of the heatmap maximum in original pixel coordinates.
    region:
        The part of the image the model saw (the whole image, or a localised joint).
    laterality:
        ``"L"``, ``"R"`` or ``None``.
    localisation_uncertain:
        True when the region was found by a localiser that should not be trusted
        on it (``uncertainty`` says why).
    localised:
        True when a localiser chose ``region``; False for a model that reads the
        whole image (nothing was localised, so nothing is uncertain about it).
    uncertainty:
        Why the localisation is uncertain, short phrases for the overlay and SR.
    """

    predicted: CodedClass
    probabilities: tuple[float, ...]
    heatmap: FloatArray
    peak: tuple[float, float]
    region: Region
    laterality: str | None = None
    localisation_uncertain: bool = False
    localised: bool = False
    uncertainty: tuple[str, ...] = ()

    @property
    def probability(self) -> float:
        return self.probabilities[self.predicted.index]

    def runner_up(self, classes: tuple[CodedClass, ...]) -> tuple[CodedClass, float] | None:
        """The class with the second-highest probability and that probability (``None``
        for a one-class model)."""
        others = [i for i in range(len(self.probabilities)) if i != self.predicted.index]
        if not others:
            return None
        second = max(others, key=lambda i: self.probabilities[i])
        return classes[second], self.probabilities[second]


@dataclass(frozen=True, eq=False)
class ImageResult:
    """Everything the model said about one image."""

    model: ModelIdentity
    classes: tuple[CodedClass, ...]
    findings: tuple[Finding, ...]
    not_assessed: str = ""
    """Why the image has no finding, as a sentence the overlay and SR show ("No knee joint
    found on the image: not graded"); empty when it has some."""
