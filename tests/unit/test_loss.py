"""The training loss: class weights weigh samples, label smoothing included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dicomnode.training.loss import WeightedCrossEntropy, make_loss

# The knee split's balanced weights, KL 0-4 (n / (k * n_c) over 2,286 / 1,046 / 1,516 / 757 / 173).
KNEE_WEIGHTS = torch.tensor([0.5055, 1.1048, 0.7623, 1.5266, 6.6798])


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(16, 5, generator=generator) * 2
    labels = torch.randint(0, 5, (16,), generator=generator)
    return logits, labels


def test_without_smoothing_it_is_torchs_weighted_cross_entropy() -> None:
    logits, labels = _batch(1)
    ours = WeightedCrossEntropy(KNEE_WEIGHTS)(logits, labels)
    torchs = nn.CrossEntropyLoss(weight=KNEE_WEIGHTS)(logits, labels)
    assert ours.item() == pytest.approx(torchs.item(), rel=1e-6)


def test_without_weights_it_is_torchs_smoothed_cross_entropy() -> None:
    logits, labels = _batch(2)
    ours = WeightedCrossEntropy(None, 0.1)(logits, labels)
    torchs = nn.CrossEntropyLoss(label_smoothing=0.1)(logits, labels)
    assert ours.item() == pytest.approx(torchs.item(), rel=1e-6)


def test_each_sample_weighs_its_own_class_weight() -> None:
    logits, labels = _batch(3)
    per_sample = F.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none")
    weights = KNEE_WEIGHTS[labels]
    expected = (per_sample * weights).sum() / weights.sum()
    assert WeightedCrossEntropy(KNEE_WEIGHTS, 0.1)(logits, labels).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def _optimum(loss: nn.Module, label: int) -> torch.Tensor:
    """The probabilities that minimise ``loss`` for one image of class ``label``."""
    logits = torch.zeros(1, 5, requires_grad=True)
    optimiser = torch.optim.LBFGS([logits], max_iter=500, tolerance_grad=1e-10)
    target = torch.tensor([label])

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        value: torch.Tensor = loss(logits, target)
        value.backward()  # type: ignore[no-untyped-call]
        return value

    optimiser.step(closure)  # type: ignore[no-untyped-call]
    return logits.detach().softmax(1)[0]


def test_a_clear_image_is_pulled_to_its_smoothed_target_not_to_the_rare_class() -> None:
    smoothed_target = torch.tensor([0.92, 0.02, 0.02, 0.02, 0.02])
    ours = _optimum(WeightedCrossEntropy(KNEE_WEIGHTS, 0.1), 0)
    assert torch.allclose(ours, smoothed_target, atol=1e-3)
    # What torch's loss does with the same weights: a healthy knee gets 0.20 on KL4.
    torchs = _optimum(nn.CrossEntropyLoss(weight=KNEE_WEIGHTS, label_smoothing=0.1), 0)
    assert torchs[4].item() == pytest.approx(0.20, abs=0.01)


def test_the_weights_travel_with_the_module() -> None:
    loss = WeightedCrossEntropy(KNEE_WEIGHTS, 0.1)
    assert "weight" in dict(loss.named_buffers())
    with pytest.raises(ValueError, match="label_smoothing"):
        WeightedCrossEntropy(None, 1.0)


def test_a_recipe_chooses_how_weights_meet_smoothing() -> None:
    logits, labels = _batch(4)
    per_sample = make_loss(KNEE_WEIGHTS, 0.1)(logits, labels)
    per_term = make_loss(KNEE_WEIGHTS, 0.1, "per_term")(logits, labels)
    torchs = nn.CrossEntropyLoss(weight=KNEE_WEIGHTS, label_smoothing=0.1)(logits, labels)
    assert per_term.item() == pytest.approx(torchs.item(), rel=1e-6)
    assert per_sample.item() == pytest.approx(
        WeightedCrossEntropy(KNEE_WEIGHTS, 0.1)(logits, labels).item(), rel=1e-6
    )
    assert abs(per_sample.item() - per_term.item()) > 1e-3  # they differ with both on
    with pytest.raises(ValueError, match="per_sample or per_term"):
        make_loss(KNEE_WEIGHTS, 0.1, "per_class")
