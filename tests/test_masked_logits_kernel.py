"""tgo_masked_loss(impl="triton"): the row kernel over full logits against the PyTorch reference."""
import pytest
import torch

from tgo_fast.loss import tgo_masked_loss


def masked_case(batch, length, vocab, dtype, masked_fraction=0.5):
    logits = (3 * torch.randn(batch, length, vocab)).to(dtype)
    ref_logits = (logits.float() + 0.3 * torch.randn(batch, length, vocab)).to(dtype)
    targets = torch.randint(0, vocab, (batch, length))
    targets[torch.rand(batch, length) > masked_fraction] = -100
    targets[:, -1] = torch.randint(0, vocab, (batch,))  # at least one masked position per sample
    return logits, ref_logits, targets, torch.rand(batch)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(3, 7, 11), (2, 5, 300), (1, 1, 17)])
def test_triton_logits_path_matches_reference_fp32(shape, reduction):
    logits, ref_logits, targets, scores = masked_case(*shape, torch.float32)
    results = {}
    for impl in ("torch", "triton"):
        x = logits.clone().requires_grad_(True)
        loss, stats = tgo_masked_loss(x, ref_logits, targets, scores, 0.5, beta=2.0, reduction=reduction,
                                      impl=impl, return_stats=True)
        grad_output = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
        loss.backward(grad_output)
        results[impl] = (loss.detach(), stats, x.grad)
    (loss_t, stats_t, grad_t), (loss_k, stats_k, grad_k) = results["torch"], results["triton"]
    # Both fp32 paths carry ~1e-6 absolute error in log π (|log π| ≈ 10 here), which ŝ = 2·Δlog π doubles:
    # compare with the float64 reference, relative 1e-5 with an absolute floor of 1e-5 for losses near 0.
    exact = tgo_masked_loss(logits.double(), ref_logits.double(), targets, scores.double(), 0.5, beta=2.0,
                            reduction=reduction, impl="torch")
    torch.testing.assert_close(loss_k.double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_t.double(), exact, rtol=1e-5, atol=1e-5)
    for key in ("policy_logp", "reference_logp", "implicit_score", "labels", "weights"):
        torch.testing.assert_close(stats_k[key], stats_t[key], rtol=1e-5, atol=1e-5)
    assert ((grad_k - grad_t).norm() / grad_t.norm()) < 1e-5
    assert torch.all(grad_k[targets == -100] == 0)  # unmasked positions carry no gradient


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_logits_path_half_precision(dtype):
    """Both paths upcast the same half logits to fp32: loss and stats agree to fp32 rounding, and the gradient,
    rounded to the logits' dtype, within one rounding (eps)."""
    logits, ref_logits, targets, scores = masked_case(2, 9, 64, dtype)
    results = {}
    for impl in ("torch", "triton"):
        x = logits.clone().requires_grad_(True)
        loss, stats = tgo_masked_loss(x, ref_logits, targets, scores, 0.5, impl=impl, reduction="none",
                                      return_stats=True)
        loss.sum().backward()
        results[impl] = (loss.detach(), stats, x.grad)
    (loss_t, stats_t, grad_t), (loss_k, stats_k, grad_k) = results["torch"], results["triton"]
    assert loss_k.dtype == torch.float32 and grad_k.dtype == dtype
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-6)
    for key in ("policy_logp", "reference_logp", "implicit_score", "labels", "weights"):
        torch.testing.assert_close(stats_k[key], stats_t[key], rtol=1e-5, atol=1e-6)
    assert ((grad_k.float() - grad_t.float()).norm() / grad_t.float().norm()) <= torch.finfo(dtype).eps


def test_triton_logits_path_non_contiguous_and_ref_logp():
    logits, ref_logits, targets, scores = masked_case(3, 6, 13, torch.float32)
    view = logits.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not view.is_contiguous()
    ref_logp = tgo_masked_loss(logits, ref_logits, targets, scores, 0.5, return_stats=True,
                               impl="torch")[1]["reference_logp"]
    torch.testing.assert_close(
        tgo_masked_loss(view, None, targets, scores, 0.5, ref_logp=ref_logp, impl="triton"),
        tgo_masked_loss(logits, ref_logits, targets, scores, 0.5, impl="torch"),
        rtol=1e-5, atol=1e-6,
    )
