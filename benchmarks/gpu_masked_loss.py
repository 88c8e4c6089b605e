"""Benchmark of the fused linear + masked cross-entropy TGO loss (masked-token models: aMUSEd / Meissonic).

Forward + backward of one training step's loss from hidden states and the output head, for
  * fused (Triton)          ``tgo_fused_linear_masked_loss(impl="triton")``: chunked, gradients in forward (GPU only)
  * fused (Triton) compiled the same step under ``torch.compile(fullgraph=True)`` (one graph around the custom op)
  * fused (Triton) CUDA graph  the same step captured once in a CUDA graph and replayed (no host work per step)
  * fused (Triton) bf16 logits ``logits_dtype=torch.bfloat16``: each chunk's logits in bf16 (half the chunk memory)
  * fused (torch)           the same chunked algorithm with the PyTorch per-chunk step (what CPUs run)
  * fused (torch) compact   ``compact_rows=True``: the masked rows only (one device→host sync per op call)
  * fused two-pass          the schedule that recomputes logits in backward (Triton step on GPU, torch on CPU)
  * full logits             logits = hidden·Wᵀ + b materialised, then the readable ``tgo_masked_loss``
  * full logits (compile)   ``torch.compile`` of the full-logits math (``logprob_from_logits`` + ``tgo_objective``)
  * Liger fused KTO         ``liger_kernel``'s ``LigerFusedLinearKTOLoss`` (average_log_prob=True), the closest
                            existing fused unpaired-preference loss, on the same inputs (GPU, when importable)
with the median time and the peak memory of one step above what was allocated before it (inputs, weights).
Peak memory is ``torch.cuda.max_memory_allocated`` on GPU; on CPU it is the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs) with glibc's mmap threshold fixed at 64 KiB so that freed
buffers leave the resident set — every byte counted was really resident, allocator and library temporaries
included.

    python benchmarks/gpu_masked_loss.py                          # GPU: Meissonic shape, bf16
    python benchmarks/gpu_masked_loss.py --device cpu             # CPU shape, fp32
    python benchmarks/gpu_masked_loss.py --device cpu --no-time --no-plot   # peak memory only (the suite's check)

Writes ``benchmarks/results/masked_loss_<device>.json`` and ``.png``. The case definitions are shared with
``test_bench_masked_loss.py`` (pytest-benchmark).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from plotting import bar_panels

SHAPES = {  # (batch, masked-sequence length, hidden width, codebook + special tokens)
    "meissonic": dict(batch=8, length=4096, width=1024, vocab=8256),
    "cpu": dict(batch=2, length=1024, width=256, vocab=8256),
}
MASK_RATIO = 0.6
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CASES = ("fused_triton", "fused_triton_compile", "fused_triton_cudagraph", "fused_triton_bf16_logits", "fused_torch",
         "fused_torch_compact", "fused_two_pass", "full_logits", "full_logits_compile", "liger_fused_kto")
GPU_ONLY = ("fused_triton", "fused_triton_compile", "fused_triton_cudagraph", "fused_triton_bf16_logits",
            "liger_fused_kto")


def make_inputs(shape: dict, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """hidden (B, L, H) and head weight (V, H) / bias (V,) as leaves, targets with ~60% masked, scores, ref_logp."""
    generator = torch.Generator(device=device).manual_seed(seed)
    batch, length, width, vocab = shape["batch"], shape["length"], shape["width"], shape["vocab"]

    def randn(*size, scale=1.0):
        return (scale * torch.randn(*size, device=device, generator=generator)).to(dtype)

    targets = torch.randint(0, vocab, (batch, length), device=device, generator=generator)
    masked = torch.rand(batch, length, device=device, generator=generator) < MASK_RATIO
    masked[:, 0] = True
    targets[~masked] = -100
    scores = torch.randn(batch, device=device, generator=generator)
    return dict(
        hidden=randn(batch, length, width).requires_grad_(),
        weight=randn(vocab, width, scale=width**-0.5).requires_grad_(),
        bias=randn(vocab, scale=0.1).requires_grad_(),
        targets=targets,
        scores=scores,
        threshold=float(scores.median()),
        ref_logp=-torch.log(torch.tensor(float(vocab))) - torch.rand(batch, device=device, generator=generator),
    )


def loss_function(case: str, device: str):
    """inputs dict → loss (a scalar to backpropagate) for one case, TGO defaults (β = 1, c = 5)."""
    from tgo_fast.kernels.fused_linear_masked_loss import fused_linear_masked_loss

    from tgo_fast.loss import logprob_from_logits, tgo_fused_linear_masked_loss, tgo_masked_loss, tgo_objective

    if case in ("fused_triton", "fused_torch", "fused_torch_compact", "fused_triton_cudagraph",
                "fused_triton_bf16_logits"):
        impl = "torch" if case.startswith("fused_torch") else "triton"
        logits_dtype = torch.bfloat16 if case == "fused_triton_bf16_logits" else torch.float32
        return lambda x: tgo_fused_linear_masked_loss(
            x["hidden"], x["weight"], x["targets"], x["scores"], x["threshold"], bias=x["bias"],
            ref_logp=x["ref_logp"], impl=impl, logits_dtype=logits_dtype, compact_rows=case == "fused_torch_compact",
        )
    if case == "fused_triton_compile":
        torch._dynamo.reset()
        compiled = torch.compile(tgo_fused_linear_masked_loss, fullgraph=True, dynamic=False)
        return lambda x: compiled(x["hidden"], x["weight"], x["targets"], x["scores"], x["threshold"], bias=x["bias"],
                                  ref_logp=x["ref_logp"], impl="triton")
    if case == "fused_two_pass":
        return lambda x: fused_linear_masked_loss(
            x["hidden"], x["weight"], x["targets"], x["scores"], x["threshold"], bias=x["bias"],
            ref_logp=x["ref_logp"], use_triton=device == "cuda", schedule="two_pass",
        )
    if case == "full_logits":  # the head as the model runs it (input dtype), then the reference loss
        return lambda x: tgo_masked_loss(
            torch.nn.functional.linear(x["hidden"], x["weight"], x["bias"]), None, x["targets"], x["scores"],
            x["threshold"], ref_logp=x["ref_logp"],
        )
    if case == "full_logits_compile":  # the reference math alone, compiled
        def full_logits_math(hidden, weight, bias, targets, scores, threshold, ref_logp):
            logp = logprob_from_logits(torch.nn.functional.linear(hidden, weight, bias), targets)
            return tgo_objective(logp - ref_logp, scores, threshold, 5.0, "mean")[0]

        torch._dynamo.reset()
        compiled = torch.compile(full_logits_math, dynamic=False)
        return lambda x: compiled(x["hidden"], x["weight"], x["bias"], x["targets"], x["scores"], x["threshold"],
                                  x["ref_logp"])
    if case == "liger_fused_kto":
        from liger_kernel.chunked_loss import LigerFusedLinearKTOLoss

        kto = LigerFusedLinearKTOLoss(beta=1.0, average_log_prob=True, use_ref_model=False)

        def liger_loss(x):
            labels = x["scores"] >= x["threshold"]
            output = kto(x["hidden"], x["weight"], x["targets"], bias=x["bias"], preference_labels=labels)
            return output[0] if isinstance(output, tuple) else output

        return liger_loss
    raise ValueError(f"case must be one of {CASES}, got {case!r}")


def available_cases(device: str) -> list[str]:
    cases = [c for c in CASES if device == "cuda" or c not in GPU_ONLY]
    if "liger_fused_kto" in cases:
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except ImportError:
            cases.remove("liger_fused_kto")
    return cases


def step_function(loss_of, inputs: dict, device: str, cudagraph: bool = False):
    """One forward + backward; the gradients are dropped at the end, so every step allocates them afresh
    (and the memory in use before a step holds none). With ``cudagraph``: the replay of the step captured once
    (its gradients live in the graph's own buffers, as in a CUDA-graphed training step)."""
    leaves = [inputs["hidden"], inputs["weight"], inputs["bias"]]
    if cudagraph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the capture: Triton JIT, cuBLAS, the allocator
            loss_of(inputs).backward()
        torch.cuda.current_stream().wait_stream(side)
        for leaf in leaves:
            leaf.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = loss_of(inputs)
            static_loss.backward()

        def replay():
            graph.replay()
            torch.cuda.synchronize()
            return static_loss.detach()

        return replay

    def step():
        loss = loss_of(inputs)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        for leaf in leaves:
            leaf.grad = None
        return loss.detach()

    return step


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def fix_cpu_allocator() -> None:
    """glibc: serve every block ≥ 64 KiB by mmap and return it on free, so the resident set follows live memory."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixing it also stops its dynamic growth)


def peak_memory_bytes(step, device: str) -> int:
    """Peak memory of one step above what was in use before it (see the module docstring)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - before
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    step()
    return (_kib("VmHWM") - before) * 1024


def run(shape_name: str, dtype: torch.dtype, device: str, cases, repeats: int, measure_time: bool) -> list[dict]:
    """Peak memory of each case, then times: triton's do_bench per case on GPU; on CPU `repeats` rounds
    that step every case in turn (a busy shared CPU then slows all cases alike), median per case."""
    inputs = make_inputs(SHAPES[shape_name], dtype, device)
    steps, rows = {}, {}
    for case in cases:
        steps[case] = step_function(loss_function(case, device), inputs, device,
                                    cudagraph=case == "fused_triton_cudagraph")
        steps[case]()  # warm up: Triton JIT, torch.compile, allocator, thread pools
        rows[case] = {"case": case, "peak_bytes": peak_memory_bytes(steps[case], device)}
    if measure_time and device == "cuda":
        from triton.testing import do_bench

        for case in cases:
            rows[case]["fwd_bwd_ms"] = do_bench(steps[case], return_mode="median")
    elif measure_time:
        times = {case: [] for case in cases}
        for _ in range(repeats):
            for case in cases:
                start = time.perf_counter()
                steps[case]()
                times[case].append((time.perf_counter() - start) * 1e3)
        for case in cases:
            rows[case]["fwd_bwd_ms"] = statistics.median(times[case])
    for row in rows.values():
        print(json.dumps(row), file=sys.stderr, flush=True)
    return list(rows.values())


def _cpu_name() -> str:
    found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return f"{found.group(1).strip() if found else platform.machine()}, {torch.get_num_threads()} threads"


def plot(rows: list[dict], title: str, path: Path) -> None:
    panels = [("peak memory of one step (MiB)", [row["peak_bytes"] / 2**20 for row in rows], "%.1f")]
    if all("fwd_bwd_ms" in row for row in rows):
        panels.insert(0, ("forward + backward (ms, median)", [row["fwd_bwd_ms"] for row in rows], "%.1f"))
    names = [row["case"] for row in rows]
    bar_panels(names, panels, ["tab:green" if n.startswith("fused") else "tab:gray" for n in names], title, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--shape", choices=list(SHAPES), help="default: meissonic on cuda, cpu on cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--cases", nargs="+", choices=CASES, help="default: every case available here")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds on CPU (GPU: triton do_bench)")
    parser.add_argument("--no-time", action="store_true", help="peak memory only")
    parser.add_argument("--no-plot", action="store_true", help="JSON only")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--check-args", action="store_true", help="parse the arguments, print them and exit")
    args = parser.parse_args(argv)
    if args.check_args:
        print(vars(args))
        return vars(args)

    device = args.device
    shape_name = args.shape or ("meissonic" if device == "cuda" else "cpu")
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    if device == "cpu":
        fix_cpu_allocator()
    cases = args.cases or available_cases(device)
    rows = run(shape_name, dtype, device, cases, args.repeats, not args.no_time)

    by_case = {row["case"]: row for row in rows}
    summary = {}
    if "full_logits" in by_case:
        reference = by_case["full_logits"]
        for row in rows:
            summary[row["case"]] = {"peak_memory_reduction_vs_full_logits": 1 - row["peak_bytes"] / reference["peak_bytes"]}
            if "fwd_bwd_ms" in row:
                summary[row["case"]]["speedup_vs_full_logits"] = reference["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    for case in ("fused_triton", "fused_triton_compile", "fused_triton_cudagraph", "fused_triton_bf16_logits"):
        if "liger_fused_kto" in by_case and case in by_case and "fwd_bwd_ms" in by_case[case]:
            summary.setdefault(case, {})["speedup_vs_liger_fused_kto"] = (
                by_case["liger_fused_kto"]["fwd_bwd_ms"] / by_case[case]["fwd_bwd_ms"]
            )
    device_name = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
    slug = re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_") if device == "cuda" else "cpu"
    result = {
        "device": device_name, "torch": torch.__version__, "shape": {"name": shape_name, **SHAPES[shape_name]},
        "mask_ratio": MASK_RATIO, "dtype": dtype_name, "threads": torch.get_num_threads(),
        "peak_memory_method": "torch.cuda.max_memory_allocated" if device == "cuda"
        else "VmHWM − VmRSS (clear_refs reset), glibc mmap threshold 64 KiB",
        "rows": rows, "summary": summary,
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"masked_loss_{slug}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_plot:
        plot(rows, f"fused masked TGO loss, {shape_name} {dtype_name}, {device_name}", stem.with_suffix(".png"))
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main()
