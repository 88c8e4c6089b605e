"""GPU benchmark of the diffusion TGO loss: fused Triton kernel vs the PyTorch reference vs torch.compile(reference).

Variants (forward + backward of the loss on the same pred, ref, target, scores, τ):
  triton           ``tgo_diffusion_loss(impl="triton")`` (the custom op ``tgo_fast::diffusion_loss``), eager
  triton_direct    the kernel entry without the dispatcher's input validation
  triton_compile   the same step under ``torch.compile(fullgraph=True)`` (one graph around the custom op)
  triton_cudagraph the same step captured once in a CUDA graph and replayed (no host work per step)
  torch            ``tgo_diffusion_loss(impl="torch")``, the library's PyTorch reference
  compile          ``torch.compile`` of that reference
  inline           the loss as a user writes it inline (difference of two means, no checks)
  inline_compile   ``torch.compile`` of the inline loss (issue 11's baseline: ≥ 1.5× at SDXL / video bf16)

One device run measures
  * the copy bandwidth (``dst.copy_(src)``) at 1 GiB (the roofline) and at each benchmark's traffic,
  * forward + backward median times (``triton.testing.do_bench``, L2 flushed between runs) of every variant,
    fp32 and bf16, at the SD1.5 / SDXL / FLUX / video shapes, with the peak memory of one step,
  * the forward alone, and the cost of the torch epilogue (``tgo_objective`` on (B,)) the kernel replaces,
  * a B·D > 2^31 correctness check (int64 offsets) and a small launch-shape sweep,
and writes ``benchmarks/results/diffusion_loss_<gpu>.json``, ``.md`` (the README table) and ``.png``.

    python benchmarks/gpu_diffusion_loss.py                 # everything (minutes: compile rows compile)
    python benchmarks/gpu_diffusion_loss.py --no-compile --shapes flux video
    python benchmarks/gpu_diffusion_loss.py --variants triton triton_cudagraph inline inline_compile

The shape and variant definitions here are shared with ``test_bench_diffusion_loss.py`` (pytest-benchmark).
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tgo_fast.loss import tgo_diffusion_loss, tgo_objective

SHAPES = {
    "sd15": (8, 4, 64, 64),
    "sdxl": (8, 4, 128, 128),
    "flux": (4, 4096, 64),
    "video": (1, 16, 21, 60, 104),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = ("triton", "triton_direct", "triton_compile", "triton_cudagraph", "torch", "compile", "inline",
            "inline_compile")
COMPILED_VARIANTS = ("triton_compile", "compile", "inline_compile")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def make_inputs(shape, dtype, device):
    """pred (leaf, requires grad), ref, target of ``shape``; scores (B,); τ their median."""
    generator = torch.Generator(device=device).manual_seed(0)
    target = torch.randn(shape, device=device, dtype=dtype, generator=generator)
    pred = (target + 0.5 * torch.randn(shape, device=device, dtype=dtype, generator=generator)).requires_grad_(True)
    ref = target + 0.5 * torch.randn(shape, device=device, dtype=dtype, generator=generator)
    scores = torch.randn(shape[0], device=device, generator=generator)
    return pred, ref, target, scores, float(scores.median())


def inline_reference(pred, ref, target, scores, threshold, beta=1.0, temperature=1e-3, c=5.0):
    """The TGO diffusion loss as a user writes it inline (paper Appendix H: difference of the two means)."""
    dims = tuple(range(1, pred.dim()))
    policy_error = (pred.float() - target.float()).square().mean(dims)
    reference_error = (ref.float() - target.float()).square().mean(dims)
    implicit_score = (beta / temperature) * (reference_error - policy_error)
    labels = (scores >= threshold).float()
    weights = 1 + c * (scores - threshold).abs()
    return (weights * F.softplus((1 - 2 * labels) * implicit_score)).mean()


def loss_function(variant):
    """(pred, ref, target, scores, τ) → loss for one variant, all with the paper's defaults (the CUDA-graphed
    variant is the triton loss; ``step_function`` captures it)."""
    if variant in ("triton", "triton_cudagraph"):
        return functools.partial(tgo_diffusion_loss, impl="triton")
    if variant == "triton_compile":
        torch._dynamo.reset()
        return torch.compile(functools.partial(tgo_diffusion_loss, impl="triton"), fullgraph=True, dynamic=False)
    if variant == "inline":
        return inline_reference
    if variant == "inline_compile":
        torch._dynamo.reset()
        return torch.compile(inline_reference, dynamic=False)
    if variant == "torch":
        return functools.partial(tgo_diffusion_loss, impl="torch")
    if variant == "compile":  # what a user gets by compiling the library's reference (one graph, checks on device)
        torch._dynamo.reset()  # a fresh static compile per row: no recompile limit, no dynamic-shape fallback
        return torch.compile(functools.partial(tgo_diffusion_loss, impl="torch"), dynamic=False)
    if variant == "triton_direct":  # the kernel entry without the dispatcher's input validation
        from tgo_fast.kernels.diffusion_loss import tgo_diffusion_loss_triton

        return functools.partial(tgo_diffusion_loss_triton, beta=1.0, temperature=1e-3, c=5.0, reduction="mean",
                                 ref_error=None, return_stats=False)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def traffic_bytes(shape, dtype, backward=True):
    """Minimum HBM traffic: forward reads pred, ref, target; backward reads pred, target and writes grad."""
    elements = torch.Size(shape).numel()
    size = torch.empty((), dtype=dtype).element_size()
    return elements * size * (6 if backward else 3)


def _device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")


def copy_bandwidth(num_bytes: int) -> float:
    """GB/s of a device-to-device copy moving ``num_bytes`` in total (half read, half written)."""
    from triton.testing import do_bench

    src = torch.empty(max(1, num_bytes // 2), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def peak_memory(step) -> int:
    """Peak bytes allocated during one step (inputs included: they are allocated before)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def step_function(variant, pred, ref, target, scores, threshold):
    """One forward + backward of ``variant``; for "triton_cudagraph" the replay of a captured step (its
    gradient lands in the graph's own buffer, which is what a CUDA-graphed training step does)."""
    fn = loss_function(variant)

    def step():
        fn(pred, ref, target, scores, threshold).backward()

    if variant != "triton_cudagraph":
        return step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture: Triton JIT, the allocator
        step()
    torch.cuda.current_stream().wait_stream(side)
    pred.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def bench_row(variant, shape_name, dtype_name, roofline_gbs):
    from triton.testing import do_bench

    shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    pred, ref, target, scores, threshold = make_inputs(shape, dtype, "cuda")
    fn = loss_function(variant)
    step = step_function(variant, pred, ref, target, scores, threshold)

    def forward():
        with torch.no_grad():
            fn(pred, ref, target, scores, threshold)

    step()  # compile / warm up
    if variant != "triton_cudagraph":
        pred.grad = None
    inputs_bytes = 3 * pred.numel() * pred.element_size()
    peak = peak_memory(step)
    pred.grad = None
    ms = do_bench(step, grad_to_none=None if variant == "triton_cudagraph" else [pred], return_mode="median")
    forward_ms = do_bench(forward, return_mode="median")
    moved = traffic_bytes(shape, dtype)
    row = {
        "variant": variant, "shape": shape_name, "dims": list(shape), "dtype": dtype_name,
        "fwd_bwd_us": ms * 1e3, "fwd_us": forward_ms * 1e3,
        "traffic_bytes": moved, "achieved_gbs": moved / (ms * 1e-3) / 1e9,
        "peak_bytes": peak, "inputs_plus_grad_bytes": inputs_bytes + pred.numel() * pred.element_size(),
    }
    row["roofline_pct"] = 100 * row["achieved_gbs"] / roofline_gbs
    del pred, ref, target
    torch.cuda.empty_cache()
    return row


def torch_epilogue_us(batch: int) -> float:
    """Forward + backward of the torch per-sample TGO objective on (B,) ŝ: what the Triton epilogue replaces."""
    from triton.testing import do_bench

    implicit_score = torch.randn(batch, device="cuda", requires_grad=True)
    scores = torch.randn(batch, device="cuda")

    def step():
        tgo_objective(implicit_score, scores, 0.0, 5.0, "mean")[0].backward()

    return do_bench(step, grad_to_none=[implicit_score], return_mode="median") * 1e3


def check_int64_offsets(batch=33, dim=2**26):
    """B·D > 2^31 elements in bf16 (~18 GB): per-sample errors and the gradient against fp32 torch, row by row."""
    from tgo_fast.kernels.diffusion_loss import tgo_diffusion_loss_triton

    generator = torch.Generator(device="cuda").manual_seed(1)
    target = torch.randn(batch, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    pred = torch.randn(batch, dim, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_(True)
    ref = torch.randn(batch, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    scores = torch.randn(batch, device="cuda", generator=generator)
    loss, stats = tgo_diffusion_loss_triton(pred, ref, target, scores, 0.0, beta=1.0, temperature=1.0, c=5.0,
                                            reduction="sum", ref_error=None, return_stats=True)
    loss.backward()
    worst = {"policy_error": 0.0, "reference_error": 0.0, "grad": 0.0}
    for i in (0, batch // 2, batch - 1):  # the last rows lie beyond 2^31 elements
        p, r, t = pred[i].detach().float(), ref[i].float(), target[i].float()
        e_policy, e_ref = (p - t).square().mean(), (r - t).square().mean()
        worst["policy_error"] = max(worst["policy_error"], float((stats["policy_error"][i] / e_policy - 1).abs()))
        worst["reference_error"] = max(worst["reference_error"], float((stats["reference_error"][i] / e_ref - 1).abs()))
        s_hat = e_ref - e_policy
        label = float(scores[i] >= 0)
        weight = 1 + 5.0 * scores[i].abs()
        expected_grad = weight * (torch.sigmoid(s_hat) - label) * (-2.0 / dim) * (p - t)
        error = (pred.grad[i].float() - expected_grad).norm() / expected_grad.norm()
        worst["grad"] = max(worst["grad"], float(error))
    del pred, ref, target
    torch.cuda.empty_cache()
    return {"batch": batch, "dim": dim, "elements": batch * dim, "max_rel_error": worst,
            "passed": worst["policy_error"] < 1e-3 and worst["reference_error"] < 1e-3 and worst["grad"] < 1e-2}


def sweep_launch_shapes(shape_names, max_blocks=(1024, 4096, 8192), programs_per_sm=(2, 4, 8, 16)):
    """fwd+bwd time of the kernel entry (bf16) over the module's launch knobs; restores them afterwards."""
    from triton.testing import do_bench

    import tgo_fast.kernels.diffusion_loss as kernel

    saved = kernel.GPU_MAX_BLOCK, kernel.PROGRAMS_PER_SM
    rows = []
    try:
        for shape_name in shape_names:
            pred, ref, target, scores, threshold = make_inputs(SHAPES[shape_name], torch.bfloat16, "cuda")
            fn = loss_function("triton_direct")
            for max_block in max_blocks:
                for per_sm in programs_per_sm:
                    kernel.GPU_MAX_BLOCK, kernel.PROGRAMS_PER_SM = max_block, per_sm
                    config = kernel.launch_config(pred.shape[0], pred[0].numel(), pred.device)
                    ms = do_bench(lambda: fn(pred, ref, target, scores, threshold).backward(), grad_to_none=[pred],
                                  return_mode="median")
                    rows.append({"shape": shape_name, "max_block": max_block, "programs_per_sm": per_sm,
                                 "config": vars(config), "fwd_bwd_us": ms * 1e3})
    finally:
        kernel.GPU_MAX_BLOCK, kernel.PROGRAMS_PER_SM = saved
    return rows


def markdown_table(rows, source) -> str:
    by_key = {(r["shape"], r["dtype"], r["variant"]): r for r in rows}
    lines = [
        "| shape | dtype | Triton µs | GB/s (% of copy) | reference µs | compile µs | × reference | × compile | "
        "peak / (inputs + grad) | CUDA graph µs | × inline | × compile(inline) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (shape, dtype, variant), row in by_key.items():
        if variant != "triton":
            continue
        reference, compiled = by_key.get((shape, dtype, "torch")), by_key.get((shape, dtype, "compile"))
        lines.append(
            f"| {shape} {tuple(row['dims'])} | {dtype} | {row['fwd_bwd_us']:.1f} | {row['achieved_gbs']:.0f} "
            f"({row['roofline_pct']:.0f}%) | " + (f"{reference['fwd_bwd_us']:.1f}" if reference else "–") + " | "
            + (f"{compiled['fwd_bwd_us']:.1f}" if compiled else "–")
            + " | " + (f"{reference['fwd_bwd_us'] / row['fwd_bwd_us']:.1f}×" if reference else "–") + " | "
            + (f"{compiled['fwd_bwd_us'] / row['fwd_bwd_us']:.1f}×" if compiled else "–")
            + f" | {row['peak_bytes'] / row['inputs_plus_grad_bytes']:.2f} | "
            + " | ".join(_ratio_cells(by_key, shape, dtype, row)) + " |"
        )
    return "\n".join(lines) + f"\n\nSource: `{source}` (forward + backward, median of `triton.testing.do_bench`).\n"


def _ratio_cells(by_key, shape, dtype, row):
    """CUDA-graph time, and the speed-ups over the inline loss and its compiled form ("–" where not run)."""
    graphed = by_key.get((shape, dtype, "triton_cudagraph"))
    cells = [f"{graphed['fwd_bwd_us']:.1f}" if graphed else "–"]
    for baseline in ("inline", "inline_compile"):
        base = by_key.get((shape, dtype, baseline))
        cells.append(f"{base['fwd_bwd_us'] / row['fwd_bwd_us']:.1f}×" if base else "–")
    return cells


def plot(rows, roofline_gbs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    triton_rows = [r for r in rows if r["variant"] == "triton"]
    labels = [f"{r['shape']}\n{r['dtype']}" for r in triton_rows]
    positions = range(len(triton_rows))
    figure, (bandwidth_axis, speedup_axis) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(VARIANTS)
    for k, variant in enumerate(VARIANTS):
        values = [next((r["achieved_gbs"] for r in rows if r["variant"] == variant and r["shape"] == t["shape"]
                        and r["dtype"] == t["dtype"]), 0.0) for t in triton_rows]
        bandwidth_axis.bar([p + k * width for p in positions], values, width, label=variant)
    bandwidth_axis.axhline(roofline_gbs, color="black", linestyle="--", label="copy (1 GiB)")
    bandwidth_axis.axhline(0.85 * roofline_gbs, color="gray", linestyle=":", label="85% of copy")
    bandwidth_axis.set_xticks([p + 0.4 - width / 2 for p in positions], labels)
    bandwidth_axis.set_ylabel("achieved GB/s (forward + backward)")
    bandwidth_axis.legend(fontsize=8)
    for k, baseline in enumerate(("torch", "compile")):
        speedups = []
        for t in triton_rows:
            base = next((r for r in rows if r["variant"] == baseline and r["shape"] == t["shape"]
                         and r["dtype"] == t["dtype"]), None)
            speedups.append(base["fwd_bwd_us"] / t["fwd_bwd_us"] if base else 0.0)
        speedup_axis.bar([p + k * 0.4 for p in positions], speedups, 0.4, label=f"vs {baseline}")
    speedup_axis.axhline(1.0, color="black", linewidth=0.8)
    speedup_axis.set_xticks([p + 0.2 for p in positions], labels)
    speedup_axis.set_ylabel("speed-up of the Triton kernel")
    speedup_axis.legend(fontsize=8)
    figure.suptitle(f"TGO diffusion loss, {torch.cuda.get_device_name()}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (slow to compile)")
    parser.add_argument("--no-large", action="store_true", help="skip the B·D > 2^31 check (needs ~18 GB)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch-shape sweep")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--check-args", action="store_true", help="parse the arguments, print them and exit")
    args = parser.parse_args(argv)
    if args.check_args:
        print(vars(args))
        return
    if not torch.cuda.is_available():
        raise SystemExit("gpu_diffusion_loss.py needs a CUDA device (the pytest-benchmark suite runs on CPU)")

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"diffusion_loss_{_device_slug()}"
    import triton

    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "timing": "triton.testing.do_bench median, L2 flushed; forward + backward unless noted",
    }
    roofline = copy_bandwidth(2**30)
    result["copy_gbs_1GiB"] = roofline
    print(f"copy bandwidth (1 GiB): {roofline:.0f} GB/s")
    variants = [v for v in args.variants if not (args.no_compile and v in COMPILED_VARIANTS)]
    rows = []
    for shape_name in args.shapes:
        for dtype_name in args.dtypes:
            same_size_copy = copy_bandwidth(traffic_bytes(SHAPES[shape_name], DTYPES[dtype_name]))
            for variant in variants:
                row = bench_row(variant, shape_name, dtype_name, roofline)
                row["copy_gbs_same_bytes"] = same_size_copy
                rows.append(row)
                print(f"{shape_name:6s} {dtype_name} {variant:14s} {row['fwd_bwd_us']:9.1f} µs "
                      f"{row['achieved_gbs']:7.0f} GB/s ({row['roofline_pct']:.0f}% of copy, "
                      f"same-size copy {same_size_copy:.0f} GB/s) peak {row['peak_bytes'] / 2**20:.0f} MiB")
            result["rows"] = rows
            stem.with_suffix(".json").write_text(json.dumps(result, indent=2))  # keep partial results
    result["torch_epilogue_us"] = {str(b): torch_epilogue_us(b) for b in (8, 512)}
    print("torch epilogue (fwd+bwd, B=8 / 512):", result["torch_epilogue_us"])
    if not args.no_sweep:
        result["launch_sweep"] = sweep_launch_shapes([s for s in ("flux", "video") if s in args.shapes])
        best = min(result["launch_sweep"], key=lambda r: r["fwd_bwd_us"], default=None)
        print("fastest launch shape:", best)
    if not args.no_large:
        result["int64_offsets"] = check_int64_offsets()
        print("B·D > 2^31 check:", result["int64_offsets"])
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    relative = stem.relative_to(Path(__file__).resolve().parent.parent) if stem.is_relative_to(
        Path(__file__).resolve().parent.parent) else stem
    stem.with_suffix(".md").write_text(markdown_table(rows, f"{relative}.json"))
    plot(rows, roofline, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())
    print(f"wrote {stem}.json / .md / .png")


if __name__ == "__main__":
    main()
