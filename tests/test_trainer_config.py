"""Trainer pieces that need no DeepSpeed engine: run config, DeepSpeed-config merge, data order, per-sample
seeds, encoding cache, objectives, metrics and plots."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from tgo_fast.loss import tgo_diffusion_loss
from tgo_fast.trainer.batches import EncodingCache, StepSchedule, encoding_cache_key, sample_seeds
from tgo_fast.trainer.config import (FIELD_NAMES, MODEL_OPTIONS, MODELS, TrainConfig, batch_layout, load_config,
                                     merge_deepspeed_config, parse_args, reference_deepspeed_config)
from tgo_fast.trainer.objectives import diffusion_objective, kto_loss, masked_objective
from tgo_fast.trainer.tracking import MetricsWriter, plot_score_histogram, plot_training_curves, read_metrics
from tgo_fast.trainer.trainer import precompute_layout

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# ------------------------------------------------------------------------------------- run config
MAIN_JOB_KEYS = {"pretrained", "resolution", "data", "max_steps", "train_batch_size", "learning_rate", "lr_warmup_steps",
                 "beta", "reward", "eval_interval", "validation_prompts", "validation_images_per_prompt",
                 "validation_inference_steps", "validation_guidance_scale"}


def test_tiny_yamls_list_every_key_and_differ_from_the_defaults_only_in_the_main_job():
    """tiny.yaml lists every key; it departs from the defaults
    (the fast tests' random-init model on the built-in scored set) only where the main job does; tiny_masked.yaml
    is the same job for the masked base, with its own β and batch (docs/main-job)."""
    tiny = load_config(CONFIGS / "tiny.yaml")
    assert set(yaml.safe_load((CONFIGS / "tiny.yaml").read_text())) == set(FIELD_NAMES)
    changed = {f.name for f in dataclasses.fields(TrainConfig) if getattr(tiny, f.name) != getattr(TrainConfig(), f.name)}
    assert changed == MAIN_JOB_KEYS
    assert tiny.pretrained == "builtin" and tiny.data == "runs/tiny/proxy/scored.jsonl" and tiny.reward == "builtin"
    masked = load_config(CONFIGS / "tiny_masked.yaml")
    changed = {f.name for f in dataclasses.fields(TrainConfig) if getattr(masked, f.name) != getattr(tiny, f.name)}
    # ŝ sums 64 tokens (β); AmusedPipeline samples half as fast, so the job keeps batch 32 to fit its budget
    assert changed == {"model", "data", "output_dir", "validation_inference_steps", "beta", "train_batch_size"}
    assert masked.data.startswith(masked.output_dir + "/")


# A family yaml is its model's recipe: these keys always, the family's own options where useful, and any other key
# only where it departs from TrainConfig's default (the complete list of keys is tiny.yaml's).
RECIPE_KEYS = {"model", "pretrained", "resolution", "data", "output_dir", "max_steps", "train_batch_size",
               "micro_batch_size", "learning_rate", "lr_scheduler", "lr_warmup_steps", "precision", "loss", "beta",
               "c", "percentile", "ref_mode", "eval_interval", "save_interval", "validation_prompts",
               "validation_inference_steps"}
RESTATED_DEFAULTS = {"temperature"}  # the paper's T = 1e-3, stated beside its β, c and p


@pytest.mark.parametrize("family", MODELS)
def test_family_yamls_are_recipes_over_the_defaults(family):
    raw = yaml.safe_load((CONFIGS / f"{family}.yaml").read_text())
    cfg = load_config(CONFIGS / f"{family}.yaml")
    assert cfg.model == family and cfg.pretrained is not None
    assert cfg.train_batch_size % cfg.micro_batch_size == 0
    assert RECIPE_KEYS <= set(raw), sorted(RECIPE_KEYS - set(raw))
    restated = {key for key in set(raw) - RECIPE_KEYS - RESTATED_DEFAULTS
                if family not in MODEL_OPTIONS.get(key, ()) and getattr(cfg, key) == getattr(TrainConfig(), key)}
    assert not restated, f"{family}.yaml restates defaults outside its recipe: {sorted(restated)}"


@pytest.mark.parametrize("name", ["zero3_cpu.json", "zero3_gpu_bf16.json", "zero2.json"])
def test_shipped_deepspeed_configs_merge(name):
    world = 2 if name == "zero3_cpu.json" else 8
    cfg = TrainConfig(train_batch_size=16, micro_batch_size=1, precision="auto")
    ds = merge_deepspeed_config(CONFIGS / name, cfg, world, cpu=name == "zero3_cpu.json")
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["gradient_accumulation_steps"] == 16 // world
    assert ds["optimizer"]["params"]["lr"] == cfg.learning_rate
    assert "auto" not in json.dumps(ds)
    assert ds["bf16"]["enabled"] == (name == "zero3_gpu_bf16.json")
    if name == "zero3_cpu.json":
        assert ds["optimizer"]["params"]["torch_adam"] is True and ds["zero_optimization"]["stage"] == 3
    ref = reference_deepspeed_config(ds)
    assert "optimizer" not in ref
    assert ref["zero_optimization"]["stage"] == (3 if "zero3" in name else 0)


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: sd15\nlearning_rat: 1e-5\n")
    with pytest.raises(ValueError, match=r"unknown config key 'learning_rat'.*did you mean 'learning_rate'"):
        load_config(path)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("ref_mode", "shared", "ref_mode must be one of"),
        ("loss", "ipo", "loss must be one of"),
        ("model", "sd4", "model must be one of"),
        ("precision", "fp8", "precision must be one of"),
        ("beta", -1.0, "beta must be > 0"),
        ("temperature", 0, "temperature must be > 0"),
        ("c", -0.5, "c must be ≥ 0"),
        ("percentile", 101, r"percentile must be in \[0, 100\]"),
        ("max_steps", 0, "max_steps must be ≥ 1"),
        ("learning_rate", "fast", "learning_rate must be a number"),
        ("max_steps", 2.5, "max_steps must be an integer"),
        ("gradient_checkpointing", "maybe", "gradient_checkpointing must be a boolean"),
        ("validation_prompts", [], "validation_prompts must be a non-empty list"),
        ("threshold_file", "/nonexistent/threshold.json", "threshold_file: no such file"),
        ("resume_from", "/nonexistent/ckpt", "resume_from must be 'latest' or a checkpoint directory"),
    ],
)
def test_invalid_values_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{key: value})


def test_lora_reference_cannot_be_updated():
    with pytest.raises(ValueError, match="ref_update='epoch'.*ref_mode"):
        TrainConfig(ref_mode="lora", ref_update="epoch")


def test_proxy_threshold_needs_a_reference_update_and_a_reward():
    assert TrainConfig(ref_update="epoch", threshold_update="proxy", reward="builtin").threshold_update == "proxy"
    with pytest.raises(ValueError, match="threshold_update='proxy'.*set ref_update: epoch"):
        TrainConfig(threshold_update="proxy", reward="builtin")
    with pytest.raises(ValueError, match="threshold_update='proxy' needs reward"):
        TrainConfig(ref_update="epoch", threshold_update="proxy")
    with pytest.raises(ValueError, match="threshold_update must be one of none, proxy"):
        TrainConfig(threshold_update="online")
    with pytest.raises(ValueError, match="proxy_size"):
        TrainConfig(proxy_size=0)


def test_lora_training_with_each_reference():
    assert TrainConfig(ref_mode="lora").trains_lora and not TrainConfig(ref_mode="precomputed").trains_lora
    assert TrainConfig(ref_mode="precomputed", lora=True).trains_lora
    assert TrainConfig(loss="sft", lora=True).trains_lora  # no reference at all
    with pytest.raises(ValueError, match="lora=true with ref_mode='separate'.*'precomputed'"):
        TrainConfig(ref_mode="separate", lora=True)


def test_none_is_a_weighting_scheme_not_a_null(tmp_path):
    """sd3's default scheme is logit_normal, so "none" (no weighting) must reach it as a value; null / ~ stay None."""
    path = tmp_path / "run.yaml"
    path.write_text("model: sd3\nweighting_scheme: none\n")
    assert load_config(path).model_options() == {"weighting_scheme": "none"}
    cfg, _ = parse_args(["--model", "sd3", "--weighting_scheme", "none"])
    assert cfg.weighting_scheme == "none"
    for null in ("null", "~"):
        assert parse_args(["--model", "sd3", "--weighting_scheme", null])[0].weighting_scheme is None
    assert load_config(overrides={"pretrained": "none"}).pretrained is None  # other keys keep "none" = None


def test_family_options_reach_the_adapter(tmp_path):
    """FLUX's training guidance and timestep density (and every family option) go from the YAML / CLI through
    the trainer's ``build_adapter`` call to the adapter."""
    import types

    from tgo_fast.trainer.trainer import Trainer

    path = tmp_path / "run.yaml"
    path.write_text("model: flux\nresolution: 32\nguidance_scale: 1.0\nweighting_scheme: logit_normal\n")
    cfg, _ = parse_args(["--config", str(path), "--logit_mean", "0.5", "--logit_std", "2", "--max_sequence_length", "16"])
    assert cfg.model_options() == {"guidance_scale": 1.0, "weighting_scheme": "logit_normal", "logit_mean": 0.5,
                                   "logit_std": 2.0, "max_sequence_length": 16}
    trainer = types.SimpleNamespace(cfg=cfg, precision="fp32", device=torch.device("cpu"))
    adapter = Trainer._build_adapter(trainer)
    assert adapter.guidance_scale == 1.0 and adapter.max_sequence_length == 16
    assert adapter.flow_matching.density == {"weighting_scheme": "logit_normal", "logit_mean": 0.5, "logit_std": 2.0,
                                             "mode_scale": 1.29}
    assert TrainConfig(model="sdxl", prediction_type="v_prediction").model_options() == {"prediction_type": "v_prediction"}
    assert TrainConfig().model_options() == {}


def test_family_options_match_the_adapters():
    """MODEL_OPTIONS lists, for each family, exactly the extra keywords its adapter takes, and the same choices."""
    import inspect

    from tgo_fast.models import adapter_class
    from tgo_fast.models.flux import WEIGHTING_SCHEMES
    from tgo_fast.trainer import config

    common = {"self", "pretrained", "resolution", "dtype", "device", "tiny_seed"}
    for family in config.MODELS:
        taken = set(inspect.signature(adapter_class(family).__init__).parameters) - common
        assert taken == {name for name, families in MODEL_OPTIONS.items() if family in families}, family
    assert config.WEIGHTING_SCHEMES == WEIGHTING_SCHEMES


@pytest.mark.parametrize(
    "values, message",
    [
        ({"guidance_scale": 1.0}, r"guidance_scale is an option of model flux, not of model='sd15'"),
        ({"model": "amused", "prediction_type": "epsilon"}, "prediction_type is an option of model sd15 | sdxl"),
        ({"model": "sdxl", "prediction_type": "sample"}, "prediction_type must be one of epsilon, v_prediction"),
        ({"model": "flux", "weighting_scheme": "cosmap"}, "weighting_scheme must be one of none, logit_normal, mode"),
        ({"model": "flux", "logit_std": 2.0}, "logit_std shapes the 'logit_normal' timestep density"),
        ({"model": "flux", "weighting_scheme": "logit_normal", "mode_scale": 1.0}, "set weighting_scheme: mode"),
        ({"model": "flux", "weighting_scheme": "logit_normal", "logit_std": 0}, "logit_std must be > 0"),
        ({"model": "flux", "guidance_scale": -1}, "guidance_scale must be ≥ 0"),
        ({"model": "flux", "max_sequence_length": 0}, "max_sequence_length must be ≥ 1"),
    ],
)
def test_invalid_family_options_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**values)


def test_cli_overrides_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: amused\nmax_steps: 7\nlearning_rate: 1e-5\n")  # YAML 1.1 reads 1e-5 as a string
    cfg, ds = parse_args(["--ds_config", "x.json", "--config", str(path), "--max_steps", "3", "--lr", "3e-4",
                          "--gradient_checkpointing", "true", "--pretrained", "none", "--local_rank=1",
                          "--validation_prompts", "a cat", "a dog"])
    assert ds == "x.json"
    assert (cfg.model, cfg.max_steps, cfg.learning_rate, cfg.gradient_checkpointing) == ("amused", 3, 3e-4, True)
    assert cfg.pretrained is None and cfg.validation_prompts == ["a cat", "a dog"]


def test_precedence_is_cli_over_yaml_over_defaults(tmp_path):
    """Booleans as ``--key true|false``, ``null``/``none`` as None for any key that may be null, ``--lr`` and the
    hyphenated spelling, on top of a YAML whose null and text values parse as their keys' types."""
    path = tmp_path / "run.yaml"
    path.write_text("lora: true\nref_mode: lora\nresolution: null\npretrained: none\nbeta: 2\nmax_steps: '5'\n"
                    "validation_prompts: one prompt\nlearning_rate: 1e-4\n")
    from_file = load_config(path)
    assert (from_file.lora, from_file.resolution, from_file.pretrained, from_file.max_steps) == (True, None, None, 5)
    assert from_file.beta == 2.0 and isinstance(from_file.beta, float) and from_file.learning_rate == 1e-4
    assert from_file.validation_prompts == ["one prompt"] and from_file.c == TrainConfig().c
    cfg, ds = parse_args(["--config", str(path), "--lora", "false", "--ref_mode", "precomputed", "--resolution", "16",
                          "--max-steps", "7", "--lr", "2e-5", "--export", "false", "--threshold_file", "null"])
    assert (cfg.lora, cfg.ref_mode, cfg.resolution, cfg.max_steps, cfg.learning_rate) == (False, "precomputed", 16, 7, 2e-5)
    assert cfg.export is False and cfg.threshold_file is None and cfg.pretrained is None and ds is None
    assert parse_args(["--config", str(path), "--lora"])[0].lora is True  # a bare boolean flag is true
    assert load_config(path, overrides={"lora": "false", "ref_mode": "precomputed"}).lora is False


def test_run_config_yaml_round_trips(tmp_path):
    """The trainer writes ``to_dict()`` as the run's config.yaml; reading it back gives the same config."""
    cfg = load_config(CONFIGS / "sd3.yaml", overrides={"max_steps": 3, "validation_guidance_scale": 2.5})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert load_config(tmp_path / "config.yaml") == cfg
    assert parse_args(["--config", str(tmp_path / "config.yaml")])[0] == cfg


def test_unknown_cli_flag_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--max_stepz", "3"])
    assert "unrecognized arguments: --max_stepz 3; did you mean --max_steps?" in capsys.readouterr().err


def test_help_lists_every_key_with_its_choices(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(f"--{name}" in out for name in FIELD_NAMES)
    assert "{separate,lora,precomputed}" in out and "--lr" in out


@pytest.mark.parametrize("argv, message", [
    (["--ref_mode", "copy"], r"ref_mode: invalid choice: 'copy' \(choose from 'separate', 'lora', 'precomputed'\)"),
    (["--max_steps", "many"], "max_steps: invalid int value: 'many'"),
    (["--lr", "fast"], "learning_rate: invalid float value: 'fast'"),
    (["--lora", "maybe"], "lora: Truthy value expected: got maybe"),
    (["--resolution", "none", "--beta", "-1"], "beta must be > 0, got -1.0"),
])
def test_invalid_cli_value_names_the_key(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


@pytest.mark.parametrize("text, message", [
    ("max_steps: many\n", "max_steps: invalid int value: 'many'"),
    ("ref_mode: copy\n", "ref_mode must be one of separate, lora, precomputed; got 'copy'"),
    ("max_steps: 2.5\n", "max_steps must be an integer, got 2.5"),
    ("lora: maybe\n", "lora: Truthy value expected: got maybe"),
    ("lora: 1\n", "lora must be a boolean"),
    ("model: null\n", "model must not be null"),
    ("validation_prompts: [a, 3]\n", "validation_prompts must be a list of strings"),
    ("- model: sd15\n", "must hold a mapping of keys to values"),
])
def test_invalid_yaml_value_names_the_key(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(path)


def test_train_script_reports_config_errors_as_usage_errors(capsys):
    from tgo_fast.trainer import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--ref_mode", "copy"])
    assert exit_info.value.code == 2 and "ref_mode: invalid choice: 'copy'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ DeepSpeed config
@pytest.mark.parametrize("world, batch, micro, expected", [(1, 8, None, (8, 1)), (2, 8, None, (4, 1)),
                                                          (2, 8, 2, (2, 2)), (4, 32, 1, (1, 8))])
def test_batch_layout(world, batch, micro, expected):
    assert batch_layout(TrainConfig(train_batch_size=batch, micro_batch_size=micro), world) == expected


@pytest.mark.parametrize("world, batch, micro", [(2, 7, None), (2, 8, 3), (3, 8, None)])
def test_batch_size_that_does_not_divide(world, batch, micro):
    with pytest.raises(ValueError, match="train_batch_size"):
        batch_layout(TrainConfig(train_batch_size=batch, micro_batch_size=micro), world)


def test_deepspeed_value_that_disagrees_with_the_run_config():
    ds = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}}
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=2 disagrees.*micro_batch_size"):
        merge_deepspeed_config(ds, TrainConfig(train_batch_size=8), 2, cpu=True)
    with pytest.raises(ValueError, match="scheduler"):
        merge_deepspeed_config({"scheduler": {"type": "WarmupLR"}}, TrainConfig(), 1, cpu=True)


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ValueError, match="fp16.*not supported on CPU"):
        merge_deepspeed_config(CONFIGS / "zero3_cpu.json", TrainConfig(precision="fp16"), 2, cpu=True)
    ds = merge_deepspeed_config(CONFIGS / "zero3_gpu_bf16.json", TrainConfig(precision="auto"), 2, cpu=False)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    with pytest.raises(ValueError, match="bf16 is enabled.*precision='fp16'"):
        merge_deepspeed_config(CONFIGS / "zero3_gpu_bf16.json", TrainConfig(precision="fp16"), 2, cpu=False)


# ------------------------------------------------------------------------------------ data order
def test_step_schedule_covers_each_epoch_once_and_resumes_anywhere():
    n, seed = int(torch.randint(40, 80, ()).item()), int(torch.randint(0, 1000, ()).item())
    schedule = StepSchedule(n, train_batch_size=8, micro_batch_size=2, accumulation=2, world_size=2, seed=seed)
    steps = schedule.steps_per_epoch
    assert steps == n // 8
    for epoch in range(2):
        seen = torch.cat([schedule.global_batch(epoch * steps + s).flatten() for s in range(steps)])
        assert seen.unique().numel() == seen.numel() == steps * 8  # no repeats within an epoch
    assert not torch.equal(schedule.global_batch(0), schedule.global_batch(steps))  # reshuffled per epoch
    full = [list(schedule.rank_batches(r, 0, 2 * steps)) for r in range(2)]
    for rank in range(2):
        resumed = list(StepSchedule(n, 8, 2, 2, 2, seed).rank_batches(rank, 3, 2 * steps))
        assert resumed == full[rank][3 * 2:]  # 2 micro-batches per step
    assert not set(sum(full[0][:2], [])) & set(sum(full[1][:2], []))  # ranks read disjoint samples


def test_step_schedule_needs_a_full_batch():
    with pytest.raises(ValueError, match="fewer than train_batch_size"):
        StepSchedule(5, 8, 4, 1, 2, 0)


def test_sample_seeds_depend_on_sample_and_epoch_only():
    indices = torch.randperm(100)[:6]
    a = sample_seeds(indices, seed=3, epoch=1, num_samples=100)
    b = sample_seeds(indices.flip(0), seed=3, epoch=1, num_samples=100).flip(0)
    assert torch.equal(a, b) and a.unique().numel() == 6
    assert not torch.equal(a, sample_seeds(indices, seed=3, epoch=2, num_samples=100))
    assert not torch.equal(a, sample_seeds(indices, seed=4, epoch=1, num_samples=100))


def test_precompute_layout_covers_every_sample_with_equal_work():
    for n, world, micro in [(10, 2, 3), (7, 3, 2), (8, 2, 4), (1, 2, 1)]:
        order, per_rank = precompute_layout(n, world, micro)
        assert order.numel() == world * per_rank and per_rank % micro == 0
        assert set(order.tolist()) == set(range(n))


# ------------------------------------------------------------------------------------ cache
def test_encoding_cache_roundtrip(tmp_path):
    n = 11
    data = {"latents": torch.randn(n, 4, 3, 3), "ids": torch.randint(0, 50, (n, 5))}
    cache = EncodingCache(tmp_path / "c", n, chunk_size=4)
    assert cache.missing_chunks() == [0, 1, 2]
    for chunk in (2, 0, 1):
        rows = list(cache.chunk_indices(chunk))
        cache.write_chunk(chunk, {k: v[rows] for k, v in data.items()})
    assert cache.missing_chunks() == []
    reread = EncodingCache(tmp_path / "c", n, chunk_size=4, max_open=1)
    for i in torch.randperm(n).tolist():
        assert torch.equal(reread[i]["latents"], data["latents"][i]) and torch.equal(reread[i]["ids"], data["ids"][i])
    with pytest.raises(ValueError, match="rows"):
        cache.write_chunk(0, {"latents": torch.randn(3, 4)})


def test_encoding_cache_key_tracks_dataset_and_adapter():
    key = encoding_cache_key("abc", {"model": "sd15", "resolution": 32})
    assert key == encoding_cache_key("abc", {"resolution": 32, "model": "sd15"})
    assert key != encoding_cache_key("abd", {"model": "sd15", "resolution": 32})
    assert key != encoding_cache_key("abc", {"model": "sd15", "resolution": 64})


# ------------------------------------------------------------------------------------ objectives
def _batch(b=6, shape=(4, 5, 5)):
    pred = torch.randn(b, *shape, requires_grad=True)
    ref = (pred.detach() + 0.05 * torch.randn(b, *shape))
    target = torch.randn(b, *shape)
    scores = torch.rand(b, dtype=torch.float64)
    return pred, ref, target, scores, float(scores.median())


def test_tgo_objective_is_the_library_loss():
    pred, ref, target, scores, tau = _batch()
    cfg = TrainConfig(beta=2.0, temperature=0.01, c=3.0)
    loss, stats = diffusion_objective(cfg, pred, target, scores, tau, ref_pred=ref)
    expected = tgo_diffusion_loss(pred, ref, target, scores, tau, beta=2.0, temperature=0.01, c=3.0)
    torch.testing.assert_close(loss, expected)
    assert set(stats) >= {"implicit_score", "policy_error", "reference_error", "labels", "weights", "accuracy"}


def test_sft_trains_on_pseudo_positives_only():
    pred, ref, target, scores, tau = _batch()
    loss, stats = diffusion_objective(TrainConfig(loss="sft"), pred, target, scores, tau)
    errors = (pred - target).square().flatten(1).mean(1)
    positive = scores >= tau
    torch.testing.assert_close(loss, errors[positive].mean())
    loss.backward()
    assert torch.all(pred.grad[~positive] == 0) and torch.all(pred.grad[positive].abs().sum((1, 2, 3)) > 0)


def test_kto_is_the_prospect_utility_with_a_clamped_mean_reference_point():
    pred, ref, target, scores, tau = _batch()
    cfg = TrainConfig(loss="kto", beta=1.0, temperature=0.01, kto_desirable_weight=1.0, kto_undesirable_weight=1.5)
    loss, stats = diffusion_objective(cfg, pred, target, scores, tau, ref_pred=ref)
    e_theta = (pred.double() - target.double()).square().flatten(1).mean(1)
    e_ref = (ref.double() - target.double()).square().flatten(1).mean(1)
    s = (e_ref - e_theta) / 0.01
    z0 = s.mean().clamp(min=0)
    positive = scores >= tau
    expected = torch.where(positive, 1 - torch.sigmoid(s - z0), 1.5 * (1 - torch.sigmoid(z0 - s))).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)
    # the reference point is detached: the gradient is that of the utility at fixed z0
    s_leaf = torch.randn(5, requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    kto_loss(s_leaf, labels, 1.0, 1.0).sum().backward()
    z = s_leaf.detach().mean().clamp(min=0)
    sig_pos, sig_neg = torch.sigmoid(s_leaf.detach() - z), torch.sigmoid(z - s_leaf.detach())
    expected_grad = torch.where(labels == 1, -sig_pos * (1 - sig_pos), sig_neg * (1 - sig_neg))
    torch.testing.assert_close(s_leaf.grad, expected_grad)


def test_kto_with_precomputed_reference_error_matches_live_reference():
    pred, ref, target, scores, tau = _batch()
    cfg = TrainConfig(loss="kto")
    live, _ = diffusion_objective(cfg, pred, target, scores, tau, ref_pred=ref)
    e_ref = (ref - target).square().flatten(1).mean(1)
    stored, _ = diffusion_objective(cfg, pred, target, scores, tau, ref_error=e_ref)
    torch.testing.assert_close(live, stored, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("loss_name", ["tgo", "sft", "kto"])
def test_masked_objectives_against_full_logits(loss_name):
    b, length, hidden_size, vocab = 4, 6, 8, 11
    head = torch.nn.Linear(hidden_size, vocab)
    hidden = torch.randn(b, length, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (b, length))
    labels[torch.rand(b, length) < 0.5] = -100
    labels[:, 0] = torch.randint(0, vocab, (b,))  # every sample has a masked token
    scores = torch.rand(b, dtype=torch.float64)
    tau = float(scores.median())
    ref_logp = -torch.rand(b) * 3
    cfg = TrainConfig(loss=loss_name, beta=0.7)
    loss, stats = masked_objective(cfg, head, hidden, labels, scores, tau, ref_logp)
    logp_tokens = torch.log_softmax(head(hidden).double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    mask = labels != -100
    logp = (logp_tokens * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(stats["policy_logp"].double(), logp.detach(), rtol=1e-5, atol=1e-5)
    positive = (scores >= tau).double()
    if loss_name == "sft":
        expected = -(positive * logp).sum() / positive.sum()
    else:
        s = 0.7 * (logp - ref_logp.double())
        if loss_name == "tgo":
            w = 1 + 5.0 * (scores - tau).abs()
            expected = (w * F.softplus((1 - 2 * positive) * s)).mean()
        else:
            z0 = s.mean().clamp(min=0)
            expected = torch.where(positive == 1, 1 - torch.sigmoid(s - z0), 1 - torch.sigmoid(z0 - s)).mean()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert hidden.grad is not None and head.weight.grad is not None and torch.isfinite(head.weight.grad).all()


# ------------------------------------------------------------------------------- metrics, plots
def test_metrics_writer_drops_rows_after_the_resumed_step(tmp_path):
    writer = MetricsWriter(tmp_path, resume_step=0, tensorboard=True, log_interval=1)
    for step in range(1, 6):
        writer.log({"step": step, "loss": float(torch.rand(())), "accuracy": 0.5})
    writer.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents*"))
    resumed = MetricsWriter(tmp_path, resume_step=3, tensorboard=False, log_interval=1)
    resumed.log({"step": 4, "loss": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_plots_and_grid(tmp_path):
    import PIL.Image

    history = [{"step": s, "loss": math.exp(-s / 5) + 0.1 * float(torch.rand(())), "accuracy": s / 10}
               for s in range(1, 11)]
    plot_training_curves(history, tmp_path / "curves.png")
    scores = torch.randn(200, dtype=torch.float64)
    plot_score_histogram(scores, float(scores.median()), tmp_path / "hist.png")
    for name in ("curves.png", "hist.png"):
        assert PIL.Image.open(tmp_path / name).size[0] > 100
