"""Fused linear + cross-entropy TGO loss for masked-token models (MaskGIT / aMUSEd / Meissonic).

The per-sample log-likelihood of a masked generative transformer is the mean, over its masked
positions M_i, of log softmax(h_ik · Wᵀ + b)[t_ik]. Full logits (B, L, V) are 1 GB in fp32 at the
Meissonic shape; this op never builds them. The B·L rows are computed one chunk at a time:

    logits_c = h_c · Wᵀ + b                      (n, V), fp32 by default: the only V-sized buffer
    lse_r    = log Σ_v exp(logits_rv)            online max / sum over V blocks (Triton kernel)
    logp_r   = logits_r[t_r] − lse_r
    D_r      = softmax(logits_r) − onehot(t_r)   written over logits_c in place

With ŝ_i = β·(Σ_{r∈M_i} logp_r / |M_i| − ref_logp_i) and g_i = ∂ℓ/∂ŝ_i = w_i·(σ(ŝ_i) − l_i),
∂ℓ/∂logits_r = coef_r·D_r with coef_r = −g_i·β/|M_i| on masked rows and 0 elsewhere, so per chunk

    grad_h_c = coef ⊙ (D · W),   grad_W += Dᵀ · (coef ⊙ h_c),   grad_b += Dᵀ · coef

(the per-row coefficient scales the (n, H) operands, never the (n, V) buffer). Matmul operands
stay in the input dtype on CUDA (tensor cores, fp32 accumulation and fp32 results); everything
else is fp32.

No host synchronisation: every row is computed (unmasked rows get coef 0 and drop out of the
sums), so chunk boundaries depend on shapes only, never on where the masked tokens are; per-sample
sums are fixed-order sums over a dense (samples, L) buffer (deterministic, no atomics); Liger's fused
losses make the same choice for their ignore_index rows.

``compact_rows=True`` computes the masked rows only, saving (1 − mask ratio) of the matmuls. Their number
decides the chunks, so each op call reads the cumulative per-sample counts to the host: ONE device→host
synchronisation per call (the single pass: one per step; two passes: one in forward, one in backward), which a
CUDA graph cannot capture (a ValueError there). ``torch.compile(fullgraph=True)`` is unaffected: the sync
happens inside the opaque op. Each chunk's per-row values are scattered back (unique indices, deterministic)
into the same dense (B·L,) buffers, so the per-sample sums are the default path's reduction.

The ops are ``torch.library`` custom ops with fake (meta) implementations and registered autograd,
so ``torch.compile(fullgraph=True)`` keeps them in one graph and CUDA graphs can capture them:

* ``tgo_fast::fused_linear_masked_tgo`` (the ``single_pass`` schedule, default for reduction
  "mean"/"sum" when a gradient is needed and a sample's L rows fit in ``chunk_rows``): chunks hold
  whole samples, so g_i is known as soon as
  the chunk's log-probs are; all gradients are computed in forward (3 matmuls per row) and
  backward only scales them by the scalar grad_output, in fp32.
* ``tgo_fast::masked_token_logprob`` + ``tgo_fast::masked_token_logprob_backward`` (``two_pass``):
  forward computes log-probs only (1 matmul); backward recomputes each chunk's logits (3 more).
  Used for reduction "none" (a per-sample grad_output cannot rescale a summed grad_W) and by
  ``masked_token_logprob``.
* ``tgo_fast::logits_token_logprob`` (+ ``_backward``): the row kernel on full logits, for
  ``tgo_fast.loss.tgo_masked_loss(impl="triton")``.

DeepSpeed ZeRO-3 partitions the head (an empty tensor outside its module's forward).
``fused_head_loss`` / ``head_token_logprob`` run the op as the head module's forward, so ZeRO-3's
own hooks gather the head before forward and before backward and reduce-scatter its gradient;
an empty head, or one gathered by hand while a gradient is needed, is a ValueError naming that fix.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

# A leaf, like Liger's ops/: the shared TGO math and the argument checks, nothing from tgo_fast.loss.
from tgo_fast._math import labels_of, tgo_objective, tgo_score_gradient, tgo_stats, weights_of
from tgo_fast._validation import (
    check_batch, check_common, check_finite_values, check_float_tensor, check_masked_targets, resolve_impl,
)

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Largest V block of one program; a row of V = 8256 codes takes one block of 16384 lanes.
_MAX_BLOCK_V = 16384
# Half-precision matmuls with an fp32 result (aten::mm.dtype, aten::addmm.dtype_out) exist on CUDA in recent torch.
_MM_HAS_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads() and "dtype_out" in torch.ops.aten.addmm.overloads()


def _half_operands(hidden: torch.Tensor) -> bool:
    """Whether bf16/fp16 inputs keep half-precision matmul operands (tensor cores, fp32 results)."""
    return hidden.is_cuda and _MM_HAS_OUT_DTYPE


def _mm_half_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for half-precision operands, accumulated and returned in fp32 (CUDA)."""
    return torch.mm(a, b, out_dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _addmm_takes_fp32_self(device: torch.device) -> bool:
    """Whether aten::addmm.dtype_out accepts an fp32 self with half operands (recent torch; earlier releases
    want self in the operands' dtype)."""
    out = torch.zeros(1, 1, device=device)
    one = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
    try:
        torch.addmm(out, one, one, out_dtype=torch.float32, out=out)
    except RuntimeError:
        return False
    return True


def _addmm_half_fp32_out(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b for half-precision operands into an fp32 out (CUDA), in place where torch allows it: no
    temporary of out's size (V×H for grad_W) per chunk."""
    if _addmm_takes_fp32_self(out.device):
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    else:
        out += _mm_half_fp32_out(a, b)


@triton.jit
def _masked_row_kernel(
    logits_ptr,  # (n, V) fp32 h·Wᵀ (bias not yet added), row stride logits_row_stride
    logits_row_stride,
    bias_ptr,  # (V,) fp32 when HAS_BIAS
    targets_ptr,  # (n,) int64, every value in [0, V)
    lse_ptr,  # (n,) fp32 out: log Σ_v exp(z_v), z = logits + bias
    target_logit_ptr,  # (n,) fp32 out: z[target]
    grad_ptr,  # (n, V) out when WRITE_GRAD: D in the matmul dtype; may be logits_ptr itself (in place)
    grad_row_stride,
    row_scale_ptr,  # (n,) fp32 when SCALE_GRAD: D_r is written times row_scale_r
    n_cols,
    BLOCK_V: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SCALE_GRAD: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # the row fits one block (V ≤ BLOCK_V): read it once, keep it in registers
):
    """One program per row: log-sum-exp, target logit, D = softmax(z) − onehot(target) (× a row scale)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    grad_row_ptr = grad_ptr + row * grad_row_stride
    scale = tl.load(row_scale_ptr + row) if SCALE_GRAD else 1.0
    target = tl.load(targets_ptr + row)
    target_logit = tl.load(row_ptr + target).to(tl.float32)
    if HAS_BIAS:
        target_logit += tl.load(bias_ptr + target)
    tl.store(target_logit_ptr + row, target_logit)

    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_V)
        in_row = cols < n_cols
        z = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(bias_ptr + cols, mask=in_row, other=0.0)
        m = tl.max(z, axis=0)
        e = tl.exp(z - m)  # 0 on the padding lanes
        s = tl.sum(e, axis=0)
        tl.store(lse_ptr + row, m + tl.log(s))
        if WRITE_GRAD:
            d = (e / s - tl.where(cols == target, 1.0, 0.0)) * scale
            tl.store(grad_row_ptr + cols, d.to(grad_ptr.dtype.element_ty), mask=in_row)
    else:
        # Online log-sum-exp: m = running max, s = Σ exp(z − m), rescaled when m grows.
        m = float("-inf")
        s = 0.0
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < n_cols
            z = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
            if HAS_BIAS:
                z += tl.load(bias_ptr + cols, mask=in_row, other=0.0)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        tl.store(lse_ptr + row, m + tl.log(s))
        if WRITE_GRAD:
            inv_s = 1.0 / s  # softmax = exp(z − m)/s: exact where m is, unlike exp(z − lse) at large |lse|
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                in_row = cols < n_cols
                z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    z += tl.load(bias_ptr + cols, mask=in_row, other=0.0)
                d = (tl.exp(z - m) * inv_s - tl.where(cols == target, 1.0, 0.0)) * scale
                tl.store(grad_row_ptr + cols, d.to(grad_ptr.dtype.element_ty), mask=in_row)


def _row_step_triton(logits, targets, bias, grad, row_scale=None):
    """logits (n, V) h·Wᵀ (any float dtype, unit column stride), targets (n,) int64, bias (V,) fp32 or None
    → lse (n,), target_logit (n,) fp32 of z = logits + bias; D (× row_scale (n,) if given) into grad (n, V)."""
    n_rows, n_cols = logits.shape
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    target_logit = torch.empty_like(lse)
    block_v = min(triton.next_power_of_2(n_cols), _MAX_BLOCK_V)
    grad_out = logits if grad is None else grad
    _masked_row_kernel[(n_rows,)](
        logits, logits.stride(0), logits if bias is None else bias, targets, lse, target_logit,
        grad_out, grad_out.stride(0), lse if row_scale is None else row_scale, n_cols,
        BLOCK_V=block_v, HAS_BIAS=bias is not None, WRITE_GRAD=grad is not None, SCALE_GRAD=row_scale is not None,
        SINGLE_BLOCK=n_cols <= block_v, num_warps=32 if block_v >= 8192 else 8,
    )
    return lse, target_logit


def _row_step_torch(logits, targets, bias, grad):
    """The same step in PyTorch (fp32 logits are overwritten; half logits are read into an fp32 copy);
    D into grad if given."""
    work = logits if logits.dtype == torch.float32 else logits.float()
    if bias is not None:
        work.add_(bias)
    target_logit = work.gather(1, targets[:, None]).squeeze(1)
    # In place, no second (n, V) buffer: e = exp(z − max), lse = max + log Σe, softmax = e / Σe.
    row_max = work.amax(dim=1, keepdim=True)
    exp_shifted = work.sub_(row_max).exp_()
    sum_exp = exp_shifted.sum(dim=1, keepdim=True)
    lse = (row_max + sum_exp.log()).squeeze(1)
    if grad is not None:
        exp_shifted.div_(sum_exp).scatter_add_(1, targets[:, None], work.new_full((len(targets), 1), -1.0))
        if grad is not work:
            grad.copy_(exp_shifted)
    return lse, target_logit


# ----------------------------------------------------------------------------------------------
# ZeRO-3 heads
# ----------------------------------------------------------------------------------------------

def _is_partitioned(param: torch.Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter whose full data is not on this rank right now."""
    if not hasattr(param, "ds_id"):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status != ZeroParamStatus.AVAILABLE


_ZERO3_FIX = (
    "Run the loss as the head module's forward so that ZeRO-3 gathers the head for forward and backward "
    "and reduce-scatters its gradient: `fused_head_loss(head, hidden, targets, scores, threshold, "
    "ref_logp=...)` (and `head_token_logprob(head, hidden, targets)` for the reference), both in "
    "tgo_fast.kernels.fused_linear_masked_loss; or compute the loss inside a module forward that owns "
    "the head (deepspeed.zero.register_external_parameter)."
)


def _check_zero3(name: str, param) -> None:
    """Empty (partitioned) heads, and ZeRO-3 heads gathered outside a module forward while a
    gradient is needed (backward would accumulate a full gradient into the empty parameter)."""
    if not isinstance(param, torch.Tensor):
        return
    if param.numel() == 0 or _is_partitioned(param):
        full_shape = tuple(getattr(param, "ds_shape", ()))
        raise ValueError(
            f"{name} is empty (local shape {tuple(param.shape)}"
            + (f", full shape {full_shape}" if full_shape else "")
            + "): a DeepSpeed ZeRO-3-partitioned parameter read outside its module's forward. " + _ZERO3_FIX
        )
    needs_grad = torch.is_grad_enabled() and param.requires_grad
    if not hasattr(param, "ds_id") or not needs_grad:
        return
    if not (param.ds_persist or param.ds_active_sub_modules):  # persistent parameters are never released
        raise ValueError(
            f"{name} is a ZeRO-3 parameter gathered outside its module's forward (e.g. by "
            "deepspeed.zero.GatheredParameters): ZeRO-3 releases it again before backward, where its "
            "gradient could not be accumulated. " + _ZERO3_FIX
        )


def call_as_forward(module: torch.nn.Module, fn, *args):
    """module(*args) with fn as its forward for this one call: the module's hooks (ZeRO-3's gather
    before forward and before backward, release after each, gradient reduce-scatter) all fire."""
    own_forward = module.__dict__.get("forward")  # an instance-level forward (accelerate hooks) survives
    module.forward = fn
    try:
        return module(*args)
    finally:
        if own_forward is None:
            del module.forward
        else:
            module.forward = own_forward


def _uses_triton(impl: str, hidden) -> bool:
    """impl ("auto" | "torch" | "triton") resolved for hidden's device, as tgo_fast.loss resolves it."""
    check_float_tensor(hidden, "hidden")
    return resolve_impl(impl, hidden) == "triton"


def fused_head_loss(head: torch.nn.Module, hidden, targets, scores, threshold, *, impl="auto", **kwargs):
    """``tgo_fused_linear_masked_loss(hidden, head.weight, targets, scores, threshold, bias=head.bias,
    impl=impl, **kwargs)`` run as ``head``'s forward (a Linear or aMUSEd's 1×1 Conv2d): the way to call the
    fused loss on a DeepSpeed ZeRO-3-partitioned head; plain heads work the same."""
    use_triton = _uses_triton(impl, hidden)

    def loss_of(hidden):
        return fused_linear_masked_loss(
            hidden, head.weight, targets, scores, threshold, bias=head.bias, use_triton=use_triton, **kwargs
        )

    return call_as_forward(head, loss_of, hidden)


def head_token_logprob(head: torch.nn.Module, hidden, targets, *, impl="auto", **kwargs):
    """``masked_token_logprob(hidden, head.weight, targets, bias=head.bias, impl=impl, **kwargs)`` run as
    ``head``'s forward (ZeRO-3-safe), for the frozen reference model."""
    use_triton = _uses_triton(impl, hidden)

    def logprob_of(hidden):
        return masked_token_logprob(hidden, head.weight, targets, bias=head.bias, use_triton=use_triton, **kwargs)

    return call_as_forward(head, logprob_of, hidden)


# ----------------------------------------------------------------------------------------------
# Input checks and the row layout
# ----------------------------------------------------------------------------------------------

def _head_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(V, H) view of a Linear weight (V, H) or a 1×1 Conv2d weight (V, H, 1, 1) (aMUSEd)."""
    if weight.dim() == 4 and weight.shape[2:] == (1, 1):
        return weight.flatten(1)
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be a Linear weight (V, H) or a 1×1 Conv2d weight (V, H, 1, 1); "
            f"got shape {tuple(weight.shape)}"
        )
    return weight


def _validate(hidden, weight, bias, targets, ignore_index, validate=True) -> tuple[torch.Tensor, torch.Tensor]:
    """Check hidden/weight/bias/targets; return the (V, H) head and the targets as int64."""
    _check_zero3("weight", weight)
    _check_zero3("bias", bias)
    check_float_tensor(hidden, "hidden")
    check_float_tensor(weight, "weight")
    if bias is not None:
        check_float_tensor(bias, "bias")
    head = _head_matrix(weight)
    vocab, width = head.shape
    if hidden.dim() < 2 or hidden.shape[-1] != width:
        raise ValueError(
            f"hidden must have shape (B, L, H) with H = weight.shape[1] = {width}, got {tuple(hidden.shape)}"
        )
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias must have shape (V,) = ({vocab},), got {tuple(bias.shape)}")
    for name, tensor in (("weight", weight), ("bias", bias), ("targets", targets)):
        if isinstance(tensor, torch.Tensor) and tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}: move it")
    targets = check_masked_targets(targets, hidden.shape[:-1], ignore_index, vocab, validate)
    return head, targets


def _check_options(chunk_rows, logits_dtype, compact_rows) -> None:
    if not isinstance(compact_rows, bool):
        raise ValueError(f"compact_rows must be True or False, got {compact_rows!r}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int (rows per chunk) or None for the default, got {chunk_rows!r}")
    if logits_dtype not in LOGITS_DTYPES:
        raise ValueError(
            f"logits_dtype must be one of {', '.join(map(str, LOGITS_DTYPES))} (the precision of the per-chunk "
            f"logits), got {logits_dtype!r}"
        )


@dataclass
class _Rows:
    """The B·L rows of hidden.flatten(0, -2), sample-major: L = sample_len rows per sample."""

    targets: torch.Tensor  # (B·L,) int64, 0 at unmasked rows (any valid id: their coefficient is 0)
    masked: torch.Tensor  # (B, L) bool
    counts: torch.Tensor  # (B,) fp32 |M_i|
    sample_len: int

    @classmethod
    def of(cls, targets: torch.Tensor, ignore_index: int) -> "_Rows":
        batch = targets.shape[0]
        targets = targets.reshape(batch, -1)
        masked = targets != ignore_index
        return cls(
            targets=torch.where(masked, targets, 0).reshape(-1), masked=masked,
            counts=masked.sum(dim=1).float(), sample_len=targets.shape[1],
        )

    def sample_mean(self, row_values: torch.Tensor, first: int = 0, end: int | None = None) -> torch.Tensor:
        """Σ_{r∈M_i} row_values_r / |M_i| for samples first … end − 1 (row_values: their rows, in order).

        A fixed-order sum over the dense (samples, L) rows, zeros at unmasked positions: deterministic, and the
        same reduction as the full-logits reference."""
        masked = self.masked[first:end]
        dense = torch.where(masked, row_values.view(masked.shape), 0.0)
        return dense.sum(dim=1) / self.counts[first:end]

    def row_coefficients(self, sample_values: torch.Tensor, first: int = 0, end: int | None = None) -> torch.Tensor:
        """value_i / |M_i| on the masked rows of samples first … end − 1, 0 on the others: (rows,) fp32."""
        masked = self.masked[first:end]
        return (masked * (sample_values / self.counts[first:end])[:, None]).reshape(-1)

    def row_buffer(self) -> torch.Tensor:
        """(B·L,) fp32 zeros: per-row values, written chunk by chunk (all rows, or the masked rows only)."""
        return torch.zeros(self.masked.numel(), dtype=torch.float32, device=self.masked.device)

    def masked_index(self) -> tuple[torch.Tensor, list[int]]:
        """(indices of the masked rows in B·L order, cumulative masked-row count at the end of each sample, on the
        host). Reading the counts is compact_rows' one device→host synchronisation; nonzero_static of that
        known size makes none."""
        if self.masked.is_cuda and torch.cuda.is_current_stream_capturing():
            raise ValueError(
                "compact_rows=True reads the number of masked rows to the host, which a CUDA graph cannot "
                "capture: use the default compact_rows=False (sync-free) in CUDA-graphed steps"
            )
        sample_ends = self.masked.sum(dim=1).cumsum(0).tolist()
        return torch.nonzero_static(self.masked.reshape(-1), size=sample_ends[-1]).squeeze(1), sample_ends


# ----------------------------------------------------------------------------------------------
# Chunk passes
# ----------------------------------------------------------------------------------------------

def _default_chunk_rows(n_rows: int, width: int, vocab: int) -> int:
    """Rows per chunk so that a logits chunk holds about as many elements as the hidden rows (Liger's rule), at
    least 256 rows so each matmul keeps the GPU busy."""
    return max(256, triton.next_power_of_2(math.ceil(n_rows * width / vocab)))


class _Head:
    """The head as matmul operands: half precision on CUDA (fp32 results), fp32 elsewhere; logits of each
    chunk in `logits_dtype` (fp32 by default)."""

    def __init__(self, hidden: torch.Tensor, head: torch.Tensor, bias: torch.Tensor | None,
                 logits_dtype: torch.dtype = torch.float32):
        compute_dtype = torch.promote_types(hidden.dtype, head.dtype)
        keep_half = _half_operands(hidden) and compute_dtype in (torch.bfloat16, torch.float16)
        self.dtype = compute_dtype if keep_half else torch.float32
        self.logits_dtype = logits_dtype
        self.weight = head.to(self.dtype)  # (V, H)
        self.bias = None if bias is None else bias.float().contiguous()

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.to(self.dtype), b.to(self.dtype)
        return _mm_half_fp32_out(a, b) if self.dtype != torch.float32 else a @ b

    def addmm_(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """out += a @ b into the fp32 accumulator out, in place."""
        a, b = a.to(self.dtype), b.to(self.dtype)
        if self.dtype == torch.float32:
            out.addmm_(a, b)
        else:
            _addmm_half_fp32_out(out, a, b)

    def logits(self, hidden_chunk: torch.Tensor) -> torch.Tensor:
        """(n, H) → (n, V) h·Wᵀ in logits_dtype; the row step adds the bias as it reads them."""
        if self.logits_dtype == self.dtype != torch.float32:  # half operands, half result (fp32 accumulation)
            return hidden_chunk.to(self.dtype) @ self.weight.t()
        return self.mm(hidden_chunk, self.weight.t()).to(self.logits_dtype)

    def grad_buffer(self, logits: torch.Tensor) -> torch.Tensor:
        """Where the row step writes D (in the matmul dtype): over the logits when they have that dtype, else a
        new buffer."""
        return logits if logits.dtype == self.dtype else torch.empty_like(logits, dtype=self.dtype)


class _Grads:
    """The gradients asked for: hidden rows (each written once, in hidden's dtype; with compact_rows only the
    masked ones, the others stay exactly 0), fp32 sums for W and b."""

    def __init__(self, hidden_rows, weight, bias, head: _Head, needs: tuple[bool, bool, bool], compact_rows: bool):
        self.needs_hidden, self.needs_weight, self.needs_bias = needs
        self.layouts = [None if t is None else (t.shape, t.dtype) for t in (hidden_rows, weight, bias)]
        self.device = hidden_rows.device
        new_hidden_grad = torch.zeros_like if compact_rows else torch.empty_like
        self.hidden = new_hidden_grad(hidden_rows) if self.needs_hidden else None
        self.weight = torch.zeros_like(head.weight, dtype=torch.float32) if self.needs_weight else None
        self.bias = torch.zeros(head.weight.shape[0], device=head.weight.device) if self.needs_bias else None

    def add_chunk(self, head: _Head, rows, hidden_chunk, d_logits, coef) -> None:
        """∂/∂logits = coef ⊙ D for the chunk rows: grad_h = coef ⊙ (D·W), grad_W += Dᵀ·(coef ⊙ h).

        rows: a slice or an index tensor (unique) of the B·L rows; d_logits: (n, V) D in the matmul dtype;
        coef: (n,) fp32."""
        if self.needs_hidden:
            self.hidden[rows] = head.mm(d_logits, head.weight).mul_(coef[:, None]).to(self.hidden.dtype)
        if self.needs_weight:
            head.addmm_(self.weight, d_logits.t(), hidden_chunk.float() * coef[:, None])
        if self.needs_bias:
            if d_logits.dtype == torch.float32:
                self.bias += d_logits.t() @ coef
            else:  # Σ_r coef_r·D_r as one half-precision mm: coef = its half part + the half remainder
                coef_high = coef.to(d_logits.dtype)
                coef_low = (coef - coef_high.float()).to(d_logits.dtype)
                self.bias += head.mm(torch.stack([coef_high, coef_low]), d_logits).sum(0)

    def outputs(self, in_input_dtypes: bool, hidden_shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(grad_hidden, grad_weight, grad_bias) shaped like the inputs; those not asked for are empty (0,).
        grad_hidden is in hidden's dtype; W and b in theirs if in_input_dtypes, else their fp32 sums."""
        grads = []
        for grad, layout, shape in zip((self.hidden, self.weight, self.bias), self.layouts, (hidden_shape, None, None)):
            if grad is None:
                grads.append(torch.empty(0, device=self.device))
                continue
            grad = grad.reshape(shape if shape is not None else layout[0])
            grads.append(grad.to(layout[1]) if in_input_dtypes else grad)
        return tuple(grads)


def _chunk_passes(hidden, weight, bias, targets, ignore_index, use_triton, chunk_rows, logits_dtype):
    """What every pass needs: (head, hidden rows (B·L, H), row layout, row step, rows per chunk)."""
    head = _Head(hidden, _head_matrix(weight), bias, logits_dtype)
    hidden_rows = hidden.reshape(-1, hidden.shape[-1])
    rows = _Rows.of(targets, ignore_index)
    return head, hidden_rows, rows, (_row_step_triton if use_triton else _row_step_torch), chunk_rows


def _row_chunks(rows: _Rows, chunk_rows: int, compact_rows: bool) -> list:
    """Two-pass chunks of chunk_rows rows: slices of the B·L rows, or (compact_rows) index tensors of the
    masked rows only."""
    if compact_rows:
        return list(rows.masked_index()[0].split(chunk_rows))
    return [slice(start, start + chunk_rows) for start in range(0, rows.masked.numel(), chunk_rows)]


def _sample_chunks(rows: _Rows, chunk_rows: int, compact_rows: bool):
    """Single-pass chunks of whole samples: (first, end, the rows of samples first … end − 1). All their rows (a
    slice), max(1, chunk_rows // L) samples per chunk; or (compact_rows) the masked rows only (an index tensor),
    as many samples as fit in chunk_rows masked rows, at least one."""
    n_samples, sample_len = rows.masked.shape
    if not compact_rows:
        samples_per_chunk = max(1, chunk_rows // sample_len)
        for first in range(0, n_samples, samples_per_chunk):
            end = min(n_samples, first + samples_per_chunk)
            yield first, end, slice(first * sample_len, end * sample_len)
        return
    index, sample_ends = rows.masked_index()
    first = 0
    while first < n_samples:
        start = sample_ends[first - 1] if first else 0
        end = first + 1
        while end < n_samples and sample_ends[end] - start <= chunk_rows:
            end += 1
        yield first, end, index[start:sample_ends[end - 1]]
        first = end


# ----------------------------------------------------------------------------------------------
# Autocast: the head's inputs in the autocast dtype, the op's own matmuls left alone
# ----------------------------------------------------------------------------------------------

def _autocast_inputs(hidden, weight, bias):
    """Under torch.autocast, hidden/weight/bias in the autocast dtype, as the head's nn.Linear would take them
    (differentiable casts: gradients reach the fp32 parameters); unchanged otherwise."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in (hidden, weight, bias))


def _autocast_off(fn):
    """fn with autocast off: the op picks its matmul dtypes itself (fp32, or half operands with fp32 results),
    which autocast would recast to half. Liger's custom_fwd/custom_bwd, for forward and backward alike."""

    @functools.wraps(fn)
    def without_autocast(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return without_autocast


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.library): fused linear + masked log-prob, two passes
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("tgo_fast::masked_token_logprob", mutates_args=())
@_autocast_off
def masked_token_logprob_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    ignore_index: int, use_triton: bool, chunk_rows: int, logits_dtype: torch.dtype, compact_rows: bool,
) -> torch.Tensor:
    """hidden (B, L..., H), weight (V, H[,1,1]), bias (V,), targets int64 (B, L...) → mean masked log-prob (B,)
    fp32, one matmul per row (per masked row with compact_rows)."""
    head, hidden_rows, rows, row_step, chunk_rows = _chunk_passes(
        hidden, weight, bias, targets, ignore_index, use_triton, chunk_rows, logits_dtype)
    row_logp = rows.row_buffer()
    for chunk in _row_chunks(rows, chunk_rows, compact_rows):
        logits = head.logits(hidden_rows[chunk])
        lse, target_logit = row_step(logits, rows.targets[chunk], head.bias, None)
        row_logp[chunk] = target_logit - lse
        del logits  # free this chunk before the next one is allocated
    return rows.sample_mean(row_logp)


@masked_token_logprob_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, use_triton, chunk_rows, logits_dtype, compact_rows):
    return hidden.new_empty(hidden.shape[0], dtype=torch.float32)


@torch.library.custom_op("tgo_fast::masked_token_logprob_backward", mutates_args=())
@_autocast_off
def masked_token_logprob_backward_op(
    grad_logp: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    targets: torch.Tensor, ignore_index: int, use_triton: bool, chunk_rows: int, logits_dtype: torch.dtype,
    compact_rows: bool, needs_hidden: bool, needs_weight: bool, needs_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recompute each chunk's logits; ∂logp_i/∂logits_r = (onehot − softmax)/|M_i| = −D_r/|M_i|.
    Returns the gradients of hidden, weight, bias in their dtypes (empty (0,) where not needed)."""
    head, hidden_rows, rows, row_step, chunk_rows = _chunk_passes(
        hidden, weight, bias, targets, ignore_index, use_triton, chunk_rows, logits_dtype)
    row_coef = rows.row_coefficients(-grad_logp.float())
    grads = _Grads(hidden_rows, weight, bias, head, (needs_hidden, needs_weight, needs_bias), compact_rows)
    for chunk in _row_chunks(rows, chunk_rows, compact_rows):
        hidden_chunk = hidden_rows[chunk]
        logits = head.logits(hidden_chunk)
        d_logits = head.grad_buffer(logits)
        row_step(logits, rows.targets[chunk], head.bias, d_logits)
        del logits  # free the chunk (when D went to another buffer) before the matmuls / next chunk
        grads.add_chunk(head, chunk, hidden_chunk, d_logits, row_coef[chunk])
        del d_logits
    return grads.outputs(in_input_dtypes=True, hidden_shape=hidden.shape)


def _fake_grads(hidden, weight, bias, needs, grad_dtype=None):
    """Fake gradients of (hidden, weight, bias): their shapes, in their dtypes (grad_dtype for W and b if
    given), or empty (0,) where not needed."""
    tensors = (hidden, weight, bias)
    return tuple(
        hidden.new_empty(0) if not need else
        t.new_empty(t.shape, dtype=grad_dtype if (grad_dtype is not None and t is not hidden) else t.dtype)
        for t, need in zip(tensors, needs)
    )


@masked_token_logprob_backward_op.register_fake
def _(grad_logp, hidden, weight, bias, targets, ignore_index, use_triton, chunk_rows, logits_dtype, compact_rows,
      needs_hidden, needs_weight, needs_bias):
    return _fake_grads(hidden, weight, bias, (needs_hidden, needs_weight, needs_bias))


def _logprob_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, *options = inputs
    ctx.save_for_backward(hidden, weight, bias, targets)
    ctx.options = options


def _logprob_backward(ctx, grad_logp):
    hidden, weight, bias, targets = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    grads = masked_token_logprob_backward_op(grad_logp, hidden, weight, bias, targets, *ctx.options, *needs)
    return (*(grad if need else None for grad, need in zip(grads, needs)), *([None] * (1 + len(ctx.options))))


masked_token_logprob_op.register_autograd(_logprob_backward, setup_context=_logprob_setup_context)


# ----------------------------------------------------------------------------------------------
# Custom op: the single pass (gradients in forward)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("tgo_fast::fused_linear_masked_tgo", mutates_args=())
@_autocast_off
def fused_linear_masked_tgo_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    ref_logp: torch.Tensor, scores: torch.Tensor, threshold: Optional[torch.Tensor], threshold_value: float,
    beta: float, c: float, reduction: str, ignore_index: int, use_triton: bool, chunk_rows: int,
    logits_dtype: torch.dtype, compact_rows: bool, needs_hidden: bool, needs_weight: bool, needs_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over chunks of whole samples, all gradients in forward. τ is `threshold` (0-d) if given, else
    threshold_value. reduction "mean" | "sum". Returns (loss, policy_logp, labels, weights, grad_hidden
    (hidden's dtype), grad_weight (fp32), grad_bias (fp32)); gradients not needed are empty (0,)."""
    tau = threshold if threshold is not None else threshold_value
    head, hidden_rows, rows, row_step, chunk_rows = _chunk_passes(
        hidden, weight, bias, targets, ignore_index, use_triton, chunk_rows, logits_dtype)
    grads = _Grads(hidden_rows, weight, bias, head, (needs_hidden, needs_weight, needs_bias), compact_rows)
    n_samples, sample_len = rows.masked.shape
    per_sample = 1.0 / n_samples if reduction == "mean" else 1.0
    policy_logp = torch.empty(n_samples, dtype=torch.float32, device=hidden.device)
    row_logp, row_coef = rows.row_buffer(), rows.row_buffer()

    for first, end, chunk in _sample_chunks(rows, chunk_rows, compact_rows):
        sample_rows = slice(first * sample_len, end * sample_len)  # the chunk's samples, all their rows
        hidden_chunk = hidden_rows[chunk]
        logits = head.logits(hidden_chunk)
        d_logits = head.grad_buffer(logits)
        lse, target_logit = row_step(logits, rows.targets[chunk], head.bias, d_logits)
        del logits  # free the chunk (when D went to another buffer) before the matmuls / next chunk
        row_logp[chunk] = target_logit - lse
        policy_logp[first:end] = rows.sample_mean(row_logp[sample_rows], first, end)
        implicit = beta * (policy_logp[first:end] - ref_logp[first:end])
        labels = labels_of(scores[first:end], tau).float()
        weights = weights_of(scores[first:end], tau, c).float()
        # ∂ℓ/∂logits_r = g_i·β/|M_i|·(onehot − softmax) = coef_r·D_r.
        sample_coef = -tgo_score_gradient(implicit, labels, weights) * (beta * per_sample)
        row_coef[sample_rows] = rows.row_coefficients(sample_coef, first, end)
        grads.add_chunk(head, chunk, hidden_chunk, d_logits, row_coef[chunk])
        del d_logits

    loss, labels, weights = tgo_objective(beta * (policy_logp - ref_logp), scores, tau, c, reduction)
    return (loss, policy_logp, labels, weights, *grads.outputs(in_input_dtypes=False, hidden_shape=hidden.shape))


@fused_linear_masked_tgo_op.register_fake
def _(hidden, weight, bias, targets, ref_logp, scores, threshold, threshold_value, beta, c, reduction,
      ignore_index, use_triton, chunk_rows, logits_dtype, compact_rows, needs_hidden, needs_weight, needs_bias):
    per_sample = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    return (hidden.new_empty((), dtype=torch.float32), per_sample, torch.empty_like(per_sample),
            torch.empty_like(per_sample),
            *_fake_grads(hidden, weight, bias, (needs_hidden, needs_weight, needs_bias), torch.float32))


def _single_pass_setup_context(ctx, inputs, output):
    hidden, weight, bias = inputs[:3]
    ctx.save_for_backward(*output[4:])
    ctx.dtypes = [None if t is None else t.dtype for t in (hidden, weight, bias)]


def _single_pass_backward(ctx, grad_loss, *_):
    """The gradients computed in forward times the scalar grad_output, in fp32 before their one rounding."""
    grads = [
        (grad.float() * grad_loss).to(dtype) if need else None
        for grad, dtype, need in zip(ctx.saved_tensors, ctx.dtypes, ctx.needs_input_grad[:3])
    ]
    return (*grads, *([None] * (len(ctx.needs_input_grad) - 3)))


fused_linear_masked_tgo_op.register_autograd(_single_pass_backward, setup_context=_single_pass_setup_context)


# ----------------------------------------------------------------------------------------------
# Custom op: the row kernel on full logits (tgo_masked_loss(impl="triton"))
# ----------------------------------------------------------------------------------------------

def _logit_rows(logits: torch.Tensor) -> torch.Tensor:
    """(B, L..., V) as (B·L, V) rows with a unit column stride (a copy only if no such view exists)."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if rows.stride(1) == 1 else rows.contiguous()


@torch.library.custom_op("tgo_fast::logits_token_logprob", mutates_args=())
def logits_token_logprob_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Full logits (B, L..., V) in any float dtype, targets int64 (B, L...) → mean masked log-prob (B,) fp32;
    one read of the logits, no copy."""
    rows = _Rows.of(targets, ignore_index)
    lse, target_logit = _row_step_triton(_logit_rows(logits), rows.targets, None, None)
    return rows.sample_mean(target_logit - lse)


@logits_token_logprob_op.register_fake
def _(logits, targets, ignore_index):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


@torch.library.custom_op("tgo_fast::logits_token_logprob_backward", mutates_args=())
def logits_token_logprob_backward_op(
    grad_logp: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """∂L/∂logits_r = −grad_logp_i/|M_i|·D_r on masked rows, 0 elsewhere, written by the row kernel in the
    logits' dtype (one more read of the logits, one write)."""
    rows = _Rows.of(targets, ignore_index)
    logit_rows = _logit_rows(logits)
    grad = torch.empty(logit_rows.shape, dtype=logits.dtype, device=logits.device)
    _row_step_triton(logit_rows, rows.targets, None, grad, rows.row_coefficients(-grad_logp.float()))
    return grad.view(logits.shape)


@logits_token_logprob_backward_op.register_fake
def _(grad_logp, logits, targets, ignore_index):
    return logits.new_empty(logits.shape)


def _logits_setup_context(ctx, inputs, output):
    logits, targets, ignore_index = inputs
    ctx.save_for_backward(logits, targets)
    ctx.ignore_index = ignore_index


def _logits_backward(ctx, grad_logp):
    logits, targets = ctx.saved_tensors
    return logits_token_logprob_backward_op(grad_logp, logits, targets, ctx.ignore_index), None, None


logits_token_logprob_op.register_autograd(_logits_backward, setup_context=_logits_setup_context)


def logprob_from_logits_triton(logits, targets, ignore_index=-100):
    """Mean masked log-prob per sample (B,) from full logits (B, L..., V) and validated int64 targets (B, L...);
    differentiable in logits."""
    return logits_token_logprob_op(logits, targets, ignore_index)


# ----------------------------------------------------------------------------------------------
# Functional entry points (tgo_fast.loss resolves impl; every other argument is validated here)
# ----------------------------------------------------------------------------------------------

def _needs_grad(*tensors) -> tuple[bool, ...]:
    return tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in tensors)


def masked_token_logprob(hidden, weight, targets, *, bias=None, ignore_index=-100, use_triton=False,
                         chunk_rows=None, logits_dtype=torch.float32, compact_rows=False, validate=True):
    """Mean log-prob of the masked tokens per sample, without full logits.

    hidden (B, L..., H), weight (V, H) or (V, H, 1, 1), targets (B, L...) int with ignore_index at
    unmasked positions, bias (V,) or None → (B,) fp32. Differentiable (two-pass); under
    ``torch.no_grad()`` it costs one matmul per row — the reference model's path.
    chunk_rows: rows per chunk (default: a logits chunk about the size of the hidden rows, ≥ 256 rows);
    logits_dtype: precision of the per-chunk logits (fp32 default; bf16/fp16 halve that buffer).
    compact_rows: compute the masked rows only (one device→host sync per op call: not in CUDA graphs).
    """
    _check_options(chunk_rows, logits_dtype, compact_rows)
    head, targets = _validate(hidden, weight, bias, targets, ignore_index, validate)
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    chunk_rows = chunk_rows or _default_chunk_rows(hidden.numel() // hidden.shape[-1], head.shape[1], head.shape[0])
    return masked_token_logprob_op(
        hidden, weight, bias, targets, ignore_index, use_triton, chunk_rows, logits_dtype, compact_rows)


def fused_linear_masked_loss(hidden, weight, targets, scores, threshold, *, bias=None, ref_logp,
                             beta=1.0, c=5.0, reduction="mean", ignore_index=-100, use_triton=False,
                             return_stats=False, schedule="auto", chunk_rows=None, logits_dtype=torch.float32,
                             compact_rows=False, validate=True):
    """TGO loss of a masked-token model from hidden states and its output head (SPEC §2, §3).

    hidden (B, L..., H); weight (V, H) or aMUSEd's 1×1 Conv2d (V, H, 1, 1); targets (B, L...) int
    (ignore_index at unmasked positions); scores (B,); threshold a number or a 0-d tensor; ref_logp (B,)
    reference mean masked log-probs (``masked_token_logprob`` of the frozen model). Returns the loss (scalar,
    or (B,) for reduction "none"), and with ``return_stats`` a dict of detached (B,) fp32 tensors.

    schedule: "single_pass" (gradients in forward, chunks of whole samples), "two_pass" (backward
    recomputes the logits) or "auto" (single pass when a gradient is needed, reduction is "mean"/"sum"
    and a whole sample fits in chunk_rows, so that the chunk budget bounds the memory either way). chunk_rows: rows per chunk (default: a logits chunk about the size of the hidden rows,
    ≥ 256; a single-pass chunk holds at least one whole sample). logits_dtype: precision of the per-chunk
    logits, torch.float32 (default) or torch.bfloat16 / torch.float16 (half the chunk memory; log-softmax
    still accumulated in fp32). validate: value checks (``tgo_fast._validation``), never a host sync.
    compact_rows: compute the masked rows only ((1 − mask ratio) fewer matmul rows; single-pass chunks then
    pack as many whole samples as fit in chunk_rows masked rows). The default computes every row and never
    synchronises; True reads the masked-row counts to the host, ONE device→host sync per op call (one per
    step with the single pass, two with the two-pass schedule): fine eagerly and under torch.compile (the sync
    is inside the opaque op), a ValueError under CUDA-graph capture. Same results to fp32 rounding.
    """
    if schedule not in ("auto", "single_pass", "two_pass"):
        raise ValueError(f"schedule must be 'auto', 'single_pass' or 'two_pass', got {schedule!r}")
    _check_options(chunk_rows, logits_dtype, compact_rows)
    head, targets = _validate(hidden, weight, bias, targets, ignore_index, validate)
    n_samples = hidden.shape[0]
    check_float_tensor(ref_logp, "ref_logp")
    check_batch(ref_logp, "ref_logp", n_samples)
    if validate:
        check_finite_values(ref_logp, "ref_logp", "the precomputed reference log-probs")
    scores, threshold = check_common(scores, threshold, n_samples, hidden.device, beta=beta, c=c,
                                     reduction=reduction, validate=validate)
    ref_logp = ref_logp.detach().to(hidden.device, torch.float32)  # constants: no gradient into the reference
    scores = scores.to(torch.float32)
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    chunk_rows = chunk_rows or _default_chunk_rows(hidden.numel() // hidden.shape[-1], head.shape[1], head.shape[0])

    needs = _needs_grad(hidden, weight, bias)
    if schedule == "single_pass" and reduction == "none":
        raise ValueError("schedule='single_pass' needs reduction 'mean' or 'sum'; use 'two_pass' for 'none'")
    if schedule == "auto":  # the single pass when its whole-sample chunks fit the chunk budget
        sample_len = hidden.numel() // (hidden.shape[0] * hidden.shape[-1])
        single = any(needs) and reduction != "none" and sample_len <= chunk_rows
        schedule = "single_pass" if single else "two_pass"

    if schedule == "single_pass":
        tau_tensor = threshold if isinstance(threshold, torch.Tensor) else None
        tau_value = 0.0 if tau_tensor is not None else threshold
        loss, policy_logp, labels, weights, *_ = fused_linear_masked_tgo_op(
            hidden, weight, bias, targets, ref_logp, scores, tau_tensor, tau_value, float(beta), float(c), reduction,
            ignore_index, use_triton, chunk_rows, logits_dtype, compact_rows, *needs,
        )
    else:
        policy_logp = masked_token_logprob_op(
            hidden, weight, bias, targets, ignore_index, use_triton, chunk_rows, logits_dtype, compact_rows)
        loss, labels, weights = tgo_objective(beta * (policy_logp - ref_logp), scores, threshold, c, reduction)
    if not return_stats:
        return loss
    implicit_score = beta * (policy_logp.detach() - ref_logp)
    return loss, tgo_stats(implicit_score, labels, weights, "policy_logp", policy_logp, "reference_logp", ref_logp)
