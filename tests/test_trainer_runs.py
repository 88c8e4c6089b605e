"""The trainer in this process as a DeepSpeed world of one (ZeRO-3 on CPU, gloo): every model family, every
reference mode, every loss, the encoding cache, exports and the errors for bad set-ups."""
import dataclasses
import json
import os

import numpy as np
import PIL.Image
import pytest
import torch

from tgo_fast.trainer import TrainConfig
from tgo_fast.trainer.config import load_config
from tgo_fast.trainer.distributed import world_of_one_session
from tgo_fast.trainer.reference import PrecomputedReference, SeparateReference

pytestmark = pytest.mark.slow

DS_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "zero3_cpu.json")
VALIDATION_PROMPTS = ["a large red circle at the center on a blue background",
                      "a small blue square at the left on a white background"]
# Smallest resolutions the tiny models accept, to keep CPU steps short.
RESOLUTION = {"sd15": 32, "sdxl": 32, "flux": 32, "amused": None, "meissonic": None}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One encoding cache for the module; the process group is torn down and the environment restored after."""
    with world_of_one_session():
        yield tmp_path_factory.mktemp("encodings")


def make_config(tmp_path, cache_dir, **overrides) -> TrainConfig:
    model = overrides.get("model", "sd15")
    values = dict(
        output_dir=str(tmp_path / "run"), cache_dir=str(cache_dir), builtin_num_samples=16, train_batch_size=4,
        max_steps=1, resolution=RESOLUTION[model], validation_prompts=VALIDATION_PROMPTS[:1], validation_inference_steps=1,
        tensorboard=False, plots=False, seed=int(torch.randint(0, 1000, ()).item()),
    )
    values.update(overrides)
    return TrainConfig(**values)


def build(cfg):
    from tgo_fast.trainer import Trainer

    return Trainer(cfg, DS_CONFIG)


def first_micro_batch(trainer):
    indices = trainer.schedule.global_batch(0)[0, 0].tolist()
    return trainer.collate([trainer.train_dataset[i] for i in indices])


def backbone_state(trainer):
    state = trainer._state_dict()
    return {k: v.clone() for k, v in state.items()}


@pytest.mark.parametrize("model", ["sd15", "amused"])
def test_reference_modes_agree_at_step_zero_then_train(model, tmp_path, cache_dir):
    """separate / lora / precomputed / precomputed with LoRA training (and, for sd15, no cache) give the same
    step-0 loss and reference values for the same seeds; each then takes an optimizer step and exports (full
    weights, or LoRA weights)."""
    seed = int(torch.randint(0, 1000, ()).item())
    modes = [("separate", True, False), ("lora", True, False), ("precomputed", True, False),
             ("precomputed", True, True)] + ([("separate", False, False)] if model == "sd15" else [])
    reference_key = "reference_error" if model == "sd15" else "reference_logp"
    results = {}
    for ref_mode, cached, lora in modes:
        cfg = make_config(tmp_path / f"{ref_mode}-{cached}-{lora}", cache_dir, model=model, ref_mode=ref_mode,
                          seed=seed, cache_encodings=cached, lora=lora)
        trainer = build(cfg)
        trainable = [n for n, p in trainer.engine.module.named_parameters() if p.requires_grad]
        assert all("lora_" in n for n in trainable) == cfg.trains_lora
        loss, stats = trainer.compute_loss(first_micro_batch(trainer), epoch=0, backward=False)
        results[(ref_mode, cached, lora)] = (loss, stats)
        before = backbone_state(trainer)
        rows = trainer.train()
        assert len(rows) == 1 and torch.isfinite(torch.tensor(rows[0]["loss"]))
        after = backbone_state(trainer)
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed, f"{ref_mode}: the optimizer step changed no weight"
        if cfg.trains_lora:
            assert all("lora_" in k for k in changed)
            _check_lora_export(trainer)
        else:
            _check_full_export(trainer, after)
    # π_θ = π_ref at step 0: ŝ = 0 up to the CPU kernels' run-to-run rounding (~1e-8 in Δ, ×β/T = 1000), while a
    # different noise / timestep / mask draw would move ŝ by O(1) and the loss by O(0.1)
    loss0, stats0 = results[("separate", True, False)]
    for key, (loss, stats) in results.items():
        assert stats["implicit_score"].abs().max() < 1e-3, key
        torch.testing.assert_close(loss, loss0, rtol=0, atol=1e-4, msg=f"{key}: step-0 loss")
        torch.testing.assert_close(stats[reference_key], stats0[reference_key], rtol=1e-5, atol=1e-6,
                                   msg=f"{key}: step-0 reference values")
        torch.testing.assert_close(stats["labels"], stats0["labels"])


def _check_full_export(trainer, state):
    backbone = trainer.adapter.backbone
    subfolder = "unet" if trainer.adapter.name in ("sd15", "sdxl") else "transformer"
    loaded = type(backbone).from_pretrained(trainer.run_dir / "final" / subfolder)
    loaded_state = loaded.state_dict()
    assert set(loaded_state) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded_state[key], value), key
    if trainer.adapter.name in ("sd15", "sdxl", "flux"):  # final/ is the whole pipeline
        from diffusers import DiffusionPipeline

        pipeline = DiffusionPipeline.from_pretrained(trainer.run_dir / "final")
        assert type(pipeline) is type(trainer.adapter.build_pipeline())


def _check_lora_export(trainer):
    from safetensors.torch import load_file

    lora_dir = trainer.run_dir / "final" / "lora"
    weights = load_file(lora_dir / "pytorch_lora_weights.safetensors")
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert json.loads((lora_dir / "lora_config.json").read_text())["r"] == trainer.cfg.lora_rank
    if trainer.adapter.name == "sd15":  # final/ is the pipeline with the LoRA merged into its UNet
        from diffusers import DiffusionPipeline

        from tgo_fast.trainer.export import merge_lora

        unet = DiffusionPipeline.from_pretrained(trainer.run_dir / "final").unet
        merged = merge_lora(backbone_state(trainer), trainer.lora_config)
        for key, value in unet.state_dict().items():
            torch.testing.assert_close(value, merged[key], msg=key)
    if trainer.adapter.name == "sd15":  # diffusers' own loader takes it
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_config(trainer.adapter.backbone.config)
        unet.load_lora_adapter(str(lora_dir), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
        loaded = {k: v for k, v in unet.state_dict().items() if "lora_B" in k}
        assert loaded and any(v.abs().sum() > 0 for v in loaded.values())


@pytest.mark.parametrize("loss_name, ref_mode", [("sft", "separate"), ("kto", "separate"), ("kto", "precomputed")])
def test_baseline_losses_train(loss_name, ref_mode, tmp_path, cache_dir):
    cfg = make_config(tmp_path, cache_dir, loss=loss_name, ref_mode=ref_mode, max_steps=2, export=False,
                      gradient_checkpointing=loss_name == "sft", plots=True)
    trainer = build(cfg)
    if loss_name == "sft":
        assert trainer.reference is None
    else:
        assert type(trainer.reference) is {"separate": SeparateReference, "precomputed": PrecomputedReference}[ref_mode]
    if ref_mode == "precomputed" and loss_name != "sft":
        assert trainer.reference.table.shape == (trainer.num_samples,)
    before = backbone_state(trainer)
    rows = trainer.train()
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert ("accuracy" in rows[0]) == (loss_name == "kto")
    after = backbone_state(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (trainer.run_dir / "plots" / "training_curves.png").is_file()
    assert (trainer.run_dir / "samples" / "step_000002.png").is_file()


@pytest.mark.parametrize("model", ["sdxl", "flux", "meissonic"])
def test_other_families_train_and_export(model, tmp_path, cache_dir):
    cfg = make_config(tmp_path, cache_dir, model=model)
    trainer = build(cfg)
    rows = trainer.train()
    assert len(rows) == 1 and rows[0]["implicit_score_mean"] == pytest.approx(0.0, abs=1e-5)
    _check_full_export(trainer, backbone_state(trainer))
    threshold = json.loads((trainer.run_dir / "threshold.json").read_text())
    assert threshold["n"] == 16 and threshold["min"] <= threshold["tau"] <= threshold["max"]


def test_threshold_file_and_reused_cache(tmp_path, cache_dir):
    tau = 0.55 + 0.1 * float(torch.rand(()))
    path = tmp_path / "tau.json"
    path.write_text(json.dumps({"tau": tau}))
    cfg = make_config(tmp_path, cache_dir, threshold_file=str(path))
    chunks = sorted(p for p in cache_dir.rglob("chunk_*.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in chunks}
    trainer = build(cfg)
    assert trainer.tau == tau
    written = json.loads((trainer.run_dir / "threshold.json").read_text())
    assert written["tau"] == tau and written["source"].startswith("threshold_file")
    assert written["positive_fraction"] == pytest.approx(float((trainer.scores >= tau).double().mean()))
    assert chunks and all(p.stat().st_mtime_ns == stamps[p] for p in chunks)  # sd15 encodings reused


@pytest.mark.parametrize("model", ["sd15", "amused"])
def test_threshold_reestimated_on_a_fresh_proxy_set(model, tmp_path, cache_dir):
    """After π_ref ← π_θ at the end of epoch 0 the trainer generates ``proxy_size`` images for training prompts,
    scores them with the reward and uses their percentile as τ from then on; a resumed run keeps that τ (and a
    checkpoint written by another number of ranks is refused)."""
    from tgo_fast.rewards import synthetic_reward
    from tgo_fast.threshold import percentile_threshold

    cfg = make_config(tmp_path, cache_dir, model=model, ref_mode="precomputed", ref_update="epoch",
                      threshold_update="proxy", reward="builtin", proxy_size=5, proxy_inference_steps=1,
                      percentile=40.0, max_steps=5, save_interval=4, export=False,
                      validation_prompts=VALIDATION_PROMPTS)
    trainer = build(cfg)
    calls, validation_calls = [], []

    def recording_reward(images, prompts):
        scores = synthetic_reward(images, prompts)
        (validation_calls if prompts == VALIDATION_PROMPTS else calls).append((images, prompts, scores))
        return scores

    trainer.reward = recording_reward
    rows = trainer.train()
    # the validation images are scored before training and at the end: validation_reward is their mean
    assert len(validation_calls) == 2
    assert rows[-1]["validation_reward"] == pytest.approx(float(validation_calls[-1][2].mean()))
    first = json.loads((trainer.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first == {"step": 0, "validation_reward": pytest.approx(float(validation_calls[0][2].mean()))}
    prompts = [p for _, batch, _ in calls for p in batch]
    scores = torch.cat([torch.as_tensor(s, dtype=torch.float64) for *_, s in calls])
    assert len(prompts) == 5 and set(prompts) <= set(trainer.proxy_prompts)
    side = trainer.adapter.resolution
    assert all(image.size == (side, side) for images, *_ in calls for image in images)
    proxy_tau = percentile_threshold(scores, 40.0)
    assert [r["tau"] for r in rows] == [trainer.initial_threshold.tau] * 4 + [proxy_tau]
    written = json.loads((trainer.run_dir / "thresholds" / "epoch_0000.json").read_text())
    assert written["tau"] == proxy_tau and written["n"] == 5 and written["p"] == 40.0
    assert json.loads((trainer.run_dir / "threshold.json").read_text())["tau"] == trainer.initial_threshold.tau
    assert PIL.Image.open(trainer.run_dir / "samples" / "step_000005.png").size == (2 * side, side)  # one row

    resumed = build(dataclasses.replace(cfg, resume_from="latest", max_steps=6))
    assert resumed.start_step == 4 and resumed.tau == proxy_tau
    assert resumed.initial_threshold.tau == trainer.initial_threshold.tau

    checkpoint = trainer.ckpt_dir / "step_000004"
    (checkpoint / "rng_state_rank1.pt").write_bytes((checkpoint / "rng_state_rank0.pt").read_bytes())
    with pytest.raises(ValueError, match="written by 2 rank.*this run has 1.*resume with 2 rank"):
        build(dataclasses.replace(cfg, resume_from="latest"))


def test_bad_setups_are_clear_errors(tmp_path, cache_dir):
    with pytest.raises(ValueError, match="pretrained='/nonexistent/model': no such directory"):
        build(make_config(tmp_path, cache_dir, pretrained="/nonexistent/model"))
    with pytest.raises(ValueError, match="not in the Hugging Face cache and HF_HUB_OFFLINE=1"):
        build(make_config(tmp_path, cache_dir, pretrained="tgo-fast-tests/no-such-model"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        build(make_config(tmp_path, cache_dir, data=str(empty)))
    with pytest.raises(ValueError, match="train_batch_size=6 is not a multiple"):
        build(make_config(tmp_path, cache_dir, train_batch_size=6, micro_batch_size=4))
    with pytest.raises(ValueError, match="fewer than train_batch_size"):
        build(make_config(tmp_path, cache_dir, builtin_num_samples=4, train_batch_size=8))
    with pytest.raises(ValueError, match="fp16.*not supported on CPU"):
        build(make_config(tmp_path, cache_dir, precision="fp16"))
    with pytest.raises(ValueError, match="resume_from='latest': no checkpoint"):
        build(make_config(tmp_path, cache_dir, resume_from="latest"))
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, {"ref_modes": "lora"})
    proxy = dict(ref_update="epoch", threshold_update="proxy")
    with pytest.raises(ValueError, match="tgo_fast_no_such_module"):  # a reward that cannot be loaded fails first
        build(make_config(tmp_path, cache_dir, reward="tgo_fast_no_such_module:score", **proxy))
    own_prompts = tmp_path / "own_prompts.jsonl"
    PIL.Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "red.png")
    own_prompts.write_text("".join(json.dumps({"prompt": f"a photo of a cat {i}", "image": "red.png", "score": i / 8})
                                   + "\n" for i in range(8)))
    with pytest.raises(ValueError, match="synthetic_reward: prompt 'a photo of a cat 0' does not parse"):
        build(make_config(tmp_path, cache_dir, data=str(own_prompts), reward="builtin", **proxy))


def test_streamed_data_fills_the_cache_like_the_map_style_set(tmp_path, cache_dir):
    rows = []
    for i in range(12):
        colour = tuple(int(v) for v in torch.randint(0, 256, (3,)))
        PIL.Image.new("RGB", (40, 40), colour).save(tmp_path / f"{i}.png")
        rows.append({"prompt": f"a plain square number {i}", "image": f"{i}.png", "score": float(torch.rand(()))})
    data = tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    results = []
    for streaming in (False, True):
        cfg = make_config(tmp_path / f"stream-{streaming}", cache_dir, data=str(data), streaming=streaming, seed=3)
        trainer = build(cfg)
        assert trainer.num_samples == 12
        batch = first_micro_batch(trainer)
        results.append((batch, trainer.compute_loss(batch, epoch=0, backward=False)[0], trainer.tau))
    (map_batch, map_loss, map_tau), (stream_batch, stream_loss, stream_tau) = results
    assert map_tau == stream_tau and torch.equal(map_batch["index"], stream_batch["index"])
    for key, value in map_batch["encoded"].items():
        torch.testing.assert_close(stream_batch["encoded"][key], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stream_loss, map_loss, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="streaming=true needs cache_encodings=true"):
        make_config(tmp_path, cache_dir, data=str(data), streaming=True, cache_encodings=False)


# ---------------------------------------------------------------------------------------------- Algorithm 1
def test_algorithm_1_generate_score_train_evaluate(tmp_path, cache_dir):
    """The main job's chain on a small budget: π_ref samples for training prompts → built-in scores → τ + TGO
    (ZeRO-3, a world of one) on that scored file → base vs policy on held-out prompts; the summary is recomputed
    here from samples.jsonl by hand (means, medians, std, win rate with ties ½)."""
    from tgo_fast.pipeline import ModelSource, evaluate, generate, load_prompts, score, trained_run
    from tgo_fast.pipeline.prompts import builtin_prompts
    from tgo_fast.pipeline.shards import read_jsonl

    sd15, steps, prompts = ModelSource("sd15", None, resolution=32), 2, builtin_prompts("heldout")[:2]
    train_prompts = load_prompts("builtin:train", num_prompts=4)
    generate(sd15, train_prompts, tmp_path / "proxy", images_per_prompt=2, num_inference_steps=steps)
    scored = score(tmp_path / "proxy" / "manifest.jsonl", "builtin", tmp_path / "proxy" / "scored.jsonl")
    cfg = make_config(tmp_path, cache_dir, data=str(tmp_path / "proxy" / "scored.jsonl"), max_steps=2,
                      learning_rate=1e-3, reward="builtin", validation_inference_steps=steps, seed=0)
    rows = build(cfg).train()
    threshold = json.loads((tmp_path / "run" / "threshold.json").read_text())
    assert threshold["tau"] == pytest.approx(float(np.median([r["score"] for r in scored])))
    assert threshold["n"] == 8 and len(rows) == 2 and "validation_reward" in rows[-1]

    summary = evaluate(trained_run(tmp_path / "run"), prompts, tmp_path / "eval", images_per_prompt=2,
                       num_inference_steps=steps, rewards=["builtin"])
    samples = read_jsonl(tmp_path / "eval" / "samples.jsonl")
    pairs = {}
    for sample in samples:
        pairs.setdefault((sample["prompt"], sample["seed"]), {})[sample["model"]] = sample["rewards"]["builtin"]
    base = np.array([p["base"] for p in pairs.values()])
    policy = np.array([p["policy"] for p in pairs.values()])
    entry = summary["rewards"]["builtin"]
    assert summary["n"] == len(pairs) == 4
    for name, values in (("base", base), ("policy", policy)):
        assert entry[name] == {"mean": pytest.approx(values.mean()), "median": pytest.approx(np.median(values)),
                               "std": pytest.approx(values.std())}
    assert entry["win_rate"] == pytest.approx(np.mean((policy > base) + 0.5 * (policy == base)))
    assert not np.array_equal(base, policy)  # the trained policy draws other images than its base
