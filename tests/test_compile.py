"""The losses inside compiled and captured training steps (issue 11).

- torch.compile(fullgraph=True) of a whole training step — forward, backward and an SGD update — with each loss
  and each implementation (the Triton kernels run under the interpreter on CPU): one graph, no recompilation, and
  the same losses and parameters as the eager step. ``Tensor.backward`` is traced with dynamo's
  ``trace_autograd_ops``; the update is written out because ``torch.optim``'s ``step`` inserts graph breaks of its
  own (torch/optim/optimizer.py, ``_use_grad``).
- torch.library.opcheck of every custom op (schema, fake tensors, autograd registration, AOT dispatch).
- On CUDA (skipped without a GPU): no device→host synchronisation with default arguments
  (``torch.cuda.set_sync_debug_mode("error")``), CUDA-graph capture and replay of a training step, and the
  Triton path compiled by inductor.
"""
import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from tgo_fast.kernels import diffusion_loss as diffusion_kernel
from tgo_fast.kernels import fused_linear_masked_loss as masked_kernel
from tgo_fast.loss import TGOLoss, masked_token_logprob, tgo_diffusion_loss, tgo_fused_linear_masked_loss, tgo_masked_loss

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
LEARNING_RATE = 1e-2
IGNORE = -100


class DiffusionModel(torch.nn.Module):
    """features (B, 16) → a prediction (B, 2, 12) for the diffusion losses."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(16, 24)

    def forward(self, features):
        return self.net(features).view(-1, 2, 12)


class MaskedModel(torch.nn.Module):
    """tokens (B, L, 8) → hidden (B, L, 8) → logits (B, L, 37) through a Linear head."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 37)


def diffusion_batch(batch=4):
    features = torch.randn(batch, 16, device=DEVICE)
    target = torch.randn(batch, 2, 12, device=DEVICE)
    ref_pred = target + 0.5 * torch.randn_like(target)
    return dict(features=features, ref_pred=ref_pred, target=target, scores=torch.rand(batch, device=DEVICE),
                ref_error=torch.rand(batch, device=DEVICE))


def masked_batch(batch=3, length=5):
    targets = torch.randint(0, 37, (batch, length), device=DEVICE)
    masked = torch.rand(batch, length, device=DEVICE) < 0.6
    masked[:, 0] = True
    return dict(tokens=torch.randn(batch, length, 8, device=DEVICE), targets=targets.masked_fill(~masked, IGNORE),
                scores=torch.rand(batch, device=DEVICE), ref_logp=-torch.rand(batch, device=DEVICE) - 3.0)


# Each case: (model class, batch builder, loss of (model, batch)); τ = 0.5, T = 1 keeps ŝ unsaturated.
def diffusion_loss(impl):
    def loss_of(model, batch):
        return tgo_diffusion_loss(model(batch["features"]), batch["ref_pred"], batch["target"], batch["scores"], 0.5,
                                  temperature=1.0, impl=impl)
    return DiffusionModel, diffusion_batch, loss_of


def diffusion_precomputed_loss(impl):
    def loss_of(model, batch):
        return tgo_diffusion_loss(model(batch["features"]), None, batch["target"], batch["scores"], 0.5,
                                  temperature=1.0, ref_error=batch["ref_error"], impl=impl)
    return DiffusionModel, diffusion_batch, loss_of


def module_loss(impl):
    loss_fn = TGOLoss(0.5, temperature=1.0, impl=impl).to(DEVICE)  # τ: the module's fp64 buffer

    def loss_of(model, batch):
        return loss_fn(model(batch["features"]), batch["ref_pred"], batch["target"], batch["scores"])
    return DiffusionModel, diffusion_batch, loss_of


def masked_logits_loss(impl):
    def loss_of(model, batch):
        logits = model.head(model.trunk(batch["tokens"]))
        return tgo_masked_loss(logits, None, batch["targets"], batch["scores"], 0.5, ref_logp=batch["ref_logp"],
                               impl=impl)
    return MaskedModel, masked_batch, loss_of


def fused_loss(impl, reduction="mean"):
    def loss_of(model, batch):
        loss = tgo_fused_linear_masked_loss(
            model.trunk(batch["tokens"]), model.head.weight, batch["targets"], batch["scores"], 0.5,
            bias=model.head.bias, ref_logp=batch["ref_logp"], reduction=reduction, impl=impl, chunk_rows=4)
        return loss if reduction != "none" else (loss * torch.linspace(0.5, 1.5, len(loss), device=DEVICE)).sum()
    return MaskedModel, masked_batch, loss_of


CASES = {
    "diffusion": diffusion_loss,
    "diffusion_ref_error": diffusion_precomputed_loss,
    "diffusion_module_tau_buffer": module_loss,
    "masked_logits": masked_logits_loss,
    "fused_single_pass": fused_loss,
    "fused_two_pass": lambda impl: fused_loss(impl, reduction="none"),
}
IMPLS = ["torch", "triton"]


def sgd_step(model, batch, loss_of):
    """One training step: forward, backward, p ← p − lr·∂L/∂p (torch.optim's step breaks graphs itself)."""
    loss = loss_of(model, batch)
    loss.backward()
    with torch.no_grad():
        for param in model.parameters():
            param.sub_(LEARNING_RATE * param.grad)
            param.grad = None
    return loss.detach()


def assert_same_training(eager_model, other_model, losses, other_losses):
    for loss, other in zip(losses, other_losses):
        torch.testing.assert_close(other, loss, rtol=1e-5, atol=1e-6)
    for (name, param), other in zip(eager_model.named_parameters(), other_model.parameters()):
        torch.testing.assert_close(other, param, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_training_step_compiles_to_one_graph(case, impl):
    model_class, make_batch, loss_of = CASES[case](impl)
    torch.manual_seed(0)
    model = model_class().to(DEVICE)
    compiled_model = copy.deepcopy(model)
    batches = [make_batch() for _ in range(2)]
    eager_losses = [sgd_step(model, batch, loss_of) for batch in batches]

    compiled_losses = compile_and_run(sgd_step, "aot_eager", compiled_model, batches, loss_of)
    assert_same_training(model, compiled_model, eager_losses, compiled_losses)


def compile_and_run(step, backend, model, batches, loss_of):
    """Run step on each batch compiled with fullgraph=True (a graph break is an error) and the second batch with
    recompilation an error; dynamo's graph-break counter must stay empty and the backend must have been called."""
    counter = CompileCounterWithBackend(backend)
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    losses = []
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        losses.append(compiled(model, batches[0], loss_of))
        with torch._dynamo.config.patch(error_on_recompile=True):
            losses.extend(compiled(model, batch, loss_of) for batch in batches[1:])
    graph_breaks = dict(torch._dynamo.utils.counters["graph_break"])
    torch._dynamo.reset()
    assert counter.frame_count >= 1 and not graph_breaks, graph_breaks
    return losses


def test_compiled_loss_checks_values_on_device():
    """Inside a compiled graph the value checks are device asserts: a NaN score still fails, with the message."""
    _, _, loss_of = diffusion_loss("torch")
    model, batch = DiffusionModel().to(DEVICE), diffusion_batch()
    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
    compiled(model, batch)
    batch["scores"][1] = float("nan")
    with pytest.raises(RuntimeError, match="scores must be finite"):
        compiled(model, batch)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------- opcheck
def _diffusion_op_samples():
    pred = torch.randn(3, 2, 5, device=DEVICE, requires_grad=True)
    target, ref = torch.randn(3, 2, 5, device=DEVICE), torch.randn(3, 2, 5, device=DEVICE)
    scores, tau = torch.rand(3, device=DEVICE), torch.tensor(0.5, dtype=torch.float64, device=DEVICE)
    return [
        (pred, ref, target, None, scores, None, 0.5, 1.0, 0.5, 5.0, "mean"),
        (pred, None, target, torch.rand(3, device=DEVICE), scores, tau, 0.0, 2.0, 1.0, 3.0, "none"),
        (pred.detach().bfloat16().requires_grad_(), ref.bfloat16(), target.bfloat16(), None, scores.double(), tau,
         0.0, 1.0, 0.5, 0.0, "sum"),
    ]


def _masked_op_inputs(dtype=torch.float32):
    batch = masked_batch()
    hidden = batch["tokens"].to(dtype).requires_grad_()
    weight = torch.randn(37, 8, device=DEVICE, dtype=dtype, requires_grad=True)
    bias = torch.randn(37, device=DEVICE, dtype=dtype, requires_grad=True)
    return hidden, weight, bias, batch


@pytest.mark.parametrize("use_triton", [False, True])
def test_opcheck_masked_ops(use_triton):
    hidden, weight, bias, batch = _masked_op_inputs()
    targets, scores, ref_logp = batch["targets"], batch["scores"], batch["ref_logp"]
    tau = torch.tensor(0.5, dtype=torch.float64, device=DEVICE)
    for compact_rows in (False, True):
        torch.library.opcheck(masked_kernel.masked_token_logprob_op,
                              (hidden, weight, bias, targets, IGNORE, use_triton, 4, torch.float32, compact_rows))
        torch.library.opcheck(masked_kernel.masked_token_logprob_op,
                              (hidden, weight.detach(), None, targets, IGNORE, use_triton, 64, torch.bfloat16,
                               compact_rows))
        grad_logp = torch.rand(3, device=DEVICE)
        torch.library.opcheck(masked_kernel.masked_token_logprob_backward_op,
                              (grad_logp, hidden.detach(), weight.detach(), bias.detach(), targets, IGNORE, use_triton,
                               4, torch.float32, compact_rows, True, True, False))
        for threshold, threshold_value, reduction in ((None, 0.5, "mean"), (tau, 0.0, "sum")):
            torch.library.opcheck(masked_kernel.fused_linear_masked_tgo_op,
                                  (hidden, weight, bias, targets, ref_logp, scores, threshold, threshold_value, 1.5,
                                   3.0, reduction, IGNORE, use_triton, 5, torch.float32, compact_rows,
                                   True, True, True))


def test_opcheck_logits_ops():
    batch = masked_batch()
    logits = torch.randn(3, 5, 37, device=DEVICE, requires_grad=True)
    torch.library.opcheck(masked_kernel.logits_token_logprob_op, (logits, batch["targets"], IGNORE))
    torch.library.opcheck(masked_kernel.logits_token_logprob_op,
                          (logits.detach().bfloat16().requires_grad_(), batch["targets"], IGNORE))
    torch.library.opcheck(masked_kernel.logits_token_logprob_backward_op,
                          (torch.rand(3, device=DEVICE), logits.detach(), batch["targets"], IGNORE))


def test_opcheck_diffusion_ops():
    for args in _diffusion_op_samples():
        torch.library.opcheck(diffusion_kernel.diffusion_loss_op, args)
    pred = torch.randn(2, 3, 4, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    coef = torch.randn(2, device=DEVICE)
    for grad_loss in (torch.tensor(0.7, device=DEVICE), torch.rand(2, device=DEVICE)):
        torch.library.opcheck(diffusion_kernel.diffusion_loss_backward_op,
                              (pred, torch.randn(2, 3, 4, 5, device=DEVICE), coef, grad_loss))


def test_threshold_as_a_tensor_matches_the_float():
    """τ as a 0-d tensor (fp64 or fp32) gives the float's loss and labels on every path."""
    pred_batch, masked = diffusion_batch(), masked_batch()
    logits = torch.randn(3, 5, 37, device=DEVICE)
    hidden, weight = torch.randn(3, 5, 8, device=DEVICE), torch.randn(37, 8, device=DEVICE)
    pred = torch.randn(4, 2, 12, device=DEVICE)
    for impl in IMPLS:
        calls = {
            "diffusion": lambda tau: tgo_diffusion_loss(pred, pred_batch["ref_pred"], pred_batch["target"],
                                                        pred_batch["scores"], tau, temperature=1.0, impl=impl,
                                                        return_stats=True),
            "masked": lambda tau: tgo_masked_loss(logits, None, masked["targets"], masked["scores"], tau,
                                                  ref_logp=masked["ref_logp"], impl=impl, return_stats=True),
            "fused": lambda tau: tgo_fused_linear_masked_loss(hidden, weight, masked["targets"], masked["scores"], tau,
                                                              ref_logp=masked["ref_logp"], impl=impl,
                                                              return_stats=True),
        }
        for name, call in calls.items():
            scores = pred_batch["scores"] if name == "diffusion" else masked["scores"]
            tau = float(scores.median())
            expected_loss, expected = call(tau)
            for as_tensor in (torch.tensor(tau, dtype=torch.float64), torch.tensor(tau, dtype=torch.float32)):
                loss, stats = call(as_tensor.to(DEVICE))
                assert torch.equal(stats["labels"], expected["labels"]), (impl, name)
                torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------- CUDA
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _cuda_cases():
    return [(case, impl) for case in CASES for impl in ("triton", "torch")]


@needs_cuda
@pytest.mark.parametrize("case, impl", _cuda_cases())
def test_no_device_to_host_sync_with_default_arguments(case, impl):
    model_class, make_batch, loss_of = CASES[case](impl)
    model, batch = model_class().to(DEVICE), make_batch()
    sgd_step(model, batch, loss_of)  # first call: Triton JIT, lazy CUDA set-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sgd_step(model, batch, loss_of)
        if model_class is MaskedModel:  # the reference model's log-probs too
            with torch.no_grad():
                masked_token_logprob(batch["tokens"], model.head.weight, batch["targets"], bias=model.head.bias)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("case, impl", _cuda_cases())
def test_cuda_graph_captures_a_training_step(case, impl):
    model_class, make_batch, loss_of = CASES[case](impl)
    torch.manual_seed(0)
    model = model_class().to(DEVICE)
    graphed_model = copy.deepcopy(model)
    batches = [make_batch() for _ in range(3)]
    eager_losses = [sgd_step(model, batch, loss_of) for batch in batches]

    static_batch = {key: value.clone() for key, value in batches[0].items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a copy, off the capture: Triton JIT, cuBLAS, the allocator
        sgd_step(copy.deepcopy(graphed_model), static_batch, loss_of)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records the step without running it: the parameters are still the initial ones
        static_loss = sgd_step(graphed_model, static_batch, loss_of)
    graphed_losses = []
    for batch in batches:
        for key, value in batch.items():
            static_batch[key].copy_(value)
        graph.replay()
        graphed_losses.append(static_loss.clone())
    assert_same_training(model, graphed_model, eager_losses, graphed_losses)


@needs_cuda
@pytest.mark.parametrize("case", list(CASES))
def test_triton_path_compiles_with_inductor(case):
    model_class, make_batch, loss_of = CASES[case]("triton")
    torch.manual_seed(0)
    model = model_class().to(DEVICE)
    compiled_model = copy.deepcopy(model)
    batches = [make_batch() for _ in range(2)]
    eager_losses = [sgd_step(model, batch, loss_of) for batch in batches]
    compiled_losses = compile_and_run(sgd_step, "inductor", compiled_model, batches, loss_of)
    assert_same_training(model, compiled_model, eager_losses, compiled_losses)
