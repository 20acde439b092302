"""Losses of the Track 1 verifier: binary focal loss, supervised contrastive loss, and their sum.

    hybrid = focal(logits, labels) + λ · supcon(embeddings, labels)

Focal loss (Lin et al. 2017) down-weights easy candidates, which are most of them; the contrastive term
(Khosla et al. 2020) pulls embeddings of mitotic figures together and away from look-alikes (hard negatives,
the detector's false positives), which is where the verifier earns its keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha_pos: float = 1.0, alpha_neg: float = 1.5,
               gamma: float = 2.0) -> torch.Tensor:
    """Mean binary focal loss over the batch: -α_t (1 - p_t)^γ log p_t, one logit per sample.

    `targets` are 0/1 (float or int); p_t = sigmoid(logit) for a positive, 1 - sigmoid(logit) for a negative;
    α_t = `alpha_pos` for positives (mitotic figures) and `alpha_neg` for negatives. log p_t is computed from the
    logits (binary cross-entropy) so it stays finite for confident predictions.
    """
    logits = logits.float().view(-1)
    targets = targets.to(logits.dtype).view(-1)
    if logits.shape != targets.shape:
        raise ValueError(f"{logits.numel()} logits but {targets.numel()} targets")
    if logits.numel() == 0:
        return logits.sum()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # = -log p_t
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha_pos * targets + alpha_neg * (1 - targets)
    return (alpha_t * (1 - p_t).pow(gamma) * ce).mean()


def supcon_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out), one view per sample.

    Embeddings are L2-normalised here. For anchor i with positives P(i) (same label, not i) and all others
    A(i) (everything but i):

        L_i = -1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a∈A(i)} exp(z_i·z_a/τ) )

    averaged over the anchors that have at least one positive; 0 when none has (a batch of all-distinct labels).
    """
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got {tuple(embeddings.shape)}")
    labels = labels.view(-1)
    n = embeddings.shape[0]
    if labels.numel() != n:
        raise ValueError(f"{n} embeddings but {labels.numel()} labels")
    z = F.normalize(embeddings.float(), dim=1)
    sim = z @ z.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positives.sum(1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        return z.sum() * 0.0  # keeps the graph, contributes nothing
    per_anchor = -(log_prob.masked_fill(~positives, 0.0).sum(1)[has_pos] / n_pos[has_pos])
    return per_anchor.mean()


@dataclass
class HybridLossConfig:
    alpha_pos: float = 1.0
    """Focal α of mitotic figures."""
    alpha_neg: float = 1.5
    """Focal α of everything else (hard negatives, false positives)."""
    gamma: float = 2.0
    temperature: float = 0.2
    """Supervised contrastive temperature τ."""
    supcon_weight: float = 1.0
    """λ: weight of the contrastive term; 0 trains with focal loss alone."""


def hybrid_loss(logits: torch.Tensor, embeddings: torch.Tensor | None, targets: torch.Tensor,
                cfg: HybridLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """focal + λ · supcon, and the two parts as floats for logging. `embeddings` may be None when λ = 0."""
    focal = focal_loss(logits, targets, cfg.alpha_pos, cfg.alpha_neg, cfg.gamma)
    if cfg.supcon_weight == 0 or embeddings is None:
        return focal, {"focal": focal.item(), "supcon": 0.0}
    supcon = supcon_loss(embeddings, targets.view(-1).round().long(), cfg.temperature)
    return focal + cfg.supcon_weight * supcon, {"focal": focal.item(), "supcon": supcon.item()}
