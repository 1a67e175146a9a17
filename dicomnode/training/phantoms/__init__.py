"""Synthetic radiograph phantoms with lesion masks, for training and explaining models.

No labelled public hand-RA or spine data can be reached by the node's
training, so these phantoms stand in: radiograph-like images (Beer-Lambert
attenuation of parametric anatomy, scatter, heel effect, quantum noise,
display processing) that vary in pose, size, laterality, exposure, noise,
bit depth and photometric interpretation, each abnormal one with a mask of
exactly where its lesion was drawn (for the Grad-CAM pointing game).

``common``: the :class:`Phantom` value object, geometry and the X-ray model.
``hand``: PA hands, normal or with rheumatoid erosions, joint-space
narrowing and periarticular osteopenia. ``spine``: AP and lateral lumbar
spines, normal or with a compression/wedge fracture, scoliosis or listhesis.
``dataset``: labelled training folders (PNG and/or DICOM DX, masks, CSV).
``cli``: the ``dicomnode phantoms`` command.

Every generator is deterministic from its seed, and takes ``with_lesion=False``
to draw an abnormal case's lesion-free twin (same anatomy, pose, exposure
and noise), which is how the tests check that masks lie where lesions are.
"""

from __future__ import annotations

from dicomnode.training.phantoms.common import Phantom
from dicomnode.training.phantoms.dataset import (
    CSV_COLUMNS,
    GROUP_PATTERN,
    PhantomCase,
    generate_case,
    plan_cases,
    write_phantom_folder,
)
from dicomnode.training.phantoms.hand import generate_hand
from dicomnode.training.phantoms.spine import generate_spine

__all__ = [
    "CSV_COLUMNS",
    "GROUP_PATTERN",
    "Phantom",
    "PhantomCase",
    "generate_case",
    "generate_hand",
    "generate_spine",
    "plan_cases",
    "write_phantom_folder",
]
