"""Explanations of model outputs.

``gradcam``: batched Grad-CAM (or HiResCAM, LayerCAM) on named layers and the
heatmap peak; the node's inference calls it once per batch. ``shap_map``: SHAP,
offline only (``dicomnode explain`` and ``dicomnode pointing``), an
:class:`~dicomnode.explain.gradcam.Explainer` a predictor can take instead.
"""

from dicomnode.explain.gradcam import CamBatch, Explainer, grad_cam, peak

__all__ = ["CamBatch", "Explainer", "grad_cam", "peak"]
