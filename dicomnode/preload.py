"""What the workers' fork server imports before it forks any worker.

torch, timm, grad-cam (which imports OpenCV, matplotlib, SciPy and
scikit-learn: about 150 MB that each worker otherwise imports at its first
Grad-CAM) and the worker code are imported once, then :func:`gc.freeze`
moves every object they created into the permanent generation. Without it,
each worker's first garbage collections walk (and so write to) the headers of
those hundreds of thousands of objects, and the copy-on-write pages they sit on
become private copies in every worker; frozen, they stay shared.
"""

from __future__ import annotations

import gc

import pytorch_grad_cam  # noqa: F401
import timm  # noqa: F401
import torch  # noqa: F401

import dicomnode.inference
import dicomnode.worker  # noqa: F401

gc.collect()
gc.freeze()
