"""The TGO math shared by the PyTorch reference (tgo_fast.loss), the threshold helpers and the kernels (SPEC §1).

Per sample i, with scores s_i, threshold τ, confidence coefficient c and implicit score ŝ_i:

    l_i = 1[s_i ≥ τ]                  (a tie counts as positive)
    w_i = 1 + c·|s_i − τ| / scale     (scale = 1 in the paper)
    ℓ_i = w_i·softplus((1 − 2·l_i)·ŝ_i)          ∂ℓ_i/∂ŝ_i = w_i·(σ(ŝ_i) − l_i)

Unchecked: callers validate their arguments first (tgo_fast._validation). A leaf: imports torch only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64; everything else (fp32/bf16/fp16, integer ratings) is computed in fp32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)`` that skips the call when the dtype already matches: on the small (B,) tensors of the
    TGO step a no-op ``.to`` costs as much host time as a real op."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def labels_of(scores: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """l = 1[s ≥ τ], compared in fp32 (fp64 scores in fp64), never in the scores' half precision; τ a number or
    a 0-d tensor (rounded to the comparison dtype either way)."""
    dtype = compute_dtype(scores)
    return (as_dtype(scores, dtype) >= tau).to(dtype)


def weights_of(scores: torch.Tensor, tau: float | torch.Tensor, c: float, scale: float = 1.0) -> torch.Tensor:
    """w = 1 + c·|s − τ| / scale."""
    distance = (as_dtype(scores, compute_dtype(scores)) - tau).abs()
    if scale != 1.0:
        distance = distance / scale
    return 1.0 + c * distance


def reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def tgo_objective(
    implicit_score: torch.Tensor, scores: torch.Tensor, threshold: float | torch.Tensor, c: float, reduction: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The TGO loss from per-sample implicit scores ŝ (B,): returns (loss, labels, weights).

    ℓ_i = w_i·softplus((1 − 2·l_i)·ŝ_i): softplus is the stable −log σ (never log(σ + ε)); its gradient is
    σ((1 − 2l)·ŝ)·(1 − 2l) = σ(ŝ) − l, so ∂ℓ_i/∂ŝ_i = w_i·(σ(ŝ_i) − l_i) comes out of autograd exactly.
    """
    labels = as_dtype(labels_of(scores, threshold), implicit_score.dtype)
    weights = as_dtype(weights_of(scores, threshold, c), implicit_score.dtype)
    sign = torch.rsub(labels, 1.0, alpha=2.0)  # 1 − 2·l in one op
    per_sample = weights * F.softplus(sign * implicit_score)
    return reduce(per_sample, reduction), labels, weights


def tgo_score_gradient(implicit_score: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """∂ℓ_i/∂ŝ_i = w_i·(σ(ŝ_i) − l_i), per sample (B,): the gradient ``tgo_objective`` gets from autograd, for
    the kernels that compute their gradients in forward (inside a custom op, where autograd does not run)."""
    return weights * (torch.sigmoid(implicit_score) - labels)


def sign_agreement(implicit_score: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1.0 where sign(ŝ) agrees with the label (ŝ > 0 with l = 1, ŝ < 0 with l = 0), else 0.0; ŝ = 0 never agrees."""
    agrees = ((implicit_score > 0) & (labels == 1)) | ((implicit_score < 0) & (labels == 0))
    return agrees.to(implicit_score.dtype).detach()


def tgo_stats(implicit_score, labels, weights, policy_name, policy, reference_name, reference) -> dict:
    """The per-sample (B,) stats of ``return_stats=True``, detached: ŝ, the policy and reference terms of each
    family (errors or log-probs), labels, weights and accuracy."""
    return {
        "implicit_score": implicit_score.detach(),
        policy_name: policy.detach(),
        reference_name: reference.detach(),
        "labels": labels.detach(),
        "weights": weights.detach(),
        "accuracy": sign_agreement(implicit_score, labels),
    }
