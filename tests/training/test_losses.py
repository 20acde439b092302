"""The verifier's losses against values worked out by hand with `math`."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import HybridLossConfig, focal_loss, hybrid_loss, supcon_loss


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_focal_loss_matches_hand_computation() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    targets = torch.tensor([1.0, 1.0, 0.0, 0.0])
    # positives: p_t = sigmoid(x), α = 1; negatives: p_t = 1 - sigmoid(x), α = 1.5; γ = 2
    terms = []
    for x, y in zip(logits.tolist(), targets.tolist()):
        p_t = _sigmoid(x) if y == 1 else 1 - _sigmoid(x)
        alpha = 1.0 if y == 1 else 1.5
        terms.append(-alpha * (1 - p_t) ** 2 * math.log(p_t))
    expected = sum(terms) / 4
    # the first term by hand, as a sanity anchor: sigmoid(2) = 0.880797, (0.119203)^2 * 0.126928 = 0.0018036
    assert terms[0] == pytest.approx(0.0018036, abs=1e-6)
    assert float(focal_loss(logits, targets)) == pytest.approx(expected, rel=1e-6)


def test_focal_loss_weights_negatives_by_one_and_a_half() -> None:
    logit = torch.tensor([0.3])
    # same p_t for a positive with logit x and a negative with logit -x: only α differs
    pos = focal_loss(logit, torch.tensor([1.0]))
    neg = focal_loss(-logit, torch.tensor([0.0]))
    assert float(neg) == pytest.approx(1.5 * float(pos), rel=1e-6)
    # γ = 0 and α = 1 reduce to binary cross-entropy
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.tensor([1.0]))
    assert float(focal_loss(logit, torch.tensor([1.0]), gamma=0.0)) == pytest.approx(float(bce), rel=1e-6)


def test_focal_loss_stays_finite_for_confident_mistakes() -> None:
    loss = focal_loss(torch.tensor([-80.0, 80.0]), torch.tensor([1.0, 0.0]))
    assert math.isfinite(float(loss))
    assert float(loss) == pytest.approx((80.0 + 1.5 * 80.0) / 2, rel=1e-4)


def test_supcon_loss_matches_hand_computation() -> None:
    # three unit vectors in 2-D: a=(1,0), b=(0.6,0.8), c=(0,1); labels 1, 1, 0; τ = 0.2.
    # unnormalised input: normalisation must happen inside
    z = torch.tensor([[2.0, 0.0], [0.6, 0.8], [0.0, 3.0]])
    labels = torch.tensor([1, 1, 0])
    t = 0.2
    ab, ac, bc = 0.6, 0.0, 0.8
    # anchor a: one positive (b) among {b, c}; anchor b: one positive (a) among {a, c}; c: no positive, skipped
    loss_a = -math.log(math.exp(ab / t) / (math.exp(ab / t) + math.exp(ac / t)))
    loss_b = -math.log(math.exp(ab / t) / (math.exp(ab / t) + math.exp(bc / t)))
    expected = (loss_a + loss_b) / 2
    assert expected == pytest.approx(0.5 * (math.log(1 + math.exp(-3)) + math.log(1 + math.exp(1))), rel=1e-12)
    assert float(supcon_loss(z, labels, temperature=t)) == pytest.approx(expected, rel=1e-5)


def test_supcon_loss_averages_over_several_positives() -> None:
    # four samples, labels 0,0,0,1; anchor 0 has two positives (1 and 2)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    labels = torch.tensor([0, 0, 0, 1])
    t = 0.2
    dots = z @ z.T

    def anchor(i: int, positives: list[int]) -> float:
        others = [j for j in range(4) if j != i]
        denom = sum(math.exp(float(dots[i, j]) / t) for j in others)
        return -sum(math.log(math.exp(float(dots[i, p]) / t) / denom) for p in positives) / len(positives)

    expected = (anchor(0, [1, 2]) + anchor(1, [0, 2]) + anchor(2, [0, 1])) / 3
    assert float(supcon_loss(z, labels, t)) == pytest.approx(expected, rel=1e-5)


def test_supcon_loss_is_zero_without_positive_pairs_and_keeps_gradients() -> None:
    z = torch.randn(3, 4, requires_grad=True)
    loss = supcon_loss(z, torch.tensor([0, 1, 2]))
    assert loss.item() == 0.0
    loss.backward()
    assert z.grad is not None


def test_supcon_pulls_same_class_together() -> None:
    labels = torch.tensor([1, 1, 0, 0])
    clustered = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    assert float(supcon_loss(clustered, labels)) < float(supcon_loss(mixed, labels))


def test_hybrid_is_focal_plus_lambda_supcon() -> None:
    logits = torch.tensor([1.0, -0.5, 0.2, -2.0])
    targets = torch.tensor([1.0, 1.0, 0.0, 0.0])
    emb = torch.tensor([[1.0, 0.2], [0.8, 0.1], [0.1, 1.0], [-0.3, 0.7]])
    focal = float(focal_loss(logits, targets))
    supcon = float(supcon_loss(emb, targets.long(), 0.2))
    total, parts = hybrid_loss(logits, emb, targets, HybridLossConfig())
    assert float(total) == pytest.approx(focal + supcon, rel=1e-6)
    assert parts == pytest.approx({"focal": focal, "supcon": supcon})
    half, _ = hybrid_loss(logits, emb, targets, HybridLossConfig(supcon_weight=0.5))
    assert float(half) == pytest.approx(focal + 0.5 * supcon, rel=1e-6)
    alone, parts = hybrid_loss(logits, None, targets, HybridLossConfig(supcon_weight=0.0))
    assert float(alone) == pytest.approx(focal) and parts["supcon"] == 0.0


def test_losses_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        focal_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError):
        supcon_loss(torch.zeros(3, 2), torch.zeros(2))
