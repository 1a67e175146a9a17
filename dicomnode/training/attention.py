"""Explanation supervision: train the card's class activation map to point at the lesion.

Where the training images have lesion masks (:mod:`dicomnode.training.masks`),
a recipe may ask (``mask_supervision:``) for a second loss term beside the
cross-entropy, after "right for the right reasons" (Ross et al. 2017) and the
guided attention of GAIN (Li et al. 2018): for every training image with a
non-empty mask, the map of its own class, computed exactly as the node computes
the card's explanation (the same method and layers, each layer's map scaled to
[0, 1], resized to the input and averaged), is pushed to put its mass, and so
its peak, inside the mask::

    loss = -log( sum_inside exp(s * map) / sum_all exp(s * map) )

with ``s`` the ``sharpness``. At ``s`` of 20 the term is about zero when the
peak is in the mask and the map falls off away from it. The map is
differentiated with ``create_graph`` (a double backward pass: about twice the
cost of a plain training step). Images without a mask (normal ones) train on
the cross-entropy alone, so the network still learns its classes from every
image; the explanation itself, at inference, is unchanged.

This needs masks, which phantoms have and most hospital folders do not: a
model trained this way says so in its card's recipe (``mask_supervision``),
and its pointing game is scored on phantoms it never saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from dicomnode.models.architectures import target_layer
from dicomnode.models.card import CamMethod, split_layers


@dataclass(frozen=True)
class MaskLoss:
    """One batch's mask term: ``loss`` (a tensor with its graph), and how often the peak hit."""

    loss: torch.Tensor
    images: int
    hits: int


class CamSupervision:
    """Records the card's layers in training and computes the mask term of a batch.

    ``weight`` is the term's weight beside the cross-entropy (the caller adds
    ``weight * term.loss``). Use as a context manager around the training loop:
    the forward hooks are removed on exit.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str,
        method: CamMethod,
        sharpness: float,
        weight: float = 1.0,
    ) -> None:
        self.method = method
        self.sharpness = sharpness
        self.weight = weight
        self._outputs: dict[int, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        for position, path in enumerate(split_layers(layers)):
            hook = _recorder(self._outputs, position)
            self._handles.append(target_layer(model, path).register_forward_hook(hook))

    def __enter__(self) -> CamSupervision:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> MaskLoss:
        """The mask term for the images of the last forward pass that have a mask.

        ``masks`` is (N, H, W) boolean in input geometry; ``labels`` (N,) the classes.
        """
        chosen = masks.flatten(1).any(1)
        count = int(chosen.sum())
        if count == 0:
            return MaskLoss(logits.new_zeros(()), 0, 0)
        activations = [self._outputs[i] for i in range(len(self._handles))]
        score = logits.gather(1, labels[:, None])[:, 0]
        grads = torch.autograd.grad(
            (score * chosen.to(score.dtype)).sum(), activations, create_graph=True
        )
        size = (int(masks.shape[-2]), int(masks.shape[-1]))
        maps = [
            layer_map(grad[chosen], act[chosen], self.method, size)
            for grad, act in zip(grads, activations, strict=True)
        ]
        cam = torch.stack(maps).mean(0).flatten(1)
        inside = masks[chosen].flatten(1)
        return MaskLoss(
            outside_mass(cam, inside, self.sharpness).mean(),
            count,
            int(inside.gather(1, cam.argmax(1, keepdim=True)).sum()),
        )


def _recorder(store: dict[int, torch.Tensor], position: int) -> Any:
    def record(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            store[position] = output

    return record


def layer_map(
    grad: torch.Tensor, activation: torch.Tensor, method: CamMethod, size: Sequence[int]
) -> torch.Tensor:
    """One layer's (N, H, W) map in [0, 1] at ``size``, as ``pytorch_grad_cam`` makes it.

    Grad-CAM weighs channels by their mean gradient; HiResCAM multiplies
    gradients and activations element-wise; LayerCAM keeps positive gradients
    only. The channel sum is rectified, then scaled per image to [0, 1].
    """
    grad, activation = grad.float(), activation.float()
    if method == "gradcam":
        weighted = grad.mean((2, 3), keepdim=True) * activation
    elif method == "hirescam":
        weighted = grad * activation
    else:
        weighted = F.relu(grad) * activation
    cam = F.relu(weighted.sum(1, keepdim=True))
    low = cam.amin((2, 3), keepdim=True)
    high = cam.amax((2, 3), keepdim=True)
    scaled = (cam - low) / (high - low + 1e-7)
    resized = F.interpolate(scaled, size=tuple(size), mode="bilinear", align_corners=False)
    return resized[:, 0]


def outside_mass(cam: torch.Tensor, inside: torch.Tensor, sharpness: float) -> torch.Tensor:
    """Per image, ``-log`` of the softmax mass of ``sharpness * cam`` inside the mask.

    ``cam`` and ``inside`` are (N, P); every row of ``inside`` has a True.
    """
    logits = sharpness * cam
    masked = logits.masked_fill(~inside, torch.finfo(logits.dtype).min)
    return torch.logsumexp(logits, 1) - torch.logsumexp(masked, 1)
