"""Fused linear + masked cross-entropy TGO vs the full-logits reference ``tgo_masked_loss``.

The reference builds logits = hidden·Wᵀ + b in fp32 from the same (possibly bf16/fp16) inputs and runs the
readable PyTorch loss; the fused op (impl "torch": chunked PyTorch; impl "triton": the row kernel, under the
interpreter on CPU) must match its loss and fp32 stats within relative RMS 1e-5 whatever the input dtype, and
the gradients of hidden, weight and bias within 1e-5 (fp32) or one rounding of their half dtype (eps).
"""
import pytest
import torch
from tgo_fast.kernels.fused_linear_masked_loss import fused_head_loss, head_token_logprob
from tgo_fast.kernels.fused_linear_masked_loss import fused_linear_masked_loss as fused_op

from tgo_fast.loss import masked_token_logprob, tgo_fused_linear_masked_loss, tgo_masked_loss

IGNORE = -100
STAT_KEYS = ("implicit_score", "policy_logp", "reference_logp", "labels", "weights", "accuracy")


def relative_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def make_inputs(batch, length, width, vocab, *, dtype=torch.float32, bias=True, mask_prob=0.6, conv=False):
    """Random hidden/head/targets with at least one masked token per sample, fresh each call."""
    hidden = torch.randn(batch, length, width).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, width) / width**0.5).to(dtype)
    weight = weight.reshape(vocab, width, 1, 1) if conv else weight
    weight.requires_grad_()
    bias_t = (0.5 * torch.randn(vocab)).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, (batch, length))
    masked = torch.rand(batch, length) < mask_prob
    masked[torch.arange(batch), torch.randint(0, length, (batch,))] = True
    targets[~masked] = IGNORE
    scores = torch.randn(batch)
    ref_logp = -torch.rand(batch) - torch.log(torch.tensor(float(vocab)))
    return hidden, weight, bias_t, targets, scores, ref_logp


def reference(hidden, weight, bias, targets, scores, threshold, ref_logp, **kwargs):
    """Full fp32 logits through the readable reference loss."""
    logits = hidden.float() @ weight.reshape(weight.shape[0], -1).float().t()
    if bias is not None:
        logits = logits + bias.float()
    return tgo_masked_loss(logits, None, targets, scores, threshold, ref_logp=ref_logp, return_stats=True, **kwargs)


def check_against_reference(inputs, *, impl, reduction="mean", **kwargs):
    hidden, weight, bias, targets, scores, ref_logp = inputs
    threshold = scores.median().item()
    params = [t for t in (hidden, weight, bias) if t is not None]
    expected_loss, expected_stats = reference(
        hidden, weight, bias, targets, scores, threshold, ref_logp, reduction=reduction, beta=1.5, c=3.0
    )
    grad_output = torch.rand_like(expected_loss) + 0.5
    expected_grads = torch.autograd.grad(expected_loss, params, grad_output)

    options = dict(bias=bias, ref_logp=ref_logp, reduction=reduction, beta=1.5, c=3.0, return_stats=True)
    if kwargs:  # schedule / chunk_rows: knobs of the kernel module, not of the public API
        loss, stats = fused_op(hidden, weight, targets, scores, threshold, use_triton=impl == "triton", **options, **kwargs)
    else:
        loss, stats = tgo_fused_linear_masked_loss(hidden, weight, targets, scores, threshold, impl=impl, **options)
    grads = torch.autograd.grad(loss, params, grad_output)

    assert loss.dtype == torch.float32 and loss.shape == expected_loss.shape
    assert relative_rms(loss, expected_loss) <= 1e-5
    for key in STAT_KEYS:
        assert stats[key].shape == (hidden.shape[0],) and not stats[key].requires_grad, key
        assert relative_rms(stats[key], expected_stats[key]) <= 1e-5, key
    for grad, expected, param in zip(grads, expected_grads, params):
        assert grad.shape == param.shape and grad.dtype == param.dtype
        assert relative_rms(grad, expected) <= (1e-5 if param.dtype == torch.float32 else torch.finfo(param.dtype).eps)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_full_logits_reference_fp32(impl, reduction, bias):
    check_against_reference(make_inputs(3, 13, 37, 301, bias=bias), impl=impl, reduction=reduction)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_odd_vocabulary_8256(impl):
    """V = 8192 codes + 64 mask/special tokens: the row spans a partial V block."""
    check_against_reference(make_inputs(2, 12, 33, 8256), impl=impl)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_one_masked_token_per_sample(impl):
    check_against_reference(make_inputs(4, 9, 37, 301, mask_prob=0.0), impl=impl)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_every_token_masked(impl):
    check_against_reference(make_inputs(3, 10, 37, 301, mask_prob=1.1), impl=impl)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(impl, dtype):
    """bf16/fp16 hidden and head: fp32 math inside, so the loss and stats equal the reference on the same values
    to fp32 rounding; gradients come back in the inputs' dtype."""
    check_against_reference(make_inputs(3, 13, 37, 301, dtype=dtype), impl=impl)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("schedule", ["single_pass", "two_pass"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matmul_path(monkeypatch, impl, schedule, dtype):
    """The CUDA path for bf16/fp16 (half operands, fp32 results, D written in half by the row step, grad_b
    from a split coefficient), run on CPU with the fp32-result matmul emulated exactly by upcasting."""
    from tgo_fast.kernels import fused_linear_masked_loss as module

    matmul_shapes = []

    def mm_half_fp32_out(a, b):
        matmul_shapes.append((a.shape[0], b.shape[1]))
        return a.float() @ b.float()

    def addmm_half_fp32_out(out, a, b):
        assert out.dtype == torch.float32 and a.dtype == b.dtype == dtype
        out.addmm_(a.float(), b.float())

    monkeypatch.setattr(module, "_half_operands", lambda hidden: True)
    monkeypatch.setattr(module, "_mm_half_fp32_out", mm_half_fp32_out)
    monkeypatch.setattr(module, "_addmm_half_fp32_out", addmm_half_fp32_out)
    seen_dtypes = []
    original_add_chunk = module._Grads.add_chunk

    def add_chunk(self, head, rows, hidden_chunk, d_logits, coef):
        seen_dtypes.append(d_logits.dtype)
        return original_add_chunk(self, head, rows, hidden_chunk, d_logits, coef)

    monkeypatch.setattr(module._Grads, "add_chunk", add_chunk)
    check_against_reference(make_inputs(3, 11, 29, 257, dtype=dtype), impl=impl, schedule=schedule,
                            chunk_rows=8)
    assert seen_dtypes and set(seen_dtypes) == {dtype}
    assert (257, 29) not in matmul_shapes  # grad_W accumulates in place: no V×H product per chunk


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("schedule", ["single_pass", "two_pass"])
@pytest.mark.parametrize("chunk_rows", [1, 5, 64])
def test_schedules_and_chunking(impl, schedule, chunk_rows):
    """Chunks smaller than a sample (whole-sample chunks then hold one sample), spanning samples, or all rows."""
    check_against_reference(make_inputs(3, 11, 29, 257), impl=impl, schedule=schedule, chunk_rows=chunk_rows)


def test_conv_head_and_non_contiguous_hidden():
    """aMUSEd's 1×1 Conv2d head (V, C, 1, 1) and channels-first hidden (B, C, h, w) permuted to (B, h, w, C)."""
    batch, channels, side, vocab = 2, 24, 4, 300
    hidden_cf = torch.randn(batch, channels, side, side, requires_grad=True)
    hidden = hidden_cf.permute(0, 2, 3, 1)
    _, weight, bias, _, scores, ref_logp = make_inputs(batch, 1, channels, vocab, conv=True)
    targets = torch.randint(0, vocab, (batch, side, side))
    targets[torch.rand(batch, side, side) < 0.5] = IGNORE
    targets[:, 0, 0] = 7
    assert not hidden.is_contiguous()
    for impl in ("torch", "triton"):
        check_against_reference((hidden, weight, bias, targets, scores, ref_logp), impl=impl)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_frozen_head_gives_hidden_gradient_only(impl):
    hidden, weight, bias, targets, scores, ref_logp = make_inputs(2, 8, 16, 97)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    loss = tgo_fused_linear_masked_loss(hidden, weight, targets, scores, 0.0, bias=bias, ref_logp=ref_logp, impl=impl)
    loss.backward()
    expected, _ = reference(hidden.detach().requires_grad_(), weight, bias, targets, scores, 0.0, ref_logp)
    assert weight.grad is None and bias.grad is None
    assert relative_rms(loss, expected) <= 1e-5 and hidden.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_masked_token_logprob(impl):
    """Reference log-probs: no grad, equal to the full-logits mean masked log-softmax."""
    hidden, weight, bias, targets, _, _ = make_inputs(3, 10, 24, 211)
    logits = hidden.detach() @ weight.detach().t() + bias.detach()
    logp_all = torch.log_softmax(logits, dim=-1)
    masked = targets != IGNORE
    token_logp = logp_all.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1) * masked
    expected = token_logp.sum(1) / masked.sum(1)
    with torch.no_grad():
        logp = masked_token_logprob(hidden, weight, targets, bias=bias, impl=impl)
    assert logp.dtype == torch.float32 and not logp.requires_grad
    assert relative_rms(logp, expected) <= 1e-5


def test_sample_without_masked_token_is_named():
    hidden, weight, bias, targets, scores, ref_logp = make_inputs(4, 6, 16, 50)
    targets[2] = IGNORE
    with pytest.raises(ValueError, match=r"\[2\].*no masked position"):
        tgo_fused_linear_masked_loss(hidden, weight, targets, scores, 0.0, bias=bias, ref_logp=ref_logp)
    with pytest.raises(ValueError, match=r"\[2\].*no masked position"):
        masked_token_logprob(hidden, weight, targets, bias=bias)


def test_empty_partitioned_weight_names_the_fix():
    """A ZeRO-3-partitioned head arrives as an empty tensor: the error says how to call the loss instead."""
    hidden, weight, _, targets, scores, ref_logp = make_inputs(2, 6, 16, 50)
    empty = torch.nn.Parameter(torch.empty(0))
    empty.ds_shape = weight.shape  # what DeepSpeed records on a partitioned parameter
    with pytest.raises(ValueError, match=r"full shape \(50, 16\).*ZeRO-3.*fused_head_loss\(head, hidden"):
        tgo_fused_linear_masked_loss(hidden, empty, targets, scores, 0.0, ref_logp=ref_logp)
    with pytest.raises(ValueError, match=r"ZeRO-3.*head_token_logprob"):
        masked_token_logprob(hidden, empty, targets)


@pytest.mark.parametrize("conv", [False, True])
def test_head_module_helpers_on_plain_heads(conv):
    """fused_head_loss / head_token_logprob on an ordinary Linear or 1×1 Conv2d head: same values and
    gradients as passing the head's tensors, and the head's forward is its own again afterwards."""
    hidden, _, _, targets, scores, ref_logp = make_inputs(2, 7, 16, 50)
    head = torch.nn.Conv2d(16, 50, kernel_size=1) if conv else torch.nn.Linear(16, 50)
    loss = fused_head_loss(head, hidden, targets, scores, 0.3, ref_logp=ref_logp, c=2.0)
    loss.backward()
    grads = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
    expected, _ = reference(hidden, head.weight, head.bias, targets, scores, 0.3, ref_logp, c=2.0)
    expected_grads = torch.autograd.grad(expected, (hidden, head.weight, head.bias))
    assert relative_rms(loss, expected) <= 1e-5
    for grad, expected_grad in zip(grads, expected_grads):
        assert relative_rms(grad, expected_grad) <= 1e-5
    with torch.no_grad():
        logp = head_token_logprob(head, hidden, targets)
        plain = masked_token_logprob(hidden, head.weight, targets, bias=head.bias)
    assert torch.equal(logp, plain)
    probe = torch.randn(3, 16, 1, 1) if conv else torch.randn(3, 16)
    assert "forward" not in head.__dict__ and head(probe).shape[1] == 50


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (lambda h, w, b, t, r: (h[..., :-1], w, b, t, r), ValueError, r"hidden must have shape \(B, L, H\) with H"),
        (lambda h, w, b, t, r: (h, w[:, :, None], b, t, r), ValueError, r"weight must be a Linear weight"),
        (lambda h, w, b, t, r: (h, w, b[:-1], t, r), ValueError, r"bias must have shape \(V,\)"),
        (lambda h, w, b, t, r: (h, w, b, t.float(), r), TypeError, r"targets must be an integer tensor"),
        (lambda h, w, b, t, r: (h, w, b, t[:, :-1], r), ValueError, r"targets must have shape"),
        (lambda h, w, b, t, r: (h, w, b, t.masked_fill(t == IGNORE, 50), r), ValueError, r"outside \[0, 50\)"),
        (lambda h, w, b, t, r: (h, w.long(), b, t, r), TypeError, r"weight must be a floating-point tensor"),
        (lambda h, w, b, t, r: (h, w, b, t, r[:-1]), ValueError, r"ref_logp must have shape \(4,\)"),
        (lambda h, w, b, t, r: (h, w, b, t, r.masked_fill(r < 0, float("nan"))), ValueError, r"ref_logp.*non-finite"),
    ],
)
def test_bad_inputs(change, error, pattern):
    hidden, weight, bias, targets, scores, ref_logp = make_inputs(4, 6, 16, 50, mask_prob=0.5)
    targets[:, 0] = IGNORE  # at least one unmasked position in every sample
    targets[:, 1] = 3
    hidden, weight, bias, targets, ref_logp = change(hidden, weight.detach(), bias.detach(), targets, ref_logp)
    with pytest.raises(error, match=pattern):
        tgo_fused_linear_masked_loss(hidden, weight, targets, scores, 0.0, bias=bias, ref_logp=ref_logp)


def test_unknown_schedule_and_single_pass_without_reduction():
    hidden, weight, _, targets, scores, ref_logp = make_inputs(2, 6, 16, 50)
    with pytest.raises(ValueError, match="schedule must be"):
        fused_op(hidden, weight, targets, scores, 0.0, ref_logp=ref_logp, schedule="three_pass")
    with pytest.raises(ValueError, match="single_pass.*reduction"):
        fused_op(hidden, weight, targets, scores, 0.0, ref_logp=ref_logp, reduction="none", schedule="single_pass")


@pytest.mark.parametrize("max_block", [64, 16384])
@pytest.mark.parametrize("grad_kind", ["none", "in_place", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_row_kernel_matches_torch_step(monkeypatch, max_block, grad_kind, with_bias):
    """The Triton row step alone: several V blocks (online rescaling) or the row in one block, large-magnitude
    logits, bias added in the kernel, D over the logits or into a separate fp32 / half buffer, against the
    PyTorch step."""
    from tgo_fast.kernels import fused_linear_masked_loss as module

    monkeypatch.setattr(module, "_MAX_BLOCK_V", max_block)
    rows, vocab = 9, 301
    logits = 30.0 * torch.randn(rows, vocab)
    logits[0] += 1e4  # exp would overflow without the running max
    bias = 3.0 * torch.randn(vocab) if with_bias else None
    targets = torch.randint(0, vocab, (rows,))
    expected_d = logits.clone()
    expected_lse, expected_target = module._row_step_torch(expected_d, targets, bias, expected_d)

    kernel_logits = logits.clone()
    grad = {
        "none": None, "in_place": kernel_logits, "fp32": torch.empty(rows, vocab),
        "bf16": torch.empty(rows, vocab, dtype=torch.bfloat16), "fp16": torch.empty(rows, vocab, dtype=torch.float16),
    }[grad_kind]
    lse, target_logit = module._row_step_triton(kernel_logits, targets, bias, grad)

    assert relative_rms(lse, expected_lse) <= 1e-6
    assert torch.equal(target_logit, expected_target)
    if grad is None:
        assert torch.equal(kernel_logits, logits)  # nothing written
    else:
        tolerance = 1e-6 if grad.dtype == torch.float32 else torch.finfo(grad.dtype).eps
        assert relative_rms(grad.float(), expected_d) <= tolerance
        assert torch.allclose(grad.float().sum(1), torch.zeros(rows), atol=tolerance * 10)  # Σ softmax − 1 = 0


@pytest.mark.parametrize("schedule", ["single_pass", "two_pass"])
def test_backward_twice(schedule):
    """Two-pass recomputes; the single pass keeps its gradients saved (a custom op's saved tensors): both can
    backpropagate twice with retain_graph, the second time adding the same gradient."""
    hidden, weight, bias, targets, scores, ref_logp = make_inputs(2, 6, 16, 50)
    loss = fused_op(hidden, weight, targets, scores, 0.0, schedule=schedule, bias=bias, ref_logp=ref_logp)
    loss.backward(retain_graph=True)
    once = weight.grad.clone()
    loss.backward()
    assert relative_rms(weight.grad, 2 * once) <= 1e-6


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8])
def test_integer_targets_of_any_width(impl, dtype):
    """Fused loss, its gradients and the reference log-probs are exactly those of int64 targets (uint8 cannot
    hold −100: ignore_index 255 there)."""
    hidden, weight, bias, targets, scores, ref_logp = make_inputs(3, 8, 16, 50)
    ignore_index = 255 if dtype == torch.uint8 else IGNORE
    targets = targets.masked_fill(targets == IGNORE, ignore_index)
    results = []
    for candidate in (targets, targets.to(dtype)):
        loss = tgo_fused_linear_masked_loss(hidden, weight, candidate, scores, 0.0, bias=bias, ref_logp=ref_logp,
                                            ignore_index=ignore_index, impl=impl)
        grads = torch.autograd.grad(loss, (hidden, weight, bias))
        with torch.no_grad():
            logp = masked_token_logprob(hidden, weight, candidate, bias=bias, ignore_index=ignore_index, impl=impl)
        results.append((loss, logp, *grads))
    for expected, actual in zip(*results):
        assert torch.equal(actual, expected)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("schedule", ["single_pass", "two_pass"])
@pytest.mark.parametrize("compact_rows", [False, True])
def test_per_sample_sums_are_deterministic(monkeypatch, impl, schedule, compact_rows):
    """No index_add_ (atomics, non-deterministic on CUDA) anywhere on the masked paths; repeated calls are
    bitwise equal (chunks of 5 rows split samples and span several), all rows or the masked rows only."""
    def no_index_add(*args, **kwargs):
        raise AssertionError("index_add_ is not deterministic on CUDA")

    monkeypatch.setattr(torch.Tensor, "index_add_", no_index_add)
    hidden, weight, bias, targets, scores, ref_logp = make_inputs(4, 9, 16, 50)
    logits = (hidden @ weight.t() + bias).detach().requires_grad_()
    runs = []
    for _ in range(2):
        loss, stats = fused_op(hidden, weight, targets, scores, 0.0, bias=bias, ref_logp=ref_logp, return_stats=True,
                               use_triton=impl == "triton", schedule=schedule, chunk_rows=5, compact_rows=compact_rows)
        grads = torch.autograd.grad(loss, (hidden, weight, bias))
        with torch.no_grad():
            logp = masked_token_logprob(hidden, weight, targets, bias=bias, impl=impl, compact_rows=compact_rows)
        logits_loss = tgo_masked_loss(logits, None, targets, scores, 0.0, ref_logp=ref_logp, impl=impl)
        (logits_grad,) = torch.autograd.grad(logits_loss, logits)
        runs.append((loss, stats["policy_logp"], *grads, logp, logits_loss, logits_grad))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_sample_means_equal_the_dense_masked_mean():
    """The per-sample mean over the masked rows is the reference's: a dense (B, L) sum with zeros at unmasked
    positions divided by |M_i|, bit for bit, for all samples or a range of them (a single-pass chunk); the row
    coefficients are value_i/|M_i| on masked rows and exactly 0 elsewhere."""
    from tgo_fast.kernels import fused_linear_masked_loss as module

    _, _, _, targets, _, _ = make_inputs(5, 13, 8, 50)
    masked = targets != IGNORE
    rows = module._Rows.of(targets, IGNORE)
    row_values = torch.randn(targets.numel())
    expected = torch.where(masked, row_values.view(5, 13), 0.0).sum(1) / masked.sum(1).float()
    assert torch.equal(rows.sample_mean(row_values), expected)
    assert torch.equal(rows.sample_mean(row_values[13:52], 1, 4), expected[1:4])
    assert torch.equal(rows.targets, torch.where(masked, targets, 0).reshape(-1))
    values = torch.randn(5)
    coefficients = rows.row_coefficients(values).view(5, 13)
    assert torch.equal(coefficients[~masked], torch.zeros(int((~masked).sum())))
    assert torch.equal(coefficients, torch.where(masked, (values / masked.sum(1))[:, None], 0.0))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("schedule", ["single_pass", "two_pass"])
def test_autocast_equals_the_op_on_autocast_dtype_inputs(impl, schedule):
    """Under torch.autocast(bf16) hidden/weight/bias take the autocast dtype, as the head's nn.Linear would, and
    the op's own fp32 matmuls are not recast: loss, stats, reference log-probs and gradients (backward inside the
    autocast region too) equal those of the op without autocast on the bf16-cast inputs."""
    inputs = make_inputs(3, 9, 16, 50)
    targets, scores, ref_logp = inputs[3:]
    options = dict(ref_logp=ref_logp, use_triton=impl == "triton", schedule=schedule, return_stats=True)
    runs = []
    for autocast in (True, False):
        params = [t.detach().clone() if autocast else t.detach().bfloat16() for t in (inputs[0], inputs[1], inputs[2])]
        hidden, weight, bias = (t.requires_grad_() for t in params)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, stats = fused_op(hidden, weight, targets, scores, 0.0, bias=bias, **options)
            with torch.no_grad():
                logp = masked_token_logprob(hidden, weight, targets, bias=bias, impl=impl)
            grads = torch.autograd.grad(loss, (hidden, weight, bias))
        assert all(grad.dtype == param.dtype for grad, param in zip(grads, params))
        runs.append((loss, *(stats[key] for key in STAT_KEYS), logp, *(grad.float() for grad in grads)))
    for with_autocast, on_cast_inputs in zip(*runs):
        assert torch.equal(with_autocast, on_cast_inputs)


def test_single_pass_scales_half_gradients_in_fp32():
    """The single pass computes its gradients in forward; a grad_output ≠ 1 (gradient accumulation's loss / k)
    scales the fp32 sums of W and b before their one rounding to bf16 (not a bf16-rounded scale, a 0.2 % bias
    at 1/3). On CPU the bf16 op computes in fp32, so its fp32 twin gives the unrounded sums exactly."""
    hidden, weight, bias, targets, scores, ref_logp = make_inputs(3, 9, 16, 50, dtype=torch.bfloat16)
    options = dict(bias=bias, ref_logp=ref_logp, schedule="single_pass")
    grad_output = torch.tensor(1 / 3)
    loss = fused_op(hidden, weight, targets, scores, 0.0, **options)
    grads = torch.autograd.grad(loss, (weight, bias), grad_output)
    twins = [t.detach().float().requires_grad_() for t in (hidden, weight, bias)]
    loss_fp32 = fused_op(twins[0], twins[1], targets, scores, 0.0, **{**options, "bias": twins[2]})
    sums = torch.autograd.grad(loss_fp32, twins[1:])
    for grad, fp32_sum in zip(grads, sums):
        assert torch.equal(grad, (fp32_sum * grad_output).bfloat16())


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("schedule", ["single_pass", "two_pass"])
def test_bf16_logits_equal_the_reference_on_bf16_rounded_logits(impl, schedule):
    """logits_dtype=torch.bfloat16 rounds each chunk's h·Wᵀ to bf16 once (the bias is added in fp32 as the row
    step reads them) and does the rest in fp32: loss, log-probs and gradients equal the full-logits reference on
    those rounded logits to fp32 rounding (1e-6), while the fp32 default differs from it by ~1e-4."""
    hidden, weight, bias, targets, scores, ref_logp = make_inputs(3, 13, 37, 301)
    weight = (3 * weight.detach()).requires_grad_()  # logits of a few units: bf16 rounding is visible
    params = (hidden, weight, bias)
    logits = hidden @ weight.t()
    logits = logits + (logits.bfloat16().float() - logits).detach() + bias  # rounded; the fp32 gradient passes
    expected_loss, expected = tgo_masked_loss(logits, None, targets, scores, 0.0, ref_logp=ref_logp, return_stats=True)
    expected_grads = torch.autograd.grad(expected_loss, params)
    options = dict(bias=bias, ref_logp=ref_logp, return_stats=True, chunk_rows=7)
    loss, stats = fused_op(hidden, weight, targets, scores, 0.0, use_triton=impl == "triton", schedule=schedule,
                           logits_dtype=torch.bfloat16, **options)
    grads = torch.autograd.grad(loss, params)
    assert relative_rms(loss, expected_loss) <= 1e-6
    assert relative_rms(stats["policy_logp"], expected["policy_logp"]) <= 1e-6
    for grad, expected_grad in zip(grads, expected_grads):
        assert relative_rms(grad, expected_grad) <= 1e-5
    _, fp32_stats = tgo_fused_linear_masked_loss(hidden, weight, targets, scores, 0.0, impl=impl, **options)
    assert relative_rms(fp32_stats["policy_logp"], expected["policy_logp"]) > 1e-5  # the option does something


@pytest.mark.parametrize("chunk_rows", [1, 13, 1000])
def test_public_chunk_rows_option(chunk_rows):
    """chunk_rows on the public functions changes the chunking, never the result (fp32 rounding)."""
    hidden, weight, bias, targets, scores, ref_logp = make_inputs(3, 13, 37, 301)
    results = []
    for rows in (None, chunk_rows):
        loss = tgo_fused_linear_masked_loss(hidden, weight, targets, scores, 0.0, bias=bias, ref_logp=ref_logp,
                                            chunk_rows=rows)
        with torch.no_grad():
            logp = masked_token_logprob(hidden, weight, targets, bias=bias, chunk_rows=rows)
        results.append((loss, logp, *torch.autograd.grad(loss, (hidden, weight, bias))))
    for default, chunked in zip(*results):
        assert relative_rms(chunked, default) <= 1e-6


@pytest.mark.parametrize("option, pattern", [
    (dict(chunk_rows=0), "chunk_rows must be a positive int"),
    (dict(chunk_rows=2.5), "chunk_rows must be a positive int"),
    (dict(logits_dtype=torch.float64), "logits_dtype must be one of"),
    (dict(compact_rows=1), "compact_rows must be True or False"),
])
def test_bad_options(option, pattern):
    hidden, weight, bias, targets, scores, ref_logp = make_inputs(2, 6, 16, 50)
    with pytest.raises(ValueError, match=pattern):
        tgo_fused_linear_masked_loss(hidden, weight, targets, scores, 0.0, ref_logp=ref_logp, **option)
    with pytest.raises(ValueError, match=pattern):
        masked_token_logprob(hidden, weight, targets, **option)


# ------------------------------------------------------------------------------------------------- compact_rows
def compact_inputs(dtype=torch.float32):
    """Odd shapes, ~50 % masked, sample 1 with a single masked token."""
    inputs = make_inputs(4, 13, 37, 301, dtype=dtype, mask_prob=0.5)
    targets = inputs[3]
    targets[1] = IGNORE
    targets[1, 6] = 17
    return inputs


def run_fused(inputs, grad_output, **options):
    """Loss, stats, reference log-probs (no grad) and the gradients of hidden, weight, bias."""
    hidden, weight, bias, targets, scores, ref_logp = inputs
    params = (hidden, weight, bias)
    loss, stats = fused_op(hidden, weight, targets, scores, 0.2, bias=bias, ref_logp=ref_logp, beta=1.5, c=3.0,
                           return_stats=True, **options)
    grads = torch.autograd.grad(loss, params, grad_output)
    logp_options = {key: options[key] for key in ("chunk_rows", "compact_rows") if key in options}
    impl = "triton" if options["use_triton"] else "torch"
    with torch.no_grad():
        logp = masked_token_logprob(hidden, weight, targets, bias=bias, impl=impl, **logp_options)
    return loss, stats, logp, grads


def assert_same_values(actual, expected):
    """(loss, stats, log-probs) equal to fp32 rounding: log-probs to 1e-6 relative; the implicit score β·(logp −
    ref_logp) and the loss built on it to 1e-6 of β·|logp| (the subtraction's operands)."""
    (loss, stats, logp), (expected_loss, expected_stats, expected_logp) = actual, expected
    score_atol = 1e-6 * 1.5 * expected_stats["policy_logp"].abs().max().item()
    torch.testing.assert_close(logp, expected_logp, rtol=1e-6, atol=0)
    torch.testing.assert_close(stats["policy_logp"], expected_stats["policy_logp"], rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=score_atol)
    for key in STAT_KEYS:
        torch.testing.assert_close(stats[key], expected_stats[key], rtol=1e-6, atol=score_atol, msg=key)


def count_head_rows(monkeypatch):
    """Record the number of rows of every chunk that goes through the head."""
    from tgo_fast.kernels import fused_linear_masked_loss as module

    seen = []
    original = module._Head.logits

    def logits(self, hidden_chunk):
        seen.append(hidden_chunk.shape[0])
        return original(self, hidden_chunk)

    monkeypatch.setattr(module._Head, "logits", logits)
    return seen


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("schedule, reduction", [
    ("single_pass", "mean"), ("single_pass", "sum"), ("two_pass", "mean"), ("two_pass", "none"),
])
@pytest.mark.parametrize("chunk_rows", [5, 16, 1000])
def test_compact_rows_equals_every_row(monkeypatch, impl, schedule, reduction, chunk_rows):
    """compact_rows=True computes the masked rows only and gives the default path's loss, stats, log-probs and
    gradients to fp32 rounding; grad_hidden is exactly 0 at unmasked rows. Chunks of 5 rows split the samples'
    masked rows, 16 pack one to three samples, 1000 hold all."""
    inputs = compact_inputs()
    masked = inputs[3] != IGNORE
    grad_output = torch.rand(4 if reduction == "none" else ()) + 0.5
    options = dict(use_triton=impl == "triton", schedule=schedule, reduction=reduction, chunk_rows=chunk_rows)
    expected_loss, expected_stats, expected_logp, expected_grads = run_fused(inputs, grad_output, **options)
    head_rows = count_head_rows(monkeypatch)
    loss, stats, logp, grads = run_fused(inputs, grad_output, compact_rows=True, **options)

    passes = 2 if schedule == "single_pass" else 3  # the loss (+ backward for two passes), the no-grad log-probs
    assert sum(head_rows) == passes * int(masked.sum()) and max(head_rows) <= max(chunk_rows, 13)
    assert_same_values((loss, stats, logp), (expected_loss, expected_stats, expected_logp))
    for grad, expected in zip(grads, expected_grads):
        assert grad.shape == expected.shape and grad.dtype == expected.dtype
        assert relative_rms(grad, expected) <= 2e-6
    assert torch.equal(grads[0][~masked], torch.zeros_like(grads[0][~masked]))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("schedule", ["single_pass", "two_pass"])
@pytest.mark.parametrize("half_matmuls", [False, True])
def test_compact_rows_bf16_inputs(monkeypatch, impl, schedule, half_matmuls):
    """bf16 inputs, with fp32 matmuls (CPU) or the CUDA path's half operands and half D (emulated as in
    test_half_precision_matmul_path): the fp32 stats equal the default path on the same bf16 inputs to fp32
    rounding, the bf16 gradients by relative RMS within one bf16 rounding."""
    from tgo_fast.kernels import fused_linear_masked_loss as module

    if half_matmuls:
        monkeypatch.setattr(module, "_half_operands", lambda hidden: True)
        monkeypatch.setattr(module, "_mm_half_fp32_out", lambda a, b: a.float() @ b.float())
        monkeypatch.setattr(module, "_addmm_half_fp32_out", lambda out, a, b: out.addmm_(a.float(), b.float()))
    inputs = compact_inputs(torch.bfloat16)
    options = dict(use_triton=impl == "triton", schedule=schedule, chunk_rows=16)
    expected_loss, expected_stats, expected_logp, expected_grads = run_fused(inputs, None, **options)
    loss, stats, logp, grads = run_fused(inputs, None, compact_rows=True, **options)

    assert_same_values((loss, stats, logp), (expected_loss, expected_stats, expected_logp))
    for grad, expected in zip(grads, expected_grads):
        assert grad.dtype == torch.bfloat16
        assert relative_rms(grad, expected) <= torch.finfo(torch.bfloat16).eps
    masked = inputs[3] != IGNORE
    assert torch.equal(grads[0][~masked], torch.zeros_like(grads[0][~masked]))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compact_rows_compiles_to_one_graph(reduction):
    """The host sync of compact_rows happens inside the custom op (opaque to dynamo): a function computing the
    loss and its gradients compiles with fullgraph=True (a graph break would raise) and gives the eager values,
    through the single pass ("mean") and the two-pass schedule ("none")."""
    hidden, weight, bias, targets, scores, ref_logp = compact_inputs()

    def loss_and_grads(hidden, weight, bias):
        loss = tgo_fused_linear_masked_loss(hidden, weight, targets, scores, 0.2, bias=bias, ref_logp=ref_logp,
                                            reduction=reduction, impl="torch", chunk_rows=16, compact_rows=True)
        loss = loss.sum()
        return loss.detach(), *torch.autograd.grad(loss, (hidden, weight, bias))

    eager = loss_and_grads(hidden, weight, bias)
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            compiled = torch.compile(loss_and_grads, fullgraph=True, backend="aot_eager")(hidden, weight, bias)
    finally:
        torch._dynamo.reset()
    for actual, expected in zip(compiled, eager):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compact_rows_syncs_once_and_refuses_cuda_graph_capture():
    """On CUDA: one device→host synchronisation per single-pass step (forward + backward), none with the default;
    inside a CUDA-graph capture compact_rows=True is a ValueError naming the default."""
    import warnings

    hidden, weight, bias, targets, scores, ref_logp = (
        None if t is None else t.detach().cuda().requires_grad_(t.requires_grad) for t in compact_inputs())

    def step(compact_rows):
        loss = tgo_fused_linear_masked_loss(hidden, weight, targets, scores, 0.2, bias=bias, ref_logp=ref_logp,
                                            chunk_rows=16, compact_rows=compact_rows)
        torch.autograd.grad(loss, (hidden, weight, bias))

    sync_counts = []
    for compact_rows in (False, True):
        step(compact_rows)  # warm up: Triton JIT, cuBLAS handles
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(compact_rows)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        sync_counts.append(sum("synchronizing" in str(w.message) for w in caught))
    assert sync_counts == [0, 1]

    with pytest.raises(ValueError, match="compact_rows=True.*CUDA graph.*compact_rows=False"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            step(True)
