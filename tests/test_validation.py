"""Every bad input of SPEC §3 raises a ValueError/TypeError that names the argument: shapes, dtypes and options
before any compute; values on CPU from one read of the result (tgo_fast._validation.all_finite), the inputs
checked only when it is non-finite."""
import math

import pytest
import torch

from tgo_fast.loss import TGOLoss, tgo_diffusion_loss, tgo_fused_linear_masked_loss, tgo_masked_loss
from tgo_fast.threshold import confidence_weights, percentile_threshold, pseudo_labels


def diffusion_args(batch=3):
    pred = torch.randn(batch, 2, 4)
    return [pred, torch.randn_like(pred), torch.randn_like(pred), torch.rand(batch), 0.5]


def masked_args(batch=2):
    logits = torch.randn(batch, 5, 7)
    targets = torch.randint(0, 7, (batch, 5))
    return [logits, torch.randn_like(logits), targets, torch.rand(batch), 0.5]


def replaced(args, index, value):
    args = list(args)
    args[index] = value
    return args


DIFFUSION_CASES = [
    # (positional replacements, keyword arguments, error type, message fragment)
    ({1: torch.randn(3, 2, 5)}, {}, ValueError, "ref_pred has shape"),
    ({2: torch.randn(3, 8)}, {}, ValueError, "target has shape"),
    ({3: torch.rand(4)}, {}, ValueError, r"scores must have shape \(3,\)"),
    ({3: torch.rand(3, 1)}, {}, ValueError, "scores must be 1-D"),
    ({0: torch.randint(0, 3, (3, 2, 4))}, {}, TypeError, "model_pred must be a floating-point"),
    ({2: torch.randint(0, 3, (3, 2, 4))}, {}, TypeError, "target must be a floating-point"),
    ({3: torch.tensor([0.1, math.nan, 0.3])}, {}, ValueError, r"scores must be finite.*\[1\]"),
    ({3: torch.tensor([0.1, math.inf, 0.3])}, {}, ValueError, "scores must be finite"),
    ({4: math.nan}, {}, ValueError, "threshold must be finite"),
    ({4: torch.tensor(math.inf)}, {}, ValueError, "threshold must be finite"),
    ({4: "median"}, {}, TypeError, "threshold must be a real number"),
    ({}, {"c": -1.0}, ValueError, "c must be ≥ 0"),
    ({}, {"temperature": 0.0}, ValueError, "temperature must be > 0"),
    ({}, {"temperature": -1e-3}, ValueError, "temperature must be > 0"),
    ({}, {"beta": 0.0}, ValueError, "beta must be > 0"),
    ({}, {"reduction": "avg"}, ValueError, "reduction must be one of"),
    ({}, {"impl": "cuda"}, ValueError, "impl must be one of"),
    ({}, {"ref_error": torch.rand(3)}, ValueError, "exactly one of ref_pred"),
    ({1: None}, {}, ValueError, "exactly one of ref_pred"),
    ({1: None}, {"ref_error": torch.rand(2)}, ValueError, r"ref_error must have shape \(3,\)"),
    ({0: torch.randn(3, 0), 1: torch.randn(3, 0), 2: torch.randn(3, 0)}, {}, ValueError, "at least one element"),
]


@pytest.mark.parametrize("replacements, kwargs, error, match", DIFFUSION_CASES)
def test_diffusion_bad_inputs(replacements, kwargs, error, match):
    args = diffusion_args()
    for index, value in replacements.items():
        args = replaced(args, index, value)
    with pytest.raises(error, match=match):
        tgo_diffusion_loss(*args, **kwargs)


def test_empty_batch():
    empty = torch.randn(0, 4)
    with pytest.raises(ValueError, match="model_pred is an empty batch"):
        tgo_diffusion_loss(empty, empty, empty, torch.rand(0), 0.5)
    with pytest.raises(ValueError, match="logits is an empty batch"):
        tgo_masked_loss(torch.randn(0, 3, 4), torch.randn(0, 3, 4), torch.zeros(0, 3, dtype=torch.long),
                        torch.rand(0), 0.5)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        tgo_diffusion_loss(*diffusion_args(), impl="triton")


MASKED_CASES = [
    ({2: torch.rand(2, 5)}, {}, TypeError, "targets must be an integer tensor"),
    ({2: torch.randint(0, 7, (2, 4))}, {}, ValueError, r"targets must have shape \(2, 5\)"),
    ({2: torch.full((2, 5), 7)}, {}, ValueError, r"outside \[0, 7\)"),
    ({0: torch.randint(0, 3, (2, 5, 7))}, {}, TypeError, "logits must be a floating-point"),
    ({1: torch.randn(2, 5, 8)}, {}, ValueError, "ref_logits has shape"),
    ({3: torch.tensor([0.1, math.nan])}, {}, ValueError, "scores must be finite"),
    ({}, {"c": -0.5}, ValueError, "c must be ≥ 0"),
    ({}, {"reduction": "mean_per_token"}, ValueError, "reduction must be one of"),
    ({1: None}, {}, ValueError, "exactly one of ref_logits"),
]


@pytest.mark.parametrize("replacements, kwargs, error, match", MASKED_CASES)
def test_masked_bad_inputs(replacements, kwargs, error, match):
    args = masked_args()
    for index, value in replacements.items():
        args = replaced(args, index, value)
    with pytest.raises(error, match=match):
        tgo_masked_loss(*args, **kwargs)


def test_masked_sample_without_masked_token_is_named():
    args = masked_args(batch=3)
    targets = torch.randint(0, 7, (3, 5))
    targets[1] = -100
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\] have no masked position"):
        tgo_masked_loss(*replaced(args, 2, targets))


def test_threshold_helpers_bad_inputs():
    with pytest.raises(ValueError, match=r"p must be a percentile in \[0, 100\]"):
        percentile_threshold(torch.rand(5), 101)
    with pytest.raises(ValueError, match="scores is empty on every rank"):
        percentile_threshold(torch.rand(0))
    with pytest.raises(ValueError, match="scores must be finite"):
        percentile_threshold(torch.tensor([0.0, math.nan]))
    with pytest.raises(TypeError, match="scores must hold real numbers"):
        pseudo_labels(torch.tensor([True, False]), 0.5)
    with pytest.raises(ValueError, match="c must be ≥ 0"):
        confidence_weights(torch.rand(3), 0.5, c=-1)
    with pytest.raises(ValueError, match="scale must be None, a positive number, 'std' or 'mad'"):
        confidence_weights(torch.rand(3), 0.5, scale="iqr")
    with pytest.raises(ValueError, match="scale must be positive"):
        confidence_weights(torch.ones(3), 0.5, scale="std")


def test_module_bad_configuration():
    with pytest.raises(ValueError, match="family must be one of"):
        TGOLoss(0.5, family="gan")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        TGOLoss(0.5, temperature=0)
    with pytest.raises(ValueError, match="threshold must be finite"):
        TGOLoss(math.nan)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reference_values_are_rejected_on_every_path(impl, bad):
    """A precomputed reference (ref_error, ref_logp) holding NaN/inf would make the loss NaN silently."""
    pred, _, target, scores, tau = diffusion_args()
    ref_error = torch.tensor([0.1, bad, 0.3])
    with pytest.raises(ValueError, match=r"ref_error \(the precomputed reference errors\) must be finite.*\[1\]"):
        tgo_diffusion_loss(pred, None, target, scores, tau, ref_error=ref_error, impl=impl)

    logits, _, targets, scores, tau = masked_args()
    ref_logp = torch.tensor([bad, -1.0])
    with pytest.raises(ValueError, match=r"ref_logp \(the precomputed reference log-probs\) must be finite.*\[0\]"):
        tgo_masked_loss(logits, None, targets, scores, tau, ref_logp=ref_logp, impl=impl)

    hidden, weight = torch.randn(2, 5, 4), torch.randn(7, 4)
    with pytest.raises(ValueError, match=r"ref_logp \(the precomputed reference log-probs\) must be finite.*\[0\]"):
        tgo_fused_linear_masked_loss(hidden, weight, targets, scores, tau, ref_logp=ref_logp, impl=impl)


def test_validate_false_skips_the_value_checks_only():
    """validate=False: no value checks (a NaN score gives a NaN loss, the caller's choice), shape checks stay."""
    pred, ref, target, scores, tau = diffusion_args()
    scores = torch.tensor([0.1, math.nan, 0.3])
    loss = tgo_diffusion_loss(pred, ref, target, scores, tau, reduction="none", validate=False)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    with pytest.raises(ValueError, match="scores must have shape"):
        tgo_diffusion_loss(pred, ref, target, torch.rand(4), tau, validate=False)
    logits, ref_logits, targets, scores, tau = masked_args()
    ref_logp = torch.tensor([math.nan, -1.0])
    loss = tgo_masked_loss(logits, None, targets, scores, tau, ref_logp=ref_logp, reduction="none", validate=False)
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])


@pytest.mark.parametrize("bad_threshold, pattern", [
    (torch.tensor(math.nan), "threshold must be finite"),
    (torch.tensor([0.5, 0.6]), r"threshold must be a single number, got a tensor of shape \(2,\)"),
])
def test_threshold_tensors_are_checked(bad_threshold, pattern):
    with pytest.raises(ValueError, match=pattern):
        tgo_diffusion_loss(*diffusion_args()[:4], bad_threshold)


def test_value_checks_on_device_name_the_problem(monkeypatch):
    """Where values cannot be read on the host (CUDA tensors, torch.compile) the checks are device asserts with the
    same messages; forced here on CPU tensors, where torch._assert_async raises at once."""
    from tgo_fast import _validation

    monkeypatch.setattr(_validation, "reads_values_on_host", lambda tensor: False)
    pred, ref, target, _, tau = diffusion_args()
    with pytest.raises(RuntimeError, match="scores must be finite"):
        tgo_diffusion_loss(pred, ref, target, torch.tensor([0.1, math.nan, 0.3]), tau)
    with pytest.raises(RuntimeError, match="threshold must be finite"):
        tgo_diffusion_loss(pred, ref, target, torch.rand(3), torch.tensor(math.inf))
    with pytest.raises(RuntimeError, match=r"ref_error \(the precomputed reference errors\) must be finite"):
        tgo_diffusion_loss(pred, None, target, torch.rand(3), tau, ref_error=torch.tensor([0.1, math.nan, 0.2]))
    logits, ref_logits, targets, scores, tau = masked_args()
    with pytest.raises(RuntimeError, match="have no masked position"):
        tgo_masked_loss(logits, ref_logits, torch.full_like(targets, -100), scores, tau)
    with pytest.raises(RuntimeError, match=r"outside \[0, 7\)"):
        tgo_masked_loss(logits, ref_logits, torch.full_like(targets, 7), scores, tau)


@pytest.mark.parametrize("bad_id", [7, -5])
def test_out_of_range_targets_are_named_on_every_masked_path(bad_id):
    """The logits path leaves the range check to cross_entropy's own bounds check on CPU and names the targets
    when it fails; the fused path checks them first (one host read for range and masked counts)."""
    logits, ref_logits, targets, scores, tau = masked_args()
    targets[0, 1] = bad_id
    pattern = rf"outside \[0, 7\).*\[{bad_id}\]"
    with pytest.raises(ValueError, match=pattern):
        tgo_masked_loss(logits, ref_logits, targets, scores, tau, impl="torch")
    with pytest.raises(ValueError, match=pattern):
        tgo_masked_loss(logits, None, targets, scores, tau, ref_logp=-torch.rand(2), impl="torch")
    with pytest.raises(ValueError, match=pattern):
        tgo_fused_linear_masked_loss(torch.randn(2, 5, 4), torch.randn(7, 4), targets, scores, tau,
                                     ref_logp=-torch.rand(2), impl="torch")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_infinite_reference_with_a_zero_loss_is_still_rejected(reduction):
    """An infinite precomputed reference value can put ŝ = ±inf on its label's side, where the sample's loss is
    exactly 0: the CPU check reads ŝ as well as the loss, so the input is still named."""
    pred, _, target, _, tau = diffusion_args()
    scores = torch.tensor([0.9, 0.1, 0.2])  # sample 0 is positive
    ref_error = torch.tensor([math.inf, 0.1, 0.1])  # ŝ_0 = +inf, softplus(−ŝ_0) = 0
    unchecked = tgo_diffusion_loss(pred, None, target, scores, tau, ref_error=ref_error, reduction="none",
                                   validate=False)
    assert unchecked[0] == 0 and torch.isfinite(unchecked).all()
    with pytest.raises(ValueError, match=r"ref_error \(the precomputed reference errors\) must be finite.*\[0\]"):
        tgo_diffusion_loss(pred, None, target, scores, tau, ref_error=ref_error, reduction=reduction)

    logits, _, targets, _, tau = masked_args()
    ref_logp = torch.tensor([-math.inf, -1.0])  # ŝ_0 = +inf for the positive sample 0
    with pytest.raises(ValueError, match=r"ref_logp \(the precomputed reference log-probs\) must be finite.*\[0\]"):
        tgo_masked_loss(logits, None, targets, torch.tensor([0.9, 0.1]), tau, ref_logp=ref_logp,
                        reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_diverged_policy_is_returned_not_blamed_on_the_inputs(reduction):
    """Valid inputs with a non-finite policy output: the loss is NaN, as without checks, and no input is named."""
    pred, ref, target, scores, tau = diffusion_args()
    pred[1] = math.nan
    assert torch.isnan(tgo_diffusion_loss(pred, ref, target, scores, tau, reduction=reduction)).any()
    logits, ref_logits, targets, scores, tau = masked_args()
    logits[0] = math.nan
    assert torch.isnan(tgo_masked_loss(logits, ref_logits, targets, scores, tau, reduction=reduction)).any()


def test_finite_half_scores_whose_sum_overflows_pass_the_finite_check():
    """The host check sums the values first (one read); an fp16 sum can overflow to inf with every value finite,
    and then the exact check clears them."""
    scores = torch.full((4,), 60000.0, dtype=torch.float16)
    assert torch.isinf(scores.sum())
    assert torch.equal(pseudo_labels(scores, 0.5), torch.ones(4))
    pred, ref, target, _, _ = diffusion_args(batch=4)
    assert torch.isfinite(tgo_diffusion_loss(pred, ref, target, scores, 0.5, temperature=1.0))
    logits, ref_logits, targets, _, _ = masked_args(batch=4)
    assert torch.isfinite(tgo_masked_loss(logits, ref_logits, targets, scores, 0.5))
