"""Evaluation figures: the text on them reads as written."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from PIL import Image

from dicomnode.encode.render import text_font
from dicomnode.training.report import gallery_image

MISSING = "\ue000"  # a private-use character: no font has a glyph for it, only the box


def _gallery(caption: str) -> npt.NDArray[np.uint8]:
    tile = Image.new("RGB", (64, 64), "grey")
    return np.asarray(gallery_image([(tile, caption)], "Grad-CAM gallery"))


def test_gallery_captions_draw_accented_file_names_not_boxes() -> None:
    """``Müller_Jörg_Hand.dcm`` is drawn with its letters, not with missing-glyph boxes."""
    written = _gallery("Müller_Jörg_Hand.dcm")
    boxed = _gallery(f"M{MISSING}ller_J{MISSING}rg_Hand.dcm")
    assert not np.array_equal(written, boxed)


def test_the_figure_and_overlay_font_has_latin_1_glyphs() -> None:
    font = text_font(14)
    box = font.getmask(MISSING).getbbox()
    for letter in "üöäéßñ":
        assert font.getmask(letter).getbbox() != box, letter
