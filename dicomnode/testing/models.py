"""Tiny, untrained, card-conformant models for tests and the benchmark.

:func:`make_tiny_model` writes a model directory the node loads exactly like a
trained one (weights file, sha256, coded classes, Grad-CAM layer), so the whole
pipeline can run without the real models. Its outputs mean nothing, and its
card says so.

``make_tiny_model(..., localiser=True)`` adds a knee localiser that is not
trained either: :func:`write_blob_localiser` sets its weights by hand so that
it marks the centre of each bright blob on a dark background. Two bright
discs side by side give two joints (left ``R``, right ``L``), so node tests
can exercise the multi-finding path deterministically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from dicomnode.models.architectures import DEFAULT_TARGET_LAYERS, build_model
from dicomnode.models.card import (
    ArchitectureSpec,
    ClassSpec,
    CodeSpec,
    GradCamSpec,
    InputSpec,
    LocaliserSpec,
    ModelCard,
    PreprocessingSpec,
    WeightsSpec,
    sha256_of,
    write_card,
)
from dicomnode.models.localise import LocaliserNet, save_localiser
from dicomnode.values import BodyPart

WEIGHTS_FILE = "model.safetensors"
LOCALISER_FILE = "localiser.safetensors"

# Heat logits of the blob localiser: gain * (summed blurred brightness) + offset.
_BLOB_GAIN = 2.0
_BLOB_OFFSET = -4.0
TEST_SCHEME = "99DICOMNODE"

# SNOMED CT qualifier values "Normal" and "Abnormal".
_NORMAL = CodeSpec(value="17621005", scheme="SCT", meaning="Normal")
_ABNORMAL = CodeSpec(value="263654008", scheme="SCT", meaning="Abnormal")


def make_tiny_model(
    directory: Path,
    *,
    name: str = "tiny-knee",
    version: str = "0.0.1",
    body_part: BodyPart | str | Sequence[BodyPart | str] = "KNEE",
    num_classes: int = 2,
    architecture: str = "small_vgg",
    params: Mapping[str, Any] | None = None,
    input_size: tuple[int, int] = (64, 64),
    seed: int = 0,
    synthetic: bool = True,
    channels: Literal[1, 3] = 3,
    temperature: float = 1.0,
    resize: Literal["stretch", "letterbox"] = "stretch",
    localiser: bool = False,
    localiser_threshold: float = 0.5,
) -> ModelCard:
    """Write an untrained model with a valid card into ``directory`` and return the card.

    Parameters
    ----------
    directory:
        Created if needed; receives ``model.safetensors`` and ``model.yaml``.
    name, version:
        The card's identity.
    body_part:
        One body part or several.
    num_classes:
        5 on a knee model gives the Kellgren-Lawrence grades ``KL0`` ... ``KL4``;
        2 gives SNOMED CT normal/abnormal; otherwise ``class0`` ... .
    architecture, params:
        Any name in :data:`~dicomnode.models.architectures.BUILDERS`;
        ``params`` defaults to ``{"widths": [4, 8]}`` for ``small_vgg``, else ``{}``.
    input_size:
        (height, width) of the model input.
    seed:
        Seeds the weights; the same arguments give byte-identical files.
        The global torch random state is left as it was.
    synthetic:
        The card's ``synthetic_training_data`` flag.
    channels, temperature, resize:
        Copied into the card.
    localiser, localiser_threshold:
        Add a hand-set blob localiser (:func:`write_blob_localiser`) as
        ``localiser.safetensors`` and ``preprocessing.localiser: knee``.

    Returns
    -------
    ModelCard
        The card as written, weights checksum included.
    """
    parts = _body_parts(body_part)
    arch_params = dict(params) if params is not None else _default_params(architecture)
    directory.mkdir(parents=True, exist_ok=True)
    _save_weights(directory / WEIGHTS_FILE, architecture, channels, num_classes, arch_params, seed)
    localiser_spec = None
    if localiser:
        sha256 = write_blob_localiser(directory / LOCALISER_FILE)
        localiser_spec = LocaliserSpec(
            file=LOCALISER_FILE, sha256=sha256, threshold=localiser_threshold
        )
    card = ModelCard(
        name=name,
        version=version,
        description=f"untrained {architecture} test model",
        body_parts=parts,
        architecture=ArchitectureSpec(name=architecture, params=arch_params),
        input=InputSpec(size=input_size, channels=channels, mean=(0.5,), std=(0.5,)),
        preprocessing=PreprocessingSpec(resize=resize, localiser="knee" if localiser else "none"),
        classes=_classes(parts, num_classes),
        gradcam=GradCamSpec(target_layer=DEFAULT_TARGET_LAYERS[architecture]),
        weights=WeightsSpec(file=WEIGHTS_FILE, sha256=sha256_of(directory / WEIGHTS_FILE)),
        localiser=localiser_spec,
        temperature=temperature,
        intended_use="Software testing only. Untrained test model with random weights; "
        "its outputs carry no clinical meaning.",
        training_data="None: untrained test model; weights are seeded random numbers.",
        metrics={},
        synthetic_training_data=synthetic,
    )
    write_card(directory, card)
    return card


def _body_parts(body_part: BodyPart | str | Sequence[BodyPart | str]) -> tuple[BodyPart, ...]:
    values = [body_part] if isinstance(body_part, str) else list(body_part)
    return tuple(BodyPart(str(value).upper()) for value in values)


def _default_params(architecture: str) -> dict[str, Any]:
    return {"widths": [4, 8]} if architecture == "small_vgg" else {}


def _save_weights(
    path: Path,
    architecture: str,
    channels: int,
    num_classes: int,
    params: dict[str, Any],
    seed: int,
) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(architecture, channels, num_classes, params)
    state = {key: value.detach().contiguous().clone() for key, value in model.state_dict().items()}
    # One metadata key only: safetensors writes several in hash order, so the
    # file (and its sha256) would change from run to run.
    save_file(state, str(path), metadata={"format": "pt"})


def _classes(parts: tuple[BodyPart, ...], num_classes: int) -> tuple[ClassSpec, ...]:
    if num_classes == 5 and BodyPart.KNEE in parts:
        return tuple(
            ClassSpec(
                index=i,
                name=f"KL{i}",
                code=CodeSpec(value=f"KL{i}", scheme=TEST_SCHEME, meaning=f"KL grade {i}"),
            )
            for i in range(5)
        )
    if num_classes == 2:
        return (
            ClassSpec(index=0, name="normal", code=_NORMAL),
            ClassSpec(index=1, name="abnormal", code=_ABNORMAL),
        )
    return tuple(
        ClassSpec(
            index=i,
            name=f"class{i}",
            code=CodeSpec(value=f"C{i}", scheme=TEST_SCHEME, meaning=f"Class {i}"),
        )
        for i in range(num_classes)
    )


def write_blob_localiser(path: Path, *, side: float = 0.3) -> str:
    """Write a hand-set (untrained) localiser that finds bright blobs; return its sha256.

    Every level of a :class:`~dicomnode.models.localise.LocaliserNet` with
    two channels carries one channel of 3 x 3 box-blurred brightness; the
    decoder sums the levels and the heat head turns the sum into a peak at
    the centre of each bright blob on a dark background. Every box side is
    ``side`` times the input size. The file is the same bytes on every call.
    """
    network = LocaliserNet(widths=(2, 2, 2, 2, 2), head=2)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
                size = module.kernel_size[0] * module.kernel_size[1]
                module.weight[0, 0] = 1.0 / size
        network.heat.weight[0, 0] *= _BLOB_GAIN
        assert network.heat.bias is not None and network.size.bias is not None
        network.heat.bias.fill_(_BLOB_OFFSET)
        network.size.weight.zero_()
        network.size.bias.fill_(math.log(side))
    return save_localiser(network, path)
