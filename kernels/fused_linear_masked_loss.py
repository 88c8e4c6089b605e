"""Fused linear + cross-entropy TGO loss for masked-token models (MaskGIT / aMUSEd / Meissonic).

The per-sample log-likelihood of a masked generative transformer is the mean, over its masked
positions M_i, of log softmax(h_ik · Wᵀ + b)[t_ik]. Full logits (B, L, V) are 1 GB in fp32 at the
Meissonic shape; this op never builds them. Only masked rows (targets ≠ ignore_index) are
computed, one chunk of rows at a time:

    logits_c = h_c · Wᵀ + b                      (n, V) fp32, the only V-sized buffer
    lse_r    = log Σ_v exp(logits_rv)            online max / sum over V blocks (Triton kernel)
    logp_r   = logits_r[t_r] − lse_r
    D_r      = softmax(logits_r) − onehot(t_r)   written over logits_c in place

With ŝ_i = β·(mean_{r∈M_i} logp_r − ref_logp_i) and g_i = ∂ℓ/∂ŝ_i (from ``tgo_objective``),
∂ℓ/∂logits_r = coef_r·D_r with coef_r = −g_i·β/|M_i|, so per chunk

    grad_h_c = coef ⊙ (D · W),   grad_W += Dᵀ · (coef ⊙ h_c),   grad_b += Dᵀ · coef

(the per-row coefficient scales the (n, H) operands, never the (n, V) buffer). Matmul operands
stay in the input dtype on CUDA (tensor cores, fp32 accumulation and fp32 results); everything
else is fp32.

Two schedules (docs/masked-kernel.md has the measurements that chose the default):

* ``single_pass`` (default for reduction "mean"/"sum" when a gradient is needed): chunks hold
  whole samples, so g_i is known as soon as the chunk's log-probs are; all gradients are computed
  in forward (3 matmuls per row) and backward only scales them by the scalar grad_output.
* ``two_pass``: forward computes log-probs only (1 matmul); backward recomputes each chunk's
  logits (3 more). Used for reduction "none" (a per-sample grad_output cannot rescale a summed
  grad_W) and by ``masked_token_logprob``.

DeepSpeed ZeRO-3 partitions the head (an empty tensor outside its module's forward).
``fused_head_loss`` / ``head_token_logprob`` run the op as the head module's forward, so ZeRO-3's
own hooks gather the head before forward and before backward and reduce-scatter its gradient;
an empty head, or one gathered by hand while a gradient is needed, is a ValueError naming that fix.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# A leaf, like Liger's ops/: the shared TGO math and the argument checks, nothing from tgo_fast.loss.
from tgo_fast._math import tgo_objective, tgo_stats
from tgo_fast._validation import (
    check_batch, check_common, check_finite_values, check_float_tensor, check_masked_targets, resolve_impl,
)

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
    grad_ptr,  # (n, V) out when WRITE_GRAD: D in the matmul dtype; may be logits_ptr itself (fp32, in place)
    grad_row_stride,
    n_cols,
    BLOCK_V: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # the row fits one block (V ≤ BLOCK_V): read it once, keep it in registers
):
    """One program per masked row: log-sum-exp, target logit, D = softmax(z) − onehot(target)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    grad_row_ptr = grad_ptr + row * grad_row_stride
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
            d = e / s - tl.where(cols == target, 1.0, 0.0)
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
                d = tl.exp(z - m) * inv_s - tl.where(cols == target, 1.0, 0.0)
                tl.store(grad_row_ptr + cols, d.to(grad_ptr.dtype.element_ty), mask=in_row)


def _row_step_triton(logits, targets, bias, grad):
    """logits (n, V) fp32 h·Wᵀ, targets (n,) int64, bias (V,) fp32 or None
    → lse (n,), target_logit (n,) of z = logits + bias; D into grad (n, V) if given."""
    n_rows, n_cols = logits.shape
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    target_logit = torch.empty_like(lse)
    block_v = min(triton.next_power_of_2(n_cols), _MAX_BLOCK_V)
    grad_out = logits if grad is None else grad
    _masked_row_kernel[(n_rows,)](
        logits, logits.stride(0), logits if bias is None else bias, targets, lse, target_logit,
        grad_out, grad_out.stride(0), n_cols,
        BLOCK_V=block_v, HAS_BIAS=bias is not None, WRITE_GRAD=grad is not None, SINGLE_BLOCK=n_cols <= block_v,
        num_warps=32 if block_v >= 8192 else 8,
    )
    return lse, target_logit


def _row_step_torch(logits, targets, bias, grad):
    """The same step in PyTorch (logits are overwritten); D into grad if given."""
    if bias is not None:
        logits.add_(bias)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    # In place, no second (n, V) buffer: e = exp(z − max), lse = max + log Σe, softmax = e / Σe.
    row_max = logits.amax(dim=1, keepdim=True)
    exp_shifted = logits.sub_(row_max).exp_()
    sum_exp = exp_shifted.sum(dim=1, keepdim=True)
    lse = (row_max + sum_exp.log()).squeeze(1)
    if grad is not None:
        exp_shifted.div_(sum_exp).scatter_add_(1, targets[:, None], logits.new_full((len(targets), 1), -1.0))
        if grad is not logits:
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
# Input checks and the masked-row layout
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


@dataclass
class _MaskedRows:
    """Where the masked rows are: flat row index into hidden.flatten(0, -2), sample of each row."""

    row_index: torch.Tensor  # (N,) int64, sample-major
    row_targets: torch.Tensor  # (N,) int64 in [0, V)
    row_sample: torch.Tensor  # (N,) int64
    sample_len: int  # positions per sample: row r lies in sample r // sample_len
    counts: list[int]  # |M_i| per sample, on the host
    counts_tensor: torch.Tensor  # (B,) fp32 on the device

    def sample_sums(self, row_values: torch.Tensor, rows: torch.Tensor, first: int = 0, end: int | None = None):
        """Σ_{r∈M_i} row_values_r for samples first … end − 1, whose masked rows (flat indices) are `rows`.

        Deterministic, on CUDA too: each row is written once into a dense (samples, sample_len) buffer that is
        then summed along each sample in a fixed order (no atomics, unlike index_add_)."""
        end = len(self.counts) if end is None else end
        dense = row_values.new_zeros((end - first) * self.sample_len)
        dense[rows - first * self.sample_len] = row_values
        return dense.view(end - first, self.sample_len).sum(dim=1)


def _validate(hidden, weight, bias, targets, ignore_index) -> tuple[torch.Tensor, _MaskedRows]:
    """Check hidden/weight/bias/targets; return the (V, H) head and the masked-row layout."""
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
    targets, counts = check_masked_targets(targets, hidden.shape[:-1], ignore_index, vocab)
    return head, _masked_rows(targets, counts, ignore_index)


def _masked_rows(targets: torch.Tensor, counts: torch.Tensor, ignore_index: int) -> _MaskedRows:
    """The masked-row layout of validated int64 targets (B, L...) with |M_i| = counts (B,)."""
    mask = (targets != ignore_index).reshape(-1)
    row_index = mask.nonzero().squeeze(1)
    sample_len = mask.numel() // targets.shape[0]
    return _MaskedRows(
        row_index=row_index,
        row_targets=targets.reshape(-1)[row_index],
        row_sample=row_index // sample_len,
        sample_len=sample_len,
        counts=counts.tolist(),
        counts_tensor=counts.float(),
    )


# ----------------------------------------------------------------------------------------------
# Chunk passes
# ----------------------------------------------------------------------------------------------

def _default_chunk_rows(n_rows: int, width: int, vocab: int) -> int:
    """Rows per chunk so that a logits chunk holds about as many elements as the masked hidden rows
    (Liger's rule), at least 256 rows so each matmul keeps the GPU busy."""
    return max(256, triton.next_power_of_2(math.ceil(n_rows * width / vocab)))


def _sample_chunks(counts: list[int], chunk_rows: int):
    """Group whole consecutive samples into chunks of ≤ chunk_rows rows (a larger sample alone)."""
    chunks, first_sample, first_row, rows = [], 0, 0, 0
    for sample, count in enumerate(counts):
        if rows and rows + count > chunk_rows:
            chunks.append((first_sample, sample, first_row, first_row + rows))
            first_sample, first_row, rows = sample, first_row + rows, 0
        rows += count
    chunks.append((first_sample, len(counts), first_row, first_row + rows))
    return chunks


class _Head:
    """The head as matmul operands: half precision on CUDA (fp32 results), fp32 elsewhere."""

    def __init__(self, hidden: torch.Tensor, head: torch.Tensor, bias: torch.Tensor | None):
        compute_dtype = torch.promote_types(hidden.dtype, head.dtype)
        keep_half = _half_operands(hidden) and compute_dtype in (torch.bfloat16, torch.float16)
        self.dtype = compute_dtype if keep_half else torch.float32
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
        """(n, H) → (n, V) fp32 h·Wᵀ; the row step adds the bias as it reads them."""
        return self.mm(hidden_chunk, self.weight.t())

    def grad_buffer(self, logits: torch.Tensor) -> torch.Tensor:
        """Where the row step writes D: over the fp32 logits, or a new buffer in the half matmul dtype."""
        return logits if self.dtype == torch.float32 else torch.empty_like(logits, dtype=self.dtype)


class _Grads:
    """The gradients asked for: hidden rows (each written once, in hidden's dtype), fp32 sums for W and b."""

    def __init__(self, hidden, weight, bias, head: _Head, needs: tuple[bool, bool, bool]):
        self.needs_hidden, self.needs_weight, self.needs_bias = needs
        self.input_layouts = [None if t is None else (t.shape, t.dtype) for t in (hidden, weight, bias)]
        self.hidden = torch.zeros_like(hidden.flatten(0, -2)) if self.needs_hidden else None
        self.weight = torch.zeros_like(head.weight, dtype=torch.float32) if self.needs_weight else None
        self.bias = torch.zeros(head.weight.shape[0], device=head.weight.device) if self.needs_bias else None

    def add_chunk(self, head: _Head, rows: torch.Tensor, hidden_chunk, d_logits, coef) -> None:
        """∂/∂logits = coef ⊙ D for the chunk rows: grad_h = coef ⊙ (D·W), grad_W += Dᵀ·(coef ⊙ h).

        d_logits: (n, V) D in the matmul dtype; coef: (n,) fp32."""
        if self.needs_hidden:
            grad_chunk = head.mm(d_logits, head.weight).mul_(coef[:, None])
            self.hidden.index_copy_(0, rows, grad_chunk.to(self.hidden.dtype))
        if self.needs_weight:
            head.addmm_(self.weight, d_logits.t(), hidden_chunk.float() * coef[:, None])
        if self.needs_bias:
            if d_logits.dtype == torch.float32:
                self.bias += d_logits.t() @ coef
            else:  # Σ_r coef_r·D_r as one half-precision mm: coef = its half part + the half remainder
                coef_high = coef.to(d_logits.dtype)
                coef_low = (coef - coef_high.float()).to(d_logits.dtype)
                self.bias += head.mm(torch.stack([coef_high, coef_low]), d_logits).sum(0)

    def for_inputs(self, scale: torch.Tensor | None = None) -> list:
        """The gradients shaped and typed like hidden / weight / bias (None where not needed), times `scale`
        (a grad_output) in fp32 first: W and b are rounded to their dtype once."""
        grads = []
        for grad, layout in zip((self.hidden, self.weight, self.bias), self.input_layouts):
            if grad is not None:
                grad = grad if scale is None else grad.float() * scale.float()
                grad = grad.reshape(layout[0]).to(layout[1])
            grads.append(grad)
        return grads


def _logprob_pass(hidden_rows, head: _Head, layout: _MaskedRows, row_step, chunk_rows) -> torch.Tensor:
    """Per-sample mean log-prob (B,) fp32 of the masked rows; no gradient work."""
    row_logp = torch.empty(len(layout.row_index), dtype=torch.float32, device=hidden_rows.device)
    for start in range(0, len(layout.row_index), chunk_rows):
        rows = layout.row_index[start:start + chunk_rows]
        logits = head.logits(hidden_rows.index_select(0, rows))
        lse, target_logit = row_step(logits, layout.row_targets[start:start + chunk_rows], head.bias, None)
        row_logp[start:start + chunk_rows] = target_logit - lse
        del logits  # free this chunk before the next one is allocated
    return layout.sample_sums(row_logp, layout.row_index) / layout.counts_tensor


def _grad_pass(hidden_rows, head: _Head, layout: _MaskedRows, row_step, chunk_rows, row_coef, grads: _Grads):
    """Recompute each chunk's logits and accumulate the gradients for ∂/∂logits_r = row_coef_r·D_r."""
    for start in range(0, len(layout.row_index), chunk_rows):
        rows = layout.row_index[start:start + chunk_rows]
        hidden_chunk = hidden_rows.index_select(0, rows)
        logits = head.logits(hidden_chunk)
        d_logits = head.grad_buffer(logits)
        row_step(logits, layout.row_targets[start:start + chunk_rows], head.bias, d_logits)
        del logits  # free the fp32 chunk (when D went to a half buffer) before the matmuls / next chunk
        grads.add_chunk(head, rows, hidden_chunk, d_logits, row_coef[start:start + chunk_rows])
        del d_logits


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
# Autograd functions
# ----------------------------------------------------------------------------------------------

class MaskedTokenLogProbFunction(torch.autograd.Function):
    """hidden (B, L..., H), weight (V, H[,1,1]), bias (V,) → mean masked log-prob (B,) fp32.

    Two-pass: forward computes log-probs only; backward recomputes each chunk's logits.
    """

    @staticmethod
    @_autocast_off
    def forward(ctx, hidden, weight, bias, layout: _MaskedRows, row_step, chunk_rows: int):
        head = _Head(hidden, _head_matrix(weight), bias)
        logp = _logprob_pass(hidden.flatten(0, -2), head, layout, row_step, chunk_rows)
        ctx.save_for_backward(hidden, weight, bias)
        ctx.layout, ctx.row_step, ctx.chunk_rows = layout, row_step, chunk_rows
        return logp

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_logp):
        hidden, weight, bias = ctx.saved_tensors
        layout = ctx.layout
        # ∂logp_i/∂logits_r = (onehot − softmax)/|M_i| = −D_r/|M_i|.
        row_coef = -(grad_logp.float() / layout.counts_tensor)[layout.row_sample]
        head = _Head(hidden, _head_matrix(weight), bias)
        grads = _Grads(hidden, weight, bias, head, ctx.needs_input_grad[:3])
        _grad_pass(hidden.flatten(0, -2), head, layout, ctx.row_step, ctx.chunk_rows, row_coef, grads)
        return (*grads.for_inputs(), None, None, None)


class LogitsTokenLogProbFunction(torch.autograd.Function):
    """Full logits (B, L..., V) → mean masked log-prob (B,) fp32 with the Triton row kernel.

    Only the masked rows are read (a gathered fp32 copy, (N, V)); with a gradient the kernel writes
    D = softmax − onehot over that copy, saved for backward: ∂logp_i/∂logits_r = −D_r/|M_i|, and the
    unmasked rows get a zero gradient. This is ``tgo_masked_loss(..., impl="triton")``'s log-prob.
    """

    @staticmethod
    def forward(ctx, logits, layout: _MaskedRows, needs_grad: bool):
        rows = logits.reshape(-1, logits.shape[-1]).index_select(0, layout.row_index).float()
        lse, target_logit = _row_step_triton(rows, layout.row_targets, None, rows if needs_grad else None)
        sums = layout.sample_sums(target_logit - lse, layout.row_index)
        if needs_grad:
            ctx.save_for_backward(rows)
            ctx.layout, ctx.logits_shape, ctx.logits_dtype = layout, logits.shape, logits.dtype
        return sums / layout.counts_tensor

    @staticmethod
    def backward(ctx, grad_logp):
        (d_rows,) = ctx.saved_tensors
        layout = ctx.layout
        row_coef = -(grad_logp.float() / layout.counts_tensor)[layout.row_sample]
        vocab = ctx.logits_shape[-1]
        grad = torch.zeros((math.prod(ctx.logits_shape) // vocab, vocab), dtype=ctx.logits_dtype, device=d_rows.device)
        grad.index_copy_(0, layout.row_index, (d_rows * row_coef[:, None]).to(ctx.logits_dtype))
        return grad.view(ctx.logits_shape), None, None


def logprob_from_logits_triton(logits, targets, counts, ignore_index=-100):
    """Mean masked log-prob per sample (B,) from full logits (B, L..., V), validated by the caller
    (``counts`` = |M_i| from ``check_masked_targets``); differentiable in logits."""
    layout = _masked_rows(targets, counts, ignore_index)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    return LogitsTokenLogProbFunction.apply(logits, layout, needs_grad)


def _tgo_step(implicit_score, scores, threshold, c):
    """Per-sample TGO loss (reduction "none") and its derivative g_i = ∂ℓ_i/∂ŝ_i."""
    with torch.enable_grad():
        implicit_score = implicit_score.detach().requires_grad_(True)
        loss, _, _ = tgo_objective(implicit_score, scores, threshold, c, "none")
        (grad,) = torch.autograd.grad(loss.sum(), implicit_score)
    return grad


class FusedLinearMaskedTGOFunction(torch.autograd.Function):
    """Single pass over chunks of whole samples; all gradients computed in forward.

    Returns (loss, policy_logp (B,), labels (B,), weights (B,)); only loss is differentiable and
    reduction must be "mean" or "sum" (a scalar grad_output rescales the stored gradients).
    """

    @staticmethod
    @_autocast_off
    def forward(ctx, hidden, weight, bias, ref_logp, scores, threshold, beta, c, reduction,
                layout: _MaskedRows, row_step, chunk_rows: int):
        head = _Head(hidden, _head_matrix(weight), bias)
        hidden_rows = hidden.flatten(0, -2)
        grads = _Grads(hidden, weight, bias, head, ctx.needs_input_grad[:3])
        n_samples = len(layout.counts)
        per_sample = 1.0 / n_samples if reduction == "mean" else 1.0
        policy_logp = torch.empty(n_samples, dtype=torch.float32, device=hidden.device)

        for first, end, row_start, row_end in _sample_chunks(layout.counts, chunk_rows):
            rows = layout.row_index[row_start:row_end]
            hidden_chunk = hidden_rows.index_select(0, rows)
            logits = head.logits(hidden_chunk)
            d_logits = head.grad_buffer(logits)
            lse, target_logit = row_step(logits, layout.row_targets[row_start:row_end], head.bias, d_logits)
            del logits  # free the fp32 chunk (when D went to a half buffer) before the matmuls / next chunk
            sums = layout.sample_sums(target_logit - lse, rows, first, end)
            policy_logp[first:end] = sums / layout.counts_tensor[first:end]
            implicit = beta * (policy_logp[first:end] - ref_logp[first:end])
            grad_implicit = _tgo_step(implicit, scores[first:end], threshold, c) * per_sample
            # ∂ℓ/∂logits_r = g_i·β/|M_i|·(onehot − softmax) = coef_r·D_r.
            sample_coef = -grad_implicit * beta / layout.counts_tensor[first:end]
            row_coef = sample_coef[layout.row_sample[row_start:row_end] - first]
            grads.add_chunk(head, rows, hidden_chunk, d_logits, row_coef)
            del d_logits

        loss, labels, weights = tgo_objective(beta * (policy_logp - ref_logp), scores, threshold, c, reduction)
        ctx.grads = grads
        ctx.mark_non_differentiable(policy_logp, labels, weights)
        return loss, policy_logp, labels, weights

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_loss, *_):
        if ctx.grads is None:
            raise RuntimeError(
                "backward ran twice through the single-pass fused TGO loss, whose gradients are computed in "
                "forward and handed out once; use schedule='two_pass' to backpropagate more than once"
            )
        grads, ctx.grads = ctx.grads, None  # handed over, not copied (autograd may take the buffers)
        scale = None if torch.equal(grad_loss, torch.ones_like(grad_loss)) else grad_loss
        return (*grads.for_inputs(scale), *([None] * 9))


# ----------------------------------------------------------------------------------------------
# Functional entry points (tgo_fast.loss resolves impl; every other argument is validated here)
# ----------------------------------------------------------------------------------------------

def masked_token_logprob(hidden, weight, targets, *, bias=None, ignore_index=-100, use_triton=False,
                         chunk_rows=None):
    """Mean log-prob of the masked tokens per sample, without full logits.

    hidden (B, L..., H), weight (V, H) or (V, H, 1, 1), targets (B, L...) int with ignore_index at
    unmasked positions, bias (V,) or None → (B,) fp32. Differentiable (two-pass); under
    ``torch.no_grad()`` it costs one matmul per masked row — the reference model's path.
    """
    head, layout = _validate(hidden, weight, bias, targets, ignore_index)
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    chunk_rows = chunk_rows or _default_chunk_rows(len(layout.row_index), head.shape[1], head.shape[0])
    row_step = _row_step_triton if use_triton else _row_step_torch
    return MaskedTokenLogProbFunction.apply(hidden, weight, bias, layout, row_step, chunk_rows)


def fused_linear_masked_loss(hidden, weight, targets, scores, threshold, *, bias=None, ref_logp,
                             beta=1.0, c=5.0, reduction="mean", ignore_index=-100, use_triton=False,
                             return_stats=False, schedule="auto", chunk_rows=None):
    """TGO loss of a masked-token model from hidden states and its output head (SPEC §2, §3).

    hidden (B, L..., H); weight (V, H) or aMUSEd's 1×1 Conv2d (V, H, 1, 1); targets (B, L...) int
    (ignore_index at unmasked positions); scores (B,); threshold float; ref_logp (B,) reference
    mean masked log-probs (``masked_token_logprob`` of the frozen model). Returns the loss (scalar,
    or (B,) for reduction "none"), and with ``return_stats`` a dict of detached (B,) fp32 tensors.

    schedule: "single_pass" (gradients in forward, chunks of whole samples), "two_pass" (backward
    recomputes the logits) or "auto" (single pass when a gradient is needed and reduction is
    "mean"/"sum"). chunk_rows: masked rows per chunk (default: logits chunk ≈ hidden rows in size).
    """
    if schedule not in ("auto", "single_pass", "two_pass"):
        raise ValueError(f"schedule must be 'auto', 'single_pass' or 'two_pass', got {schedule!r}")
    head, layout = _validate(hidden, weight, bias, targets, ignore_index)
    n_samples = len(layout.counts)
    check_float_tensor(ref_logp, "ref_logp")
    check_batch(ref_logp, "ref_logp", n_samples)
    check_finite_values(ref_logp, "ref_logp", "the precomputed reference log-probs")
    scores, threshold = check_common(scores, threshold, n_samples, hidden.device, beta=beta, c=c, reduction=reduction)
    ref_logp = ref_logp.detach().to(hidden.device, torch.float32)  # constants: no gradient into the reference
    scores = scores.to(torch.float32)
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    chunk_rows = chunk_rows or _default_chunk_rows(len(layout.row_index), head.shape[1], head.shape[0])
    row_step = _row_step_triton if use_triton else _row_step_torch

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if schedule == "single_pass" and reduction == "none":
        raise ValueError("schedule='single_pass' needs reduction 'mean' or 'sum'; use 'two_pass' for 'none'")
    if schedule == "auto":
        schedule = "single_pass" if needs_grad and reduction != "none" else "two_pass"

    if schedule == "single_pass":
        loss, policy_logp, labels, weights = FusedLinearMaskedTGOFunction.apply(
            hidden, weight, bias, ref_logp, scores, threshold, beta, c, reduction, layout, row_step, chunk_rows
        )
    else:
        policy_logp = MaskedTokenLogProbFunction.apply(hidden, weight, bias, layout, row_step, chunk_rows)
        loss, labels, weights = tgo_objective(beta * (policy_logp - ref_logp), scores, threshold, c, reduction)
    if not return_stats:
        return loss
    implicit_score = beta * (policy_logp.detach() - ref_logp)
    return loss, tgo_stats(implicit_score, labels, weights, "policy_logp", policy_logp, "reference_logp", ref_logp)
