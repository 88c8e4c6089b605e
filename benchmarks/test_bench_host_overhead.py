"""pytest-benchmark: host overhead per call on tiny tensors, and a compiled vs an eager training step (CPU or CUDA).

    pytest benchmarks/test_bench_host_overhead.py                      # timings, grouped for comparison
    pytest benchmarks/test_bench_host_overhead.py --benchmark-disable  # CI: every row runs once

On tiny tensors (diffusion B=8, D=256; masked B=4, L=16, V=64) the compute is negligible, so forward + backward
time is host overhead: argument checks, dispatch, autograd. Each group compares the library call with the same
math written inline (issue 11's target: at most 1.1× the inline expression; measured, never asserted), the
library with ``validate=False``, and the public path on the custom op where there is one. The step group
times a whole training step (a Linear model, the loss, backward, an SGD update) eager and compiled with
``torch.compile(fullgraph=True)`` (inductor; ``aot_eager`` in check mode, where inductor's 30 s C++ compile on a
2-core CPU would dominate CI).
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from gpu_diffusion_loss import inline_reference
from tgo_fast.loss import tgo_diffusion_loss, tgo_fused_linear_masked_loss, tgo_masked_loss

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _synchronised(fn):
    def call():
        result = fn()
        if CUDA:
            torch.cuda.synchronize()
        return result
    return call


def diffusion_inputs(batch=8, dim=256):
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(batch, dim, generator=generator)
    pred = (target + 0.5 * torch.randn(batch, dim, generator=generator)).to(DEVICE).requires_grad_()
    ref = (target + 0.5 * torch.randn(batch, dim, generator=generator)).to(DEVICE)
    scores = torch.rand(batch, generator=generator).to(DEVICE)
    return pred, ref, target.to(DEVICE), scores, 0.5


def inline_masked(logits, ref_logp, targets, scores, threshold, beta=1.0, c=5.0, ignore_index=-100):
    """The masked TGO loss written inline from full logits."""
    token_logp = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index,
                                  reduction="none").view(targets.shape)
    policy_logp = token_logp.sum(1) / (targets != ignore_index).sum(1)
    implicit_score = beta * (policy_logp - ref_logp)
    labels = (scores >= threshold).float()
    weights = 1 + c * (scores - threshold).abs()
    return (weights * F.softplus((1 - 2 * labels) * implicit_score)).mean()


def masked_inputs(batch=4, length=16, vocab=64):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, length, vocab, generator=generator).to(DEVICE).requires_grad_()
    targets = torch.randint(0, vocab, (batch, length), generator=generator)
    targets[:, 1::2] = -100
    ref_logp = -torch.rand(batch, generator=generator) - 4.0
    return logits, ref_logp.to(DEVICE), targets.to(DEVICE), torch.rand(batch, generator=generator).to(DEVICE), 0.5


DIFFUSION_ROWS = {
    "inline": inline_reference,
    "tgo_torch": functools.partial(tgo_diffusion_loss, impl="torch"),
    "tgo_torch_no_validate": functools.partial(tgo_diffusion_loss, impl="torch", validate=False),
    "tgo_auto": tgo_diffusion_loss,  # the Triton custom op on CUDA
}


@pytest.mark.benchmark(group="host-overhead-diffusion-B8-D256")
@pytest.mark.parametrize("row", list(DIFFUSION_ROWS))
def test_diffusion_host_overhead(benchmark, row):
    pred, ref, target, scores, threshold = diffusion_inputs()
    loss_of = DIFFUSION_ROWS[row]

    def step():
        pred.grad = None
        loss = loss_of(pred, ref, target, scores, threshold)
        loss.backward()
        return loss

    loss = benchmark(_synchronised(step))
    expected = inline_reference(pred, ref, target, scores, threshold)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


MASKED_ROWS = {
    "inline": lambda logits, ref_logp, targets, scores, tau: inline_masked(logits, ref_logp, targets, scores, tau),
    "tgo_torch": lambda logits, ref_logp, targets, scores, tau: tgo_masked_loss(
        logits, None, targets, scores, tau, ref_logp=ref_logp, impl="torch"),
    "tgo_torch_no_validate": lambda logits, ref_logp, targets, scores, tau: tgo_masked_loss(
        logits, None, targets, scores, tau, ref_logp=ref_logp, impl="torch", validate=False),
}


@pytest.mark.benchmark(group="host-overhead-masked-B4-L16-V64")
@pytest.mark.parametrize("row", list(MASKED_ROWS))
def test_masked_host_overhead(benchmark, row):
    logits, ref_logp, targets, scores, threshold = masked_inputs()
    loss_of = MASKED_ROWS[row]

    def step():
        logits.grad = None
        loss = loss_of(logits, ref_logp, targets, scores, threshold)
        loss.backward()
        return loss

    loss = benchmark(_synchronised(step))
    torch.testing.assert_close(loss, inline_masked(logits, ref_logp, targets, scores, threshold), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------- compiled vs eager step
def diffusion_step_parts():
    model = torch.nn.Linear(64, 256).to(DEVICE)
    _, ref, target, scores, threshold = diffusion_inputs()
    features = torch.randn(8, 64, device=DEVICE)

    def loss_of():
        return tgo_diffusion_loss(model(features), ref, target, scores, threshold, temperature=1.0)
    return model, loss_of


def fused_step_parts():
    trunk, head = torch.nn.Linear(32, 32).to(DEVICE), torch.nn.Linear(32, 512).to(DEVICE)
    model = torch.nn.ModuleList([trunk, head])
    tokens = torch.randn(4, 64, 32, device=DEVICE)
    targets = torch.randint(0, 512, (4, 64), device=DEVICE)
    targets[:, ::3] = -100
    scores, ref_logp = torch.rand(4, device=DEVICE), -torch.rand(4, device=DEVICE) - 6.0

    def loss_of():
        return tgo_fused_linear_masked_loss(trunk(tokens), head.weight, targets, scores, 0.5, bias=head.bias,
                                            ref_logp=ref_logp)
    return model, loss_of


STEPS = {"diffusion": diffusion_step_parts, "fused_masked": fused_step_parts}


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("loss_name", list(STEPS))
def test_training_step_compiled_vs_eager(benchmark, loss_name, mode):
    benchmark.group = f"step-{loss_name}"
    model, loss_of = STEPS[loss_name]()

    def train_step():
        loss = loss_of()
        loss.backward()
        with torch.no_grad():
            for param in model.parameters():
                param.sub_(1e-3 * param.grad)
                param.grad = None
        return loss.detach()

    step = train_step
    with torch._dynamo.config.patch(trace_autograd_ops=True):  # backward inside the compiled graph
        if mode == "compiled":
            backend = "aot_eager" if benchmark.disabled else "inductor"
            benchmark.extra_info["backend"] = backend
            torch._dynamo.reset()
            step = torch.compile(train_step, fullgraph=True, backend=backend)
            step()  # compile outside the timed calls
        loss = benchmark(_synchronised(step))
    torch._dynamo.reset()
    assert torch.isfinite(loss)


def test_gpu_scripts_import_and_parse_their_arguments(capsys):
    """The GPU report scripts cannot run here; a later session with a GPU just runs them: they import on CPU and
    parse every variant / case name."""
    import gpu_diffusion_loss
    import gpu_masked_loss

    gpu_diffusion_loss.main(["--variants", *gpu_diffusion_loss.VARIANTS, "--shapes", "sdxl", "video", "--check-args"])
    assert "triton_cudagraph" in capsys.readouterr().out
    parsed = gpu_masked_loss.main(["--cases", *gpu_masked_loss.CASES, "--check-args"])
    assert parsed["cases"] == list(gpu_masked_loss.CASES)
