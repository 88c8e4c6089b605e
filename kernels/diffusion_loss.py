"""Fused Triton kernels for the diffusion TGO loss (SPEC §1, §2), as ``torch.library`` custom ops.

Forward, one launch: ``_diffusion_forward_kernel``, grid (chunks, B). Every program streams one chunk of
one sample's D elements from pred, ref and target once and writes three fp32 partial sums
    Σ (p − t)²,   Σ (r − t)²,   Σ (r − p)·(r + p − 2t)      (the product form of Δ, SPEC §2)
to a (3, B, chunks) buffer, then counts itself done on an arrival counter (an acq_rel atomic). The
program that arrives last ("last program reduces") runs the epilogue: it sums the partials per sample
in a fixed order — the same order whichever program it is, so the result is deterministic run to run,
with no atomics on the data — and computes
    e_θ = Σ(p − t)²/D,   e_ref = Σ(r − t)²/D (or the given ref_error),
    Δ = Σ(r − p)(r + p − 2t)/D (or ref_error − e_θ),   ŝ = (β/T)·Δ,
    l = [s ≥ τ],   w = 1 + c·|s − τ|,   ℓ = w·softplus(x) with x = ŝ if l = 0 else −ŝ,
    ∂ℓ/∂ŝ = w·σ(x)·(1 − 2l) = w·(σ(ŝ) − l),
the reduced loss, the stats of ``return_stats`` and the per-sample gradient coefficient
    coef_i = ∂L/∂ŝ_i · ∂ŝ_i/∂(p − t)_ij / (p − t)_ij = ∂L/∂ŝ_i · (−2β/(T·D)),
and resets the counter to 0 for the next call (one counter per device and stream, so no memset launch;
a CUDA graph capture gets its own counter, zeroed inside the graph). τ comes as a float argument or,
when it is a device tensor, is read by the kernel: no host synchronisation.

Backward, one launch: ``_diffusion_grad_kernel`` re-reads pred and target and writes
    grad_pred_ij = grad_output_i · coef_i · (p_ij − t_ij)        in pred's dtype.
Only pred, target (already held by autograd) and coef (B,) are saved. Writing the gradient during
forward (Liger's pattern) does not pay here: coef_i needs the whole row's sum, which the forward
only has after every chunk of the row is read, so it would need a second read of pred and target —
exactly what backward does — plus a B·D gradient buffer kept alive from forward to backward.

Bytes per element (b = element size): forward 3b read (2b with ``ref_error``), backward 2b read + b write.

Layout: each (B, ...) tensor is viewed as rows (B, D) with its own row and column stride, so batch
slices and strided single-axis views need no copy; trailing dimensions are visited in the memory order
of ``model_pred`` (channels-last stays a view). Only a layout no (B, D) view can express is copied.
Offsets are int64. Inputs fp32/bf16/fp16 (fp64 accepted too); accumulation and outputs are fp32.

Ops: ``tgo_fast::diffusion_loss`` (forward) and ``tgo_fast::diffusion_loss_backward``, with fake
implementations and autograd registered, so ``torch.compile(fullgraph=True)`` keeps a training step
in one graph and CUDA graphs capture it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}
STAT_NAMES = ("implicit_score", "policy_error", "reference_error", "labels", "weights", "accuracy")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Launch shape on a GPU: about PROGRAMS_PER_SM programs per SM, each streaming blocks of GPU_MIN_BLOCK to
# GPU_MAX_BLOCK elements (256 elements per warp, at most 8 warps).
GPU_MIN_BLOCK = 512
GPU_MAX_BLOCK = 4096
PROGRAMS_PER_SM = 8
# The interpreter runs programs one after another in numpy: few programs over large blocks is fastest.
INTERPRETER_BLOCK = 16384
MAX_BATCH = 65535  # a CUDA grid's second axis
EPILOGUE_BLOCK_B = 128
EPILOGUE_BLOCK_CHUNKS = 64


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^−|x|), log1p by u = 1 + z: log(u)·z/(u − 1) (exact to rounding)."""
    z = tl.exp(-tl.abs(x))
    u = 1.0 + z
    log1p_z = tl.where(u == 1.0, z, tl.log(u) * z / tl.where(u == 1.0, 1.0, u - 1.0))
    return tl.maximum(x, 0.0) + log1p_z


@triton.jit
def _sigmoid(x):
    """σ(x) without overflow: 1/(1 + e^−x) for x ≥ 0, eˣ/(1 + eˣ) otherwise."""
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def _diffusion_epilogue(
    partials_ptr, ref_error_ptr, scores_ptr, threshold_ptr, stats_ptr, coef_ptr, loss_ptr,
    B, D, n_chunks, threshold, score_scale, c, grad_scale,
    HAS_REF: tl.constexpr, THRESHOLD_ON_DEVICE: tl.constexpr, REDUCTION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_CHUNKS: tl.constexpr,
):
    """Per-sample sums of the partials (fixed order), the TGO step, stats, coef and the reduced loss."""
    if THRESHOLD_ON_DEVICE:  # τ in the scores' precision, as torch compares a tensor with a 0-d tensor
        tau = tl.load(threshold_ptr).to(scores_ptr.dtype.element_ty)
    else:
        tau = threshold
    total = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for row_start in range(0, B, BLOCK_B):
        rows = row_start + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        policy_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
        ref_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
        delta_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for chunk_start in range(0, n_chunks, BLOCK_CHUNKS):
            chunks = chunk_start + tl.arange(0, BLOCK_CHUNKS)
            mask = row_mask[:, None] & (chunks < n_chunks)[None, :]
            index = rows[:, None] * n_chunks + chunks[None, :]
            # .cg: read from L2, where the other programs' partials are, never a stale L1 line
            policy_sum += tl.sum(tl.load(partials_ptr + index, mask=mask, other=0.0, cache_modifier=".cg"), axis=1)
            if HAS_REF:
                ref_sum += tl.sum(tl.load(partials_ptr + B * n_chunks + index, mask=mask, other=0.0,
                                          cache_modifier=".cg"), axis=1)
                delta_sum += tl.sum(tl.load(partials_ptr + 2 * B * n_chunks + index, mask=mask, other=0.0,
                                            cache_modifier=".cg"), axis=1)

        policy_error = policy_sum / D
        if HAS_REF:
            ref_error = ref_sum / D
            delta = delta_sum / D
        else:
            ref_error = tl.load(ref_error_ptr + rows, mask=row_mask, other=0.0)
            delta = ref_error - policy_error
        implicit_score = score_scale * delta

        # s − τ in the scores' dtype (fp32, or fp64), as tgo_fast._math does.
        distance = tl.load(scores_ptr + rows, mask=row_mask, other=0.0) - tau
        positive = distance >= 0  # a tie counts as positive
        label = positive.to(tl.float32)
        weight = (1.0 + c * tl.abs(distance)).to(tl.float32)
        signed_score = tl.where(positive, -implicit_score, implicit_score)  # ℓ = w·softplus(signed_score)
        loss = weight * _softplus(signed_score)
        d_loss_d_score = weight * _sigmoid(signed_score) * (1.0 - 2.0 * label)  # = w·(σ(ŝ) − l)
        correct = ((implicit_score > 0) & positive) | ((implicit_score < 0) & (distance < 0))

        tl.store(stats_ptr + rows, implicit_score, mask=row_mask)
        tl.store(stats_ptr + B + rows, policy_error, mask=row_mask)
        tl.store(stats_ptr + 2 * B + rows, ref_error, mask=row_mask)
        tl.store(stats_ptr + 3 * B + rows, label, mask=row_mask)
        tl.store(stats_ptr + 4 * B + rows, weight, mask=row_mask)
        tl.store(stats_ptr + 5 * B + rows, correct.to(tl.float32), mask=row_mask)
        tl.store(coef_ptr + rows, d_loss_d_score * grad_scale, mask=row_mask)
        if REDUCTION == 0:
            tl.store(loss_ptr + rows, loss, mask=row_mask)
        total += tl.where(row_mask, loss, 0.0)

    if REDUCTION == 1:
        tl.store(loss_ptr, tl.sum(total, axis=0))
    if REDUCTION == 2:
        tl.store(loss_ptr, tl.sum(total, axis=0) / B)


@triton.jit
def _diffusion_forward_kernel(
    pred_ptr, ref_ptr, target_ptr,  # (B, D) views, strides below
    partials_ptr,  # (3, B, n_chunks) fp32: Σ(p−t)², Σ(r−t)², Σ(r−p)(r+p−2t) over the chunk
    counter_ptr,  # (1,) int32, 0 on entry and on exit: programs that have stored their partials
    ref_error_ptr,  # (B,) fp32, read when not HAS_REF
    scores_ptr,  # (B,) fp32 s, or fp64 s (fp64 s − τ with threshold = 0 when τ is a float)
    threshold_ptr,  # () τ, read when THRESHOLD_ON_DEVICE
    stats_ptr,  # (6, B) fp32 out: ŝ, e_θ, e_ref, l, w, accuracy
    coef_ptr,  # (B,) fp32 out: ∂L/∂ŝ_i · (−2β/(T·D))
    loss_ptr,  # () fp32 out, or (B,) for REDUCTION = 0
    B, D, n_chunks, chunk_len,  # chunk_len: a multiple of BLOCK
    stride_pred_row, stride_pred_col,
    stride_ref_row, stride_ref_col,
    stride_target_row, stride_target_col,
    threshold, score_scale, c, grad_scale,  # grad_scale = −2β/(T·D), divided by B for "mean"
    HAS_REF: tl.constexpr,
    THRESHOLD_ON_DEVICE: tl.constexpr,
    REDUCTION: tl.constexpr,  # 0 none, 1 sum, 2 mean
    BLOCK: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_CHUNKS: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    pred_row = pred_ptr + row * stride_pred_row
    ref_row = ref_ptr + row * stride_ref_row
    target_row = target_ptr + row * stride_target_row
    offsets = tl.arange(0, BLOCK).to(tl.int64)
    start = chunk * chunk_len

    policy_sq = tl.zeros((BLOCK,), dtype=tl.float32)
    ref_sq = tl.zeros((BLOCK,), dtype=tl.float32)
    delta = tl.zeros((BLOCK,), dtype=tl.float32)
    for step in range(0, chunk_len, BLOCK):
        cols = start + step + offsets
        mask = cols < D
        p = tl.load(pred_row + cols * stride_pred_col, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(target_row + cols * stride_target_col, mask=mask, other=0.0).to(tl.float32)
        policy_diff = p - t
        policy_sq += policy_diff * policy_diff
        if HAS_REF:
            r = tl.load(ref_row + cols * stride_ref_col, mask=mask, other=0.0).to(tl.float32)
            ref_diff = r - t
            ref_sq += ref_diff * ref_diff
            # (r − p)·(r + p − 2t): exactly 0 where r = p, no cancellation between two large means.
            delta += (r - p) * (r + p - 2.0 * t)

    out = partials_ptr + row * n_chunks + chunk
    tl.store(out, tl.sum(policy_sq, axis=0))
    if HAS_REF:
        tl.store(out + B * n_chunks, tl.sum(ref_sq, axis=0))
        tl.store(out + 2 * B * n_chunks, tl.sum(delta, axis=0))

    # Last program reduces: acq_rel publishes this program's partials to whoever counts after it, and makes
    # every earlier program's partials visible to this one.
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if arrived == n_chunks * B - 1:
        _diffusion_epilogue(
            partials_ptr, ref_error_ptr, scores_ptr, threshold_ptr, stats_ptr, coef_ptr, loss_ptr,
            B, D, n_chunks, threshold, score_scale, c, grad_scale,
            HAS_REF, THRESHOLD_ON_DEVICE, REDUCTION, BLOCK_B, BLOCK_CHUNKS,
        )
        tl.atomic_xchg(counter_ptr, 0)  # ready for the next call on this stream


@triton.jit
def _diffusion_grad_kernel(
    grad_ptr,  # (B, D) out, contiguous rows, pred's dtype
    pred_ptr, target_ptr,  # (B, D) views
    coef_ptr,  # (B,) fp32
    grad_output_ptr,  # () or (B,) fp32: stride_grad_output = 0 for a reduced loss
    D, chunk_len,
    stride_pred_row, stride_pred_col,
    stride_target_row, stride_target_col,
    stride_grad_output,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    scale = tl.load(coef_ptr + row) * tl.load(grad_output_ptr + row * stride_grad_output).to(tl.float32)
    offsets = tl.arange(0, BLOCK).to(tl.int64)
    start = chunk * chunk_len
    for step in range(0, chunk_len, BLOCK):
        cols = start + step + offsets
        mask = cols < D
        p = tl.load(pred_ptr + row * stride_pred_row + cols * stride_pred_col, mask=mask, other=0.0)
        t = tl.load(target_ptr + row * stride_target_row + cols * stride_target_col, mask=mask, other=0.0)
        grad = scale * (p.to(tl.float32) - t.to(tl.float32))
        tl.store(grad_ptr + row * D + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchConfig:
    """How the D elements of a sample are split: ``chunks`` programs of ``chunk_len`` elements each,
    streamed ``block`` at a time."""

    block: int
    chunk_len: int
    chunks: int
    num_warps: int


def _cdiv(a: int, b: int) -> int:  # plain host arithmetic: triton.cdiv is a jit function, slow on the host
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_config(batch: int, dim: int, device: torch.device) -> LaunchConfig:
    """Pick the block and the split of each row. On a GPU: about PROGRAMS_PER_SM programs per SM whatever
    B and D are (small blocks for small inputs, several blocks per program for large ones); under the
    interpreter: one program per row."""
    if device.type == "cuda":
        wanted = PROGRAMS_PER_SM * _multiprocessor_count(device.index if device.index is not None else 0)
        block = min(GPU_MAX_BLOCK, max(GPU_MIN_BLOCK, _next_power_of_2(_cdiv(batch * dim, wanted))))
        block = min(block, max(16, _next_power_of_2(dim)))
        num_warps = max(1, min(8, block // 256))
        blocks_per_row = _cdiv(dim, block)
        chunks = min(blocks_per_row, _cdiv(wanted, batch))
    else:
        block = min(INTERPRETER_BLOCK, _next_power_of_2(max(dim, 16)))
        num_warps = 1
        blocks_per_row = _cdiv(dim, block)
        chunks = 1
    chunk_len = _cdiv(blocks_per_row, chunks) * block
    return LaunchConfig(block=block, chunk_len=chunk_len, chunks=_cdiv(dim, chunk_len), num_warps=num_warps)


def _trailing_order(x: torch.Tensor) -> tuple[int, ...]:
    """Trailing dimensions of x from the largest stride to the smallest (the memory order)."""
    return tuple(sorted(range(1, x.dim()), key=lambda d: -x.stride(d)))


def _as_rows(x: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """x (B, ...) as a (B, D) view with trailing dims visited in ``order``; a copy only if no view exists."""
    if order != tuple(range(1, x.dim())):
        x = x.permute(0, *order)
    return x.reshape(x.shape[0], -1)


def _check_runnable(tensors: dict[str, torch.Tensor]) -> None:
    model_pred = tensors["model_pred"]
    device = model_pred.device
    if model_pred.numel() == 0:
        raise ValueError(f"model_pred has shape {tuple(model_pred.shape)}: every sample needs at least one element")
    if model_pred.shape[0] > MAX_BATCH:
        raise ValueError(f"the Triton diffusion loss takes at most {MAX_BATCH} samples (the grid's second axis), "
                         f"got a batch of {model_pred.shape[0]}: split the batch or use impl='torch'")
    for name, tensor in tensors.items():
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: the Triton diffusion loss takes {[str(d) for d in SUPPORTED_DTYPES]}, "
                            f"got {tensor.dtype}")
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device}, model_pred on {device}: put them on one device")
    if device.type == "cuda":
        return
    if device.type == "cpu" and isinstance(_diffusion_forward_kernel, InterpretedFunction):
        return
    raise ValueError(
        f"impl='triton' got tensors on {device}: the Triton kernels need CUDA tensors, or CPU tensors with "
        "TRITON_INTERPRET=1 set before tgo_fast is imported (Triton's interpreter); use impl='torch' otherwise")


_ARRIVAL_COUNTERS: dict = {}


def _arrival_counter(device: torch.device) -> torch.Tensor:
    """The forward kernel's int32 arrival counter: 0 between calls (the last program resets it), so one per
    device and stream serves every call without a memset. A CUDA graph capture gets a fresh zero, allocated
    (and zeroed) inside the graph."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(1, dtype=torch.int32, device=device)
        key = (device, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device, 0)
    counter = _ARRIVAL_COUNTERS.get(key)
    if counter is None:
        counter = _ARRIVAL_COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def diffusion_loss_forward(model_pred, ref_pred, target, ref_error, scores, threshold, beta, temperature, c,
                           reduction):
    """Forward pass, one launch. model_pred, target: (B, ...); ref_pred: (B, ...) or None with ref_error (B,);
    scores (B,) fp32 or fp64; threshold a float or a 0-d tensor on the device.

    Returns loss (() or (B,) fp32), stats (6, B) fp32 (rows as STAT_NAMES) and coef (B,) fp32.
    """
    batch = model_pred.shape[0]
    dim = model_pred.numel() // batch
    device = model_pred.device
    order = _trailing_order(model_pred)
    pred_rows = _as_rows(model_pred, order)
    target_rows = _as_rows(target, order)
    has_ref = ref_pred is not None
    ref_rows = _as_rows(ref_pred, order) if has_ref else pred_rows  # pointer unused when not has_ref
    config = launch_config(batch, dim, device)

    partials = torch.empty((3 if has_ref else 1, batch, config.chunks), dtype=torch.float32, device=device)
    stats = torch.empty((len(STAT_NAMES), batch), dtype=torch.float32, device=device)
    coef = torch.empty((batch,), dtype=torch.float32, device=device)
    loss = torch.empty((batch,) if reduction == "none" else (), dtype=torch.float32, device=device)
    ref_error_f32 = coef if has_ref else ref_error.to(dtype=torch.float32).contiguous()  # coef: unread placeholder
    grad_scale = -2.0 * beta / (temperature * dim)
    if reduction == "mean":
        grad_scale /= batch
    threshold_on_device = isinstance(threshold, torch.Tensor)
    if scores.dtype == torch.float64 and not threshold_on_device:
        scores, threshold = scores - threshold, 0.0  # a float argument is fp32 in the kernel: subtract τ in fp64
    elif scores.dtype != torch.float64:
        scores = scores.to(dtype=torch.float32)
    _diffusion_forward_kernel[(config.chunks, batch)](
        pred_rows, ref_rows, target_rows, partials, _arrival_counter(device),
        ref_error_f32, scores.contiguous(), threshold if threshold_on_device else coef, stats, coef, loss,
        batch, dim, config.chunks, config.chunk_len,
        pred_rows.stride(0), pred_rows.stride(1),
        ref_rows.stride(0), ref_rows.stride(1),
        target_rows.stride(0), target_rows.stride(1),
        0.0 if threshold_on_device else float(threshold), beta / temperature, c, grad_scale,
        HAS_REF=has_ref, THRESHOLD_ON_DEVICE=threshold_on_device, REDUCTION=REDUCTIONS[reduction],
        BLOCK=config.block,
        BLOCK_B=min(EPILOGUE_BLOCK_B, _next_power_of_2(batch)),
        BLOCK_CHUNKS=min(EPILOGUE_BLOCK_CHUNKS, _next_power_of_2(config.chunks)),
        num_warps=config.num_warps,
    )
    return loss, stats, coef


def diffusion_loss_backward(model_pred, target, coef, grad_output):
    """grad_pred (shape and dtype of model_pred, in its memory order) = grad_output_i · coef_i · (pred − target)."""
    batch = model_pred.shape[0]
    dim = model_pred.numel() // batch
    order = _trailing_order(model_pred)
    config = launch_config(batch, dim, model_pred.device)
    pred_rows = _as_rows(model_pred, order)
    target_rows = _as_rows(target, order)
    grad = _empty_like_layout(model_pred, order)
    grad_output = grad_output.to(dtype=torch.float32)
    _diffusion_grad_kernel[(config.chunks, batch)](
        _as_rows(grad, order), pred_rows, target_rows, coef, grad_output,
        dim, config.chunk_len,
        pred_rows.stride(0), pred_rows.stride(1),
        target_rows.stride(0), target_rows.stride(1),
        grad_output.stride(0) if grad_output.dim() == 1 else 0,
        BLOCK=config.block, num_warps=config.num_warps,
    )
    return grad


def _empty_like_layout(model_pred: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """An empty tensor of model_pred's shape and dtype whose rows (B, D) in `order` are contiguous."""
    return torch.empty_permuted(model_pred.shape, (0, *order), dtype=model_pred.dtype, device=model_pred.device)


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("tgo_fast::diffusion_loss", mutates_args=())
def diffusion_loss_op(
    model_pred: torch.Tensor, ref_pred: Optional[torch.Tensor], target: torch.Tensor,
    ref_error: Optional[torch.Tensor], scores: torch.Tensor, threshold: Optional[torch.Tensor],
    threshold_value: float, beta: float, temperature: float, c: float, reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats (6, B), coef (B,)) of ``diffusion_loss_forward``; τ is `threshold` (0-d, on the device) if
    given, else threshold_value."""
    return diffusion_loss_forward(
        model_pred, ref_pred, target, ref_error, scores, threshold if threshold is not None else threshold_value,
        beta, temperature, c, reduction)


@diffusion_loss_op.register_fake
def _(model_pred, ref_pred, target, ref_error, scores, threshold, threshold_value, beta, temperature, c, reduction):
    batch = model_pred.shape[0]
    loss = model_pred.new_empty((batch,) if reduction == "none" else (), dtype=torch.float32)
    return loss, model_pred.new_empty((len(STAT_NAMES), batch), dtype=torch.float32), \
        model_pred.new_empty((batch,), dtype=torch.float32)


@torch.library.custom_op("tgo_fast::diffusion_loss_backward", mutates_args=())
def diffusion_loss_backward_op(
    model_pred: torch.Tensor, target: torch.Tensor, coef: torch.Tensor, grad_loss: torch.Tensor
) -> torch.Tensor:
    return diffusion_loss_backward(model_pred, target, coef, grad_loss)


@diffusion_loss_backward_op.register_fake
def _(model_pred, target, coef, grad_loss):
    return _empty_like_layout(model_pred, _trailing_order(model_pred))


def _setup_context(ctx, inputs, output):
    model_pred, _, target = inputs[:3]
    ctx.save_for_backward(model_pred, target, output[2])


def _backward(ctx, grad_loss, grad_stats, grad_coef):
    """Gradient only into model_pred (SPEC §1.6)."""
    model_pred, target, coef = ctx.saved_tensors
    grad_pred = diffusion_loss_backward_op(model_pred, target, coef, grad_loss) if ctx.needs_input_grad[0] else None
    return (grad_pred, *([None] * 10))


diffusion_loss_op.register_autograd(_backward, setup_context=_setup_context)


def tgo_diffusion_loss_triton(model_pred, ref_pred, target, scores, threshold, *, beta, temperature, c,
                              reduction, ref_error, return_stats):
    """The Triton implementation behind ``tgo_fast.loss.tgo_diffusion_loss(impl="triton")``.

    Arguments are validated by the dispatcher (SPEC §3): scores a real tensor (B,) on the device,
    threshold a float or a 0-d tensor on the device, exactly one of ref_pred (B, ...) and ref_error (B,).
    Returns the loss (fp32; () or (B,) for reduction "none"), with the stats dict when return_stats.
    """
    inputs = {"model_pred": model_pred, "ref_pred": ref_pred, "target": target}
    _check_runnable({name: tensor for name, tensor in inputs.items() if tensor is not None})
    if not scores.is_floating_point():
        scores = scores.float()  # integer ratings: compared in fp32, as the reference does
    threshold_on_device = isinstance(threshold, torch.Tensor)
    loss, stats, _ = diffusion_loss_op(
        model_pred, ref_pred, target, None if ref_pred is not None else ref_error.detach(), scores.detach(),
        threshold.detach() if threshold_on_device else None, 0.0 if threshold_on_device else float(threshold),
        float(beta), float(temperature), float(c), reduction)
    if not return_stats:
        return loss
    return loss, dict(zip(STAT_NAMES, stats.detach().unbind(0)))
