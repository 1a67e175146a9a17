"""Encode a result as a Grayscale Softcopy Presentation State on the original image.

Where the Secondary Capture burns the result into a copy of the image, the presentation
state (GSPS, PS3.3 A.33.1) draws it over the original in the radiologist's own viewer, as
graphics they can switch off, zoom with the image and window as they like (IHE AI Results
prefers this to burned-in pixels). It holds, in two graphic layers:

``AI RESULT``
    The result as text in the top left corner of the display: each finding (or why there
    is none), what the outline shows, the model, the review notice and, for a model trained
    on synthetic data, that notice; a localised finding (a knee) is framed by its box with
    its line of text above it.
``AI EVIDENCE``
    Each finding's explanation as outlines: where its heat map is at least
    :data:`OUTLINE_LEVEL` of its peak (the overlay's full-opacity level), and a cross at the
    peak.

The presentation state keeps the original's grey-scale pipeline (its Modality LUT, its
window or VOI LUT, its Presentation LUT Shape, MONOCHROME1 shown inverted): only the
graphics are added.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import numpy.typing as npt
import pydicom
from contourpy import LineType, contour_generator
from highdicom import (
    PresentationLUTShapeValues,
    PresentationLUTTransformation,
    VOILUTFunctionValues,
)
from highdicom.color import CIELabColor
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    GrayscaleSoftcopyPresentationState,
    SoftcopyVOILUTTransformation,
    TextJustificationValues,
    TextObject,
)
from PIL import Image

from dicomnode.encode.header import conformant_header, stamp_in_source_zone
from dicomnode.encode.render import (
    HEAT_FULL,
    REVIEW_NOTICE,
    SYNTHETIC_NOTICE,
    model_line,
    result_lines,
)
from dicomnode.encode.sc import (
    is_paired,
    overlay_side,
    series_description,
    source_laterality,
)
from dicomnode.errors import EncodeError
from dicomnode.imaging.pixels import shown_inverted
from dicomnode.values import Finding, FloatArray, ImageResult, OwnWindow, Placement, Region

OUTLINE_LEVEL = HEAT_FULL
"""The outline is drawn where a finding's heat map reaches this share of its peak."""

MAX_OUTLINES = 4
"""Outlines drawn per finding, the largest first (small islands of heat are left out)."""

_CONTOUR_SIDE = 160
"""The heat map is outlined at this longest side (it is smooth: a Grad-CAM map comes from
a feature map of 7-20 cells), which keeps each outline to a few hundred points."""

_LABEL_MAX = 16
_RESULT = GraphicLayer(
    "AI RESULT", 1, "the AI result: findings, model and notices", CIELabColor(97.1, -21.6, 94.5)
)
_EVIDENCE = GraphicLayer(
    "AI EVIDENCE",
    2,
    "where the evidence for each finding is strongest",
    CIELabColor(62.0, 52.0, 70.0),
)
_LINE_HEIGHT = 0.035
"""Height of a line of the result's text, as a share of the displayed area."""

Points = npt.NDArray[np.float64]


def presentation_state_applies(source: pydicom.Dataset) -> bool:
    """A grey-scale presentation state fits the source: one sample per pixel, MONOCHROME."""
    try:
        samples = int(source.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):  # written in another VR: not a header to draw on
        return False
    photometric = str(source.get("PhotometricInterpretation", "MONOCHROME2"))
    return samples == 1 and photometric.startswith("MONOCHROME")


def encode_pr(
    source: pydicom.Dataset,
    result: ImageResult,
    image_size: tuple[int, int],
    placement: Placement,
    *,
    own_window: OwnWindow | None = None,
) -> pydicom.Dataset:
    """Encode the result of one image as a presentation state referencing it.

    Parameters
    ----------
    source:
        The original image, read without pixel data (its Rows and Columns, grey-scale
        pipeline, patient and study are used).
    result:
        The result to draw; its heat maps may be at a smaller size than the image (the
        overlay's), and are scaled to it.
    image_size:
        (rows, columns) of the decoded image, which the graphics are placed on (and the
        state's Displayed Area spans, whatever the header's Rows and Columns say).
    placement:
        The presentation state's own series and SOP Instance UIDs and numbers, and the
        node (General Equipment module).
    own_window:
        The window the node chose itself for an image whose header has none it could use
        (:attr:`PreparedImage.own_window`): the state carries it, so that the image looks
        as on the overlay. Otherwise the header's window or VOI LUT is carried.

    Returns
    -------
    pydicom.Dataset
        A Grayscale Softcopy Presentation State (Modality PR).

    Raises
    ------
    EncodeError
        When the source is not a grey-scale image or lacks what a presentation state needs.
    """
    if not presentation_state_applies(source):
        raise EncodeError("a grey-scale presentation state needs a MONOCHROME source image")
    rows, columns = image_size
    source = _sized(conformant_header(source), rows, columns)
    model = result.model
    description = series_description(_prefix(source, result), model)
    try:
        annotations = [
            _annotation(source, _RESULT, *_result_graphics(result, source, rows, columns)),
            _annotation(source, _EVIDENCE, _evidence_graphics(result, rows, columns), []),
        ]
        pr = GrayscaleSoftcopyPresentationState(
            referenced_images=[source],
            series_instance_uid=placement.series_uid,
            series_number=placement.series_number,
            sop_instance_uid=placement.sop_uid,
            instance_number=placement.instance_number,
            manufacturer=placement.manufacturer,
            manufacturer_model_name=model.name[:64],
            software_versions=placement.software_version[:64],
            device_serial_number="",
            content_label=content_label(model.name),
            content_description=description,
            graphic_annotations=[a for a in annotations if a is not None],
            graphic_layers=[_RESULT, _EVIDENCE],
            voi_lut_transformations=_voi(own_window),
            presentation_lut_transformation=PresentationLUTTransformation(
                presentation_lut_shape=_presentation_lut_shape(source)
            ),
            series_description=description,
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise EncodeError(f"cannot encode the presentation state: {exc}") from exc
    _series_laterality(pr, source, result)
    stamp_in_source_zone(pr, source)
    return pr


def _series_laterality(pr: pydicom.Dataset, source: pydicom.Dataset, result: ImageResult) -> None:
    """The body part and side of the image the state annotates (its series is that side's,
    as the overlay's is). General Series Laterality is Type 2C: empty for a paired body part
    shown on both sides or on an unknown one, absent for an unpaired one."""
    if "BodyPartExamined" in source:
        pr.BodyPartExamined = source.BodyPartExamined
    side = overlay_side(source, result)
    if side is not None or is_paired(source):
        pr.Laterality = side


def _prefix(source: pydicom.Dataset, result: ImageResult) -> str:
    """ "AI annotations", with the side when the state annotates one (a series per side)."""
    side = overlay_side(source, result)
    return "AI annotations" if side is None else f"AI annotations {side}"


def _sized(source: pydicom.Dataset, rows: int, columns: int) -> pydicom.Dataset:
    """``source`` with the decoded image's Rows and Columns (a copy when it says otherwise,
    as a header with Rows written in another VR does)."""
    if (source.get("Rows"), source.get("Columns")) == (rows, columns):
        return source
    sized = copy.deepcopy(source)
    del sized.Rows, sized.Columns
    sized.Rows, sized.Columns = rows, columns
    return sized


def content_label(model_name: str) -> str:
    """The Content Label (CS, 16 characters of A-Z, 0-9, space and _) naming the model."""
    label = re.sub(r"[^A-Z0-9_ ]", "_", model_name.upper())[:_LABEL_MAX].strip()
    return label or "AI_RESULT"


def _presentation_lut_shape(source: pydicom.Dataset) -> PresentationLUTShapeValues:
    """INVERSE where the node shows the image inverted (MONOCHROME1, whose low values are
    white, or a Presentation LUT Shape INVERSE), else IDENTITY: with the state applied the
    image looks as it does without it, and as on the overlay."""
    photometric = str(source.get("PhotometricInterpretation", ""))
    if shown_inverted(source, photometric):
        return PresentationLUTShapeValues.INVERSE
    return PresentationLUTShapeValues.IDENTITY


def _voi(own_window: OwnWindow | None) -> list[SoftcopyVOILUTTransformation] | None:
    """The node's own window as the state's VOI (None: highdicom copies the source's)."""
    if own_window is None:
        return None
    return [
        SoftcopyVOILUTTransformation(
            window_center=own_window.center,
            window_width=own_window.width,
            window_explanation="dicomnode: 0.5-99.5 % of the image's values",
            voi_lut_function=VOILUTFunctionValues.LINEAR_EXACT,
        )
    ]


def _annotation(
    source: pydicom.Dataset,
    layer: GraphicLayer,
    graphics: list[GraphicObject],
    texts: list[TextObject],
) -> GraphicAnnotation | None:
    if not graphics and not texts:
        return None
    return GraphicAnnotation(
        referenced_images=[source],
        graphic_layer=layer,
        graphic_objects=graphics or None,
        text_objects=texts or None,
    )


def summary_lines(result: ImageResult, laterality: str | None) -> list[str]:
    """The text in the display's corner: the findings without a box of their own (a whole-
    image model's, or why there is none), what the outline shows, model and notices."""
    lines = [
        line
        for line, finding in zip(
            result_lines(result, laterality), _findings_or_none(result), strict=True
        )
        if finding is None or not finding.localised
    ]
    if result.findings:
        lines.append(_outline_legend(result))
    lines += [model_line(result.model), REVIEW_NOTICE]
    if result.model.synthetic_training_data:
        lines.append(SYNTHETIC_NOTICE)
    return lines


def _findings_or_none(result: ImageResult) -> list[Finding | None]:
    return list(result.findings) if result.findings else [None]


def _outline_legend(result: ImageResult) -> str:
    level = f"{round(OUTLINE_LEVEL * 100)}%"
    if len(result.findings) == 1:
        meaning = result.findings[0].predicted.code_meaning
        return f"Outline: evidence for {meaning} at {level} of its peak or more; cross: peak"
    return f"Outline: evidence for each box's result at {level} of its peak or more; cross: peak"


def _result_graphics(
    result: ImageResult, source: pydicom.Dataset, rows: int, columns: int
) -> tuple[list[GraphicObject], list[TextObject]]:
    """The boxes of localised findings, their labels, and the summary text."""
    laterality = source_laterality(source)
    texts = [
        TextObject(
            line,
            AnnotationUnitsValues.DISPLAY,
            bounding_box=(0.01, 0.01 + i * _LINE_HEIGHT, 0.99, 0.01 + (i + 1) * _LINE_HEIGHT),
            text_justification=TextJustificationValues.LEFT,
        )
        for i, line in enumerate(summary_lines(result, laterality))
    ]
    boxes: list[GraphicObject] = []
    lines = result_lines(result, laterality) if result.findings else ()
    for finding, line in zip(result.findings, lines, strict=True):
        if finding.localised:
            boxes.append(_polyline(_box_points(finding.region)))
            texts.append(_box_label(finding.region, line, rows, columns))
    return boxes, texts


def _box_points(region: Region) -> Points:
    x0, y0, x1, y1 = region.x0, region.y0, region.x1, region.y1
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)


def _box_label(region: Region, line: str, rows: int, columns: int) -> TextObject:
    """The finding's line just above its box (inside its top when the box touches the top)."""
    height = max(8.0, min(rows, columns) / 25)
    top = region.y0 - height if region.y0 >= height else region.y0
    right = float(max(region.x1, min(columns, region.x0 + 20 * height)))
    return TextObject(
        line,
        AnnotationUnitsValues.PIXEL,
        bounding_box=(float(region.x0), float(top), right, float(top + height)),
        text_justification=TextJustificationValues.LEFT,
    )


def _evidence_graphics(result: ImageResult, rows: int, columns: int) -> list[GraphicObject]:
    graphics: list[GraphicObject] = []
    for finding in result.findings:
        graphics += [_polyline(points) for points in heat_outlines(finding.heatmap, rows, columns)]
        graphics += [_polyline(points) for points in _cross(finding.peak, rows, columns)]
    return graphics


def _polyline(points: Points) -> GraphicObject:
    return GraphicObject(GraphicTypeValues.POLYLINE, points, AnnotationUnitsValues.PIXEL)


def heat_outlines(
    heatmap: FloatArray, rows: int, columns: int, level: float = OUTLINE_LEVEL
) -> list[Points]:
    """Closed outlines of ``heatmap`` at ``level`` of its peak, in the image's pixel
    coordinates ((column, row), 0 the top left corner of the first pixel).

    ``heatmap`` may be at any size (the overlay's); it is outlined at
    :data:`_CONTOUR_SIDE` and scaled to ``rows`` x ``columns``. At most
    :data:`MAX_OUTLINES` outlines, the largest first.
    """
    if heatmap.size == 0 or float(heatmap.max()) <= 0.0:
        return []
    small = _shrunk(heatmap / float(heatmap.max()))
    padded = np.pad(small, 1)  # heat at the border still gives a closed outline
    lines = contour_generator(z=padded, line_type=LineType.Separate).lines(level)
    scale = np.array([columns / small.shape[1], rows / small.shape[0]])
    outlines = [
        np.clip((np.asarray(line, dtype=np.float64) - 1 + 0.5) * scale, 0, [columns, rows])
        for line in lines
        if len(line) >= 4
    ]
    outlines.sort(key=_area, reverse=True)
    return [outline for outline in outlines[:MAX_OUTLINES] if _area(outline) > 0]


def _shrunk(heat: FloatArray) -> FloatArray:
    longest = max(heat.shape)
    if longest <= _CONTOUR_SIDE:
        return heat
    scale = _CONTOUR_SIDE / longest
    size = (max(2, round(heat.shape[1] * scale)), max(2, round(heat.shape[0] * scale)))
    image = Image.fromarray(np.ascontiguousarray(heat, dtype=np.float32), mode="F")
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def _area(points: Points) -> float:
    """The area a closed outline encloses (shoelace formula)."""
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)


def _cross(peak: tuple[float, float], rows: int, columns: int) -> list[Points]:
    """Two strokes crossing at the heat peak (the centre of its pixel, as the SR's peak),
    clipped to the image."""
    arm = max(3.0, min(rows, columns) / 60)
    x, y = peak[0] + 0.5, peak[1] + 0.5
    horizontal = [[max(0.0, x - arm), y], [min(columns, x + arm), y]]
    vertical = [[x, max(0.0, y - arm)], [x, min(rows, y + arm)]]
    return [np.array(horizontal, dtype=np.float64), np.array(vertical, dtype=np.float64)]
