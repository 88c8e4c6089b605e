"""pytest-benchmark suite of the fused linear + masked cross-entropy TGO loss, forward + backward.

    pytest benchmarks/test_bench_masked_loss.py                      # timings
    pytest benchmarks/test_bench_masked_loss.py --benchmark-disable  # CI: every row runs once

Shape: B=2, L=1024, H=256, V=8256 on CPU (~60% masked; the Meissonic shape on CUDA). Rows: the fused op
(PyTorch chunked step, all rows or the masked rows only (compact_rows); on CUDA the Triton kernel too: eager,
compiled, CUDA-graphed, bf16 logits), its two-pass schedule, the full-logits reference,
and torch.compile of the full-logits math (CUDA only here: its first compile takes ~35 s on a 2-core CPU;
``benchmarks/gpu_masked_loss.py --device cpu`` runs it). The peak-memory check runs the script in a
subprocess (peak resident set on CPU, see its docstring) and asserts the ≥ 80% reduction.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gpu_masked_loss import CASES, SHAPES, available_cases, loss_function, make_inputs, step_function

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPE = "meissonic" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32


@pytest.fixture(scope="module")
def expected_loss():
    """The full-logits reference loss of the benchmark inputs (seed 0), computed once."""
    inputs = make_inputs(SHAPES[SHAPE], DTYPE, DEVICE)
    with torch.no_grad():
        return loss_function("full_logits", DEVICE)(inputs).item()


@pytest.mark.parametrize("case", list(CASES))
def test_masked_loss_forward_backward(benchmark, case, expected_loss):
    if case not in available_cases(DEVICE):
        pytest.skip(f"{case} needs a GPU (and liger_kernel for liger_fused_kto)")
    if case == "full_logits_compile" and not CUDA:
        pytest.skip("torch.compile's first compile takes ~35 s on this CPU: run benchmarks/gpu_masked_loss.py")
    inputs = make_inputs(SHAPES[SHAPE], DTYPE, DEVICE)
    loss_of = loss_function(case, DEVICE)
    step = step_function(loss_of, inputs, DEVICE, cudagraph=case == "fused_triton_cudagraph")
    if CUDA:
        step()  # warm up: Triton JIT, torch.compile, the caching allocator
    benchmark.extra_info.update(case=case, device=DEVICE, dtype=str(DTYPE), **SHAPES[SHAPE])
    loss = benchmark(step)

    if case != "liger_fused_kto":  # Liger's KTO is a different objective on the same inputs
        tolerance = 1e-2 if DTYPE == torch.bfloat16 else 1e-5
        assert abs(loss.item() - expected_loss) <= tolerance * abs(expected_loss)
    else:
        assert torch.isfinite(loss)


def test_peak_memory_fused_vs_full_logits(tmp_path):
    """The fused op's peak memory for one step is ≥ 80% below the full-logits reference (both schedules, all rows
    or the masked rows only)."""
    script = Path(__file__).with_name("gpu_masked_loss.py")
    cases = ["fused_torch", "fused_torch_compact", "fused_two_pass", "full_logits"] + (["fused_triton"] if CUDA else [])
    subprocess.run(
        [sys.executable, str(script), "--device", DEVICE, "--no-time", "--no-plot", "--out-dir", str(tmp_path), "--cases", *cases],
        check=True, capture_output=True,
    )
    result = json.loads(next(tmp_path.glob("masked_loss_*.json")).read_text())
    reduction = {case: value["peak_memory_reduction_vs_full_logits"] for case, value in result["summary"].items()}
    print(json.dumps({row["case"]: row["peak_bytes"] for row in result["rows"]}))
    for case in (c for c in cases if c != "full_logits"):
        assert reduction[case] >= 0.8, (case, reduction[case])
