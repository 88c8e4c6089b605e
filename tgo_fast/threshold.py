"""Threshold, pseudo-labels and confidence weights (SPEC §1, steps 1–3).

    τ   = Percentile({s_i}, p)                    one global value, over all ranks' scores
    l_i = 1[s_i ≥ τ]                              a tie counts as positive
    w_i = 1 + c·|s_i − τ| / scale                 scale = 1 in the paper ("std"/"mad" optional)

Threshold modes (``threshold_mode``): the paper's one global τ stands in for the instance baseline
b(x) = β·log Z(x) of the KL-regularised optimum π*(y|x) ∝ π_ref(y|x)·exp(r(x, y)/β). Two per-prompt
estimates from the K scored samples y_1..y_K of each prompt group (samples of π_ref):

    per_prompt      τ(x) = Percentile({s_k}, p)
    log_partition   b̂(x) = β_r·log((1/K)·Σ_k exp(s_k/β_r))        (a logsumexp, stable for any β_r)

b̂(x) lies in [mean_k s_k, max_k s_k]. By Jensen (log is concave), E[b̂(x)] ≤ β_r·log E exp(s/β_r): for finite K
it underestimates the log-partition baseline; the gap shrinks as O(1/K) (delta method:
≈ β_r·Var[e^{s/β_r}] / (2K·E[e^{s/β_r}]²)). Each sample is then labelled and weighted against its own group's
threshold τ_i. A group of one sample has no estimate (its threshold would be its own score): an error.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Sequence

import torch
import torch.distributed as dist

from ._math import labels_of, weights_of
from ._validation import as_score_tensor, check_finite_number, check_nonnegative

# torch.quantile refuses inputs with more than 2**24 elements.
_QUANTILE_MAX_NUMEL = 2**24
_SCALES = (None, "std", "mad")
THRESHOLD_MODES = ("global", "per_prompt", "log_partition")


def gather_scores(scores: torch.Tensor) -> torch.Tensor:
    """All ranks' scores concatenated in rank order (identity when torch.distributed is not initialised).

    Ranks may hold different numbers of scores: sizes are exchanged first, then padded tensors.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return scores
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = scores.detach().reshape(-1).to(device=device, dtype=torch.float64)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([local.numel()], dtype=torch.int64, device=device))
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(sizes), dtype=torch.float64, device=device)
    padded[: local.numel()] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]).to(scores.device)


def _percentile(values: torch.Tensor, p: float) -> float:
    """Linear-interpolation percentile (numpy's default) of a 1-D float64 tensor of any size."""
    q = p / 100.0
    if values.numel() <= _QUANTILE_MAX_NUMEL:
        return float(torch.quantile(values, q, interpolation="linear"))
    # Beyond torch.quantile's limit: the two order statistics around position q·(n−1), by selection.
    position = q * (values.numel() - 1)
    lower_rank = math.floor(position)
    lower = torch.kthvalue(values, lower_rank + 1).values
    if position == lower_rank:
        return float(lower)
    upper = torch.kthvalue(values, lower_rank + 2).values
    return float(lower + (upper - lower) * (position - lower_rank))


def percentile_threshold(scores: torch.Tensor | Sequence[float], p: float = 50.0) -> float:
    """τ = the p-th percentile of the scores (linear interpolation), over every rank's scores.

    Args:
        scores: (N,) scores of this rank (any real dtype, any N ≥ 1 across ranks, no NaN/inf).
        p: percentile in [0, 100]; 50 (the median) in the paper.

    Returns:
        τ as a Python float (computed in float64); identical on every rank when torch.distributed is
        initialised, since all ranks' scores are gathered first (a collective: call it on every rank).
    """
    scores = as_score_tensor(scores, "scores", allow_empty=True)
    p = check_finite_number(p, "p")
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"p must be a percentile in [0, 100], got {p}")
    values = gather_scores(scores).reshape(-1).to(torch.float64)
    if values.numel() == 0:
        raise ValueError("scores is empty on every rank: the threshold needs at least one score")
    return _percentile(values, p)


def pseudo_labels(scores: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """l_i = 1 if s_i ≥ τ else 0 (ties are positive), as a float tensor of the scores' compute dtype."""
    return labels_of(as_score_tensor(scores, "scores"), check_finite_number(tau, "threshold"))


def confidence_weights(
    scores: torch.Tensor,
    tau: float | torch.Tensor,
    c: float = 5.0,
    scale: float | str | None = None,
) -> torch.Tensor:
    """w_i = 1 + c·|s_i − τ| / scale.

    Args:
        scores: (B,) scores.
        tau: the threshold τ.
        c: confidence coefficient, c ≥ 0 (5 in the paper; 0 gives uniform weights).
        scale: None (the paper: raw scores), a positive float (e.g. ``ThresholdEstimate.std`` of the whole
            training set: the recommended way to scale), or "std" / "mad" to use the standard deviation /
            median absolute deviation of *these* scores (batch-dependent; an extension, off by default).
    """
    scores = as_score_tensor(scores, "scores")
    tau = check_finite_number(tau, "threshold")
    c = check_nonnegative(c, "c")
    return weights_of(scores, tau, c, 1.0 if scale is None else _scale_value(scores, scale))


def _scale_value(values: torch.Tensor, scale: float | str) -> float:
    if isinstance(scale, str):
        if scale not in ("std", "mad"):
            raise ValueError(f"scale must be None, a positive number, 'std' or 'mad', got {scale!r}")
        value = _spread(values.to(torch.float64), scale)
    else:
        value = check_finite_number(scale, "scale")
    if not value > 0:
        raise ValueError(
            f"scale must be positive, got {value} (the scores have no spread): use scale=None for raw scores"
        )
    return value


def _spread(values: torch.Tensor, kind: str) -> float:
    """Standard deviation (population) or median absolute deviation of a float64 tensor."""
    if kind == "std":
        return float(values.std(unbiased=False)) if values.numel() > 1 else 0.0
    # torch.median returns the lower of the two middle values; the median here interpolates (numpy's).
    return _percentile((values - _percentile(values, 50.0)).abs(), 50.0)


@dataclasses.dataclass(frozen=True)
class ThresholdEstimate:
    """The estimate of τ and the statistics of the scores it came from (written next to checkpoints)."""

    tau: float
    p: float
    n: int
    mean: float
    std: float
    mad: float
    min: float
    max: float
    positive_fraction: float  # of the samples labelled against their own threshold (τ, or their group's)
    source: str
    mode: str = "global"  # THRESHOLD_MODES
    log_partition_beta: float | None = None  # β_r of log_partition
    group_thresholds: dict[str, float] | None = None  # per_prompt / log_partition: τ(x) of each prompt group
    group_sizes: dict[str, int] | None = None  # K of each group

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON, atomically (a temporary file renamed over the target)."""
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ThresholdEstimate":
        with open(path) as f:
            data = json.load(f)
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = required - data.keys()
        if missing:
            raise ValueError(f"{os.fspath(path)} is not a threshold file: missing keys {sorted(missing)}")
        estimate = cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        check_finite_number(estimate.tau, f"tau in {os.fspath(path)}")
        return estimate


def estimate_threshold(
    scores: torch.Tensor | Sequence[float], p: float = 50.0, source: str = "training set"
) -> ThresholdEstimate:
    """τ = percentile_threshold(scores, p) with the statistics of all ranks' scores (a collective)."""
    tau = percentile_threshold(scores, p)
    values = gather_scores(as_score_tensor(scores, "scores", allow_empty=True)).reshape(-1).to(torch.float64)
    return ThresholdEstimate(
        tau=tau,
        p=float(p),
        n=values.numel(),
        mean=float(values.mean()),
        std=_spread(values, "std"),
        mad=_spread(values, "mad"),
        min=float(values.min()),
        max=float(values.max()),
        positive_fraction=float((values >= tau).double().mean()),
        source=source,
    )


def group_thresholds(scores: torch.Tensor | Sequence[float], groups: Sequence[str], mode: str, *, p: float = 50.0,
                     log_partition_beta: float = 1.0) -> tuple[dict[str, float], dict[str, int]]:
    """Per-group thresholds of ``mode`` ("per_prompt" or "log_partition", see the module docstring) and the group
    sizes K, groups in order of first appearance. Local (no gather): pass every rank's scores.

    Raises:
        ValueError: an unknown mode, scores and groups of different lengths, or a group of one sample.
    """
    if mode not in THRESHOLD_MODES[1:]:
        raise ValueError(f"mode must be one of {', '.join(THRESHOLD_MODES[1:])}; got {mode!r}")
    values = as_score_tensor(scores, "scores").reshape(-1).to(torch.float64)
    if len(groups) != values.numel():
        raise ValueError(f"groups has {len(groups)} entries but scores has {values.numel()}: one group per score")
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    singles = [group for group, indices in members.items() if len(indices) == 1]
    if singles:
        raise ValueError(
            f"threshold_mode={mode!r} estimates each prompt's threshold from its K samples, but {len(singles)} of "
            f"{len(members)} prompt groups have a single sample (e.g. {singles[0]!r}), whose threshold would be its "
            "own score: sample K ≥ 2 images per prompt from π_ref, pool prompts with a 'group' column, or use "
            "threshold_mode: global")
    p = check_finite_number(p, "p")
    beta = check_finite_number(log_partition_beta, "log_partition_beta")
    if not beta > 0:
        raise ValueError(f"log_partition_beta must be > 0, got {beta}")
    thresholds = {}
    for group, indices in members.items():
        group_scores = values[indices]
        if mode == "per_prompt":
            thresholds[group] = _percentile(group_scores, p)
        else:  # β_r·log mean_k exp(s_k/β_r) = m + β_r·log mean_k exp((s_k − m)/β_r), m = max_k s_k: the logsumexp
            # shift (no overflow, every term ≤ 1, the sum ≥ 1); a group of equal scores gets exactly that score
            top = group_scores.max()
            thresholds[group] = float(top + beta * torch.log(torch.exp((group_scores - top) / beta).mean()))
    return thresholds, {group: len(indices) for group, indices in members.items()}


def with_group_thresholds(estimate: ThresholdEstimate, scores: torch.Tensor | Sequence[float],
                          groups: Sequence[str], mode: str, *, log_partition_beta: float = 1.0) -> ThresholdEstimate:
    """``estimate`` (the global τ and score statistics) with the per-group thresholds of ``mode`` (p = the
    estimate's) and the fraction of samples at or above their own group's threshold."""
    thresholds, sizes = group_thresholds(scores, groups, mode, p=estimate.p, log_partition_beta=log_partition_beta)
    own = sample_thresholds(thresholds, groups)
    values = as_score_tensor(scores, "scores").reshape(-1).to(torch.float64)
    return dataclasses.replace(
        estimate, mode=mode, log_partition_beta=log_partition_beta if mode == "log_partition" else None,
        group_thresholds=thresholds, group_sizes=sizes, positive_fraction=float((values >= own).double().mean()))


def sample_thresholds(thresholds: dict[str, float], groups: Sequence[str]) -> torch.Tensor:
    """(N,) float64: each sample's own threshold, its group's."""
    missing = sorted(set(groups) - thresholds.keys())
    if missing:
        raise ValueError(f"no threshold for prompt group(s) {missing[:3]}: the thresholds come from other data")
    return torch.tensor([thresholds[group] for group in groups], dtype=torch.float64)
