"""Explanations of model outputs.

``gradcam``: batched Grad-CAM (or HiResCAM, LayerCAM) on named layers and the
heatmap peak; the node's inference calls it once per batch. (SHAP and other
offline explanations belong to training and reports, not here.)
"""

from dicomnode.explain.gradcam import CamBatch, grad_cam, peak

__all__ = ["CamBatch", "grad_cam", "peak"]
