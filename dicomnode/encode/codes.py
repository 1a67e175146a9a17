"""Coded concepts used in the node's Structured Reports.

Public concepts come from :data:`pydicom.sr.codedict.codes` (DCM, SCT, UCUM).
Concepts that no public terminology provides live in the private coding scheme
:data:`PRIVATE_SCHEME` (``99DICOMNODE``; a designator starting with ``99`` is
reserved for local schemes by PS3.16 section 8.2) and are declared in every SR
through :data:`PRIVATE_SCHEME_IDENTIFICATION`.
"""

from __future__ import annotations

from collections.abc import Sequence

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicomnode.values import BodyPart, CodedClass

PRIVATE_SCHEME = "99DICOMNODE"
"""Coding scheme designator of the node's own concepts."""

PRIVATE_SCHEME_IDENTIFICATION = CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="dicomnode local concepts",
    responsible_organization="dicomnode",
)
"""Coding Scheme Identification Sequence item declaring :data:`PRIVATE_SCHEME`."""


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


def _public(code: Code) -> CodedConcept:
    return CodedConcept.from_code(code)


# Report structure ---------------------------------------------------------

PROCEDURE_REPORTED = _public(codes.SCT.PlainRadiography)
"""(168537006, SCT, "Plain radiography"): the procedure the report is about."""

OBSERVER_DEVICE = _public(codes.cid270.Device)
"""(121007, DCM, "Device"): the observer type of the algorithm."""

QUALITATIVE_EVALUATIONS = CodedConcept(
    value="C0034375", scheme_designator="UMLS", meaning="Qualitative Evaluations"
)
"""Heading of the report-level statements (TID 1500 qualitative evaluations)."""

COMMENT = _public(codes.DCM.Comment)
"""(121106, DCM, "Comment"): free text such as the review requirement."""

DEMONSTRATION_MODEL = _private("DEMOMODEL", "Demonstration model")
"""Text item saying the model was trained on synthetic data only."""

# Per finding -------------------------------------------------------------

FINDING = _public(codes.DCM.Finding)
"""(121071, DCM, "Finding"): names the predicted class."""

PROBABILITY = _public(codes.DCM.Probability)
"""(122157, DCM, "Probability"): one numeric measurement per class."""

PROBABILITY_UNIT = CodedConcept(
    value="{probability}", scheme_designator="UCUM", meaning="probability"
)
"""Dimensionless UCUM unit with an annotation, for values in [0, 1]."""

VISUAL_EXPLANATION = _public(codes.DCM.VisualExplanation)
"""(130401, DCM, "Visual explanation"): reference to the Grad-CAM overlay image."""

GRADCAM = _public(codes.DCM.GradientWeightedClassActivation)
"""(130403, DCM, "Gradient-weighted class activation"): the explanation method."""

NOT_ASSESSED = _private("NOTASSESSED", "Not assessed")
"""Finding type of an image the model could not assess (no knee joint found on it)."""

INTENDED_USE = _private("INTENDEDUSE", "Intended use")
"""Text item stating what a model is for and what it was not validated on."""

GRADCAM_PEAK = _private("GRADCAMPEAK", "Grad-CAM peak")
"""Point of maximal Grad-CAM activation in source pixel coordinates."""

CAM_PEAKS: dict[str, CodedConcept] = {
    "gradcam": GRADCAM_PEAK,
    "hirescam": _private("HIRESCAMPEAK", "HiResCAM peak"),
    "layercam": _private("LAYERCAMPEAK", "LayerCAM peak"),
    "shap": _private("SHAPPEAK", "SHAP peak"),
}
"""The peak's concept per explanation method (a card's ``gradcam.method``, or SHAP)."""


def peak_concept(method: str) -> CodedConcept:
    """The concept naming the peak of a ``method`` map (Grad-CAM for an unknown method).

    The SR's algorithm parameters name the explanation in full (method,
    layers, ensemble weighting, shift averaging); the peak's own concept
    names the method, so a reader sees which map the point comes from.
    """
    return CAM_PEAKS.get(method, GRADCAM_PEAK)


LOCALISATION_UNCERTAIN = _private("LOCUNCERTAIN", "Localisation uncertain")
"""Whether the analysed region was found with low confidence (value Yes/No)."""

YES = _public(codes.SCT.Yes)
NO = _public(codes.SCT.No)

# Anatomy -----------------------------------------------------------------

ANATOMICAL_STRUCTURE = _public(codes.SCT.AnatomicalStructure)
"""Finding site used when the body part is unknown."""

BODY_PARTS: dict[BodyPart, CodedConcept] = {
    BodyPart.HAND: _public(codes.SCT.Hand),
    BodyPart.KNEE: _public(codes.SCT.Knee),
    BodyPart.SPINE: _public(codes.SCT.Spine),
}
"""Finding site per routed body part."""

BODY_PART_EXAMINED: dict[str, CodedConcept] = {
    "CSPINE": _public(codes.SCT.CervicalSpine),
    "TSPINE": _public(codes.SCT.ThoracicSpine),
    "LSPINE": _public(codes.SCT.LumbarSpine),
    "SACRUM": _public(codes.SCT.Sacrum),
    "COCCYX": _public(codes.SCT.Coccyx),
    "WRIST": _public(codes.SCT.WristJoint),
    "FINGER": _public(codes.SCT.Finger),
    "THUMB": _public(codes.SCT.Thumb),
    "PATELLA": _public(codes.SCT.Patella),
}
"""Finding sites of other Body Part Examined defined terms (PS3.16 Annex L) the node routes."""

LATERALITY: dict[str, CodedConcept] = {
    "R": _public(codes.SCT.Right),
    "L": _public(codes.SCT.Left),
}
"""Laterality modifiers (CID 244) keyed by the DICOM laterality letter."""


def class_concept(coded: CodedClass) -> CodedConcept:
    """Return the coded concept that names one output class of a model.

    Parameters
    ----------
    coded:
        The class as declared on the model card.

    Returns
    -------
    highdicom.sr.CodedConcept
        (code value, coding scheme designator, code meaning) of the class.
    """
    return CodedConcept(
        value=coded.code_value,
        scheme_designator=coded.coding_scheme,
        meaning=coded.code_meaning,
    )


def body_part_concept(
    body_part_examined: str | MultiValue[str] | None, routed: Sequence[BodyPart] = ()
) -> CodedConcept:
    """Return the finding site for a Body Part Examined value.

    Parameters
    ----------
    body_part_examined:
        The source's BodyPartExamined (any case), or ``None``.
    routed:
        The body parts of the model that analysed the image: the finding site
        when Body Part Examined names none the node knows (empty, or an alias
        from the study description) and the model has exactly one.

    Returns
    -------
    highdicom.sr.CodedConcept
        The SNOMED CT concept of the body part (``LSPINE``: Lumbar spine, ...),
        or "Anatomical Structure" when neither names one.
    """
    if isinstance(body_part_examined, MultiValue):  # KNEE\\LEG: the first names the site
        body_part_examined = body_part_examined[0] if body_part_examined else None
    term = str(body_part_examined or "").strip().upper()
    if term in BODY_PART_EXAMINED:
        return BODY_PART_EXAMINED[term]
    if term in BodyPart.__members__:
        return BODY_PARTS[BodyPart(term)]
    if len(routed) == 1:
        return BODY_PARTS[routed[0]]
    return ANATOMICAL_STRUCTURE
