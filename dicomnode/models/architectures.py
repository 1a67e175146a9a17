"""Network architectures a model card may name.

Each builder returns an untrained ``torch.nn.Module`` mapping a batch of
shape (N, C, H, W) to logits of shape (N, classes). Weights come from the
card's safetensors file (node) or from training; nothing is ever downloaded.
``DEFAULT_TARGET_LAYERS`` gives the Grad-CAM layer that training writes into
a card (the last convolutional block of each network).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dicomnode.errors import ModelError

Builder = Callable[[int, int, dict[str, Any]], nn.Module]


class SmallVGG(nn.Module):
    """A VGG-style CNN small enough for CPU: blocks of (conv-bn-relu) x2 + max-pool.

    ``widths`` sets the channels of each block; a global average pool and a
    linear layer make the head. The Grad-CAM target is the last block.
    """

    def __init__(
        self, in_chans: int, num_classes: int, widths: tuple[int, ...] = (16, 32, 64, 128)
    ):
        super().__init__()
        blocks: list[nn.Module] = []
        channels = in_chans
        for width in widths:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(channels, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(width, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            channels = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))  # type: ignore[no-any-return]


def _small_vgg(in_chans: int, num_classes: int, params: dict[str, Any]) -> nn.Module:
    widths = tuple(int(w) for w in params.get("widths", (16, 32, 64, 128)))
    return SmallVGG(in_chans, num_classes, widths)


def _torchvision(name: str) -> Builder:
    def build(in_chans: int, num_classes: int, params: dict[str, Any]) -> nn.Module:
        import torchvision.models as tvm

        model: nn.Module = getattr(tvm, name)(weights=None, num_classes=num_classes, **params)
        if in_chans != 3:
            _replace_first_conv(model, in_chans)
        return model

    return build


def _replace_first_conv(model: nn.Module, in_chans: int) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            new = nn.Conv2d(
                in_chans,
                module.out_channels,
                module.kernel_size,  # type: ignore[arg-type]
                module.stride,  # type: ignore[arg-type]
                module.padding,  # type: ignore[arg-type]
                bias=module.bias is not None,
            )
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
            return
    raise ModelError("no 3-channel input convolution to replace")


def _timm(name: str) -> Builder:
    def build(in_chans: int, num_classes: int, params: dict[str, Any]) -> nn.Module:
        import timm

        model: nn.Module = timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **params
        )
        return model

    return build


BUILDERS: dict[str, Builder] = {
    "small_vgg": _small_vgg,
    "vgg16": _torchvision("vgg16"),
    "resnet18": _torchvision("resnet18"),
    "resnet50": _torchvision("resnet50"),
    "densenet121": _torchvision("densenet121"),
    "efficientnet_lite0": _timm("tf_efficientnet_lite0"),
    "xception": _timm("legacy_xception"),
    "inception_resnet_v2": _timm("inception_resnet_v2"),
}

DEFAULT_TARGET_LAYERS: dict[str, str] = {
    "small_vgg": "features",
    "vgg16": "features.29",
    "resnet18": "layer4",
    "resnet50": "layer4",
    "densenet121": "features.norm5",
    "efficientnet_lite0": "bn2",
    "xception": "act4",
    "inception_resnet_v2": "conv2d_7b",
}


def build_model(
    name: str, in_chans: int, num_classes: int, params: dict[str, Any] | None = None
) -> nn.Module:
    """Build architecture ``name``; raise :class:`ModelError` for an unknown one."""
    try:
        builder = BUILDERS[name]
    except KeyError:
        known = ", ".join(sorted(BUILDERS))
        raise ModelError(f"unknown architecture {name!r}; known: {known}") from None
    return builder(in_chans, num_classes, dict(params or {}))


def target_layer(model: nn.Module, path: str) -> nn.Module:
    """The module at dotted ``path`` inside ``model`` (Grad-CAM target)."""
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise ModelError(f"Grad-CAM target layer {path!r} does not exist in the model") from exc
