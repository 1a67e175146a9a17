"""Render the Grad-CAM overlay that the Secondary Capture image carries.

The overlay is the windowed radiograph in grey with each finding's Grad-CAM
heatmap blended in the *turbo* colour map where the heat is significant, a
rectangle around a localised region, labelled just above it with its side or
number, and a cross at the heat peak; above the image, in a band of its own,
the text that names the result and the algorithm and a colour scale that says
what the heat means. Apart from the box labels no text is drawn on the image:
the band is added to it, not drawn over it.

Everything works on ``uint8``/``uint16`` arrays and only touches the pixels
it changes (heat bounding box, boxes, band), so a 3000 x 3000 radiograph
renders in well under a second on one CPU core.
"""

from __future__ import annotations

import math
from contextlib import suppress
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from dicomnode.errors import EncodeError
from dicomnode.imaging.pixels import MIN_SIDE
from dicomnode.values import (
    Finding,
    FloatArray,
    ImageResult,
    ModelIdentity,
    PreparedImage,
    Region,
)

UInt8Array = npt.NDArray[np.uint8]
Colour = tuple[int, int, int]
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

HEAT_THRESHOLD = 0.2
"""Heat below this is not drawn at all."""

HEAT_FULL = 0.5
"""Heat at or above this is drawn with :data:`MAX_ALPHA` opacity."""

MAX_ALPHA = 0.6
"""Largest opacity of the colour map over the radiograph."""

REVIEW_NOTICE = "AI result, requires review by a radiologist"
SYNTHETIC_NOTICE = "DEMONSTRATION MODEL, synthetic training data: not for diagnostic use"
CLOSE_CALL = 0.15
"""A runner-up class within this probability of the result is named beside it."""

_TEXT: Colour = (255, 255, 255)
_WARNING: Colour = (255, 170, 0)
_REGION: Colour = (255, 230, 0)
_PEAK: Colour = (0, 255, 255)


def _turbo_lut() -> UInt8Array:
    """Return the 256-entry turbo colour map (polynomial fit by A. Mikhailov, 2019)."""
    x = np.linspace(0.0, 1.0, 256)
    red = 0.13572138 + x * (
        4.61539260 + x * (-42.66032258 + x * (132.13108234 + x * (-152.94239396 + x * 59.28637943)))
    )
    green = 0.09140261 + x * (
        2.19418839 + x * (4.84296658 + x * (-14.18503333 + x * (4.27729857 + x * 2.82956604)))
    )
    blue = 0.10667330 + x * (
        12.64194608 + x * (-60.58204836 + x * (110.36276771 + x * (-89.90310912 + x * 27.34824973)))
    )
    rgb = np.clip(np.stack([red, green, blue], axis=1), 0.0, 1.0)
    return np.round(rgb * 255.0).astype(np.uint8)


def _alpha_lut() -> npt.NDArray[np.uint16]:
    """Return the opacity (0..255) for each of the 256 heat levels."""
    heat = np.linspace(0.0, 1.0, 256)
    ramp = np.clip((heat - HEAT_THRESHOLD) / (HEAT_FULL - HEAT_THRESHOLD), 0.0, 1.0)
    alpha = np.where(heat >= HEAT_THRESHOLD, ramp * MAX_ALPHA * 255.0, 0.0)
    return np.round(alpha).astype(np.uint16)


TURBO: UInt8Array = _turbo_lut()
"""The colour map: ``TURBO[level]`` is the RGB colour of heat ``level / 255``."""

_ALPHA = _alpha_lut()


def _blend_lut() -> UInt8Array:
    """``_BLEND[level << 8 | grey]``: the RGB of grey ``grey`` under heat ``level``.

    The grey overlay has one value in all three channels, so the blend of every
    pixel is one of 256 x 256 colours: looking it up is about three times faster
    than computing it per pixel, with the same integer rounding.
    """
    alpha = _ALPHA[:, None, None].astype(np.uint32)
    grey = np.arange(256, dtype=np.uint32)[None, :, None]
    colour = TURBO[:, None, :].astype(np.uint32)
    mixed = (grey * (255 - alpha) + colour * alpha + 127) // 255
    return mixed.astype(np.uint8).reshape(256 * 256, 3)


_BLEND = _blend_lut()


@dataclass(frozen=True)
class _Layout:
    """Sizes that scale with the image so the overlay reads the same at any size."""

    rows: int
    columns: int
    margin: int
    line_width: int
    font_size: int

    @classmethod
    def for_shape(cls, rows: int, columns: int) -> _Layout:
        short = min(rows, columns)
        return cls(
            rows=rows,
            columns=columns,
            margin=max(2, short // 100),
            line_width=max(1, short // 400),
            font_size=max(10, round(short / 45)),
        )


def overlay_lines(result: ImageResult, laterality: str | None = None) -> tuple[str, ...]:
    """Return the lines of text burned into the overlay's band, top to bottom.

    Parameters
    ----------
    result:
        What the model said about the image.
    laterality:
        Image laterality used for findings that carry none of their own.

    Returns
    -------
    tuple of str
        One line per finding (or why there is none), what the heat shows, the
        model line, the review notice and, for models trained on synthetic data
        only, :data:`SYNTHETIC_NOTICE`.
    """
    model = result.model
    lines = list(result_lines(result, laterality))
    if not result.not_assessed:
        lines.append(_heat_legend(result))
    lines.append(model_line(model))
    lines.append(REVIEW_NOTICE)
    if model.synthetic_training_data:
        lines.append(SYNTHETIC_NOTICE)
    return tuple(lines)


def model_line(model: ModelIdentity) -> str:
    """The line that names the algorithm: name, version and the start of its weights' hash."""
    return f"{model.name} {model.version} (sha256 {model.sha256[:12]})"


def result_lines(result: ImageResult, laterality: str | None = None) -> tuple[str, ...]:
    """The result itself: one line per finding, or the one line saying why there is none."""
    if result.not_assessed:
        return (result.not_assessed,)
    labels = region_labels(result, laterality)
    return tuple(
        _finding_line(finding, label, result)
        for finding, label in zip(result.findings, labels, strict=True)
    )


def region_labels(result: ImageResult, laterality: str | None = None) -> tuple[str, ...]:
    """The label of each finding on the overlay: its side (``R``, ``L``), else its number
    among several (``1``, ``2``), else nothing; a localised box carries the same label."""
    sides = [finding.laterality or laterality for finding in result.findings]
    if all(sides) and len(set(sides)) == len(sides):
        return tuple(str(side) for side in sides)
    if len(sides) == 1:
        return ("",)
    return tuple(str(number) for number in range(1, len(sides) + 1))


def percent(probability: float) -> str:
    """A probability as a reader takes it in: ``71%`` (halves rounded up), never ``100%``
    or ``0%`` unless exact."""
    value = math.floor(probability * 100 + 0.5)
    if value >= 100 and probability < 1.0:
        return ">99%"
    if value <= 0 and probability > 0.0:
        return "<1%"
    return f"{value}%"


def _finding_line(finding: Finding, label: str, result: ImageResult) -> str:
    text = f"{finding.predicted.code_meaning}, probability {percent(finding.probability)}"
    runner_up = finding.runner_up(result.classes)
    if runner_up is not None and finding.probability - runner_up[1] < CLOSE_CALL:
        text += f" (next: {runner_up[0].code_meaning} {percent(runner_up[1])})"
    if label:
        text = f"{label}: {text}"
    if finding.localisation_uncertain:
        why = f": {finding.uncertainty[0]}" if finding.uncertainty else ""
        text = f"{text}; localisation uncertain{why}"
    return text


def _heat_legend(result: ImageResult) -> str:
    if len(result.findings) == 1:
        return f"Colour: evidence for {result.findings[0].predicted.code_meaning}"
    return "Colour: evidence for each box's result, each box scaled to its own peak"


def render_overlay(image: PreparedImage, result: ImageResult, max_size: int = 0) -> UInt8Array:
    """Render the explanation overlay of one image, its text in a band above it.

    Parameters
    ----------
    image:
        The prepared (windowed, display-ready) radiograph.
    result:
        The model's findings on ``image``; each heatmap has the image's shape
        or the overlay's (see :func:`fitted_result`).
    max_size:
        The longest side of the image in the overlay, in pixels (0: the image's
        own size). Overlays of 3000-pixel radiographs are 27 MB of RGB; a PACS
        viewer shows them no better than at 2048 pixels.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape (band + rows, columns, 3), RGB, with (rows,
        columns) ``image.shape_within(max_size)`` and the text band on top.

    Raises
    ------
    EncodeError
        When the pixels are not a 2-D image or a heatmap does not match them.
    """
    _check_image(image)
    shape = image.shape_within(max_size)
    fitted = fitted_result(image, result, max_size)
    _check_heatmaps(shape, fitted)
    rgb = _grey_rgb(image.pixels, shape)
    heat = _combined_heat(fitted.findings)
    if heat is not None:
        _blend_heat(rgb, heat)
    layout = _Layout.for_shape(*shape)
    labels = region_labels(result, image.laterality)
    for finding, label in zip(fitted.findings, labels, strict=True):
        _draw_region(rgb, finding, label, layout)
    band = _band(overlay_lines(result, image.laterality), result, layout)
    return np.concatenate([band, rgb], axis=0)


def heat_image(pixels: FloatArray, heat: FloatArray | None) -> UInt8Array:
    """The [0, 1] pixels in grey with ``heat`` (same shape, or ``None``) blended in, as RGB.

    The overlay's own colours: no text, boxes or scale bar.
    """
    rgb = _grey_rgb(pixels, pixels.shape)
    if heat is not None:
        _blend_heat(rgb, heat)
    return rgb


def _check_image(image: PreparedImage) -> None:
    if image.pixels.ndim != 2 or min(image.rows, image.columns) < MIN_SIDE:
        raise EncodeError(f"cannot render pixels of shape {image.pixels.shape}")


def _check_heatmaps(shape: tuple[int, int], result: ImageResult) -> None:
    for finding in result.findings:
        if finding.heatmap.shape != shape:
            raise EncodeError(
                f"heatmap shape {finding.heatmap.shape} differs from the overlay's shape {shape}"
            )


def _levels(values: FloatArray) -> UInt8Array:
    """[0, 1] values as the nearest of 256 levels (outside values clipped)."""
    scaled = np.multiply(values, 255.0, dtype=np.float32)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    scaled += 0.5
    return scaled.astype(np.uint8)


def _grey_rgb(pixels: FloatArray, shape: tuple[int, ...]) -> UInt8Array:
    """The [0, 1] pixels as a grey RGB ``uint8`` image of ``shape`` (rows, columns).

    Quantised to 256 levels first, then shrunk: resizing bytes is about four
    times faster than resizing floats, and the overlay is bytes anyway.
    """
    grey = _levels(pixels)
    if grey.shape != shape:
        grey = np.asarray(
            Image.fromarray(grey).resize(
                (shape[1], shape[0]), Image.Resampling.BILINEAR, reducing_gap=2.0
            )
        )
    rgb: UInt8Array = np.repeat(grey[..., None], 3, axis=2)  # 3x faster than broadcasting
    return rgb


def _combined_heat(findings: tuple[Finding, ...]) -> FloatArray | None:
    """Return the pixel-wise maximum of all heatmaps (``None`` without findings)."""
    if not findings:
        return None
    heat = findings[0].heatmap
    for finding in findings[1:]:
        heat = np.maximum(heat, finding.heatmap)
    return heat


def _heat_box(levels: npt.NDArray[np.uint8]) -> tuple[slice, slice] | None:
    """Return the bounding box of the drawn heat levels, or ``None`` if none is drawn."""
    drawn = levels >= int(np.ceil(HEAT_THRESHOLD * 255.0))
    rows = np.flatnonzero(drawn.any(axis=1))
    if rows.size == 0:
        return None
    columns = np.flatnonzero(drawn[rows[0] : rows[-1] + 1].any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1)


def _blend_heat(rgb: UInt8Array, heat: FloatArray) -> None:
    """Blend the colour-mapped heat into the grey ``rgb`` in place (see :data:`_BLEND`)."""
    levels = _levels(heat)
    box = _heat_box(levels)
    if box is None:
        return
    index = levels[box].astype(np.intp) << 8
    index |= rgb[box][..., 0]
    rgb[box] = np.take(_BLEND, index, axis=0)


def _draw_box(rgb: UInt8Array, box: tuple[int, int, int, int], colour: Colour, width: int) -> None:
    """Draw the outline of the (x0, y0, x1, y1) box, clipped to the image."""
    rows, columns = rgb.shape[:2]
    x0, y0 = max(0, box[0]), max(0, box[1])
    x1, y1 = min(columns, box[2]), min(rows, box[3])
    if x1 <= x0 or y1 <= y0:
        return
    rgb[y0 : min(y1, y0 + width), x0:x1] = colour
    rgb[max(y0, y1 - width) : y1, x0:x1] = colour
    rgb[y0:y1, x0 : min(x1, x0 + width)] = colour
    rgb[y0:y1, max(x0, x1 - width) : x1] = colour


def _draw_region(rgb: UInt8Array, finding: Finding, label: str, layout: _Layout) -> None:
    """Outline a localised region, label it, and mark the heat peak with a cross (last,
    so nothing hides it)."""
    region = finding.region
    whole = (region.x0, region.y0, region.x1, region.y1) == (0, 0, layout.columns, layout.rows)
    if not whole:
        _draw_box(rgb, (region.x0, region.y0, region.x1, region.y1), _REGION, layout.line_width)
        if label:
            _draw_label(rgb, region, label, layout)
    column, row = round(finding.peak[0]), round(finding.peak[1])
    arm, half = 4 * layout.margin, max(1, layout.line_width) // 2 + 1
    _draw_box(rgb, (column - arm, row - half + 1, column + arm + 1, row + half), _PEAK, half)
    _draw_box(rgb, (column - half + 1, row - arm, column + half, row + arm + 1), _PEAK, half)


def _draw_label(rgb: UInt8Array, region: Region, label: str, layout: _Layout) -> None:
    """A box's label (its side or number, the only text on the image) just above its
    top-left corner, or inside the corner where the image leaves no room above it."""
    font = text_font(layout.font_size)
    height = _line_height(font) + 2 * layout.margin
    above = region.y0 - height
    origin = (max(0, region.x0), above if above >= 0 else max(0, region.y0))
    _draw_text_block(rgb, origin, [(label, _REGION)], font, layout.margin)


@lru_cache(maxsize=32)
def text_font(size: int) -> Font:
    """The font of burned-in and figure text, ``size`` pixels high.

    Pillow's built-in font covers ASCII only and draws accented letters (a model's class
    names, a file name such as ``Müller_Jörg_Hand.dcm`` in a gallery caption) as boxes;
    DejaVu Sans covers Latin-1 and beyond. matplotlib (which grad-cam requires) ships it;
    without it, Pillow's font is still better than no text.
    """
    path = _dejavu_sans()
    if path is not None:
        with suppress(OSError):
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def _dejavu_sans() -> Path | None:
    """matplotlib's copy of DejaVu Sans, found without importing matplotlib.

    Importing it would set up its configuration folder, which a service account may
    not have; only the font file is wanted.
    """
    spec = find_spec("matplotlib")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    return path if path.is_file() else None


def _text_width(font: Font, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)


def _wrapped(text: str, font: Font, available: int) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``available`` pixels (a single
    word wider than that stays whole)."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and _text_width(font, candidate) > available:
            lines.append(current)
            current = word
        else:
            current = candidate
    return [*lines, current]


def _line_height(font: Font) -> int:
    _, top, _, bottom = font.getbbox("Ag|")
    return int(bottom - top) + max(2, int(bottom - top) // 4)


def _draw_text_block(
    rgb: UInt8Array,
    origin: tuple[int, int],
    lines: list[tuple[str, Colour]],
    font: Font,
    padding: int,
) -> None:
    """Darken a box at ``origin`` (x, y) just big enough for ``lines`` and write them in it."""
    height = _line_height(font)
    width = max(_text_width(font, text) for text, _ in lines)
    x0, y0 = origin
    x1 = min(rgb.shape[1], x0 + width + 2 * padding)
    y1 = min(rgb.shape[0], y0 + height * len(lines) + 2 * padding)
    crop = rgb[y0:y1, x0:x1] // 4
    canvas = Image.fromarray(crop)
    draw = ImageDraw.Draw(canvas)
    for index, (text, colour) in enumerate(lines):
        _, top, _, _ = font.getbbox(text)
        draw.text((padding, padding + index * height - top), text, fill=colour, font=font)
    rgb[y0:y1, x0:x1] = np.asarray(canvas)


def _band(lines: tuple[str, ...], result: ImageResult, layout: _Layout) -> UInt8Array:
    """The dark band above the image: the text lines, wrapped to its width at the layout's
    font size (a narrow image gets more lines, not smaller letters), then the colour scale.

    Warnings (no finding, synthetic training data) are drawn in orange.
    """
    font = text_font(layout.font_size)
    height = _line_height(font)
    colours = [_TEXT] * len(lines)
    if result.model.synthetic_training_data:
        colours[-1] = _WARNING
    if result.not_assessed:
        colours[0] = _WARNING
    available = layout.columns - 4 * layout.margin
    coloured = [
        (part, colour)
        for line, colour in zip(lines, colours, strict=True)
        for part in _wrapped(line, font, available)
    ]
    text_rows = 2 * layout.margin + height * len(coloured)
    band = np.zeros((text_rows + height + layout.margin, layout.columns, 3), dtype=np.uint8)
    canvas = Image.fromarray(band)
    draw = ImageDraw.Draw(canvas)
    for index, (text, colour) in enumerate(coloured):
        _, top, _, _ = font.getbbox(text)
        draw.text((2 * layout.margin, layout.margin + index * height - top), text, colour, font)
    # the scale says what the colours mean; without findings there are none
    origin = (2 * layout.margin, text_rows)
    scale = _scale_words(draw, font, origin, height, layout) if result.findings else None
    band = np.asarray(canvas).copy()
    if scale is not None:
        x0, width = scale
        levels = np.linspace(0, 255, width).round().astype(np.uint8)
        band[text_rows : text_rows + max(2, (height * 2) // 3), x0 : x0 + width] = TURBO[levels]
    return band


def _scale_words(
    draw: ImageDraw.ImageDraw,
    font: Font,
    origin: tuple[int, int],
    height: int,
    layout: _Layout,
) -> tuple[int, int]:
    """Write ``low`` and ``high`` on the scale's line from ``origin`` (x, y); return where
    the colours go between them: (first column, width)."""
    x, y = origin
    gap = max(2, height // 3)
    x0 = x + _text_width(font, "low") + gap
    width = max(0, min(_scale_width(layout), layout.columns - x0))
    for word, left in (("low", x), ("high", x0 + width + gap)):
        _, top, _, _ = font.getbbox(word)
        draw.text((left, y - top), word, _TEXT, font)
    return x0, width


def _scale_width(layout: _Layout) -> int:
    return max(16, layout.columns // 4)


def fitted_result(image: PreparedImage, result: ImageResult, max_size: int) -> ImageResult:
    """``result`` on the overlay of ``image`` whose longest side is at most ``max_size``.

    Heatmaps, regions and peaks are scaled with the image; a heatmap already
    made at the overlay's shape (as the node's predictor makes it) is kept as
    it is. ``max_size`` 0 (or an image already small enough) returns ``result``.
    """
    rows, columns = image.shape_within(max_size)
    if (rows, columns) == (image.rows, image.columns):
        return result
    scale = max_size / max(image.rows, image.columns)
    findings = tuple(_scaled_finding(f, (columns, rows), scale) for f in result.findings)
    return replace(result, findings=findings)


def _resize(array: FloatArray, size: tuple[int, int]) -> FloatArray:
    """``array`` resized to ``size`` (columns, rows); unchanged when empty or already that size."""
    if array.size == 0 or array.shape == (size[1], size[0]):
        return array
    resized = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), mode="F").resize(
        size, Image.Resampling.BILINEAR, reducing_gap=2.0
    )
    return np.asarray(resized, dtype=np.float32)


def _scaled_finding(finding: Finding, size: tuple[int, int], scale: float) -> Finding:
    columns, rows = size
    region = finding.region
    box = Region(
        min(columns, int(region.x0 * scale)),
        min(rows, int(region.y0 * scale)),
        min(columns, max(int(region.x0 * scale) + 1, round(region.x1 * scale))),
        min(rows, max(int(region.y0 * scale) + 1, round(region.y1 * scale))),
    )
    peak = (finding.peak[0] * scale, finding.peak[1] * scale)
    return replace(finding, heatmap=_resize(finding.heatmap, size), region=box, peak=peak)
