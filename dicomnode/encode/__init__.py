"""Pure encoders from results to DICOM objects (no network, no database).

:func:`render_overlay` draws the Grad-CAM overlay of one image,
:func:`encode_sc` wraps it in a Secondary Capture image, :func:`encode_pr` draws the
result over the original as a Grayscale Softcopy Presentation State and
:func:`encode_sr` writes a study's results as a TID 1500 Comprehensive SR.
"""

from __future__ import annotations

from dicomnode.encode.pr import encode_pr
from dicomnode.encode.render import overlay_lines, render_overlay
from dicomnode.encode.sc import encode_sc
from dicomnode.encode.sr import SrImageItem, encode_sr

__all__ = [
    "SrImageItem",
    "encode_pr",
    "encode_sc",
    "encode_sr",
    "overlay_lines",
    "render_overlay",
]
