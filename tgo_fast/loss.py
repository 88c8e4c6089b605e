"""The TGO losses: the PyTorch reference (the executable form of SPEC §1–§2) and the dispatch to the kernels.

Per sample i, with scores s_i, threshold τ, confidence coefficient c and inverse temperature β:

    l_i = 1[s_i ≥ τ]                  w_i = 1 + c·|s_i − τ|
    ŝ_i = β·(log π_θ(y_i|x_i) − log π_ref(y_i|x_i))
    ℓ_i = −w_i·(l_i·log σ(ŝ_i) + (1 − l_i)·log(1 − σ(ŝ_i))) = w_i·softplus((1 − 2·l_i)·ŝ_i)
    ∂ℓ_i/∂ŝ_i = w_i·(σ(ŝ_i) − l_i)

Diffusion / flow models (Gaussian likelihood at temperature T, errors averaged over every non-batch element):

    e_θ,i = mean_j (pred_θ,ij − target_ij)²       e_ref,i = mean_j (pred_ref,ij − target_ij)²
    Δ_i   = e_ref,i − e_θ,i = mean_j (pred_ref,ij − pred_θ,ij)·(pred_ref,ij + pred_θ,ij − 2·target_ij)
    ŝ_i   = (β/T)·Δ_i

Masked token models (M_i = masked positions of sample i, i.e. targets ≠ ignore_index):

    log π(y_i|x_i) = (1/|M_i|)·Σ_{k∈M_i} log softmax(logits_ik)[t_ik]        ŝ_i = β·(log π_θ − log π_ref)

Everything is accumulated in fp32 (fp64 inputs stay fp64); outputs are fp32. Gradients flow into the policy
only: the reference, the target, the scores and τ are constants.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _validation as V
from ._math import as_dtype, compute_dtype, tgo_objective, tgo_stats

__all__ = [
    "tgo_diffusion_loss",
    "tgo_masked_loss",
    "tgo_fused_linear_masked_loss",
    "masked_token_logprob",
    "tgo_objective",
    "TGOLoss",
]


# ----------------------------------------------------------------------------------- diffusion / flow (§2)
def _check_diffusion(model_pred, ref_pred, target, ref_error, temperature):
    """Shapes, dtypes, devices and T (metadata only: the value checks are ``_check_diffusion_values``)."""
    V.check_float_tensor(model_pred, "model_pred")
    V.check_float_tensor(target, "target")
    V.check_same_shape(target, "target", model_pred, "model_pred")
    if model_pred.numel() == 0:  # the batch is not empty (checked above): a sample is
        raise ValueError(f"model_pred has shape {tuple(model_pred.shape)}: each sample needs at least one element")
    if (ref_pred is None) == (ref_error is None):
        raise ValueError(
            "pass exactly one of ref_pred (the reference prediction, same shape as model_pred) and ref_error "
            f"(the precomputed reference error, shape ({model_pred.shape[0]},)); got "
            + ("both" if ref_pred is not None else "neither")
        )
    if ref_pred is not None:
        V.check_float_tensor(ref_pred, "ref_pred")
        V.check_same_shape(ref_pred, "ref_pred", model_pred, "model_pred")
    else:
        V.check_float_tensor(ref_error, "ref_error")
        V.check_batch(ref_error, "ref_error", model_pred.shape[0])
    device = model_pred.device
    for name, other in (("target", target), ("ref_pred", ref_pred), ("ref_error", ref_error)):
        if other is not None and other.device != device:
            raise ValueError(f"{name} is on {other.device} but model_pred is on {device}: move it")
    V.check_positive(temperature, "temperature")


def _check_diffusion_values(scores, ref_error):
    """Finite scores and ref_error (τ is checked with the metadata: a number, or a device assert)."""
    V.check_finite_values(scores, "scores")
    if ref_error is not None:
        V.check_finite_values(ref_error, "ref_error", "the precomputed reference errors")


def diffusion_implicit_score(model_pred, ref_pred, target, ref_error, beta, temperature, errors=True):
    """ŝ = (β/T)·Δ with Δ in the product form of SPEC §2; returns (ŝ, e_θ, e_ref), each (B,) (e_θ and e_ref
    None when ``errors=False`` and Δ does not need them: the loss alone skips their passes).

    With the residuals d = pred − target (carries the gradient) and u = ref − target (a constant),
    Δ = mean_j (u − d)·(u + d): exactly 0 when pred == ref (u − d is 0 bit for bit), no cancellation of two
    large means. Means run over every non-batch dim in place (no reshape: any layout, no copy)."""
    dtype = compute_dtype(model_pred)
    sample_dims = tuple(range(1, model_pred.dim()))
    target = as_dtype(target.detach(), dtype)
    policy_residual = as_dtype(model_pred, dtype) - target
    scale = beta / temperature
    if ref_pred is None:
        policy_error = _sample_mean(policy_residual.square(), sample_dims)
        reference_error = as_dtype(ref_error.detach(), dtype)
        return scale * (reference_error - policy_error), policy_error, reference_error
    reference_residual = as_dtype(ref_pred.detach(), dtype) - target
    delta = _sample_mean((reference_residual - policy_residual) * (reference_residual + policy_residual), sample_dims)
    if not errors:
        return scale * delta, None, None
    policy_error = _sample_mean(policy_residual.square(), sample_dims)
    reference_error = _sample_mean(reference_residual.square(), sample_dims)
    return scale * delta, policy_error, reference_error


def _sample_mean(values: torch.Tensor, sample_dims: tuple[int, ...]) -> torch.Tensor:
    """Mean over the non-batch dims; (B,) inputs have one element per sample (``mean(())`` would reduce all)."""
    return values.mean(sample_dims) if sample_dims else values


def tgo_diffusion_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor | None,
    target: torch.Tensor,
    scores: torch.Tensor,
    threshold: float | torch.Tensor,
    *,
    beta: float = 1.0,
    temperature: float = 1e-3,
    c: float = 5.0,
    reduction: str = "mean",
    ref_error: torch.Tensor | None = None,
    impl: str = "auto",
    return_stats: bool = False,
    validate: bool = True,
):
    """TGO loss of a diffusion / flow model.

    Args:
        model_pred: (B, *) policy prediction (ε, v or flow velocity), any float dtype, contiguous or not.
        ref_pred: (B, *) reference prediction on the same noisy input, or None with ``ref_error``.
        target: (B, *) regression target of the parameterisation (noise, velocity, noise − x0).
        scores: (B,) scalar feedback s_i.
        threshold: τ (see ``tgo_fast.threshold.percentile_threshold``), a number or a 0-d tensor (on the device:
            no host read).
        beta, temperature, c: β > 0, T > 0, c ≥ 0.
        reduction: "mean" | "sum" | "none" (per-sample (B,)).
        ref_error: (B,) precomputed e_ref (then ``ref_pred=None``).
        impl: "auto" | "torch" | "triton".
        return_stats: also return a dict of per-sample (B,) tensors: implicit_score, policy_error,
            reference_error, labels, weights, accuracy.
        validate: check values (finite scores, τ and ref_error). Never a host synchronisation: a ValueError
            naming the positions on CPU (eager, the PyTorch path: one read of the result, the inputs checked
            only when it is non-finite), a device-side assert on CUDA and under torch.compile
            (``tgo_fast._validation``); False skips them (a few tiny launches).

    No host synchronisation and no graph break with any arguments (the Triton path is the custom op
    ``tgo_fast::diffusion_loss``): ``torch.compile(fullgraph=True)`` and CUDA graphs take it.
    """
    _check_diffusion(model_pred, ref_pred, target, ref_error, temperature)
    impl = V.resolve_impl(impl, model_pred)
    check_result = validate and impl == "torch" and V.reads_values_on_host(model_pred)
    check_inputs = validate and not check_result
    scores, threshold = V.check_common(
        scores, threshold, model_pred.shape[0], model_pred.device, beta=beta, c=c, reduction=reduction,
        validate=check_inputs,
    )
    if check_inputs:
        _check_diffusion_values(scores, ref_error)
    if impl == "triton":
        from .kernels.diffusion_loss import tgo_diffusion_loss_triton

        return tgo_diffusion_loss_triton(
            model_pred, ref_pred, target, scores, threshold, beta=beta, temperature=temperature, c=c,
            reduction=reduction, ref_error=ref_error, return_stats=return_stats,
        )
    implicit_score, policy_error, reference_error = diffusion_implicit_score(
        model_pred, ref_pred, target, ref_error, beta, temperature, errors=return_stats
    )
    loss, labels, weights = tgo_objective(implicit_score, scores, threshold, c, reduction)
    if check_result and not (V.all_finite(loss) if ref_error is None else V.all_finite(loss, implicit_score)):
        _check_diffusion_values(scores, ref_error)  # names the input; a diverged policy's result is returned
    if not return_stats:
        return loss
    return loss, tgo_stats(
        implicit_score, labels, weights, "policy_error", policy_error, "reference_error", reference_error
    )


# ------------------------------------------------------------------------------------------- masked (§2)
def logprob_from_logits(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """log π(y_i|x_i) = mean over masked positions of log softmax(logits)[target], per sample (B,).

    Targets of any integer width; the per-sample sum runs over a dense (B, L) tensor (ignored positions hold 0),
    a fixed-order reduction: deterministic, on CUDA too.
    """
    batch, num_classes = logits.shape[0], logits.shape[-1]
    targets = as_dtype(targets, torch.int64)  # cross_entropy takes int64 class indices only
    token_nll = F.cross_entropy(
        as_dtype(logits.reshape(-1, num_classes), compute_dtype(logits)), targets.reshape(-1),
        ignore_index=ignore_index, reduction="none",
    ).reshape(batch, -1)
    counts = (targets != ignore_index).reshape(batch, -1).sum(dim=1)
    return token_nll.sum(dim=1).div(counts).neg()  # the int64 counts promote to the float dtype


def _check_masked_values(logits, targets, ignore_index, scores, ref_logp):
    """Finite ref_logp, targets in [0, V) with a masked position per sample, finite scores."""
    if ref_logp is not None:
        V.check_finite_values(ref_logp, "ref_logp", "the precomputed reference log-probs")
    V.check_masked_targets(targets, logits.shape[:-1], ignore_index, logits.shape[-1])
    V.check_finite_values(scores, "scores")


def tgo_masked_loss(
    logits: torch.Tensor,
    ref_logits: torch.Tensor | None,
    targets: torch.Tensor,
    scores: torch.Tensor,
    threshold: float | torch.Tensor,
    *,
    beta: float = 1.0,
    c: float = 5.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    ref_logp: torch.Tensor | None = None,
    impl: str = "auto",
    return_stats: bool = False,
    validate: bool = True,
):
    """TGO loss of a masked generative transformer from full logits (the readable reference).

    Args:
        logits: (B, *, V) policy logits; ref_logits: same shape, or None with ``ref_logp`` (B,).
        targets: (B, *) token ids at masked positions, ``ignore_index`` elsewhere (at least one per sample).
        Other arguments as ``tgo_diffusion_loss`` (no temperature here). Stats hold policy_logp / reference_logp.

    ``impl="triton"`` computes the log-probs with the fused row kernel (the custom op
    ``tgo_fast::logits_token_logprob``: one read of the logits in their dtype, online log-sum-exp; backward
    writes coef·(softmax − onehot) in one more pass); the TGO step stays in PyTorch. The logits themselves
    are the memory cost here: ``tgo_fused_linear_masked_loss`` avoids them. ``validate`` as
    ``tgo_diffusion_loss`` (finite scores, τ and ref_logp; targets in range; a masked token per sample).
    """
    V.check_float_tensor(logits, "logits")
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (B, *, V), got {tuple(logits.shape)}")
    if (ref_logits is None) == (ref_logp is None):
        raise ValueError(
            "pass exactly one of ref_logits (same shape as logits) and ref_logp (precomputed reference "
            f"log-probs, shape ({logits.shape[0]},)); got " + ("both" if ref_logits is not None else "neither")
        )
    if ref_logits is not None:
        V.check_float_tensor(ref_logits, "ref_logits")
        V.check_same_shape(ref_logits, "ref_logits", logits, "logits")
    else:
        V.check_float_tensor(ref_logp, "ref_logp")
        V.check_batch(ref_logp, "ref_logp", logits.shape[0])
    impl = V.resolve_impl(impl, logits)
    # CPU, eager, PyTorch path: the value checks read the result once (V.all_finite) instead of every input.
    check_result = validate and impl == "torch" and V.reads_values_on_host(logits)
    check_inputs = validate and not check_result
    if check_inputs and ref_logp is not None:
        V.check_finite_values(ref_logp, "ref_logp", "the precomputed reference log-probs")
    targets = V.check_masked_targets(targets, logits.shape[:-1], ignore_index, logits.shape[-1], check_inputs)
    scores, threshold = V.check_common(
        scores, threshold, logits.shape[0], logits.device, beta=beta, c=c, reduction=reduction,
        validate=check_inputs,
    )
    if impl == "triton":
        from .kernels.fused_linear_masked_loss import logprob_from_logits_triton

        logprob = logprob_from_logits_triton
    else:
        logprob = logprob_from_logits

    try:
        policy_logp = logprob(logits, targets, ignore_index)
    except IndexError:  # cross_entropy's own bounds check (CPU) met a target outside [0, V)
        if check_result:
            _check_masked_values(logits, targets, ignore_index, scores, ref_logp)  # the ValueError naming them
        raise
    if ref_logits is not None:
        with torch.no_grad():
            reference_logp = logprob(ref_logits, targets, ignore_index)
    else:
        reference_logp = as_dtype(ref_logp.detach(), policy_logp.dtype)
    implicit_score = beta * (policy_logp - reference_logp)
    loss, labels, weights = tgo_objective(implicit_score, scores, threshold, c, reduction)
    if check_result and not (V.all_finite(loss) if ref_logp is None else V.all_finite(loss, implicit_score)):
        _check_masked_values(logits, targets, ignore_index, scores, ref_logp)  # a diverged policy's is returned
    if not return_stats:
        return loss
    return loss, tgo_stats(implicit_score, labels, weights, "policy_logp", policy_logp, "reference_logp", reference_logp)


def tgo_fused_linear_masked_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    scores: torch.Tensor,
    threshold: float | torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logp: torch.Tensor,
    beta: float = 1.0,
    c: float = 5.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    impl: str = "auto",
    return_stats: bool = False,
    chunk_rows: int | None = None,
    logits_dtype: torch.dtype = torch.float32,
    compact_rows: bool = False,
    validate: bool = True,
):
    """TGO loss of a masked transformer straight from hidden states and the output head (no full logits).

    Args:
        hidden: (B, L, H) hidden states before the head; weight: (V, H) head weight (a 1×1 conv's (V, H, 1, 1)
            is accepted); bias: (V,) or None; targets: (B, L); ref_logp: (B,) reference log-probs from
            ``masked_token_logprob`` of the reference model. Gradients flow to hidden, weight and bias.
        chunk_rows: rows (token positions) per chunk; None picks Liger's rule (a logits chunk about the size
            of the hidden states, at least 256 rows). The chunk's logits are the op's only V-sized buffer:
            chunk_rows × V × 4 bytes in fp32. Chunks hold whole samples when gradients are computed in forward.
        logits_dtype: precision of each chunk's logits: torch.float32 (default, exact log-softmax of fp32
            h·Wᵀ) or torch.bfloat16 / torch.float16 (logits rounded once, as a half-precision head would
            produce them; half the chunk memory; the log-sum-exp is still accumulated in fp32).
        compact_rows: False (default): every one of the B·L rows goes through the head (unmasked ones with a zero
            coefficient), so the op never synchronises with the host. True: only the masked rows do ((1 − mask
            ratio) fewer matmul rows, same results to fp32 rounding, grad_hidden exactly 0 at unmasked rows), at
            the cost of ONE device→host synchronisation per op call to read the masked-row counts (one per step
            with the single pass, one in forward and one in backward with the two-pass schedule). For eager
            training with sparse masks; it works under ``torch.compile(fullgraph=True)`` (the sync is inside the
            custom op) but not in a CUDA graph (a ValueError during capture).
        validate: as ``tgo_diffusion_loss`` (finite scores, τ and ref_logp; targets in range; a masked token
            per sample), never a host synchronisation.
    """
    V.check_float_tensor(hidden, "hidden")
    use_triton = V.resolve_impl(impl, hidden) == "triton"
    from .kernels.fused_linear_masked_loss import fused_linear_masked_loss

    return fused_linear_masked_loss(
        hidden, weight, targets, scores, threshold, bias=bias, ref_logp=ref_logp, beta=beta, c=c,
        reduction=reduction, ignore_index=ignore_index, use_triton=use_triton, return_stats=return_stats,
        chunk_rows=chunk_rows, logits_dtype=logits_dtype, compact_rows=compact_rows, validate=validate,
    )


def masked_token_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_rows: int | None = None,
    logits_dtype: torch.dtype = torch.float32,
    compact_rows: bool = False,
    validate: bool = True,
) -> torch.Tensor:
    """Per-sample mean log-prob of the masked targets (B,), fp32, computed chunk by chunk (differentiable; one
    matmul per row under no_grad). chunk_rows, logits_dtype, compact_rows, validate: as
    ``tgo_fused_linear_masked_loss`` (compact_rows: masked rows only, one host sync per call)."""
    V.check_float_tensor(hidden, "hidden")
    use_triton = V.resolve_impl(impl, hidden) == "triton"
    from .kernels.fused_linear_masked_loss import masked_token_logprob as _masked_token_logprob

    return _masked_token_logprob(
        hidden, weight, targets, bias=bias, ignore_index=ignore_index, use_triton=use_triton, chunk_rows=chunk_rows,
        logits_dtype=logits_dtype, compact_rows=compact_rows, validate=validate,
    )


# ---------------------------------------------------------------------------------------------- module
_FAMILIES = {
    "diffusion": tgo_diffusion_loss,
    "masked": tgo_masked_loss,
    "fused_linear_masked": tgo_fused_linear_masked_loss,
}


class TGOLoss(nn.Module):
    """TGO loss with τ stored as a buffer (saved in ``state_dict``); a drop-in for a diffusers training loop.

    ``family`` picks the functional form, and ``forward`` takes that form's positional inputs without τ:

    - "diffusion":           ``loss_fn(model_pred, ref_pred, target, scores, ref_error=None)``
    - "masked":              ``loss_fn(logits, ref_logits, targets, scores, ref_logp=None)``
    - "fused_linear_masked": ``loss_fn(hidden, weight, targets, scores, bias=None, ref_logp=...)``

    plus ``return_stats=`` and any per-call keyword of the functional form. τ goes to the loss as the buffer
    itself (fp64, on the module's device): no host read, so a compiled or CUDA-graphed step can hold it.
    """

    def __init__(
        self,
        threshold: float | torch.Tensor,
        *,
        beta: float = 1.0,
        temperature: float = 1e-3,
        c: float = 5.0,
        reduction: str = "mean",
        impl: str = "auto",
        family: str = "diffusion",
        ignore_index: int = -100,
    ):
        super().__init__()
        V.check_choice(family, "family", tuple(_FAMILIES))
        V.check_choice(reduction, "reduction", V.REDUCTIONS)
        V.check_choice(impl, "impl", V.IMPLS)
        V.check_positive(beta, "beta")
        V.check_positive(temperature, "temperature")
        V.check_nonnegative(c, "c")
        self.family, self.beta, self.temperature, self.c = family, float(beta), float(temperature), float(c)
        self.reduction, self.impl, self.ignore_index = reduction, impl, ignore_index
        self.register_buffer("threshold", torch.tensor(V.check_finite_number(threshold, "threshold"), dtype=torch.float64))

    def _apply(self, fn, recurse=True):
        """Module casts (``.half()``, ``.to(torch.bfloat16)``, DeepSpeed's bf16 engine) move τ but never round it:
        τ decides the labels, and 0.123456789 in fp16 is 0.1234741, which flips every score in between."""
        threshold = self.threshold
        super()._apply(fn, recurse)
        self.threshold = threshold.to(device=self.threshold.device)  # float64 kept
        return self

    def set_threshold(self, threshold: float | torch.Tensor) -> None:
        """Replace τ (e.g. after re-estimating it on a fresh proxy set)."""
        self.threshold.fill_(V.check_finite_number(threshold, "threshold"))

    def forward(self, *inputs, **kwargs):
        options = dict(beta=self.beta, c=self.c, reduction=self.reduction, impl=self.impl)
        if self.family == "diffusion":
            options["temperature"] = self.temperature
        else:
            options["ignore_index"] = self.ignore_index
        options.update(kwargs)
        return _FAMILIES[self.family](*inputs, threshold=self.threshold, **options)

    def extra_repr(self) -> str:
        return (
            f"family={self.family!r}, threshold={float(self.threshold):g}, beta={self.beta:g}, "
            f"temperature={self.temperature:g}, c={self.c:g}, reduction={self.reduction!r}, impl={self.impl!r}"
        )
