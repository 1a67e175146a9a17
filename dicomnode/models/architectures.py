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
from pydantic import ValidationError
from torch import nn

from dicomnode.errors import ModelError
from dicomnode.imaging.tensor import resize_images
from dicomnode.models.card import ENSEMBLE, MEMBER_INPUT, InputSpec
from dicomnode.validation import describe_validation_error

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


def fuse_probabilities(weights: torch.Tensor, member_probs: torch.Tensor) -> torch.Tensor:
    """``q_c ∝ sum_m w[m, c] * p_m[c]`` (N, classes) from weights (members, classes) and
    member probabilities (members, N, classes), normalised so the classes sum to 1."""
    mixed = (weights[:, None, :] * member_probs).sum(dim=0)
    return mixed / mixed.sum(dim=1, keepdim=True).clamp_min(1e-12)


class MirrorMean(nn.Module):
    """A network run on each input and on its left-right mirror: the mean of the two logits.

    The test-time flip of a card's ``test_time_flip``, for the forward passes
    that give figures and probabilities (training's validation, evaluation, the
    node) and for SHAP. Grad-CAM hooks a layer inside the network, so the
    node's maps come from :func:`dicomnode.explain.gradcam.mirror_averaged`
    instead, which gives the same logits.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = (self.network(x) + self.network(torch.flip(x, dims=[-1]))) / 2
        return logits


def scorer(network: nn.Module, test_time_flip: bool) -> nn.Module:
    """``network``, or when the card flips at test time :class:`MirrorMean` of it (of each
    member, for an ensemble: :class:`MirroredEnsemble`)."""
    if not test_time_flip:
        return network
    if isinstance(network, EnsembleNet):
        return MirroredEnsemble(network)
    return MirrorMean(network)


class MemberInput(nn.Module):
    """What one member of an ensemble of several inputs sees.

    Such an ensemble's input is the prepared grey image in [0, 1] (one channel,
    not normalised) at the largest member size; each member gets it resized to
    its own ``size`` (bilinear, antialiased when shrinking, as
    :func:`~dicomnode.imaging.tensor.to_input` resizes), repeated to its
    ``channels`` and normalised with its ``mean`` and ``std``. A member of the
    ensemble's own size sees exactly the numbers it sees served alone; a smaller
    one sees the image resized twice (source to the ensemble's size, then to its
    own), which is close but not equal (README, "Members may take different inputs").
    """

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.size = (int(spec.size[0]), int(spec.size[1]))
        self.channels = int(spec.channels)
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x[:, :1].float()  # resized in float32 whatever the autocast (bfloat16 on a GPU)
        if tuple(grey.shape[-2:]) != self.size:
            grey = resize_images(grey, *self.size)
        mean = self.get_buffer("mean").reshape(1, -1, 1, 1)
        std = self.get_buffer("std").reshape(1, -1, 1, 1)
        return (grey.expand(-1, self.channels, -1, -1) - mean) / std


class EnsembleNet(nn.Module):
    """Members fused by per-class weights.

    ``class_weights`` (members, classes) holds each member's weight for each
    class, each column summing to 1; ``temperatures`` each member's
    temperature. For an input, member ``m`` gives ``p_m = softmax(z_m / T_m)``;
    the ensemble's probability of class ``c`` is
    ``q_c = sum_m w[m, c] * p_m[c]``, normalised so the classes sum to 1.
    :meth:`forward` returns ``log q``: a softmax of it (temperature 1) gives
    ``q`` back, so the node runs an ensemble as it runs any network.

    ``inputs``: for members that do not share one input, one
    :class:`MemberInput` each (they hold no weights); ``None`` when every
    member takes the ensemble's input as it is.
    """

    def __init__(
        self,
        members: list[nn.Module],
        num_classes: int,
        inputs: list[MemberInput] | None = None,
    ) -> None:
        super().__init__()
        if inputs is not None and len(inputs) != len(members):
            raise ModelError(f"an ensemble of {len(members)} members got {len(inputs)} inputs")
        self.members = nn.ModuleList(members)
        self.inputs = nn.ModuleList(inputs) if inputs is not None else None
        uniform = torch.full((len(members), num_classes), 1.0 / len(members))
        self.register_buffer("class_weights", uniform)
        self.register_buffer("temperatures", torch.ones(len(members)))

    def member_input(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The input member ``index`` sees for the ensemble's input ``x``."""
        if self.inputs is None:
            return x
        adapted: torch.Tensor = self.inputs[index](x)
        return adapted

    def member_logits(self, index: int, x: torch.Tensor, mirror: bool = False) -> torch.Tensor:
        """Member ``index``'s logits for the ensemble's input ``x``; with ``mirror``, the mean
        of its logits for its input and for that input's left-right mirror (as
        :class:`MirrorMean` gives the member served alone)."""
        member = self.members[index]
        seen = self.member_input(index, x)
        logits: torch.Tensor = member(seen)
        if mirror:
            logits = (logits + member(torch.flip(seen, dims=[-1]))) / 2
        return logits

    def member_probabilities(self, x: torch.Tensor, mirror: bool = False) -> torch.Tensor:
        """``p`` of shape (members, N, classes); ``mirror``: see :meth:`member_logits`."""
        temperatures = self._buffer("temperatures")
        return torch.stack(
            [
                torch.softmax(self.member_logits(m, x, mirror) / t, dim=1)
                for m, t in enumerate(temperatures)
            ]
        )

    def _buffer(self, name: str) -> torch.Tensor:
        buffer = self.get_buffer(name)
        return buffer

    def weights_cpu(self) -> torch.Tensor:
        """``class_weights`` as float32 on the CPU."""
        return self._buffer("class_weights").detach().to("cpu", torch.float32)

    def fuse(self, member_probs: torch.Tensor) -> torch.Tensor:
        """Ensemble probabilities (N, classes) from member probabilities."""
        return fuse_probabilities(self._buffer("class_weights"), member_probs)

    def forward(self, x: torch.Tensor, mirror: bool = False) -> torch.Tensor:
        return torch.log(self.fuse(self.member_probabilities(x, mirror)).clamp_min(1e-12))


class MirroredEnsemble(nn.Module):
    """An ensemble whose card flips at test time: each member's logits are the mean of its
    logits for the input and for its mirror (each member as it is served alone), then the
    members are fused. That is what ``dicomnode ensemble-cv`` scores from the members'
    out-of-fold predictions; a mirror mean of the fused ``log q`` would not be.
    """

    def __init__(self, ensemble: EnsembleNet) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.ensemble(x, mirror=True)
        return logits


def _ensemble(in_chans: int, num_classes: int, params: dict[str, Any]) -> nn.Module:
    specs = params.get("members")
    if not isinstance(specs, list) or len(specs) < 2:
        raise ModelError("architecture ensemble needs params.members: a list of two or more")
    own = [spec.get(MEMBER_INPUT) for spec in specs]
    if any(o is None for o in own) and any(o is not None for o in own):
        raise ModelError(
            f"architecture ensemble: give params.members[].{MEMBER_INPUT} for every member or none"
        )
    inputs = None if own[0] is None else [MemberInput(_member_input(o)) for o in own]
    members = [
        build_model(
            str(spec["name"]),
            in_chans if inputs is None else inputs[m].channels,
            num_classes,
            dict(spec.get("params") or {}),
        )
        for m, spec in enumerate(specs)
    ]
    return EnsembleNet(members, num_classes, inputs)


def _member_input(raw: Any) -> InputSpec:
    try:
        return InputSpec.model_validate(raw)
    except ValidationError as exc:
        raise ModelError(
            f"architecture ensemble: a member's {MEMBER_INPUT}: "
            + describe_validation_error(exc, MEMBER_INPUT)
        ) from exc


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


TORCHVISION_NAMES: dict[str, str] = {
    "vgg16": "vgg16",
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "densenet121": "densenet121",
}
"""Architectures built by torchvision: the node's name -> torchvision's model function."""

TIMM_NAMES: dict[str, str] = {
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "efficientnet_lite1": "tf_efficientnet_lite1",
    "efficientnet_lite2": "tf_efficientnet_lite2",
    "xception": "legacy_xception",
    "inception_resnet_v2": "inception_resnet_v2",
}
"""Architectures built by timm: the node's name -> timm's model name."""

BUILDERS: dict[str, Builder] = {
    "small_vgg": _small_vgg,
    **{name: _torchvision(tv) for name, tv in TORCHVISION_NAMES.items()},
    **{name: _timm(tm) for name, tm in TIMM_NAMES.items()},
    "ensemble": _ensemble,
}

DEFAULT_TARGET_LAYERS: dict[str, str] = {
    "small_vgg": "features",
    "vgg16": "features.29",
    "resnet18": "layer4",
    "resnet50": "layer4",
    "densenet121": "features.norm5",
    "efficientnet_lite0": "bn2",
    "efficientnet_lite1": "bn2",
    "efficientnet_lite2": "bn2",
    "xception": "act4",
    "inception_resnet_v2": "conv2d_7b",
}

TRAINABLE = tuple(sorted(set(BUILDERS) - {ENSEMBLE}))
"""Architectures a training recipe may name (an ensemble is built from trained members)."""


def build_model(
    name: str, in_chans: int, num_classes: int, params: dict[str, Any] | None = None
) -> nn.Module:
    """Build architecture ``name``; raise :class:`ModelError` for an unknown one."""
    try:
        builder = BUILDERS[name]
    except KeyError:
        known = ", ".join(sorted(BUILDERS))
        raise ModelError(f"unknown architecture {name!r}; known: {known}") from None
    try:
        return builder(in_chans, num_classes, dict(params or {}))
    except (KeyError, TypeError) as exc:
        raise ModelError(f"architecture {name!r}: bad params: {exc}") from exc


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """Move ``model`` to ``device``; on the CPU, its 4-D weights to channels-last (NHWC).

    oneDNN runs CPU convolutions faster on channels-last weights, and a convolution
    whose weight is channels-last gives channels-last output, so inputs need no
    conversion: the forward pass and Grad-CAM's backward pass of the shipped networks
    take 10-25 % less time (README, "Channels-last networks on the CPU"). Outputs
    agree with the contiguous layout to rounding (about 1e-5 in the logits).
    """
    model.to(device)
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


def target_layer(model: nn.Module, path: str) -> nn.Module:
    """The module at dotted ``path`` inside ``model`` (Grad-CAM target)."""
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise ModelError(f"Grad-CAM target layer {path!r} does not exist in the model") from exc
