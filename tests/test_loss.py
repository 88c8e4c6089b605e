"""The PyTorch reference losses against hand-computed values and independent float64 reimplementations."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tgo_fast.loss import TGOLoss, tgo_diffusion_loss, tgo_masked_loss


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def paper_diffusion_loss(model_pred, ref_pred, target, scores, tau, beta=1.0, temperature=1e-3, c=5.0):
    """SPEC §1–§2 in float64, written independently of the library, element by element where it is cheap."""
    model_pred, ref_pred, target = (t.double() for t in (model_pred, ref_pred, target))
    losses = []
    for i in range(model_pred.shape[0]):
        e_theta = ((model_pred[i] - target[i]) ** 2).mean()
        e_ref = ((ref_pred[i] - target[i]) ** 2).mean()
        s_hat = (beta / temperature) * (e_ref - e_theta)  # log π_θ − log π_ref = −(e_θ − e_ref)/T
        label = 1.0 if float(scores[i]) >= tau else 0.0
        weight = 1.0 + c * abs(float(scores[i]) - tau)
        sig = torch.sigmoid(s_hat)
        losses.append(-weight * (label * torch.log(sig) + (1 - label) * torch.log(1 - sig)))
    return torch.stack(losses)


def app_h_pseudocode_loss(model_pred, ref_pred, target, scores, tau, beta=1.0, T=1e-3, c=5.0):
    """The paper's appendix pseudocode shape: difference of means, log-sigmoid of ± the implicit score."""
    dims = list(range(1, model_pred.dim()))
    model_err = (model_pred.double() - target.double()).pow(2).mean(dim=dims)
    ref_err = (ref_pred.double() - target.double()).pow(2).mean(dim=dims)
    inside = -(beta / T) * (model_err - ref_err)
    labels = (scores.double() >= tau).double()
    weights = 1 + c * (scores.double() - tau).abs()
    loss = -weights * (labels * F.logsigmoid(inside) + (1 - labels) * F.logsigmoid(-inside))
    return loss.mean()


def unsaturated_inputs(batch=5, shape=(3, 6, 5), dtype=torch.float32, spread=0.02):
    """Policy close to the reference so that |ŝ| = 1000·|Δ| stays O(1) (not saturated)."""
    target = torch.randn(batch, *shape, dtype=torch.float64)
    ref = target + 0.5 * torch.randn_like(target)
    pred = ref + spread * torch.randn_like(ref)
    scores = torch.rand(batch, dtype=torch.float64)
    return pred.to(dtype), ref.to(dtype), target.to(dtype), scores


def test_hand_computed_diffusion_values():
    # B = 2, D = 2; β = 1, T = 0.5, c = 2, τ = 0.5.
    pred = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    ref = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    target = torch.zeros(2, 2)
    scores = torch.tensor([0.75, 0.25])
    # Sample 0: e_θ = (1 + 0)/2 = 0.5, e_ref = 0, ŝ = (1/0.5)·(0 − 0.5) = −1; s ≥ τ → l = 1, w = 1 + 2·0.25 = 1.5
    #           ℓ = 1.5·softplus(1) = 1.5·log(1 + e)
    # Sample 1: e_θ = 0, e_ref = (1 + 1)/2 = 1, ŝ = 2·(1 − 0) = 2; s < τ → l = 0, w = 1.5, ℓ = 1.5·log(1 + e²)
    l0 = 1.5 * math.log(1 + math.e)
    l1 = 1.5 * math.log(1 + math.e**2)
    loss, stats = tgo_diffusion_loss(pred, ref, target, scores, 0.5, temperature=0.5, c=2.0, return_stats=True,
                                     reduction="none")
    torch.testing.assert_close(loss, torch.tensor([l0, l1]))
    torch.testing.assert_close(stats["implicit_score"], torch.tensor([-1.0, 2.0]))
    torch.testing.assert_close(stats["policy_error"], torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(stats["reference_error"], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(stats["labels"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(stats["weights"], torch.tensor([1.5, 1.5]))
    # sign(ŝ) agrees with the label for neither sample: ŝ_0 < 0 with l = 1, ŝ_1 > 0 with l = 0.
    torch.testing.assert_close(stats["accuracy"], torch.tensor([0.0, 0.0]))
    mean = tgo_diffusion_loss(pred, ref, target, scores, 0.5, temperature=0.5, c=2.0)
    total = tgo_diffusion_loss(pred, ref, target, scores, 0.5, temperature=0.5, c=2.0, reduction="sum")
    assert math.isclose(mean.item(), (l0 + l1) / 2, rel_tol=1e-6)
    assert math.isclose(total.item(), l0 + l1, rel_tol=1e-6)


def test_hand_computed_diffusion_gradient():
    # Sample 0 above: ∂ℓ/∂pred_0j = w·(σ(ŝ) − l)·(−β/T)·2·(pred_0j − target_0j)/D = 1.5·(σ(−1) − 1)·(−2)·2·pred_0j/2
    pred = torch.tensor([[1.0, 0.0], [0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    loss = tgo_diffusion_loss(pred, ref, torch.zeros(2, 2), torch.tensor([0.75, 0.25]), 0.5, temperature=0.5,
                              c=2.0, reduction="sum")
    loss.backward()
    expected_00 = 1.5 * (_sigmoid(-1.0) - 1.0) * (-2.0) * 2.0 * 1.0 / 2.0
    torch.testing.assert_close(pred.grad, torch.tensor([[expected_00, 0.0], [0.0, 0.0]]))


def test_policy_equal_reference_gives_exactly_zero_score():
    # Large offsets make the two errors large: a difference of means would leave rounding noise × 1000.
    target = torch.randn(4, 4, 16, 16)
    pred = target + 30.0 + torch.randn_like(target)
    loss, stats = tgo_diffusion_loss(pred, pred.clone(), target, torch.rand(4), 0.5, return_stats=True,
                                     reduction="none")
    assert torch.equal(stats["implicit_score"], torch.zeros(4))
    torch.testing.assert_close(loss, stats["weights"] * math.log(2.0))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_diffusion_matches_float64_paper_equations_fp32(reduction):
    pred, ref, target, scores = unsaturated_inputs()
    tau = float(np.percentile(scores.numpy(), 50))
    pred.requires_grad_(True)
    loss = tgo_diffusion_loss(pred, ref, target, scores, tau, reduction=reduction)
    assert loss.dtype == torch.float32

    pred64 = pred.detach().double().requires_grad_(True)
    expected = paper_diffusion_loss(pred64, ref, target, scores, tau)
    expected = {"mean": expected.mean(), "sum": expected.sum(), "none": expected}[reduction]
    assert expected.abs().min() > 1e-3  # unsaturated: the comparison is meaningful
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=0)

    # pred64 → loss through the float64 path of the paper equations, elementwise in i
    grad_output = torch.rand_like(loss)  # a non-scalar grad_output for reduction="none"
    (grad,) = torch.autograd.grad(loss, pred, grad_output)
    e = paper_diffusion_loss(pred64, ref, target, scores, tau)
    e = {"mean": e.mean(), "sum": e.sum(), "none": e}[reduction]
    (expected_grad,) = torch.autograd.grad(e, pred64, grad_output.double())
    rel = (grad.double() - expected_grad).norm() / expected_grad.norm()
    assert rel < 1e-5


def test_diffusion_matches_app_h_pseudocode():
    pred, ref, target, scores = unsaturated_inputs(batch=6, shape=(4, 8, 8), dtype=torch.float64)
    tau = 0.4
    loss = tgo_diffusion_loss(pred, ref, target, scores, tau)
    torch.testing.assert_close(loss, app_h_pseudocode_loss(pred, ref, target, scores, tau), rtol=1e-9, atol=0)


def test_diffusion_gradcheck_float64():
    pred, ref, target, scores = unsaturated_inputs(batch=3, shape=(2, 3), dtype=torch.float64)
    pred.requires_grad_(True)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda p: tgo_diffusion_loss(p, ref, target, scores, 0.5, reduction=reduction), (pred,)
        )


def test_diffusion_ref_error_path_equals_ref_pred_path():
    pred, ref, target, scores = unsaturated_inputs(spread=1e-3)
    _, stats = tgo_diffusion_loss(pred, ref, target, scores, 0.5, return_stats=True)
    loss_ref = tgo_diffusion_loss(pred, ref, target, scores, 0.5)
    loss_err = tgo_diffusion_loss(pred, None, target, scores, 0.5, ref_error=stats["reference_error"])
    # The difference-of-means path loses ~1e-7·e/Δ relative accuracy; the product form does not.
    torch.testing.assert_close(loss_err, loss_ref, rtol=1e-3, atol=1e-6)


def test_diffusion_no_gradient_to_reference_target_or_scores():
    pred, ref, target, scores = unsaturated_inputs(dtype=torch.float64)
    for t in (pred, ref, target, scores):
        t.requires_grad_(True)
    tgo_diffusion_loss(pred, ref, target, scores, 0.5).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert ref.grad is None and target.grad is None and scores.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_diffusion_half_inputs_accumulate_in_fp32(dtype):
    pred, ref, target, scores = unsaturated_inputs(dtype=dtype)
    loss = tgo_diffusion_loss(pred, ref, target, scores, 0.5, reduction="none")
    assert loss.dtype == torch.float32
    expected = paper_diffusion_loss(pred.double(), ref.double(), target.double(), scores, 0.5)
    rel_rms = ((loss.double() - expected).norm() / expected.norm()).item()
    assert rel_rms < 1e-5  # same rounded inputs, fp32 accumulation


def test_diffusion_non_contiguous_inputs():
    pred, ref, target, scores = unsaturated_inputs(batch=4, shape=(6, 5, 3))
    views = [t.transpose(1, 3) for t in (pred, ref, target)]
    assert not views[0].is_contiguous()
    loss = tgo_diffusion_loss(*views, scores, 0.5, reduction="none")
    torch.testing.assert_close(loss, tgo_diffusion_loss(pred, ref, target, scores, 0.5, reduction="none"))


def test_large_implicit_scores_are_finite():
    target = torch.zeros(2, 8)
    pred = torch.full((2, 8), 10.0, requires_grad=True)  # e_θ = 100, ŝ = −1e5
    loss = tgo_diffusion_loss(pred, torch.zeros(2, 8), target, torch.tensor([1.0, 0.0]), 0.5, reduction="none")
    loss.sum().backward()
    # l = 1 (ŝ ≪ 0): ℓ = w·softplus(1e5) = w·1e5 exactly; l = 0: ℓ = w·softplus(−1e5) = 0.
    torch.testing.assert_close(loss, torch.tensor([3.5 * 1e5, 0.0]))
    assert torch.isfinite(pred.grad).all()


def test_tie_at_threshold_is_positive():
    pred, ref, target, _ = unsaturated_inputs(batch=2)
    _, stats = tgo_diffusion_loss(pred, ref, target, torch.tensor([0.5, 0.4999]), 0.5, return_stats=True)
    torch.testing.assert_close(stats["labels"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(stats["weights"], torch.tensor([1.0, 1.0 + 5 * 1e-4]), rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------------------- masked
def masked_inputs(batch=3, length=7, vocab=11, dtype=torch.float32):
    logits = torch.randn(batch, length, vocab, dtype=torch.float64)
    ref_logits = logits + 0.1 * torch.randn_like(logits)
    targets = torch.randint(0, vocab, (batch, length))
    targets[torch.rand(batch, length) < 0.4] = -100
    targets[:, 0] = torch.randint(0, vocab, (batch,))  # at least one masked token per sample
    return logits.to(dtype), ref_logits.to(dtype), targets, torch.rand(batch, dtype=torch.float64)


def test_masked_logprob_equals_cross_entropy():
    logits, ref_logits, targets, scores = masked_inputs()
    _, stats = tgo_masked_loss(logits, ref_logits, targets, scores, 0.5, return_stats=True)
    for i in range(logits.shape[0]):
        keep = targets[i] != -100
        expected = -F.cross_entropy(logits[i][keep], targets[i][keep])
        torch.testing.assert_close(stats["policy_logp"][i], expected)


def test_hand_computed_masked_values():
    # One sample, V = 2, two positions, the second unmasked. logits (0, log 3): log softmax = (−log 4, log 3/4).
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0]]])
    ref_logits = torch.zeros(1, 2, 2)  # log softmax = −log 2 everywhere
    targets = torch.tensor([[1, -100]])
    # ŝ = β·(log(3/4) − log(1/2)) = 2·log(3/2); s = 0.2 < τ = 0.5 → l = 0, w = 1 + 1·0.3 = 1.3
    # ℓ = 1.3·softplus(2·log 1.5) = 1.3·log(1 + 2.25)
    loss, stats = tgo_masked_loss(logits, ref_logits, targets, torch.tensor([0.2]), 0.5, beta=2.0, c=1.0,
                                  return_stats=True)
    assert math.isclose(loss.item(), 1.3 * math.log(3.25), rel_tol=1e-6)
    assert math.isclose(stats["implicit_score"].item(), 2 * math.log(1.5), rel_tol=1e-6)


def paper_masked_loss(logits, ref_logits, targets, scores, tau, beta=1.0, c=5.0):
    out = []
    for i in range(logits.shape[0]):
        keep = targets[i] != -100
        lp = torch.log_softmax(logits[i].double(), -1)[keep].gather(1, targets[i][keep, None]).mean()
        rlp = torch.log_softmax(ref_logits[i].double(), -1)[keep].gather(1, targets[i][keep, None]).mean()
        s_hat = beta * (lp - rlp)
        label = float(scores[i] >= tau)
        weight = 1 + c * abs(float(scores[i]) - tau)
        out.append(-weight * (label * F.logsigmoid(s_hat) + (1 - label) * F.logsigmoid(-s_hat)))
    return torch.stack(out)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masked_matches_float64_paper_equations_fp32(reduction):
    logits, ref_logits, targets, scores = masked_inputs()
    logits.requires_grad_(True)
    loss = tgo_masked_loss(logits, ref_logits, targets, scores, 0.5, beta=3.0, reduction=reduction)
    logits64 = logits.detach().double().requires_grad_(True)
    expected = paper_masked_loss(logits64, ref_logits, targets, scores, 0.5, beta=3.0)
    expected = {"mean": expected.mean(), "sum": expected.sum(), "none": expected}[reduction]
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=0)
    grad_output = torch.rand_like(loss)
    (grad,) = torch.autograd.grad(loss, logits, grad_output)
    (expected_grad,) = torch.autograd.grad(expected, logits64, grad_output.double())
    assert ((grad.double() - expected_grad).norm() / expected_grad.norm()) < 1e-5


def test_masked_gradcheck_float64_and_ref_logp_path():
    logits, ref_logits, targets, scores = masked_inputs(batch=2, length=4, vocab=5, dtype=torch.float64)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: tgo_masked_loss(x, ref_logits, targets, scores, 0.5), (logits,))
    _, stats = tgo_masked_loss(logits, ref_logits, targets, scores, 0.5, return_stats=True)
    torch.testing.assert_close(
        tgo_masked_loss(logits, None, targets, scores, 0.5, ref_logp=stats["reference_logp"]),
        tgo_masked_loss(logits, ref_logits, targets, scores, 0.5),
    )


def test_masked_policy_equal_reference_gives_zero_score():
    logits, _, targets, scores = masked_inputs()
    _, stats = tgo_masked_loss(logits, logits.clone(), targets, scores, 0.5, return_stats=True)
    assert torch.equal(stats["implicit_score"], torch.zeros(3))


# ------------------------------------------------------------------------------------------- module
def test_tgo_loss_module_matches_functional_and_saves_threshold():
    pred, ref, target, scores = unsaturated_inputs()
    module = TGOLoss(0.3, c=2.0, temperature=2e-3)
    torch.testing.assert_close(
        module(pred, ref, target, scores),
        tgo_diffusion_loss(pred, ref, target, scores, 0.3, c=2.0, temperature=2e-3),
    )
    state = module.state_dict()
    assert float(state["threshold"]) == 0.3
    restored = TGOLoss(0.0, c=2.0, temperature=2e-3)
    restored.load_state_dict(state)
    assert float(restored.threshold) == 0.3
    restored.set_threshold(0.7)
    assert float(restored.threshold) == 0.7


def test_tgo_loss_module_masked_family():
    logits, ref_logits, targets, scores = masked_inputs()
    module = TGOLoss(0.5, family="masked", beta=2.0)
    torch.testing.assert_close(
        module(logits, ref_logits, targets, scores, reduction="none"),
        tgo_masked_loss(logits, ref_logits, targets, scores, 0.5, beta=2.0, reduction="none"),
    )


# ------------------------------------------------------------------------------------------- layering
def _tgo_fast_imports(path) -> set[str]:
    """The tgo_fast modules a source file imports (absolute, or relative to the tgo_fast package)."""
    import ast

    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ("tgo_fast." if node.level else "") + (node.module or "")
            modules.update({base} if node.module else {f"tgo_fast.{alias.name}" for alias in node.names})
    return {name for name in modules if name.split(".")[0] == "tgo_fast"}


def test_kernels_and_shared_math_are_leaves():
    """The kernel modules import only the shared math and the checks; those two import only torch, so the
    public layer (tgo_fast.loss) depends on the kernels and never the other way round."""
    import pathlib

    import tgo_fast
    import tgo_fast.kernels
    from tgo_fast import _math

    package = pathlib.Path(tgo_fast.__file__).parent
    kernel_files = sorted(pathlib.Path(tgo_fast.kernels.__file__).parent.glob("*.py"))
    assert len(kernel_files) >= 3
    for path in kernel_files:
        assert _tgo_fast_imports(path) <= {"tgo_fast._math", "tgo_fast._validation"}, path.name
    for leaf in ("_math.py", "_validation.py"):
        assert _tgo_fast_imports(package / leaf) == set(), leaf
    from tgo_fast import loss, threshold

    assert loss.tgo_objective is _math.tgo_objective and threshold.labels_of is _math.labels_of


INTEGER_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]


def assert_same_as_int64_targets(logits, ref_logits, targets, scores, ignore_index, impl):
    """Loss, policy log-probs and logits gradient with `targets` are exactly those with targets.long()."""
    results = []
    for candidate in (targets.long(), targets):
        x = logits.clone().requires_grad_(True)
        loss, stats = tgo_masked_loss(x, ref_logits, candidate, scores, 0.5, ignore_index=ignore_index, impl=impl,
                                      return_stats=True)
        loss.backward()
        results.append((loss, stats["policy_logp"], x.grad))
    for expected, actual in zip(*results):
        assert torch.equal(actual, expected)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
def test_masked_loss_takes_integer_targets_of_any_width(impl, dtype):
    logits, ref_logits, targets, scores = masked_inputs()
    ignore_index = 255 if dtype == torch.uint8 else -100  # uint8 cannot hold −100
    targets = targets.masked_fill(targets == -100, ignore_index).to(dtype)
    assert_same_as_int64_targets(logits, ref_logits, targets, scores, ignore_index, impl)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_uint8_token_156_is_not_ignore_index_minus_100(impl):
    """−100 wraps to 156 in uint8: ids are compared with ignore_index in int64, so 156 stays a masked token."""
    logits, ref_logits, _, scores = masked_inputs(vocab=200)
    targets = torch.randint(150, 160, logits.shape[:-1], dtype=torch.uint8)
    targets[:, 0] = 156
    assert_same_as_int64_targets(logits, ref_logits, targets, scores, -100, impl)


@pytest.mark.parametrize("cast", [
    lambda module: module.half(),
    lambda module: module.to(torch.bfloat16),
    lambda module: module.to("cpu", torch.float16),
    lambda module: module.float(),
])
def test_tgo_loss_module_casts_keep_threshold_precision(cast):
    """τ = 0.123456789 would round to 0.1234741 in fp16 (0.1235352 in bf16) and flip the label of s = 0.12346."""
    tau = 0.123456789
    module = TGOLoss(tau)
    assert cast(module) is module
    assert module.threshold.dtype == torch.float64 and float(module.threshold) == tau
    pred, ref, target, _ = unsaturated_inputs(batch=3, dtype=torch.float16)
    _, stats = module(pred, ref, target, torch.tensor([0.12346, 0.1234, tau]), return_stats=True)
    assert stats["labels"].tolist() == [1.0, 0.0, 1.0]
    restored = TGOLoss(0.0).half()
    restored.load_state_dict(module.state_dict())
    assert float(restored.threshold) == tau
