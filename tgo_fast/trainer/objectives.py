"""The training objectives selectable with ``--loss``: TGO (the method), SFT, Diffusion-KTO and Diffusion-DPO
(baselines).

All four see the same per-sample quantities; only the TGO math lives in ``tgo_fast.loss`` (used through
its public API, fused kernels included). The baselines:

* ``sft`` — fine-tune on the pseudo-positives only (l_i = 1[s_i ≥ τ]): the mean over positives of the
  denoising error e_θ,i (diffusion) or of −log π_θ(y_i|x_i) (masked); negatives get no gradient.
* ``kto`` — Diffusion-KTO (Li et al. 2024), KTO's prospect-theory utility on the implicit reward
  ŝ_i = β·(log π_θ − log π_ref) (the same ŝ as TGO, with the temperature for diffusion):

      z₀  = max(0, mean_i ŝ_i)      over the global micro-batch, detached (the KL reference point)
      ℓ_i = λ_D·(1 − σ(ŝ_i − z₀))   if l_i = 1 (desirable)
      ℓ_i = λ_U·(1 − σ(z₀ − ŝ_i))   if l_i = 0 (undesirable)

* ``dpo`` — Diffusion-DPO (Wallace et al. 2024) on preference pairs (w, l) formed within a prompt from the
  scores (``batches.preference_pairs``). The micro-batch holds 2B rows, the B winners then the B losers, and
  both images of a pair share noise and timestep (or mask). With TGO's ŝ per image,

      ŝ = (β/T)·(e_ref − e_θ)  (diffusion)       ŝ = β·(log π_θ − log π_ref)  (masked)
      ℓ_p = −log σ(ŝ_w − ŝ_l) = softplus(−(ŝ_w − ŝ_l))

  which is diffusers' ``train_diffusion_dpo.py`` loss −log σ(−½·β_dpo·((e_θ,w − e_ref,w) − (e_θ,l − e_ref,l)))
  with β_dpo = 2β/T (β = 1, T = 1e-3: β_dpo = 2000; the diffusers example uses 5000 for SD1.5). Its stats are
  per pair: ``implicit_score`` is the margin ŝ_w − ŝ_l, ``accuracy`` is 1[ŝ_w > ŝ_l], errors and log-probs are
  the pair's means.

Every objective returns ``(loss, stats)`` with detached per-sample (B,) stats for logging (per pair for DPO).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.fused_linear_masked_loss import fused_head_loss, head_token_logprob
from .._math import sign_agreement
from ..loss import diffusion_implicit_score, tgo_diffusion_loss
from ..threshold import confidence_weights, pseudo_labels
from . import distributed as D
from .config import TrainConfig

__all__ = ["needs_reference", "diffusion_objective", "masked_objective", "reference_logp",
           "reference_error", "kto_loss", "dpo_loss"]


def needs_reference(cfg: TrainConfig) -> bool:
    """SFT trains on the positives' likelihood alone; TGO, KTO and DPO compare with the reference."""
    return cfg.loss != "sft"


def reference_error(ref_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """e_ref,i = mean_j (pred_ref,ij − target_ij)² in fp32 (B,) — what the precomputed mode stores."""
    batch = ref_pred.shape[0]
    return (ref_pred.detach().float().reshape(batch, -1) - target.float().reshape(batch, -1)).square().mean(dim=1)


@torch.no_grad()
def reference_logp(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, impl: str) -> torch.Tensor:
    """log π_ref(y_i|x_i) (B,) from the reference's hidden states and output head (chunked, no grad;
    run as the head's forward, so a ZeRO-3-partitioned head is gathered by its own hooks)."""
    return head_token_logprob(head, hidden.detach(), labels, impl=impl)


def _labels_weights(cfg: TrainConfig, scores: torch.Tensor, tau: float):
    return pseudo_labels(scores, tau).float(), confidence_weights(scores, tau, cfg.c).float()


def kto_loss(implicit_score: torch.Tensor, labels: torch.Tensor, desirable_weight: float,
             undesirable_weight: float) -> torch.Tensor:
    """Diffusion-KTO's per-sample loss (B,) from ŝ with gradient (see the module docstring)."""
    total = D.all_reduce_sum(torch.stack([implicit_score.detach().sum(),
                                          torch.tensor(float(implicit_score.numel()), device=implicit_score.device)]))
    reference_point = (total[0] / total[1]).clamp(min=0).to(implicit_score.dtype)
    desirable = desirable_weight * (1.0 - torch.sigmoid(implicit_score - reference_point))
    undesirable = undesirable_weight * (1.0 - torch.sigmoid(reference_point - implicit_score))
    return torch.where(labels == 1, desirable, undesirable)


def dpo_loss(implicit_score: torch.Tensor, **row_stats: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Diffusion-DPO from ŝ of 2B rows (the B winners, then the B losers): mean over pairs of
    softplus(−(ŝ_w − ŝ_l)), and per-pair stats (the margin, 1[margin > 0], each of ``row_stats`` averaged over
    the pair)."""
    winner, loser = implicit_score.chunk(2)
    margin = winner - loser
    stats = {name: value.detach().float().view(2, -1).mean(dim=0) for name, value in row_stats.items()}
    stats.update(implicit_score=margin.detach(), accuracy=(margin > 0).to(margin.dtype).detach())
    return F.softplus(-margin).mean(), stats


def _sft_reduce(per_sample: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of the positives' losses (0 with a zero gradient when the micro-batch has none)."""
    return (labels * per_sample).sum() / labels.sum().clamp(min=1.0)


def diffusion_objective(cfg: TrainConfig, pred: torch.Tensor, target: torch.Tensor, scores: torch.Tensor,
                        tau: float, *, ref_pred: torch.Tensor | None = None,
                        ref_error: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Loss of a diffusion / flow policy prediction ``pred`` against ``target`` (+ the reference's)."""
    if cfg.loss == "dpo":
        implicit_score, policy_error, ref_error = diffusion_implicit_score(
            pred, ref_pred, target, ref_error, cfg.beta, cfg.temperature)
        return dpo_loss(implicit_score, policy_error=policy_error, reference_error=ref_error)
    if cfg.loss == "tgo":
        return tgo_diffusion_loss(pred, ref_pred, target, scores, tau, beta=cfg.beta, temperature=cfg.temperature,
                                  c=cfg.c, ref_error=ref_error, impl=cfg.impl, return_stats=True)
    labels, weights = _labels_weights(cfg, scores, tau)
    if cfg.loss == "sft":
        batch = pred.shape[0]
        policy_error = (pred.float().reshape(batch, -1) - target.float().reshape(batch, -1)).square().mean(dim=1)
        stats = {"policy_error": policy_error.detach(), "labels": labels, "weights": weights}
        return _sft_reduce(policy_error, labels), stats
    # ŝ with Δ in the product form, exactly as the TGO loss computes it
    implicit_score, policy_error, ref_error = diffusion_implicit_score(
        pred, ref_pred, target, ref_error, cfg.beta, cfg.temperature)
    loss = kto_loss(implicit_score, labels, cfg.kto_desirable_weight, cfg.kto_undesirable_weight).mean()
    stats = {"policy_error": policy_error.detach(), "labels": labels, "weights": weights,
             "implicit_score": implicit_score.detach(), "reference_error": ref_error.detach(),
             "accuracy": sign_agreement(implicit_score, labels)}
    return loss, stats


def masked_objective(cfg: TrainConfig, head: torch.nn.Module, hidden: torch.Tensor, labels_tokens: torch.Tensor,
                     scores: torch.Tensor, tau: float, ref_logp: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """Loss of a masked-token policy from its hidden states (B, L, H) and output head module (Linear or
    1×1 Conv2d, V outputs)."""
    if cfg.loss == "tgo":  # the fused kernel as the head's forward: logits never materialised
        return fused_head_loss(head, hidden, labels_tokens, scores, tau, ref_logp=ref_logp, beta=cfg.beta, c=cfg.c,
                               impl=cfg.impl, return_stats=True)
    # The chunked log-prob (differentiable, run as the head's forward): no full logits for the baselines either.
    policy_logp = head_token_logprob(head, hidden, labels_tokens, impl=cfg.impl)
    if cfg.loss == "dpo":
        return dpo_loss(cfg.beta * (policy_logp - ref_logp.float()), policy_logp=policy_logp,
                        reference_logp=ref_logp.float())
    labels, weights = _labels_weights(cfg, scores, tau)
    stats = {"policy_logp": policy_logp.detach(), "labels": labels, "weights": weights}
    if cfg.loss == "sft":
        return _sft_reduce(-policy_logp, labels), stats
    implicit_score = cfg.beta * (policy_logp - ref_logp.float())
    loss = kto_loss(implicit_score, labels, cfg.kto_desirable_weight, cfg.kto_undesirable_weight).mean()
    stats.update(implicit_score=implicit_score.detach(), reference_logp=ref_logp.detach().float(),
                 accuracy=sign_agreement(implicit_score, labels))
    return loss, stats
