"""Argument checks shared by the losses, the kernels and the threshold helpers (a leaf: imports torch only).

Every check raises with a message that names the argument, what was received and what is expected
(SPEC §3); shape, dtype and option checks before any compute.

Shape, dtype and option checks read only metadata: they are free. Value checks (finite scores, τ and
reference values; targets in range; a masked token per sample) read tensor data, and reading it on the host
from a GPU tensor is a device→host synchronisation. So they never read device data on the host:

- CPU tensors, eager: host checks, a ValueError that names the bad positions (no device to wait for). On
  the PyTorch path of ``tgo_diffusion_loss`` and ``tgo_masked_loss`` they read the result instead of every
  input: one host read of the loss (and ŝ) per call (``all_finite``), the inputs checked only when it is
  non-finite (cross_entropy's own bounds check catches out-of-range targets first); elsewhere one
  reduction and one read per checked tensor;
- CUDA tensors, or inside ``torch.compile``: ``torch._assert_async`` on the device, no synchronisation and
  no graph break. A failure surfaces as a RuntimeError carrying the same message (CPU, compiled) or as a
  CUDA device-side assert at the next synchronisation (which, as for any device-side assert, ends the
  process's CUDA context: rerun the batch on CPU to see the positions).

The losses take ``validate=False`` to skip the value checks altogether (about three tiny launches per
checked tensor).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "torch", "triton")


def check_finite_number(value, name: str) -> float:
    """A real, finite Python number (a 0-d / one-element tensor is accepted)."""
    if type(value) is float and math.isfinite(value):  # the common case, without the checks below
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a single number, got a tensor of shape {tuple(value.shape)}")
        if value.is_complex():
            raise TypeError(f"{name} must be real, got dtype {value.dtype}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_nonnegative(value, name: str) -> float:
    if type(value) is float and 0.0 <= value < math.inf:  # the common case in one comparison
        return value
    value = check_finite_number(value, name)
    if value < 0:
        raise ValueError(f"{name} must be ≥ 0, got {value}")
    return value


def check_positive(value, name: str) -> float:
    if type(value) is float and 0.0 < value < math.inf:  # the common case in one comparison
        return value
    value = check_finite_number(value, name)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_choice(value, name: str, choices: Sequence) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def reads_values_on_host(tensor: torch.Tensor) -> bool:
    """Whether value checks may read `tensor` on the host: a CPU tensor outside torch.compile (no device to
    synchronise with, no graph to break); elsewhere they run on the device (``torch._assert_async``)."""
    return tensor.is_cpu and not torch.compiler.is_compiling()


def all_finite(*results: torch.Tensor) -> bool:
    """Whether every value of a loss (scalar or (B,)) and, where given, its ŝ (B,) is finite: one host read.

    The value checks of the PyTorch path on CPU tensors (eager) read this instead of every input: a non-finite
    score makes its weight, hence its loss, non-finite (w·softplus(x) with w = inf or NaN is inf or NaN); a
    sample without a masked token makes ŝ, hence the loss, NaN (0/0); a non-finite precomputed reference value
    makes ŝ non-finite (pass ŝ then: an infinite ŝ on the label's side has a zero loss). Only when this is
    False are the inputs checked, to name the culprit; finite inputs with a non-finite result (a diverged
    policy) return that result, as they would without checks."""
    total = 0.0
    for result in results:  # summed on the host: these are (B,) values, and a read is cheaper than an op
        values = result.tolist()
        total += sum(values) if isinstance(values, list) else values
    return math.isfinite(total)


def assert_on_device(condition: torch.Tensor, message: str) -> None:
    """Fail with `message` when the boolean tensor `condition` is False, without a host synchronisation."""
    torch._assert_async(condition, message)


def as_score_tensor(scores, name: str, allow_empty: bool = False, validate: bool = True) -> torch.Tensor:
    """Scores as a 1-D real tensor with finite values (integer ratings are accepted as they are)."""
    if not isinstance(scores, torch.Tensor):
        try:
            scores = torch.as_tensor(scores, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{name} must be a tensor or a sequence of numbers, got {type(scores).__name__}") from error
    if scores.is_complex() or scores.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got dtype {scores.dtype}")
    if scores.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one score per sample), got shape {tuple(scores.shape)}")
    if scores.numel() == 0 and not allow_empty:
        raise ValueError(f"{name} is empty: the batch needs at least one sample")
    if validate and scores.is_floating_point():
        check_finite_values(scores, name)
    return scores


def check_float_tensor(tensor, name: str) -> torch.Tensor:
    """A floating-point tensor (fp16/bf16/fp32/fp64) with a batch dimension."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (fp32/bf16/fp16/fp64), got dtype {tensor.dtype}")
    if tensor.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension, got a 0-d tensor")
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(tensor.shape)}): it needs at least one sample")
    return tensor


def check_same_shape(tensor: torch.Tensor, name: str, reference: torch.Tensor, reference_name: str) -> None:
    if tensor.shape != reference.shape:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but {reference_name} has shape {tuple(reference.shape)}: "
            "they must match"
        )


def check_batch(tensor: torch.Tensor, name: str, batch: int) -> None:
    if tensor.dim() != 1 or tensor.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},) (one value per sample), got {tuple(tensor.shape)}")


def check_finite_values(tensor: torch.Tensor, name: str, what: str | None = None) -> None:
    """Every value of a float tensor (scores, a precomputed reference (B,)) is finite: a NaN would silently
    make the loss NaN. Host check with the positions on CPU, a device-side assert elsewhere (module docstring)."""
    on_host = reads_values_on_host(tensor)
    # On the host one reduction and one read settle the common case: a NaN or ±inf anywhere makes the sum
    # non-finite. (Finite values whose sum overflows, e.g. large fp16 scores, take the exact check and pass it.)
    if on_host and math.isfinite(tensor.detach().sum().tolist()):
        return
    label = f"{name} ({what})" if what else name
    advice = ": recompute them, or drop those samples from the batch" if what else ""
    if not on_host:
        assert_on_device(torch.isfinite(tensor).all(), f"{label} must be finite; a value is NaN or inf{advice}")
        return
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten()[:5].tolist()
        raise ValueError(f"{label} must be finite; non-finite values at positions {bad}{advice}")


def check_threshold(threshold, device, validate: bool = True) -> float | torch.Tensor:
    """τ as a Python float, or as a 0-d tensor where reading it would synchronise (on a GPU) or break a
    compiled graph. A CPU tensor is read in eager mode (free); a device tensor is moved to `device`."""
    if not isinstance(threshold, torch.Tensor) or reads_values_on_host(threshold):
        return check_finite_number(threshold, "threshold")
    if threshold.numel() != 1:
        raise ValueError(f"threshold must be a single number, got a tensor of shape {tuple(threshold.shape)}")
    if not threshold.is_floating_point():
        raise TypeError(f"threshold must be a floating-point tensor or a number, got dtype {threshold.dtype}")
    threshold = threshold.detach().reshape(()).to(device)
    if validate:
        assert_on_device(torch.isfinite(threshold), "threshold must be finite; it is NaN or inf")
    return threshold


def check_common(
    scores, threshold, batch: int, device, *, beta, c, reduction, validate: bool = True
) -> tuple[torch.Tensor, float | torch.Tensor]:
    """Validate the arguments every TGO loss takes; return scores on `device` and τ (a float, or a 0-d tensor
    on `device` when it came as a device tensor or under torch.compile: see ``check_threshold``)."""
    scores = as_score_tensor(scores, "scores", validate=validate)
    check_batch(scores, "scores", batch)
    threshold = check_threshold(threshold, device, validate)
    check_positive(beta, "beta")
    check_nonnegative(c, "c")
    check_choice(reduction, "reduction", REDUCTIONS)
    if scores.requires_grad:  # scores are constants: no gradient flows into them
        scores = scores.detach()
    return (scores if scores.device == device else scores.to(device)), threshold


def resolve_impl(impl: str, tensor: torch.Tensor) -> str:
    """"auto" → "triton" on CUDA tensors (not fp64), "torch" elsewhere; "triton" on CPU needs the interpreter."""
    check_choice(impl, "impl", IMPLS)
    if impl == "auto":
        # fp64 stays on the reference: the kernels accumulate in fp32.
        return "triton" if tensor.is_cuda and tensor.dtype != torch.float64 else "torch"
    if impl == "triton" and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"impl='triton' got tensors on {tensor.device}: the Triton kernels need CUDA tensors, or the Triton "
            "interpreter (set TRITON_INTERPRET=1 before importing tgo_fast). Use impl='auto' or 'torch' on CPU."
        )
    return impl


def check_masked_targets(
    targets, batch_shape, ignore_index: int, num_classes: int | None = None, validate: bool = True
) -> torch.Tensor:
    """targets (B, *) integer token ids of any width, ignore_index where not masked; every sample has a masked
    position (value checks as the module docstring says).

    Returns the targets as int64 (compared with ignore_index in int64: −100 is not representable in uint8, where
    it would wrap to 156).
    """
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor of token ids, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor of token ids, got dtype {targets.dtype}")
    if targets.shape != batch_shape:
        raise ValueError(f"targets must have shape {tuple(batch_shape)}, got {tuple(targets.shape)}")
    targets = targets if targets.dtype == torch.int64 else targets.long()
    if not validate:
        return targets
    masked = targets != ignore_index
    counts = masked.reshape(targets.shape[0], -1).sum(dim=1)
    range_message = f"targets hold ids outside [0, {num_classes}) that are not ignore_index={ignore_index}"
    empty_message = (
        f"have no masked position (every target is ignore_index={ignore_index}): their log-likelihood is "
        "undefined; mask at least one token per sample"
    )
    if not reads_values_on_host(targets):
        if num_classes is not None:
            assert_on_device((~masked | ((targets >= 0) & (targets < num_classes))).all(), range_message)
        assert_on_device((counts > 0).all(), "some sample(s) " + empty_message)
        return targets
    # One host read for both checks: the extreme masked ids and the fewest masked positions of a sample; the
    # offending values are looked up only when a check fails.
    if targets.numel() == 0:  # (B, 0): no positions at all
        lowest = highest = fewest = 0
    else:
        lowest, highest = torch.where(masked, targets, 0).aminmax()
        lowest, highest, fewest = torch.stack((lowest, highest, counts.min())).tolist()
    if num_classes is not None and (lowest < 0 or highest >= num_classes):
        out_of_range = masked & ((targets < 0) | (targets >= num_classes))
        raise ValueError(f"{range_message}: {targets[out_of_range][:5].tolist()}")
    if fewest == 0:
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"sample(s) {empty[:10]} {empty_message}")
    return targets
