"""Batched class activation maps (Grad-CAM and two finer variants) on named layers.

One call runs one forward pass and one backward pass for a whole batch and
returns both the logits and one class activation map per image, so inference
never runs the network twice.

Three methods of ``pytorch_grad_cam``, named in the model card
(``gradcam.method``):

* ``gradcam``: Grad-CAM (Selvaraju et al. 2017), channel weights from the
  spatially averaged gradients; smooth, as coarse as the layer's grid;
* ``hirescam``: HiResCAM (Draelos & Carin 2020), gradients times activations
  element-wise, then summed over channels: the map is faithful to the score;
* ``layercam``: LayerCAM (Jiang et al. 2021), positive gradients times
  activations element-wise: usable at early, high-resolution layers.

A card may also ask for **shift averaging** (``gradcam.shift``, in input
pixels): the map becomes the mean of the maps of the input and of copies of it
shifted by a few pixels, each moved back into place (test-time augmentation of
the explanation, as in Augmented Grad-CAM, Morbidelli et al. 2020). A layer of
stride 4 to 16 sees a lesion of a few pixels differently at each shift; the
mean keeps what every copy agrees on, so the peak moves off the layer's grid
onto the lesion. It costs one more forward and backward pass per copy
(:func:`~dicomnode.models.card.shift_offsets`); on CUDA the copies are
batched together up to the predictor's batch size.

A card's layer may name several layers of one network joined by ``+``
(``blocks.1+blocks.2+blocks.4``): each layer's map is scaled to [0, 1] and
resized to the input, and the maps are averaged (pytorch-grad-cam's
multi-layer aggregation, as in the LayerCAM paper), so a coarse late layer
says *which* joint and the early layers say *where* on it.

Memory stays flat between calls:

* a forward hook on the first target layer to run detaches its output and
  makes it the start of the autograd graph, so only the network from that
  layer to the logits is differentiated and nothing before it is kept;
* the activations are snapshotted by copy, so an in-place operation after the
  target layer (DenseNet's final ``relu``) cannot change them, on CPU as on CUDA;
* the hooks of ``pytorch_grad_cam`` are released in a ``finally`` block (its
  context manager swallows ``IndexError``, so it is not used), and any
  parameter gradients are dropped afterwards.

``pytorch_grad_cam`` is imported on first use: it takes seconds to import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from dicomnode.errors import InferenceError, ModelError
from dicomnode.models.architectures import EnsembleNet, target_layer
from dicomnode.models.card import CAM_METHOD_NAMES, CamMethod, shift_offsets, split_layers
from dicomnode.values import FloatArray


@dataclass(frozen=True, eq=False)
class CamBatch:
    """What one Grad-CAM pass over a batch produced.

    Attributes
    ----------
    logits:
        ``float32`` tensor (N, classes) on the CPU, detached.
    cams:
        ``float32`` array (N, H, W) in [0, 1] at the input tensor's size; a map
        with no positive evidence is all zero.
    classes:
        The class each map explains: the ones asked for, or else the argmax of
        each image's logits (the predicted class).
    """

    logits: torch.Tensor
    cams: FloatArray
    classes: tuple[int, ...]


@dataclass(frozen=True)
class Explainer:
    """Another explanation than a card's own (SHAP, say: ``explain/shap_map.py``).

    ``explain`` maps (network, ready batch) to a :class:`CamBatch`: logits, the
    classes explained and their maps in the input's geometry; ``description`` is
    what outputs say the map is, ``method`` the short name the SR's peak concept
    is chosen by (:func:`dicomnode.encode.codes.peak_concept`).
    """

    description: str
    explain: Callable[[nn.Module, torch.Tensor], CamBatch]
    method: str


def grad_cam(
    model: nn.Module,
    layer_path: str,
    inputs: torch.Tensor,
    classes: Sequence[int] | None = None,
    method: CamMethod = "gradcam",
) -> CamBatch:
    """Run ``model`` on ``inputs`` and compute its class activation maps at ``layer_path``.

    Parameters
    ----------
    model:
        A classifier mapping (N, C, H, W) to logits (N, classes); it is put in
        eval mode. Its parameters may be frozen: the graph starts at the target
        layer. Hooks are added to it for the duration of the call, so do not
        run two calls on one model at the same time.
    layer_path:
        Dotted path of the target layer inside ``model`` (``"layer4"``,
        ``"features.29"``), or several joined by ``+`` (maps averaged).
    inputs:
        Batch of shape (N, C, H, W) on the model's device. Works inside
        ``torch.inference_mode`` and ``torch.no_grad`` too.
    classes:
        One class per image to explain; ``None`` explains each image's
        highest-scoring class (``ClassifierOutputTarget`` of the argmax).
    method:
        ``gradcam``, ``hirescam`` or ``layercam`` (see the module notes).

    Returns
    -------
    CamBatch
        Logits, maps and the classes they explain.

    Raises
    ------
    InferenceError
        If a layer does not exist, the method is unknown, the shapes are
        wrong, or the pass fails.
    """
    if inputs.ndim != 4 or inputs.shape[0] == 0:
        raise InferenceError(
            f"Grad-CAM needs a non-empty (N, C, H, W) batch, got {tuple(inputs.shape)}"
        )
    if classes is not None and len(classes) != inputs.shape[0]:
        raise InferenceError(f"Grad-CAM got {len(classes)} classes for {inputs.shape[0]} images")
    if method not in CAM_METHOD_NAMES:
        raise InferenceError(
            f"unknown class activation map method {method!r}; use {', '.join(CAM_METHOD_NAMES)}"
        )
    try:
        layers = [target_layer(model, path) for path in split_layers(layer_path)]
    except ModelError as exc:
        raise InferenceError(str(exc)) from exc
    with torch.inference_mode(False), torch.enable_grad():
        batch = inputs.clone() if inputs.is_inference() else inputs
        try:
            logits, raw = _run(model, layers, batch, classes, method)
        except (RuntimeError, ValueError) as exc:
            raise InferenceError(f"Grad-CAM at {layer_path!r} failed: {exc}") from exc
        finally:
            model.zero_grad(set_to_none=True)
    explained = tuple(int(c) for c in classes) if classes is not None else _argmax(logits)
    return CamBatch(logits=logits, cams=_clean(raw), classes=explained)


def shift_inputs(inputs: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``inputs`` (N, C, H, W) with their content moved ``dx`` columns right and ``dy`` rows down.

    The edge rows and columns are repeated into the space the move opens.
    """
    if dx == dy == 0:
        return inputs
    pad = max(abs(dx), abs(dy))
    rows, columns = inputs.shape[-2:]
    padded = torch.nn.functional.pad(inputs, (pad, pad, pad, pad), mode="replicate")
    top, left = pad - dy, pad - dx
    return padded[..., top : top + rows, left : left + columns]


def shift_maps(maps: FloatArray, dx: int, dy: int) -> FloatArray:
    """Maps (N, H, W) with their content moved ``dx`` columns right and ``dy`` rows down (0 in)."""
    moved = np.zeros_like(maps)
    rows, columns = maps.shape[-2:]
    if abs(dx) >= columns or abs(dy) >= rows:
        return moved
    source_rows, target_rows = _moved_span(rows, dy)
    source_columns, target_columns = _moved_span(columns, dx)
    moved[:, target_rows, target_columns] = maps[:, source_rows, source_columns]
    return moved


def _moved_span(length: int, by: int) -> tuple[slice, slice]:
    """Source and target slices of a move by ``by`` along an axis of ``length``."""
    if by >= 0:
        return slice(0, length - by), slice(by, length)
    return slice(-by, length), slice(0, length + by)


def shift_averaged(
    explain: Callable[[torch.Tensor, Sequence[int] | None], CamBatch],
    inputs: torch.Tensor,
    shift: int,
    max_images: int | None = None,
) -> CamBatch:
    """The mean of ``explain``'s maps over the copies of ``shift_offsets(shift)``.

    ``explain(batch, classes)`` is one Grad-CAM pass. The unshifted pass comes
    first and decides the logits and the class each map explains; every
    shifted copy explains that same class, and its maps are moved back before
    they are averaged. The mean is scaled so each map's maximum is 1 (all zero
    when no copy has positive evidence).

    The shifted copies go through ``explain`` together, as many whole copies
    of the batch per pass as fit in ``max_images`` images (at least one; by
    default one copy per pass): a single radiograph's 12 shifted copies take
    two passes of up to 8 images instead of 12 passes of one, which is what
    a GPU is fast at (on the 2-core CPU it measured no faster and held about
    four times the memory, so the node batches copies on CUDA only). Each image's map
    is its own (Grad-CAM scales every map separately, and the networks run in
    eval mode), so the grouping changes the time, not the maps.
    """
    plain = explain(inputs, None)
    offsets = shift_offsets(shift)[1:]
    if not offsets:
        return plain
    count = inputs.shape[0]
    per_pass = max(1, (max_images or count) // count)
    total = plain.cams.astype(np.float32, copy=True)
    for start in range(0, len(offsets), per_pass):
        group = offsets[start : start + per_pass]
        copies = torch.cat([shift_inputs(inputs, dx, dy) for dx, dy in group])
        moved = explain(copies, plain.classes * len(group)).cams
        for index, (dx, dy) in enumerate(group):
            total += shift_maps(moved[index * count : (index + 1) * count], -dx, -dy)
    return CamBatch(logits=plain.logits, cams=_unit_peak(total), classes=plain.classes)


def mirror_averaged(
    explain: Callable[[torch.Tensor, Sequence[int] | None], CamBatch],
    max_images: int | None = None,
) -> Callable[[torch.Tensor, Sequence[int] | None], CamBatch]:
    """``explain`` of each image and its left-right mirror (a card's ``test_time_flip``).

    The logits are the mean of the two (as
    :class:`~dicomnode.models.architectures.MirrorMean` gives), the class
    explained is the top class of that mean (or the one asked for), and the map
    is the mean of the image's map and the mirror's map flipped back, scaled so
    its maximum is 1. Where an image's or a mirror's own top class differs from
    the mean's, that one is explained again for the mean's class.

    The images and their mirrors go through ``explain`` in passes of at most
    ``max_images`` images (by default the batch's own size: the images, then
    the mirrors, so a pass holds no more than it would without the flip). Each
    map is its own whatever else is in the pass, so the grouping changes the
    time and memory, not the maps.
    """

    def both(inputs: torch.Tensor, classes: Sequence[int] | None) -> CamBatch:
        count = inputs.shape[0]
        limit = max(count, max_images or count)
        doubled = torch.cat([inputs, torch.flip(inputs, dims=[-1])])
        asked = None if classes is None else tuple(int(c) for c in classes)
        result = _in_passes(explain, doubled, None if asked is None else asked * 2, limit)
        logits = (result.logits[:count] + result.logits[count:]) / 2
        chosen = asked if asked is not None else _argmax(logits)
        wanted = chosen * 2
        cams = result.cams
        redo = [i for i, c in enumerate(result.classes) if c != wanted[i]]
        if redo:
            cams = cams.copy()
            again = _in_passes(explain, doubled[redo], [wanted[i] for i in redo], limit)
            cams[redo] = again.cams
        total = cams[:count] + cams[count:, :, ::-1]
        return CamBatch(logits=logits, cams=_unit_peak(total), classes=chosen)

    return both


def _in_passes(
    explain: Callable[[torch.Tensor, Sequence[int] | None], CamBatch],
    inputs: torch.Tensor,
    classes: Sequence[int] | None,
    limit: int,
) -> CamBatch:
    """``explain(inputs, classes)`` run on consecutive parts of at most ``limit`` images."""
    parts = [
        explain(
            inputs[start : start + limit],
            None if classes is None else classes[start : start + limit],
        )
        for start in range(0, inputs.shape[0], limit)
    ]
    if len(parts) == 1:
        return parts[0]
    return CamBatch(
        logits=torch.cat([part.logits for part in parts]),
        cams=np.concatenate([part.cams for part in parts]),
        classes=tuple(c for part in parts for c in part.classes),
    )


def _unit_peak(total: FloatArray) -> FloatArray:
    """Maps (N, H, W) scaled so each maximum is 1; a map with no positive value becomes 0."""
    peaks = total.reshape(total.shape[0], -1).max(axis=1)
    scaled: FloatArray = (total / np.where(peaks > 0, peaks, 1.0)[:, None, None]).astype(np.float32)
    return _clean(scaled)


def peak(cam: FloatArray) -> tuple[float, float]:
    """(column, row) of the maximum of a 2-D map.

    The first maximum in row-major order wins; a flat map (all zero, say) has
    no peak of its own and gives the centre pixel.

    Raises
    ------
    InferenceError
        If ``cam`` is not a non-empty 2-D array.
    """
    if cam.ndim != 2 or cam.size == 0:
        raise InferenceError(f"peak needs a non-empty 2-D map, got shape {cam.shape}")
    rows, columns = cam.shape
    values = np.nan_to_num(cam, nan=-np.inf)
    if not values.max() > values.min():
        return float(columns // 2), float(rows // 2)
    row, column = divmod(int(np.argmax(values)), columns)
    return float(column), float(row)


def _cam_class(method: CamMethod) -> Callable[..., Any]:
    from pytorch_grad_cam import GradCAM, HiResCAM, LayerCAM

    classes: dict[str, Callable[..., Any]] = {
        "gradcam": GradCAM,
        "hirescam": HiResCAM,
        "layercam": LayerCAM,
    }
    return classes[method]


def _run(
    model: nn.Module,
    layers: list[nn.Module],
    batch: torch.Tensor,
    classes: Sequence[int] | None,
    method: CamMethod,
) -> tuple[torch.Tensor, FloatArray]:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = None if classes is None else [ClassifierOutputTarget(int(c)) for c in classes]
    hooks = _cut_at_first_layer(model, layers)
    try:
        cam = _cam_class(method)(model=model, target_layers=layers, reshape_transform=_snapshot)
        try:
            raw = cam(input_tensor=batch, targets=targets)
            logits = cam.outputs.detach().to("cpu", torch.float32)
        finally:
            cam.activations_and_grads.release()
            cam.outputs = None
    finally:
        for hook in hooks:
            hook.remove()
    return logits, np.asarray(raw)


def _cut_at_first_layer(model: nn.Module, layers: list[nn.Module]) -> list[RemovableHandle]:
    """Hooks that start the graph at whichever target layer runs first in each forward pass.

    Later target layers must stay connected to it, so that their gradients
    flow back to the earlier ones; a pre-hook on the model re-arms the cut
    for every forward pass.
    """
    armed = [True]

    def arm(module: nn.Module, args: Any) -> None:
        armed[0] = True

    def cut(module: nn.Module, args: Any, output: Any) -> torch.Tensor | None:
        if not armed[0]:
            return None
        armed[0] = False
        return _start_graph_here(module, args, output)

    handles = [model.register_forward_pre_hook(arm)]
    handles += [layer.register_forward_hook(cut) for layer in dict.fromkeys(layers)]
    return handles


def _start_graph_here(module: nn.Module, args: Any, output: Any) -> torch.Tensor:
    """Forward hook: the target layer's output becomes a fresh leaf of the graph."""
    if not isinstance(output, torch.Tensor):
        raise InferenceError(
            f"Grad-CAM target layer {type(module).__name__} does not output a tensor"
        )
    # clone() so an in-place op after the layer acts on a non-leaf tensor.
    return output.detach().requires_grad_(True).clone()


def _snapshot(tensor: torch.Tensor) -> torch.Tensor:
    """Copy an activation (or gradient) so later in-place ops cannot change it."""
    return tensor.detach().clone()


def _argmax(logits: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argmax(logits.numpy(), axis=-1))


def _clean(raw: FloatArray) -> FloatArray:
    """``float32`` maps in [0, 1] with no NaN (a degenerate map becomes zero)."""
    cams = np.nan_to_num(raw.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    result: FloatArray = np.clip(cams, 0.0, 1.0, out=cams)
    return result


def _member_cams(
    member: nn.Module,
    path: str,
    inputs: torch.Tensor,
    classes: Sequence[int],
    method: CamMethod,
    mirror: bool,
    max_images: int | None,
) -> FloatArray:
    """One member's maps for ``classes``: of its input, or mirror-averaged."""

    def one_pass(batch: torch.Tensor, asked: Sequence[int] | None) -> CamBatch:
        return grad_cam(member, path, batch, asked, method)

    explain = mirror_averaged(one_pass, max_images) if mirror else one_pass
    return explain(inputs, classes).cams


def _in_geometry(cams: FloatArray, size: Sequence[int]) -> FloatArray:
    """Maps (N, h, w) of a member's own input brought to the ensemble input's (H, W):
    both inputs frame the same pixels, so a bilinear resize puts each map in place."""
    if tuple(cams.shape[-2:]) == tuple(size):
        return cams
    resized = F.interpolate(
        torch.from_numpy(cams)[:, None],
        size=(int(size[0]), int(size[1])),
        mode="bilinear",
        align_corners=False,
    )
    return _clean(resized[:, 0].numpy())


def ensemble_grad_cam(
    model: EnsembleNet,
    layer_paths: Sequence[str],
    inputs: torch.Tensor,
    method: CamMethod = "gradcam",
    classes: Sequence[int] | None = None,
    *,
    mirror: bool = False,
    max_images: int | None = None,
) -> CamBatch:
    """Class activation maps of an :class:`~dicomnode.models.architectures.EnsembleNet`.

    The ensemble's predicted class ``c`` of each image comes from one forward
    pass of every member. Each member ``m`` then gets its own map (``method``)
    for ``c`` at ``layer_paths[m]`` (a path inside the member; on the member's own
    input when members take several, the map then resized onto the ensemble's), and the ensemble's
    map is the mean of the members' maps weighted by each member's share of the
    ensemble's probability of ``c``: ``s_m = w[m, c] p_m[c] / sum_k w[k, c] p_k[c]``,
    scaled so its maximum is 1 (all zero when no member has positive evidence).
    The returned logits are ``log q`` (see ``EnsembleNet``). ``classes``, when
    given, replaces the predicted classes as the ones the maps explain.

    With ``mirror`` (a card's ``test_time_flip``) each member classifies its input and its
    mirror (:class:`~dicomnode.models.architectures.MirroredEnsemble`), and each member's
    map is its :func:`mirror_averaged` map for ``c`` (passes of up to ``max_images``).
    """
    members = model.members
    if len(members) != len(layer_paths):
        raise InferenceError(
            f"an ensemble Grad-CAM needs one target layer per member, got {len(layer_paths)}"
        )
    with torch.inference_mode():
        on_device = model.member_probabilities(inputs, mirror)
        fused = model.fuse(on_device).to("cpu", torch.float32)
    member_probs = on_device.to("cpu", torch.float32)
    weights = model.weights_cpu()
    chosen = _argmax(fused) if classes is None else tuple(int(c) for c in classes)
    if len(chosen) != inputs.shape[0]:
        raise InferenceError(f"Grad-CAM got {len(chosen)} classes for {inputs.shape[0]} images")
    rows = torch.arange(len(chosen))
    index = torch.tensor(chosen)
    contribution = weights[:, index] * member_probs[:, rows, index]  # (members, N)
    shares = (contribution / contribution.sum(dim=0).clamp_min(1e-12)).numpy()
    total: FloatArray | None = None
    for number, (member, path, share) in enumerate(zip(members, layer_paths, shares, strict=True)):
        with torch.no_grad():
            seen = model.member_input(number, inputs)
        cams = _member_cams(member, path, seen, chosen, method, mirror, max_images)
        cams = _in_geometry(cams, inputs.shape[-2:]) * share[:, None, None]
        total = cams if total is None else total + cams
    assert total is not None
    logits = torch.log(fused.clamp_min(1e-12))
    return CamBatch(logits=logits, cams=_unit_peak(total), classes=chosen)
