"""Encode a study's results as a Comprehensive SR measurement report (TID 1500).

Document tree (one measurement group per finding)::

    Imaging Measurement Report (TID 1500)
      Observation context: observer is a device, the algorithm (TID 1004)
      Procedure reported: Plain radiography
      Imaging Measurements
        Measurement Group, one per finding: TID 1410 for a localised joint,
        TID 1501 for a whole-image finding (hand, spine)
          Tracking Identifier / Tracking Unique Identifier
          Finding = <predicted class>
          Finding Site = <body part>, Laterality = <side>
          Algorithm Identification (TID 4019): name, version, weights sha256
          Probability = p {probability}, modifier Finding = <class>   (per class)
          Localisation uncertain = Yes/No            (localised findings)
          Image Region = POLYLINE around the joint   -> source image (TID 1410)
          Source image for measurement group         -> source image (TID 1501)
          Visual explanation = the Secondary Capture overlay
          <method> peak = POINT  (Grad-CAM, HiResCAM, LayerCAM, SHAP) -> source image
      Qualitative Evaluations
        Comment = "AI result, requires review by a radiologist"
        Demonstration model = "DEMONSTRATION MODEL, synthetic training data"

Spatial coordinates follow PS3.3 C.18.6.1.2: (0, 0) is the top-left corner of
the top-left pixel, so a :class:`~dicomnode.values.Region` maps onto its
corners unchanged and the peak pixel (column, row) onto its centre
(column + 0.5, row + 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    ComprehensiveSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageContentItem,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    ScoordContentItem,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.uid import PYDICOM_ROOT_UID

from dicomnode.encode import codes as dn
from dicomnode.encode.header import (
    conformant_header,
    referenced_requests,
    stamp_in_source_zone,
)
from dicomnode.encode.render import REVIEW_NOTICE, SYNTHETIC_NOTICE
from dicomnode.encode.sc import series_description, source_laterality
from dicomnode.errors import EncodeError
from dicomnode.uids import derived_uid
from dicomnode.values import Finding, ImageResult, ModelIdentity, Placement

_Group = PlanarROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations
_Reference = TypeVar("_Reference", SourceImageForMeasurementGroup, SourceImageForRegion)

_PATIENT_STUDY_KEYWORDS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


@dataclass(frozen=True, eq=False)
class SrImageItem:
    """One analysed image of the study, as the SR reports it.

    Attributes
    ----------
    source:
        The original image's dataset, read without pixel data.
    sc:
        The Secondary Capture overlay encoded for it, or ``None`` when none
        was made; referenced as the finding's "Visual explanation".
    result:
        What the model said about the image.
    pr:
        The presentation state drawn for it (``results.presentation_state``), or ``None``;
        each reference to the source image names it as the state to display it with.
    """

    source: pydicom.Dataset
    sc: pydicom.Dataset | None
    result: ImageResult
    pr: pydicom.Dataset | None = None


def encode_sr(
    items: Sequence[SrImageItem],
    placement: Placement,
    *,
    predecessor: pydicom.Dataset | None = None,
    uid_root: str = PYDICOM_ROOT_UID,
    not_analysed: int = 0,
) -> pydicom.Dataset:
    """Encode the results of one study as a Comprehensive SR (TID 1500).

    Parameters
    ----------
    items:
        The analysed images, all of one study; report order follows them.
    placement:
        The new document's series and SOP Instance UIDs and numbers, and the node that
        made it (its manufacturer is also the algorithm's).
    predecessor:
        An earlier SR this one replaces; listed in the Predecessor Documents
        Sequence.
    uid_root:
        Root of the UIDs the document makes: its findings' tracking UIDs (the
        same for one finding of one image and model version in every round)
        and its device observers' UIDs.
    not_analysed:
        How many images of the study routed to the model could not be analysed
        (their jobs failed for good; the caller lists them in ``items`` as "Not
        assessed"). The document then says so and is flagged PARTIAL, not COMPLETE.

    Returns
    -------
    highdicom.sr.ComprehensiveSR
        The document (a :class:`pydicom.Dataset`), preliminary and unverified.

    Raises
    ------
    EncodeError
        When there are no items, they span several studies, or highdicom
        refuses the content.
    """
    _check_items(items)
    models = _distinct_models(items)
    manufacturer = placement.manufacturer
    try:
        report = MeasurementReport(
            observation_context=_observation_context(models, manufacturer, uid_root),
            procedure_reported=dn.PROCEDURE_REPORTED,
            imaging_measurements=_groups(items, uid_root, manufacturer),
        )
        report[0].ContentSequence.append(_notices(models, not_analysed))
        sr = ComprehensiveSR(
            evidence=_evidence(items),
            content=report[0],
            series_instance_uid=placement.series_uid,
            series_number=placement.series_number,
            sop_instance_uid=placement.sop_uid,
            instance_number=placement.instance_number,
            manufacturer=manufacturer,
            is_complete=not_analysed == 0,
            is_final=False,
            is_verified=False,
            previous_versions=None if predecessor is None else [predecessor],
            requested_procedures=referenced_requests(item.source for item in items) or None,
            coding_schemes=_coding_schemes(items),
            series_description=series_description("AI report", models[0]),
            software_versions=placement.software_version,
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise EncodeError(f"cannot encode the Structured Report: {exc}") from exc
    stamp_in_source_zone(sr, items[0].source)
    return sr


def _check_items(items: Sequence[SrImageItem]) -> None:
    if not items:
        raise EncodeError("a Structured Report needs at least one image")
    studies = {str(item.source.get("StudyInstanceUID", "")) for item in items}
    studies |= {str(item.sc.get("StudyInstanceUID", "")) for item in items if item.sc}
    if len(studies) != 1 or "" in studies:
        raise EncodeError(f"all images of a report must share one study, got {sorted(studies)}")
    differ = _identity_conflicts([conformant_header(item.source) for item in items])
    if differ:  # values not quoted: the reason is stored and printed
        raise EncodeError(
            "the images of this study name different patients ("
            + ", ".join(differ)
            + " differ): one report would copy the details of one patient onto the images of "
            "another. Check the study in the PACS, and give this report up with dicomnode "
            "discard (the node keeps the header it stored first of each image)"
        )


PATIENT_IDENTITY = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate")
"""The attributes that must agree among a report's images (the SR copies the first's)."""


def _identity_conflicts(sources: Sequence[pydicom.Dataset]) -> list[str]:
    """The identity attributes on which ``sources`` disagree. An empty value agrees with
    any, and names are compared group by group (alphabetic, ideographic, phonetic) without
    trailing delimiters or case: ``Doe^John^^`` is ``DOE^JOHN``, and ``Yamada^Tarou`` is
    ``Yamada^Tarou=山田^太郎``. The sources are compared as the SR copies them (cleaned:
    a birth date ``00000000`` is empty, ``1965.01.01`` is ``19650101``)."""
    differ = []
    for keyword in PATIENT_IDENTITY:
        seen: dict[int, set[str]] = {}
        for source in sources:
            for index, part in enumerate(_parts(keyword, source.get(keyword))):
                if part:
                    seen.setdefault(index, set()).add(part)
        if any(len(values) > 1 for values in seen.values()):
            differ.append(keyword)
    return differ


def _parts(keyword: str, value: object) -> list[str]:
    text = " ".join(str(value or "").split())
    if keyword != "PatientName":
        return [text]
    return [group.rstrip("^ ").upper() for group in text.split("=")]


def _distinct_models(items: Sequence[SrImageItem]) -> list[ModelIdentity]:
    models: list[ModelIdentity] = []
    for item in items:
        if item.result.model not in models:
            models.append(item.result.model)
    return models


def _device_uid(model: ModelIdentity, uid_root: str) -> str:
    """Return a UID under ``uid_root`` that always names the same model weights."""
    return derived_uid(uid_root, "device", model.name, model.version, model.sha256)


def _observation_context(
    models: list[ModelIdentity], manufacturer: str, uid_root: str
) -> ObservationContext:
    """Return the observation context: each algorithm is a device observer."""
    observers = [
        ObserverContext(
            observer_type=dn.OBSERVER_DEVICE,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=_device_uid(model, uid_root),
                name=f"{model.name} {model.version}"[:64],
                manufacturer_name=manufacturer,
                model_name=model.name[:64],
            ),
        )
        for model in models
    ]
    context = ObservationContext(observer_device_context=observers[0])
    for observer in observers[1:]:
        context.extend(observer)
    return context


def _algorithm(model: ModelIdentity, manufacturer: str) -> AlgorithmIdentification:
    """Return the TID 4019 Algorithm Identification of ``model``."""
    return AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[f"weights sha256: {model.sha256}", f"explanation: {model.explanation}"],
        manufacturer=manufacturer,
    )


def _groups(items: Sequence[SrImageItem], uid_root: str, manufacturer: str) -> list[_Group]:
    groups: list[_Group] = []
    for image_index, item in enumerate(items, start=1):
        algorithm = _algorithm(item.result.model, manufacturer)
        if not item.result.findings:
            groups.append(_image_group(item, image_index, uid_root, algorithm))
        for finding_index, finding in enumerate(item.result.findings, start=1):
            tracking = _tracking(uid_root, item, image_index, finding_index)
            groups.append(_finding_group(item, finding, tracking, algorithm))
    return groups


def _tracking(
    uid_root: str, item: SrImageItem, image_index: int, finding_index: int
) -> TrackingIdentifier:
    """Return a tracking identifier of one finding of one source image and model version.

    Its UID depends on the source image, the model and the finding, not on the document:
    the same finding keeps its UID in a follow-up SR (TID 1500 tracking across documents).
    """
    model = item.result.model
    uid = derived_uid(
        uid_root,
        "tracking",
        str(item.source.SOPInstanceUID),
        model.name,
        model.version,
        str(finding_index),
    )
    return TrackingIdentifier(uid=uid, identifier=f"image {image_index} finding {finding_index}")


def _finding_group(
    item: SrImageItem,
    finding: Finding,
    tracking: TrackingIdentifier,
    algorithm: AlgorithmIdentification,
) -> _Group:
    """Return the group of one finding: TID 1410 with the joint's box for a localised
    finding, TID 1501 on the whole source image otherwise (a box around the image border
    would claim a region nobody outlined)."""
    finding_type = dn.class_concept(finding.predicted)
    sites = [_finding_site(item, finding.laterality)]
    measurements = _probabilities(item.result, finding)
    group: _Group
    if finding.localised:
        group = PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_region=_region(item, finding),
            finding_type=finding_type,
            algorithm_id=algorithm,
            finding_sites=sites,
            measurements=measurements,
            qualitative_evaluations=[_localisation(finding)],
        )
    else:
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            finding_type=finding_type,
            algorithm_id=algorithm,
            finding_sites=sites,
            measurements=measurements,
            source_images=[_source(item)],
        )
    content = group[0].ContentSequence
    if finding.uncertainty:
        reasons = "; ".join(finding.uncertainty)
        content.append(_comment(f"Localisation uncertain: {reasons}"))
    if item.sc is not None:
        content.append(_visual_explanation(item.sc))
    content.append(_peak(item.source, finding, item.result.model.explanation_method))
    return group


def _source(item: SrImageItem) -> SourceImageForMeasurementGroup:
    source = SourceImageForMeasurementGroup(item.source.SOPClassUID, item.source.SOPInstanceUID)
    return _shown_with(source, item.pr)


def _shown_with(reference: _Reference, pr: pydicom.Dataset | None) -> _Reference:
    """``reference`` to the source image naming ``pr`` as the presentation state to display
    it with (Image Reference Macro, PS3.3 Table 10-3: the nested Referenced SOP Sequence)."""
    if pr is not None:
        state = pydicom.Dataset()
        state.ReferencedSOPClassUID = pr.SOPClassUID
        state.ReferencedSOPInstanceUID = pr.SOPInstanceUID
        reference.ReferencedSOPSequence[0].ReferencedSOPSequence = [state]
    return reference


def _comment(text: str) -> TextContentItem:
    return TextContentItem(dn.COMMENT, text, RelationshipTypeValues.CONTAINS)


def _image_group(
    item: SrImageItem, image_index: int, uid_root: str, algorithm: AlgorithmIdentification
) -> MeasurementsAndQualitativeEvaluations:
    """Return the TID 1501 group of an image on which the model reported nothing: its
    finding type is "Not assessed", and a comment says why (no knee joint found)."""
    reason = item.result.not_assessed
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(uid_root, item, image_index, 0),
        finding_type=dn.NOT_ASSESSED if reason else None,
        algorithm_id=algorithm,
        finding_sites=[_finding_site(item, None)],
        source_images=[_source(item)],
    )
    if reason:
        group[0].ContentSequence.append(_comment(reason))
    if item.sc is not None:
        group[0].ContentSequence.append(_visual_explanation(item.sc))
    return group


def _source_for_region(source: pydicom.Dataset) -> SourceImageForRegion:
    return SourceImageForRegion(source.SOPClassUID, source.SOPInstanceUID)


def _region(item: SrImageItem, finding: Finding) -> ImageRegion:
    """Return the closed POLYLINE around the region the model saw."""
    r = finding.region
    corners = [(r.x0, r.y0), (r.x1, r.y0), (r.x1, r.y1), (r.x0, r.y1), (r.x0, r.y0)]
    return ImageRegion(
        graphic_type="POLYLINE",
        graphic_data=np.array(corners, dtype=np.float64),
        source_image=_shown_with(_source_for_region(item.source), item.pr),
    )


def _peak(source: pydicom.Dataset, finding: Finding, method: str) -> ScoordContentItem:
    """Return the peak of the ``method`` map as a POINT at the centre of the peak pixel."""
    column, row = finding.peak
    point = ScoordContentItem(
        name=dn.peak_concept(method),
        graphic_type="POINT",
        graphic_data=np.array([[column + 0.5, row + 0.5]], dtype=np.float64),
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    point.ContentSequence = ContentSequence([_source_for_region(source)])
    return point


def _finding_site(item: SrImageItem, laterality: str | None) -> FindingSite:
    side = laterality or source_laterality(item.source)
    return FindingSite(
        anatomic_location=dn.body_part_concept(
            item.source.get("BodyPartExamined"), item.result.model.body_parts
        ),
        laterality=dn.LATERALITY.get(side or ""),
    )


def _probabilities(result: ImageResult, finding: Finding) -> list[Measurement]:
    """Return one Probability measurement per class, each modified by its class."""
    if len(finding.probabilities) != len(result.classes):
        raise EncodeError(
            f"{len(finding.probabilities)} probabilities for {len(result.classes)} classes"
        )
    return [
        _probability(coded_class, probability)
        for coded_class, probability in zip(
            (dn.class_concept(c) for c in result.classes), finding.probabilities, strict=True
        )
    ]


def _probability(coded_class: CodedConcept, probability: float) -> Measurement:
    measurement = Measurement(
        name=dn.PROBABILITY, value=float(probability), unit=dn.PROBABILITY_UNIT
    )
    measurement[0].ContentSequence = ContentSequence(
        [
            CodeContentItem(
                name=dn.FINDING,
                value=coded_class,
                relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
            )
        ]
    )
    return measurement


def _localisation(finding: Finding) -> QualitativeEvaluation:
    answer = dn.YES if finding.localisation_uncertain else dn.NO
    return QualitativeEvaluation(name=dn.LOCALISATION_UNCERTAIN, value=answer)


def _visual_explanation(sc: pydicom.Dataset) -> ImageContentItem:
    return ImageContentItem(
        name=dn.VISUAL_EXPLANATION,
        referenced_sop_class_uid=sc.SOPClassUID,
        referenced_sop_instance_uid=sc.SOPInstanceUID,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )


def _notices(models: list[ModelIdentity], not_analysed: int = 0) -> ContainerContentItem:
    """Return the report-level statements: review required, images not analysed,
    demonstration model, model notes, each model's intended use."""
    container = ContainerContentItem(
        name=dn.QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    notices = [_comment(REVIEW_NOTICE)]
    if not_analysed:
        notices.append(_comment(not_analysed_notice(not_analysed)))
    for model in models:
        if model.synthetic_training_data:
            text = f"{SYNTHETIC_NOTICE} ({model.name} {model.version})"
            notices.append(
                TextContentItem(dn.DEMONSTRATION_MODEL, text, RelationshipTypeValues.CONTAINS)
            )
        if model.reader_note:
            text = f"{model.name} {model.version}: {model.reader_note}"
            notices.append(_comment(text))
        if model.intended_use:
            text = f"{model.name} {model.version}: {model.intended_use}"
            notices.append(TextContentItem(dn.INTENDED_USE, text, RelationshipTypeValues.CONTAINS))
    container.ContentSequence = ContentSequence(notices)
    return container


def not_analysed_notice(count: int) -> str:
    """The statement of a report that leaves images out."""
    images = "image" if count == 1 else "images"
    return (
        f"INCOMPLETE: {count} {images} of this study could not be analysed; this report lists "
        "them as Not assessed. A later report follows if their analysis is retried."
    )


def _evidence(items: Sequence[SrImageItem]) -> list[pydicom.Dataset]:
    """The sources, overlays and presentation states; the first cleaned and completed for
    patient/study copying."""
    evidence = [conformant_header(items[0].source, _PATIENT_STUDY_KEYWORDS)]
    seen = {items[0].source.SOPInstanceUID}
    made = [made for item in items for made in (item.sc, item.pr) if made is not None]
    for dataset in [item.source for item in items] + made:
        if dataset.SOPInstanceUID not in seen:
            seen.add(dataset.SOPInstanceUID)
            evidence.append(dataset)
    return evidence


def _coding_schemes(items: Sequence[SrImageItem]) -> list[CodingSchemeIdentificationItem]:
    """Declare the node's private scheme and any other local scheme the classes use."""
    schemes = [dn.PRIVATE_SCHEME_IDENTIFICATION]
    designators = {dn.PRIVATE_SCHEME}
    for item in items:
        for coded in item.result.classes:
            scheme = coded.coding_scheme
            if scheme.startswith("99") and scheme not in designators:
                designators.add(scheme)
                schemes.append(CodingSchemeIdentificationItem(designator=scheme))
    return schemes
