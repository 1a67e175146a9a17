"""Model cards, the registry, inference with Grad-CAM, and the architectures."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from dicomnode.encode.render import fitted_result, render_overlay
from dicomnode.errors import InferenceError, ModelError
from dicomnode.explain import grad_cam, peak
from dicomnode.explain.gradcam import CamBatch, shift_averaged, shift_inputs, shift_maps
from dicomnode.imaging.tensor import to_source_geometry
from dicomnode.inference import Predictor, prepare_input
from dicomnode.models.architectures import (
    DEFAULT_TARGET_LAYERS,
    TRAINABLE,
    build_model,
    target_layer,
)
from dicomnode.models.card import (
    ArchitectureSpec,
    GradCamSpec,
    PreprocessingSpec,
    identity,
    load_card,
    shift_offsets,
    write_card,
)
from dicomnode.models.registry import ModelRegistry
from dicomnode.testing.models import make_tiny_model
from dicomnode.values import BodyPart, ImageResult, PreparedImage, Region

ROWS, COLUMNS = 300, 217


def _image(seed: int, laterality: str | None = "L") -> PreparedImage:
    """A radiograph-like picture: a soft gradient with a bright ellipse somewhere."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:ROWS, 0:COLUMNS].astype(np.float32)
    cy, cx = rng.uniform(0.25, 0.75) * ROWS, rng.uniform(0.25, 0.75) * COLUMNS
    blob = ((rows - cy) / 40) ** 2 + ((columns - cx) / 25) ** 2 < 1
    pixels = 0.2 + 0.3 * rows / ROWS + 0.4 * blob + rng.normal(0, 0.02, (ROWS, COLUMNS))
    return PreparedImage(np.clip(pixels, 0, 1).astype(np.float32), laterality, f"synthetic-{seed}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    directory = tmp_path_factory.mktemp("models") / "tiny-knee"
    card = make_tiny_model(directory)
    return Predictor.load(directory, card)


@pytest.fixture(scope="module")
def images() -> list[PreparedImage]:
    return [_image(seed) for seed in range(3)]


def _probabilities(predictor: Predictor, images: list[PreparedImage]) -> np.ndarray:
    return np.array([r.findings[0].probabilities for r in predictor.predict(images)])


# --- cards ---------------------------------------------------------------------------------


def _edit_card(directory: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = directory / "model.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    edit(raw)
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda raw: raw.update(version="1.0 beta!"), "version"),
        (lambda raw: raw.pop("classes"), "classes"),
        (lambda raw: raw["weights"].update(sha256="ABC123"), "weights.sha256"),
        (lambda raw: raw.update(classes=raw["classes"][:1]), "classes"),
        (lambda raw: raw["input"].update(std=[0.0]), "input"),
        (lambda raw: raw["gradcam"].update(method="saliency"), "gradcam.method"),
        (lambda raw: raw.update(body_parts=["KNEE", "KNEE"]), "body_parts"),
    ],
    ids=[
        "bad-version",
        "missing-classes",
        "bad-sha256-format",
        "one-class",
        "zero-std",
        "unknown-cam-method",
        "body-part-twice",
    ],
)
def test_invalid_card_names_the_field(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], field: str
) -> None:
    make_tiny_model(tmp_path)
    _edit_card(tmp_path, edit)
    with pytest.raises(ModelError, match=rf"invalid: .*{field}"):
        load_card(tmp_path)


def test_weights_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    card = make_tiny_model(tmp_path)
    _edit_card(tmp_path, lambda raw: raw["weights"].update(sha256="0" * 64))
    with pytest.raises(ModelError, match="refusing"):
        load_card(tmp_path)
    wrong = card.model_copy(
        update={"weights": card.weights.model_copy(update={"sha256": "1" * 64})}
    )
    with pytest.raises(ModelError, match="refusing"):
        Predictor.load(tmp_path, wrong)


def test_tiny_model_is_reproducible_and_round_trips(tmp_path: Path) -> None:
    first = make_tiny_model(tmp_path / "a", num_classes=5)
    again = make_tiny_model(tmp_path / "b", num_classes=5)
    other = make_tiny_model(tmp_path / "c", num_classes=5, seed=1)
    assert load_card(tmp_path / "a") == first
    assert first.weights.sha256 == again.weights.sha256 != other.weights.sha256
    assert [c.code.meaning for c in first.classes] == [f"KL grade {i}" for i in range(5)]
    assert {c.code.scheme for c in first.classes} == {"99DICOMNODE"}
    assert first.synthetic_training_data
    assert "untrained" in first.intended_use.lower()


def test_a_cards_reader_note_travels_with_every_result(tmp_path: Path) -> None:
    card = make_tiny_model(tmp_path / "m", num_classes=5)
    assert identity(card).reader_note == ""
    noted = card.model_copy(update={"reader_note": "KL4 probabilities run high."})
    write_card(tmp_path / "m", noted)
    assert identity(load_card(tmp_path / "m")).reader_note == "KL4 probabilities run high."
    with pytest.raises(ModelError, match="reader_note"):
        write_card(tmp_path / "m", card.model_copy(update={"reader_note": "x" * 1025}))
        load_card(tmp_path / "m")


# --- registry ------------------------------------------------------------------------------


def test_registry_routes_body_parts_and_ignores_other_entries(tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "knee", name="knee", body_part="KNEE")
    make_tiny_model(tmp_path / "hand", name="hand", body_part=["HAND", "SPINE"])
    (tmp_path / "README.md").write_text("models live here\n", encoding="utf-8")
    (tmp_path / "notes").mkdir()
    registry = ModelRegistry.load(tmp_path)
    assert [c.directory.name for c in registry.cards] == ["hand", "knee"]
    knee = registry.for_body_part(BodyPart.KNEE)
    assert knee is not None and knee.card.name == "knee"
    assert registry.for_body_part("SPINE") == registry.for_body_part(BodyPart.HAND)
    assert ModelRegistry.load(tmp_path / "notes").for_body_part(BodyPart.KNEE) is None


def test_registry_refuses_two_cards_for_one_body_part(tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "knee-a", name="knee-a")
    make_tiny_model(tmp_path / "knee-b", name="knee-b")
    with pytest.raises(ModelError, match=r"KNEE: knee-a .*, knee-b"):
        ModelRegistry.load(tmp_path)
    by_card = ModelRegistry.load(tmp_path, choose={BodyPart.KNEE: "knee-b"}).for_body_part("KNEE")
    by_dir = ModelRegistry.load(tmp_path, choose={"knee": "knee-a"}).for_body_part("KNEE")
    assert by_card is not None and by_card.card.name == "knee-b"
    assert by_dir is not None and by_dir.directory.name == "knee-a"
    with pytest.raises(ModelError, match="not among its cards"):
        ModelRegistry.load(tmp_path, choose={"KNEE": "knee-c"})
    with pytest.raises(ModelError, match="no model card claims HAND"):
        ModelRegistry.load(tmp_path, choose={"KNEE": "knee-a", "HAND": "knee-a"})


def test_registry_refuses_a_bad_card_naming_its_directory(tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "good", name="good")
    make_tiny_model(tmp_path / "broken", name="broken", body_part="HAND")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ModelError, match=r"broken.*sha256"):
        ModelRegistry.load(tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        ModelRegistry.load(tmp_path / "missing")


def test_registry_refuses_duplicate_name_and_version(tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "one", body_part="KNEE")
    make_tiny_model(tmp_path / "two", body_part="HAND")
    with pytest.raises(ModelError, match=r"tiny-knee version 0\.0\.1"):
        ModelRegistry.load(tmp_path)


# --- inference -----------------------------------------------------------------------------


def test_probabilities_sum_to_one_and_predicted_is_the_argmax(
    tiny: Predictor, images: list[PreparedImage]
) -> None:
    for result in tiny.predict(images):
        (finding,) = result.findings
        assert len(finding.probabilities) == tiny.card.num_classes
        assert sum(finding.probabilities) == pytest.approx(1.0, abs=1e-12)
        assert finding.predicted.index == int(np.argmax(finding.probabilities))
        assert result.model.sha256 == tiny.card.weights.sha256
        assert result.classes == tiny.card.coded_classes()


def test_predict_is_deterministic(tiny: Predictor, images: list[PreparedImage]) -> None:
    first, second = tiny.predict(images), tiny.predict(images)
    for a, b in zip(first, second, strict=True):
        assert a.findings[0].probabilities == b.findings[0].probabilities
        np.testing.assert_array_equal(a.findings[0].heatmap, b.findings[0].heatmap)


def test_a_batch_equals_single_images(tiny: Predictor, images: list[PreparedImage]) -> None:
    batched = tiny.predict(images)
    chunked = Predictor(tiny.directory, tiny.card, tiny.model, tiny.device, batch_size=2).predict(
        images
    )
    singles = [tiny.predict([image])[0] for image in images]
    for batch, chunk, single in zip(batched, chunked, singles, strict=True):
        for other in (chunk, single):
            np.testing.assert_allclose(
                batch.findings[0].probabilities, other.findings[0].probabilities, atol=1e-6
            )
            np.testing.assert_allclose(
                batch.findings[0].heatmap, other.findings[0].heatmap, atol=1e-4
            )
    assert tiny.predict([]) == []


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_heatmap_has_the_source_geometry_and_the_peak_is_its_maximum(
    tmp_path: Path, resize: Literal["stretch", "letterbox"]
) -> None:
    card = make_tiny_model(tmp_path, resize=resize)
    (finding,) = Predictor.load(tmp_path, card).predict([_image(7, "R")])[0].findings
    assert finding.heatmap.shape == (ROWS, COLUMNS)
    assert finding.heatmap.dtype == np.float32
    assert finding.heatmap.min() >= 0.0 and finding.heatmap.max() <= 1.0
    column, row = finding.peak
    assert 0 <= column < COLUMNS and 0 <= row < ROWS
    assert finding.heatmap[int(row), int(column)] == finding.heatmap.max()
    assert (finding.region.x0, finding.region.y0, finding.region.width, finding.region.height) == (
        0,
        0,
        COLUMNS,
        ROWS,
    )
    assert finding.laterality == "R"


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_a_heatmap_size_makes_the_map_at_the_overlays_shape(
    tmp_path: Path, resize: Literal["stretch", "letterbox"]
) -> None:
    """The node asks for maps at its overlay size: the overlay then needs no resized map."""
    card = make_tiny_model(tmp_path, resize=resize)
    full, small = Predictor.load(tmp_path, card), Predictor.load(tmp_path, card, heatmap_size=150)
    for seed in range(4):
        image = _image(seed)
        (on_image,), (on_overlay,) = (p.predict([image])[0].findings for p in (full, small))
        assert image.shape_within(150) == (150, 108)
        assert on_overlay.heatmap.shape == (150, 108)
        assert on_overlay.probabilities == on_image.probabilities
        assert on_overlay.region == on_image.region
        whole = ImageResult(full.identity, full.classes, (on_image,))
        made = ImageResult(small.identity, small.classes, (on_overlay,))
        shrunk, kept = fitted_result(image, whole, 150), fitted_result(image, made, 150)
        assert kept.findings[0].heatmap is on_overlay.heatmap  # not resized again
        assert np.abs(kept.findings[0].heatmap - shrunk.findings[0].heatmap).max() < 0.05
        # The peak is in original pixels and points at (nearly) the full map's maximum.
        column, row = on_overlay.peak
        assert 0 <= column < COLUMNS and 0 <= row < ROWS
        assert on_image.heatmap[round(row), round(column)] >= on_image.heatmap.max() - 0.05
        overlays = [render_overlay(image, r, 150) for r in (whole, made)]
        assert overlays[0].shape == overlays[1].shape
        assert overlays[0].shape[1:] == (108, 3) and overlays[0].shape[0] > 150  # the band
        assert np.abs(overlays[0].astype(int) - overlays[1].astype(int)).mean() < 1.0

    # An image that fits already is explained exactly as at full size.
    roomy = Predictor.load(tmp_path, card, heatmap_size=COLUMNS + ROWS)
    image = _image(9)
    (same,), (reference,) = (p.predict([image])[0].findings for p in (roomy, full))
    np.testing.assert_array_equal(same.heatmap, reference.heatmap)
    assert same.peak == reference.peak
    with pytest.raises(ModelError, match="heatmap_size"):
        Predictor.load(tmp_path, card, heatmap_size=-1)


def test_temperature_changes_probabilities_not_the_argmax(
    tmp_path: Path, tiny: Predictor, images: list[PreparedImage]
) -> None:
    hot = make_tiny_model(tmp_path, temperature=4.0)
    assert hot.weights.sha256 == tiny.card.weights.sha256
    plain, softened = (
        _probabilities(tiny, images),
        _probabilities(Predictor.load(tmp_path, hot), images),
    )
    assert not np.allclose(plain, softened)
    np.testing.assert_array_equal(plain.argmax(axis=1), softened.argmax(axis=1))
    assert softened.max() <= plain.max()


def test_forward_probabilities_equal_predict(tiny: Predictor, images: list[PreparedImage]) -> None:
    tensors = [prepare_input(tiny.card, image.pixels)[0] for image in images]
    np.testing.assert_allclose(
        tiny.forward_probabilities(tensors), _probabilities(tiny, images), atol=1e-6
    )
    assert tiny.forward_probabilities(torch.stack(tensors)[:0]).shape == (0, tiny.card.num_classes)


@pytest.mark.parametrize("architecture", ["small_vgg", "efficientnet_lite0"])
def test_on_the_cpu_the_network_runs_channels_last_with_the_same_outputs(
    tmp_path: Path, images: list[PreparedImage], architecture: str
) -> None:
    """The node's CPU networks hold their convolution weights channels-last (faster in
    oneDNN); probabilities and Grad-CAM maps are those of the contiguous layout."""
    card = make_tiny_model(tmp_path, architecture=architecture, input_size=(96, 96))
    predictor = Predictor.load(tmp_path, card, "cpu")
    convolutions = [m for m in predictor.model.modules() if isinstance(m, nn.Conv2d)]
    assert convolutions
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convolutions)
    assert not all(c.weight.is_contiguous() for c in convolutions)
    contiguous = copy.deepcopy(predictor.model).to(memory_format=torch.contiguous_format)
    assert all(m.weight.is_contiguous() for m in contiguous.modules() if isinstance(m, nn.Conv2d))
    plain = Predictor(tmp_path, card, contiguous, torch.device("cpu"), 8, None)
    fast, slow = predictor.predict(images), plain.predict(images)
    for ours, theirs in zip(fast, slow, strict=True):
        (a,), (b,) = ours.findings, theirs.findings
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
        np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-4)


def test_no_hooks_or_gradients_are_left_behind(
    tiny: Predictor, images: list[PreparedImage]
) -> None:
    with torch.inference_mode():
        tiny.predict(images[:1])
    for module in tiny.model.modules():
        assert not module._forward_hooks and not module._backward_hooks
    assert all(p.grad is None and not p.requires_grad for p in tiny.model.parameters())
    assert not tiny.model.training


def test_non_finite_pixels_are_an_inference_error(tiny: Predictor) -> None:
    broken = np.full((ROWS, COLUMNS), np.nan, dtype=np.float32)
    with pytest.raises(InferenceError, match="non-finite outputs for: nan-image"):
        tiny.predict([PreparedImage(broken, None, "nan-image")])
    assert tiny.forward_probabilities([]).shape == (0, tiny.card.num_classes)


def test_weights_of_another_shape_are_refused_naming_the_key(tmp_path: Path) -> None:
    card = make_tiny_model(tmp_path / "a")
    wider = make_tiny_model(tmp_path / "b", params={"widths": [4, 16]})
    mixed = card.model_copy(update={"weights": wider.weights})
    with pytest.raises(ModelError, match=r"features\.1\.0\.weight has shape \(16, 4, 3, 3\)"):
        Predictor.load(tmp_path / "b", mixed)
    more_classes = make_tiny_model(tmp_path / "c", num_classes=3)
    with pytest.raises(ModelError, match=r"classifier\.weight"):
        Predictor.load(tmp_path / "c", more_classes.model_copy(update={"classes": card.classes}))


def test_unknown_architecture_and_knee_localiser_are_refused(tmp_path: Path) -> None:
    card = make_tiny_model(tmp_path)
    with pytest.raises(ModelError, match="unknown architecture 'nonet'"):
        Predictor.load(
            tmp_path, card.model_copy(update={"architecture": ArchitectureSpec(name="nonet")})
        )
    knee = card.model_copy(update={"preprocessing": PreprocessingSpec(localiser="knee")})
    with pytest.raises(ModelError, match="localiser 'knee' is not available in this version"):
        Predictor.load(tmp_path, knee)
    nowhere = card.model_copy(update={"gradcam": GradCamSpec(target_layer="features.9")})
    with pytest.raises(ModelError, match=r"features\.9"):
        Predictor.load(tmp_path, nowhere)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_cuda_without_cuda_is_refused(tmp_path: Path) -> None:
    card = make_tiny_model(tmp_path)
    with pytest.raises(ModelError, match="CUDA is not available"):
        Predictor.load(tmp_path, card, device="cuda")
    assert Predictor.load(tmp_path, card, device="auto").device == torch.device("cpu")


# --- Grad-CAM ------------------------------------------------------------------------------


class _Dead(nn.Module):
    """A classifier whose last feature map is identically zero."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        nn.init.zeros_(conv.weight)
        self.features = nn.Sequential(conv, nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))  # type: ignore[no-any-return]


def test_an_all_zero_cam_stays_zero() -> None:
    result = grad_cam(_Dead(), "features", torch.rand(2, 1, 16, 16))
    assert result.cams.shape == (2, 16, 16) and result.cams.dtype == np.float32
    assert not result.cams.any()
    assert peak(result.cams[0]) == (8.0, 8.0)


def test_grad_cam_explains_the_classes_asked_for(tiny: Predictor) -> None:
    batch = torch.stack([prepare_input(tiny.card, _image(seed).pixels)[0] for seed in range(2)])
    asked = grad_cam(tiny.model, "features", batch, classes=[1, 0])
    assert asked.classes == (1, 0) and asked.logits.shape == (2, 2)
    assert asked.cams.min() >= 0.0 and asked.cams.max() <= 1.0
    with pytest.raises(InferenceError, match="does not exist"):
        grad_cam(tiny.model, "nowhere", batch)


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "layercam"])
def test_several_layers_give_the_maps_of_pytorch_grad_cam(
    method: Literal["gradcam", "hirescam", "layercam"],
) -> None:
    from pytorch_grad_cam import GradCAM, HiResCAM, LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = build_model("small_vgg", 1, 2, {"widths": [4, 8, 8]}).eval().requires_grad_(False)
    batch = torch.rand(3, 1, 32, 32)
    early = grad_cam(model, "features.0", batch, method=method)
    both = grad_cam(model, "features.0 + features.2", batch, method=method)
    assert both.classes == early.classes and torch.equal(both.logits, early.logits)
    assert not np.allclose(both.cams, early.cams, atol=1e-2)
    # The library on the whole graph (no cut): the node cuts it at the first
    # target layer only, so the early layer still gets the gradients that flow
    # through the later one and the maps are the same.
    reference = copy.deepcopy(model).requires_grad_(True)
    library = {"gradcam": GradCAM, "hirescam": HiResCAM, "layercam": LayerCAM}[method]
    features = cast(nn.Sequential, reference.features)
    cam = library(model=reference, target_layers=[features[0], features[2]])
    expected = cam(input_tensor=batch, targets=[ClassifierOutputTarget(c) for c in both.classes])
    cam.activations_and_grads.release()
    np.testing.assert_allclose(both.cams, expected, atol=1e-5)
    assert early.cams.max() > 0.5


def test_methods_differ_and_an_unknown_method_is_refused(tiny: Predictor) -> None:
    batch = torch.stack([prepare_input(tiny.card, _image(seed).pixels)[0] for seed in range(2)])
    plain = grad_cam(tiny.model, "features.0", batch).cams
    layer = grad_cam(tiny.model, "features.0", batch, method="layercam").cams
    assert plain.shape == layer.shape and not np.allclose(plain, layer, atol=1e-3)
    with pytest.raises(InferenceError, match="unknown class activation map method"):
        grad_cam(tiny.model, "features.0", batch, method="saliency")  # type: ignore[arg-type]


def test_a_predictor_explains_as_its_card_says(
    tiny: Predictor, images: list[PreparedImage]
) -> None:
    spec = GradCamSpec(target_layer="features.0+features.1", method="layercam")
    other = tiny.with_explanation(spec)
    assert other.model is tiny.model and tiny.card.gradcam.method == "gradcam"
    assert other.identity.explanation == "LayerCAM at features.0+features.1"
    assert tiny.identity.explanation == f"Grad-CAM at {tiny.card.gradcam.target_layer}"
    prepared = [prepare_input(tiny.card, image.pixels) for image in images]
    expected = grad_cam(
        tiny.model, spec.target_layer, torch.stack([t for t, _ in prepared]), method="layercam"
    ).cams
    plain = tiny.predict(images)
    for index, result in enumerate(other.predict(images)):
        (finding,) = result.findings
        (before,) = plain[index].findings
        assert finding.probabilities == pytest.approx(before.probabilities)
        heatmap = to_source_geometry(expected[index], prepared[index][1])
        np.testing.assert_allclose(finding.heatmap, heatmap, atol=1e-6)
        assert not np.allclose(finding.heatmap, before.heatmap, atol=1e-3)
    with pytest.raises(ModelError, match="does not exist"):
        tiny.with_explanation(GradCamSpec(target_layer="features.0+nowhere"))


def _mirrored(image: PreparedImage) -> PreparedImage:
    return PreparedImage(np.ascontiguousarray(image.pixels[:, ::-1]), image.laterality, "mirror")


@pytest.mark.parametrize("shift", [0, 4])
def test_a_card_that_flips_at_test_time_treats_an_image_and_its_mirror_alike(
    tmp_path: Path, shift: int
) -> None:
    made = make_tiny_model(tmp_path / "m", seed=3, num_classes=3, temperature=1.5)
    made = made.model_copy(update={"gradcam": made.gradcam.model_copy(update={"shift": shift})})
    plain = Predictor.load(tmp_path / "m", made)
    flipping = Predictor.load(tmp_path / "m", made.model_copy(update={"test_time_flip": True}))
    # Every output names the flip with the explanation (SR algorithm parameters, overlay text).
    assert flipping.identity.explanation == (
        f"{plain.identity.explanation}, mean with the left-right mirror's map (test-time flip)"
    )
    for network in (plain.model, flipping.model):  # spread an untrained net's logits
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.mul_(1.5)
    image = _image(4)
    (a,) = flipping.predict([image])[0].findings
    (b,) = flipping.predict([_mirrored(image)])[0].findings
    # An image and its mirror: the same probabilities and class, maps that are mirror images.
    assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)
    assert a.predicted == b.predicted
    np.testing.assert_allclose(a.heatmap, b.heatmap[:, ::-1], atol=1e-4)
    assert float(a.heatmap.max()) > 0.9  # the mean map scaled to 1 (then resized to the image)
    # The probabilities are the softmax of the mean of the two logits, as evaluation computes.
    tensor, _ = prepare_input(made, image.pixels)
    with torch.no_grad():
        mean = (plain.model(tensor[None]) + plain.model(tensor[None].flip(-1))) / 2
    expected = torch.softmax(mean / made.temperature, dim=1)[0].numpy()
    assert a.probabilities == pytest.approx(expected.tolist(), abs=1e-5)
    np.testing.assert_allclose(flipping.forward_probabilities([tensor])[0], expected, atol=1e-5)
    assert a.predicted.index == int(expected.argmax())
    # Without the flip this network tells the two apart (it is not symmetric), by far more
    # than the tolerances above.
    (c,) = plain.predict([image])[0].findings
    (d,) = plain.predict([_mirrored(image)])[0].findings
    assert float(np.abs(np.subtract(c.probabilities, d.probabilities)).max()) > 1e-4
    assert not np.allclose(c.heatmap, d.heatmap[:, ::-1], atol=1e-2)


@pytest.mark.parametrize(
    ("max_images", "passes"),
    [(None, [(1, None), (1, None), (1, (1,))]), (2, [(2, None), (1, (1,))])],
)
def test_mirror_averaging_explains_the_class_of_the_mean_logits(
    max_images: int | None, passes: list[tuple[int, tuple[int, ...] | None]]
) -> None:
    """Each half's own top class may differ from the mean's: the maps then explain the mean's.

    By default the image and its mirror go through in separate passes (no pass holds more
    than the batch); with room for both they share one."""
    from dicomnode.explain.gradcam import mirror_averaged

    calls: list[tuple[int, tuple[int, ...] | None]] = []

    def explain(batch: torch.Tensor, classes: Any) -> CamBatch:
        calls.append((batch.shape[0], None if classes is None else tuple(classes)))
        # image (marked at column 0): class 0 by a little, its peak at column 1;
        # mirror (marked at column 5): class 1 by a lot, its peak at column 4.
        is_image = [bool(item[0, 0, 0] > 0) for item in batch]
        logits = torch.tensor([[1.0, 0.8] if i else [0.0, 3.0] for i in is_image])
        maps = np.zeros((batch.shape[0], 4, 6), dtype=np.float32)
        for index, image in enumerate(is_image):
            maps[index, 1 if image else 2, 1 if image else 4] = 0.5
        own = tuple(0 if i else 1 for i in is_image)
        return CamBatch(logits=logits, cams=maps, classes=tuple(classes or own))

    marked = torch.zeros(1, 1, 4, 6)
    marked[..., 0] = 1.0
    result = mirror_averaged(explain, max_images)(marked, None)
    # Only the image, whose own class (0) is not the mean's, is explained again, for class 1.
    assert result.classes == (1,) and calls == passes
    assert torch.allclose(result.logits, torch.tensor([[0.5, 1.9]]))
    # The mirror's map (its peak at column 4) is flipped back to column 1 and added to the
    # image's; the sum is scaled to a maximum of 1.
    assert result.cams.shape == (1, 4, 6)
    assert result.cams[0, 1, 1] == result.cams[0, 2, 1] == pytest.approx(1.0)
    assert float(result.cams.sum()) == pytest.approx(2.0)


def test_shift_offsets_and_moves_undo_each_other() -> None:
    assert shift_offsets(0) == ((0, 0),)
    offsets = shift_offsets(4)
    assert offsets[0] == (0, 0) and len(offsets) == len(set(offsets)) == 13
    assert {(2, 2), (-2, 0), (4, 0), (0, -4)} <= set(offsets)
    assert max(max(abs(dx), abs(dy)) for dx, dy in offsets) == 4
    with pytest.raises(ModelError, match="at least 0"):
        shift_offsets(-1)
    inputs = torch.arange(2 * 1 * 6 * 5, dtype=torch.float32).reshape(2, 1, 6, 5)
    moved = shift_inputs(inputs, 2, -1)
    # Content moves right and up; the edge is repeated into the opened space.
    assert torch.equal(moved[..., 0:5, 2:5], inputs[..., 1:6, 0:3])
    assert torch.equal(moved[..., 5, 2:5], inputs[..., 5, 0:3])
    assert torch.equal(moved[..., :5, 0], inputs[..., 1:6, 0])
    maps = np.random.default_rng(0).random((2, 6, 5)).astype(np.float32)
    back = shift_maps(shift_maps(maps, 2, -1), -2, 1)
    # What left the map is gone (row 0, columns 3 and 4); the rest is back in place.
    np.testing.assert_array_equal(back[:, 1:6, 0:3], maps[:, 1:6, 0:3])
    assert not back[:, 0, :].any() and not back[:, :, 3:].any()
    assert not shift_maps(maps, 5, 0).any()


def test_a_shift_averaged_map_is_the_mean_of_the_shifted_maps_moved_back(
    tiny: Predictor, images: list[PreparedImage]
) -> None:
    spec = GradCamSpec(target_layer="features.0+features.1", method="layercam", shift=4)
    other = tiny.with_explanation(spec)
    assert other.identity.explanation == (
        "LayerCAM at features.0+features.1, mean of 13 copies shifted up to 4 px"
    )
    prepared = [prepare_input(tiny.card, image.pixels) for image in images]
    batch = torch.stack([t for t, _ in prepared])
    plain = grad_cam(tiny.model, spec.target_layer, batch, method="layercam")
    total = np.zeros_like(plain.cams)
    for dx, dy in shift_offsets(4):
        moved = shift_inputs(batch, dx, dy)
        cams = grad_cam(tiny.model, spec.target_layer, moved, plain.classes, "layercam").cams
        total += shift_maps(cams, -dx, -dy)
    expected = total / total.reshape(len(images), -1).max(axis=1)[:, None, None]
    for index, result in enumerate(other.predict(images)):
        (finding,) = result.findings
        assert finding.predicted.index == plain.classes[index]
        assert finding.probabilities == pytest.approx(
            tiny.predict([images[index]])[0].findings[0].probabilities
        )
        heatmap = to_source_geometry(expected[index].astype(np.float32), prepared[index][1])
        np.testing.assert_allclose(finding.heatmap, heatmap, atol=1e-5)
        assert 0.9 < finding.heatmap.max() <= 1.0
        one_pass = to_source_geometry(plain.cams[index], prepared[index][1])
        assert not np.allclose(finding.heatmap, one_pass, atol=1e-3)


@pytest.mark.parametrize(
    ("count", "max_images", "passes"),
    [(1, None, [1] * 13), (1, 8, [1, 8, 4]), (3, 8, [3] + [6] * 6), (2, 1, [2] * 13)],
)
def test_shifted_copies_are_batched_up_to_max_images_and_give_the_same_maps(
    tiny: Predictor, count: int, max_images: int | None, passes: list[int]
) -> None:
    generator = torch.Generator().manual_seed(count)
    batch = torch.rand(count, tiny.card.input.channels, *tiny.card.input.size, generator=generator)
    seen: list[tuple[int, tuple[int, ...] | None]] = []

    def one_pass(inputs: torch.Tensor, classes: Any) -> CamBatch:
        seen.append((inputs.shape[0], None if classes is None else tuple(classes)))
        return grad_cam(tiny.model, "features.0+features.1", inputs, classes, "layercam")

    grouped = shift_averaged(one_pass, batch, 4, max_images)
    assert [size for size, _ in seen] == passes
    # The first pass picks the classes; every shifted copy explains the same ones.
    assert seen[0][1] is None
    assert all(classes == grouped.classes * (size // count) for size, classes in seen[1:])
    seen.clear()
    one_by_one = shift_averaged(one_pass, batch, 4, 1)
    assert len(seen) == 13
    assert grouped.classes == one_by_one.classes
    assert torch.equal(grouped.logits, one_by_one.logits)
    np.testing.assert_allclose(grouped.cams, one_by_one.cams, atol=1e-5)
    assert grouped.cams.reshape(count, -1).max(axis=1) == pytest.approx(1.0)


@pytest.mark.parametrize(("max_images", "passes"), [(None, [3, 3]), (4, [4, 2]), (6, [6])])
def test_an_image_and_its_mirror_go_through_in_passes_that_change_no_map(
    tmp_path: Path, max_images: int | None, passes: list[int]
) -> None:
    """The node's CPU default: images, then mirrors (a pass no larger than the batch); with
    room for both (CUDA's batch) one pass. The same logits and maps either way."""
    from dicomnode.explain.gradcam import mirror_averaged

    card = make_tiny_model(tmp_path / "m", seed=3, num_classes=3)
    model = Predictor.load(tmp_path / "m", card).model
    with torch.no_grad():  # spread an untrained net's logits
        for parameter in model.parameters():
            parameter.mul_(1.5)
    generator = torch.Generator().manual_seed(7)
    batch = torch.rand(3, card.input.channels, *card.input.size, generator=generator)
    seen: list[int] = []

    def one_pass(inputs: torch.Tensor, classes: Any) -> CamBatch:
        seen.append(inputs.shape[0])
        return grad_cam(model, "features.0+features.1", inputs, classes, "layercam")

    reference = mirror_averaged(one_pass, 6)(batch, None)
    seen.clear()
    result = mirror_averaged(one_pass, max_images)(batch, None)
    assert seen[: len(passes)] == passes  # then one more pass only where a half disagrees
    assert result.classes == reference.classes
    assert torch.allclose(result.logits, reference.logits, atol=1e-6)
    np.testing.assert_allclose(result.cams, reference.cams, atol=1e-5)
    mirrored = mirror_averaged(one_pass, max_images)(batch.flip(-1), None)
    np.testing.assert_allclose(mirrored.cams, result.cams[:, :, ::-1], atol=1e-5)


def test_the_predictor_batches_shifted_copies_on_cuda_only(
    tiny: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dicomnode.inference as inference

    asked: list[int | None] = []
    maps: Any = object()  # what explain_batch gave, passed on as it is

    def recording(
        model: nn.Module, spec: Any, batch: torch.Tensor, per_pass: Any, *, mirror: bool
    ) -> Any:
        assert mirror is False  # the card does not flip at test time
        asked.append(per_pass)
        return maps

    monkeypatch.setattr(inference, "explain_batch", recording)
    batch = torch.zeros(1, tiny.card.input.channels, *tiny.card.input.size)
    assert tiny.explain(batch) is maps
    on_cuda = Predictor(tiny.directory, tiny.card, tiny.model, torch.device("cuda"), 5, None)
    assert on_cuda.explain(batch) is maps
    assert asked == [None, 5]


def test_a_card_writes_its_shift_only_when_it_has_one(tmp_path: Path) -> None:
    card = make_tiny_model(tmp_path / "plain")
    assert "shift" not in (tmp_path / "plain" / "model.yaml").read_text(encoding="utf-8")
    shifted = card.model_copy(update={"gradcam": GradCamSpec(target_layer="features", shift=6)})
    write_card(tmp_path / "plain", shifted)
    assert load_card(tmp_path / "plain").gradcam.shift == 6
    with pytest.raises(ValueError, match="less than or equal to 32"):
        GradCamSpec(target_layer="features", shift=33)


def test_peak_is_column_then_row() -> None:
    cam = np.zeros((5, 7), dtype=np.float32)
    cam[3, 6] = 1.0
    assert peak(cam) == (6.0, 3.0)


# --- architectures -------------------------------------------------------------------------


# Real weights and a Grad-CAM pass for the small network and the production
# configuration; shapes only (meta device: no memory, no arithmetic) for the rest.
REAL = {("small_vgg", 1), ("small_vgg", 3), ("efficientnet_lite0", 3)}


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", TRAINABLE)
def test_every_architecture_builds_and_has_its_gradcam_layer(name: str, in_chans: int) -> None:
    params = {"widths": [4, 8]} if name == "small_vgg" else {}
    if (name, in_chans) not in REAL:
        with torch.device("meta"):
            model = build_model(name, in_chans, 3, params)
        target_layer(model, DEFAULT_TARGET_LAYERS[name])
        logits = model.eval()(torch.empty(2, in_chans, 96, 96, device="meta"))
        assert tuple(logits.shape) == (2, 3)
        return
    model = build_model(name, in_chans, 3, params).eval().requires_grad_(False)
    result = grad_cam(model, DEFAULT_TARGET_LAYERS[name], torch.rand(2, in_chans, 64, 64))
    assert result.logits.shape == (2, 3) and result.cams.shape == (2, 64, 64)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(TRAINABLE) - {"small_vgg"}))
def test_every_architecture_runs_grad_cam_through_a_predictor(tmp_path: Path, name: str) -> None:
    card = make_tiny_model(tmp_path, architecture=name, input_size=(96, 96), channels=1)
    (finding,) = Predictor.load(tmp_path, card).predict([_image(0)])[0].findings
    assert finding.heatmap.shape == (ROWS, COLUMNS)
    assert finding.heatmap[int(finding.peak[1]), int(finding.peak[0])] == finding.heatmap.max()


def test_a_predictors_variants_share_its_network_and_its_lock(tiny: Predictor) -> None:
    """Grad-CAM hooks on one network must serve one caller at a time, whichever copy calls."""
    variant = tiny.without_localiser()
    assert variant.model is tiny.model
    assert variant._lock is tiny._lock


def test_a_scaled_region_does_not_grow_by_a_rounding_error() -> None:
    from dicomnode.inference import _scaled

    rows, columns, shape = 3995, 3990, (2048, 2045)
    scaled = _scaled(Region(0, 0, columns, rows), shape[1] / columns, shape[0] / rows)
    assert (scaled.width, scaled.height) == (2045, 2048)
    inner = _scaled(Region(10, 10, 20, 20), 0.5, 0.5)
    assert inner == Region(5, 5, 10, 10)
    partial = _scaled(Region(1, 1, 3, 3), 0.5, 0.5)
    assert partial == Region(0, 0, 2, 2)  # covers every pixel the region touches
