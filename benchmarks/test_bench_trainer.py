"""Train-step throughput and peak tensor memory: the tgo_fast trainer vs a diffusers-DPO-style loop (CPU, tiny SD1.5).

Both train the same tiny random-init SD1.5 UNet on the same batches with the TGO objective; they differ in the
machinery, which is what the trainer optimises:

* ``dpo_style`` — the issue's baseline: the loop of diffusers' ``train_diffusion_dpo.py`` (VAE + text-encoder
  forward on every step, the loss written out in PyTorch: two full (B, C, h, w) error tensors, the difference
  of their means, ``F.logsigmoid``; ``torch.optim.AdamW`` with its defaults) with full fine-tuning against a
  second full copy of the UNet, as the original Diffusion-DPO trains.
* ``dpo_style[lora]`` — the same loop as diffusers' script really runs it: LoRA adapters on the UNet (same rank
  and targets as the trainer), the reference is the UNet with ``disable_adapters()``. The like-for-like baseline
  of the trainer's LoRA variants.
* ``tgo_fast[...]`` — :class:`tgo_fast.trainer.Trainer` (DeepSpeed engine with the shipped CPU config's fused
  torch AdamW, world of one): cached latents / text embeddings, the library loss, and no second copy of the
  weights. ``precomputed``: full fine-tuning, reference errors stored by a pre-pass; ``lora``: LoRA adapters,
  the reference is the base model under disabled adapters (one no-grad forward per step);
  ``precomputed+lora``: LoRA adapters and the pre-pass reference (no reference forward at all).

Peak memory on CPU has no allocator counter, so it is measured as *live tensor bytes*: every tensor reachable
from Python (unique storages: weights, gradients, optimizer state, DeepSpeed buffers, encoders) plus the
activations autograd saved for backward, sampled at the end of forward and after backward, minus what was live
before the variant was built. ``make bench`` prints the table; on GPUs see ``benchmarks/gpu_trainer.py``.
"""
from __future__ import annotations

import copy
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

BATCH = 4
RESOLUTION = 32
NUM_SAMPLES = 8
TIMED_STEPS = 20
RESULTS: dict[str, dict[str, float]] = {}
VARIANTS = {"precomputed": {"ref_mode": "precomputed"}, "lora": {"ref_mode": "lora"},
            "precomputed+lora": {"ref_mode": "precomputed", "lora": True}}


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    from tgo_fast.trainer.distributed import world_of_one_session

    with world_of_one_session():
        yield


# ---------------------------------------------------------------------------------- memory accounting
def _storages(tensors) -> dict[int, int]:
    found = {}
    for tensor in tensors:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue
        if storage.device.type == "cpu" and storage.nbytes() > 0:
            found[storage.data_ptr()] = storage.nbytes()
    return found


def live_tensor_storages() -> dict[int, int]:
    gc.collect()
    return _storages(obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


class StepMemory:
    """Peak live tensor bytes of one training step: Python-reachable tensors + autograd's saved activations."""

    def __init__(self):
        self.saved: dict[int, int] = {}
        self.peak = 0

    def pack(self, tensor):
        self.saved.update(_storages([tensor]))
        return tensor

    def sample(self) -> None:
        live = live_tensor_storages()
        self.peak = max(self.peak, sum({**self.saved, **live}.values()))

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)


def _no_hooks():
    import contextlib

    return contextlib.nullcontext()


def _record(name: str, step, samples_per_step: int, baseline_bytes: int, memory: StepMemory, benchmark):
    """Median step time (the garbage collector off while timing, as ``timeit`` does: a full collection over the
    ~500k objects torch/diffusers/DeepSpeed keep alive would land in random steps) and peak tensor memory."""
    if not benchmark.disabled:  # check mode (CI): one timed step of each, no warm-up
        step()  # warm-up (first-call allocations, DeepSpeed's parameter trace)
    gc.collect()
    gc.disable()
    try:
        seconds = []
        for _ in range(1 if benchmark.disabled else TIMED_STEPS):
            started = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - started)
        if not benchmark.disabled:
            benchmark.pedantic(step, rounds=TIMED_STEPS, iterations=1)
    finally:
        gc.enable()
    step(memory)
    RESULTS[name] = {"samples_per_s": samples_per_step / statistics.median(seconds),
                     "peak_tensor_mib": (memory.peak - baseline_bytes) / 2**20}
    benchmark.extra_info.update(RESULTS[name])
    assert RESULTS[name]["peak_tensor_mib"] > 0


def _batches():
    from tgo_fast.data import ScoredImageDataset, collate_scored, synthetic_scored_dataset

    images = ScoredImageDataset(synthetic_scored_dataset(NUM_SAMPLES, resolution=64, seed=0), resolution=RESOLUTION)
    return [collate_scored([images[i] for i in range(start, start + BATCH)]) for start in range(0, NUM_SAMPLES, BATCH)]


# ---------------------------------------------------------------------------------- the baselines
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_style_loop(lora, benchmark):
    from tgo_fast.models import build_adapter
    from tgo_fast.threshold import confidence_weights, percentile_threshold, pseudo_labels

    batches = _batches()
    tau = percentile_threshold(torch.cat([b["score"] for b in batches]))
    baseline = sum(live_tensor_storages().values())
    adapter = build_adapter("sd15", None, resolution=RESOLUTION, tiny_seed=0)
    policy = adapter.backbone.train()
    if lora:  # diffusers' script: adapters on the UNet, the reference is the same UNet with them disabled
        from peft import LoraConfig

        policy.requires_grad_(False)
        policy.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                      target_modules=list(adapter.lora_target_modules)))
        reference = None
    else:
        reference = copy.deepcopy(policy).requires_grad_(False).eval()  # the second copy
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    beta, temperature, c = 1.0, 1e-3, 5.0
    state = {"i": 0}

    def reference_forward(encoded, inputs):
        if reference is not None:
            return adapter.forward(reference, encoded, inputs)
        policy.disable_adapters()
        try:
            return adapter.forward(policy, encoded, inputs)
        finally:
            policy.enable_adapters()

    def step(memory: StepMemory | None = None):
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        encoded = adapter.encode(batch["pixel_values"], batch["prompt"])  # VAE + CLIP on every step
        inputs = adapter.sample_inputs(encoded, batch["index"])
        with memory.hooks() if memory else _no_hooks():
            model_pred = adapter.forward(policy, encoded, inputs)
            with torch.no_grad():
                ref_pred = reference_forward(encoded, inputs)
            target = inputs["target"]
            model_losses = (model_pred.float() - target.float()).pow(2).mean(dim=[1, 2, 3])
            ref_losses = (ref_pred.float() - target.float()).pow(2).mean(dim=[1, 2, 3])
            implicit_score = -(beta / temperature) * (model_losses - ref_losses)
            labels = pseudo_labels(batch["score"], tau).float()
            weights = confidence_weights(batch["score"], tau, c).float()
            loss = (weights * -(labels * F.logsigmoid(implicit_score)
                                + (1 - labels) * F.logsigmoid(-implicit_score))).mean()
        if memory:
            memory.sample()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if memory:
            memory.sample()
        optimizer.zero_grad(set_to_none=True)

    _record("dpo_style[lora]" if lora else "dpo_style", step, BATCH, baseline, StepMemory(), benchmark)


# ------------------------------------------------------------------------------------ the trainer
def single_process_ds_config() -> dict:
    """The shipped CPU config (``configs/zero3_cpu.json``: torch AdamW, fused) at ZeRO stage 0: one process has
    nothing to shard (``make train`` runs it with ZeRO-3 on two ranks)."""
    config = json.loads((Path(__file__).resolve().parents[1] / "configs" / "zero3_cpu.json").read_text())
    config["zero_optimization"] = {"stage": 0}
    return config


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tgo_fast_trainer(variant, benchmark, tmp_path):
    from tgo_fast.trainer import TrainConfig, Trainer
    from tgo_fast.trainer.reference import SeparateReference

    gc.collect()
    baseline = sum(live_tensor_storages().values())
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), resolution=RESOLUTION,
                      builtin_num_samples=NUM_SAMPLES, train_batch_size=BATCH, max_steps=1, learning_rate=1e-5,
                      tensorboard=False, plots=False, export=False, **VARIANTS[variant])
    trainer = Trainer(cfg, single_process_ds_config())
    assert not isinstance(trainer.reference, SeparateReference)  # no second copy of the weights in either mode
    state = {"i": 0}

    def step(memory: StepMemory | None = None):
        indices = trainer.schedule.global_batch(state["i"] % trainer.schedule.steps_per_epoch)[0, 0].tolist()
        state["i"] += 1
        _train_step(trainer, trainer.collate([trainer.train_dataset[i] for i in indices]), memory)

    _record(f"tgo_fast[{variant}]", step, BATCH, baseline, StepMemory(), benchmark)
    del trainer
    gc.collect()


def _train_step(trainer, batch, memory: StepMemory | None = None):
    """One optimizer step of the trainer (forward, backward, DeepSpeed step), sampling memory around backward."""
    engine = trainer.engine
    original_backward = engine.backward

    def backward(loss):
        if memory:
            memory.sample()
        return original_backward(loss)

    engine.backward = backward
    try:
        with memory.hooks() if memory else _no_hooks():
            trainer.compute_loss(batch, epoch=0, backward=True)
        engine.step()
        if memory:
            memory.sample()
    finally:
        engine.backward = original_backward


def test_report():
    """The comparison table (``-s`` shows it); measured numbers only, no assertion on them. Each row against the
    DPO-style loop with a second UNet (the issue's baseline) and against the DPO-style loop that trains the same
    parameters (full weights, or LoRA adapters with the reference under disabled adapters)."""
    if not {"dpo_style", "dpo_style[lora]"} <= RESULTS.keys():
        pytest.skip("the measurements did not run")
    print(f"\n{'variant':<28}{'samples/s':>10}{'peak tensor MiB':>17}"
          f"{'vs dpo_style: speed, mem. saved':>33}{'vs same-parameter DPO: speed, saved':>37}")
    for name, row in RESULTS.items():
        like = RESULTS["dpo_style[lora]" if "lora" in name else "dpo_style"]
        columns = []
        for base in (RESULTS["dpo_style"], like):
            speed = row["samples_per_s"] / base["samples_per_s"]
            columns.append(f"{speed:>.2f}x, {1 - row['peak_tensor_mib'] / base['peak_tensor_mib']:>+4.0%}")
        print(f"{name:<28}{row['samples_per_s']:>10.2f}{row['peak_tensor_mib']:>17.2f}{columns[0]:>33}{columns[1]:>37}")


def test_gpu_script_runs_every_variant(tmp_path):
    """``benchmarks/gpu_trainer.py`` on its tiny configs (CPU): every variant takes a step and is reported, with
    both comparisons, in the JSON, Markdown and PNG it writes."""
    script = Path(__file__).with_name("gpu_trainer.py")
    subprocess.run([sys.executable, str(script), "--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0",
                    "--out", str(tmp_path)], check=True, capture_output=True, timeout=600)
    result = json.loads((tmp_path / "trainer_cpu_tiny.json").read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["dpo_style", "dpo_style_lora", "tgo_separate", "tgo_lora", "tgo_precomputed",
                          "tgo_precomputed_lora"]
    assert all(row["samples_per_s"] > 0 and row["step_s"] > 0 for row in rows.values())
    for name, row in rows.items():
        assert row["vs_dpo_style"]["speedup"] == pytest.approx(row["samples_per_s"] / rows["dpo_style"]["samples_per_s"])
        like = rows["dpo_style_lora" if "lora" in name else "dpo_style"]
        assert row["vs_same_parameter_dpo"]["speedup"] == pytest.approx(row["samples_per_s"] / like["samples_per_s"])
    assert {"torch", "diffusers", "peft", "date"} <= result.keys()
    assert (tmp_path / "trainer_cpu_tiny.md").read_text().count("\n| ") == 7  # the header and six rows
    assert (tmp_path / "trainer_cpu_tiny.png").stat().st_size > 0
