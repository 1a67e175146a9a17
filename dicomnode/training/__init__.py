"""Training, cross-validation and evaluation of the node's models.

``config``: the recipe (YAML). ``data``: the labelled image folders, a decoded
cache and the augmenting dataset. ``folds``: patient-grouped stratified folds.
``metrics``: the figures every card reports. ``pretrained``: where initial
weights are found (never downloaded); ``network``: the network a recipe trains,
with them loaded. ``train``: the loop, fold by fold, checkpointed every epoch;
``state``: the values it passes on; ``output``: the model directory it writes.
``evaluate``: a model directory against a labelled folder.

The node never imports this package (``models`` knows nothing of ``training``).
"""

from __future__ import annotations

from dicomnode.errors import TrainingError

__all__ = ["TrainingError"]
