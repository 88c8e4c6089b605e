"""The sd3 family (SD3 / SD3.5) on its tiny random-init config: encoding as StableDiffusion3Pipeline conditions,
flow-matching inputs and diffusers' SD3 timestep weighting, the from_pretrained path, exports diffusers loads, the
run-config options, and the trainer (a DeepSpeed world of one) in every reference mode."""
import json
import math
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusion3Pipeline

from tgo_fast.models import build_adapter
from tgo_fast.models.sd3 import WEIGHTING_SCHEMES, SD3Adapter
from tgo_fast.pipeline.generate import load_sampler, trained_run
from tgo_fast.trainer import TrainConfig
from tgo_fast.trainer.config import SD3_WEIGHTING_SCHEMES, load_config, parse_args
from tgo_fast.trainer.export import LORA_WEIGHT_NAME, merge_lora, save_lora, save_pipeline

from model_helpers import assert_same_state, lora_adapter, random_seeds

ROOT = Path(__file__).resolve().parents[1]
DS_CONFIG = ROOT / "configs" / "zero3_cpu.json"
PROMPTS = ["a large red circle at the center on a blue background", "a small green square at the left", "a cat"]


@pytest.fixture(scope="module")
def adapter():
    return build_adapter("sd3", None)


def random_batch(adapter, batch_size=3):
    pixel_values = torch.rand(batch_size, 3, adapter.resolution, adapter.resolution) * 2 - 1
    return pixel_values, PROMPTS[:batch_size]


def velocity(adapter, encoded, inputs):
    """The raw transformer output v̂ (no loss weight)."""
    return adapter.backbone(hidden_states=inputs["noisy_latents"], encoder_hidden_states=encoded["prompt_embeds"],
                            pooled_projections=encoded["pooled_prompt_embeds"], timestep=inputs["timesteps"],
                            return_dict=False)[0]


# ------------------------------------------------------------------------------------------------ adapter
def test_tiny_build_is_deterministic_frozen_and_sd3_shaped(adapter):
    same, other = build_adapter("sd3", None, tiny_seed=0), build_adapter("sd3", None, tiny_seed=1)
    assert isinstance(adapter, SD3Adapter) and adapter.kind == "diffusion" and adapter.resolution == 64
    for name in ("backbone", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        assert_same_state(getattr(adapter, name), getattr(same, name))
    assert any(not torch.equal(a, b) for a, b in zip(adapter.backbone.parameters(), other.backbone.parameters()))
    assert all(p.requires_grad for p in adapter.backbone.parameters())
    for frozen in (adapter.vae, adapter.text_encoder, adapter.text_encoder_2, adapter.text_encoder_3):
        assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert adapter.vae.config.latent_channels == 16 and adapter.vae.config.shift_factor == 0.0609
    assert adapter.backbone.config.dual_attention_layers == (0,)  # an SD3.5 block and an SD3 block
    assert adapter.max_sequence_length == adapter.tokenizer_3.model_max_length == 32


def test_encode_gives_the_pipelines_conditioning_and_shifted_latents(adapter):
    pixel_values, prompts = random_batch(adapter)
    encoded = adapter.encode(pixel_values, prompts)
    assert all(value.dtype == torch.float32 and value.shape[0] == 3 for value in encoded.values())
    for key, value in adapter.encode(pixel_values, prompts).items():  # deterministic (cacheable)
        torch.testing.assert_close(value, encoded[key], rtol=0, atol=0)

    # Joint sequence: [CLIP-L penultimate | CLIP-G penultimate | zeros up to T5's width] then T5's last hidden state.
    clip_hidden, pooled = [], []
    for tokenizer, encoder in ((adapter.tokenizer, adapter.text_encoder), (adapter.tokenizer_2, adapter.text_encoder_2)):
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        output = encoder(ids, output_hidden_states=True)
        clip_hidden.append(output.hidden_states[-2])
        pooled.append(output.text_embeds)
    t5_ids = adapter.tokenizer_3(prompts, padding="max_length", max_length=32, truncation=True,
                                 return_tensors="pt").input_ids
    t5_hidden = adapter.text_encoder_3(t5_ids).last_hidden_state
    clip = torch.cat(clip_hidden, dim=-1)
    expected = torch.cat([F.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1])), t5_hidden], dim=1)
    torch.testing.assert_close(encoded["prompt_embeds"], expected)
    torch.testing.assert_close(encoded["pooled_prompt_embeds"], torch.cat(pooled, dim=-1))

    mode = adapter.vae.encode(pixel_values).latent_dist.mode()
    torch.testing.assert_close(encoded["latents"], (mode - 0.0609) * 1.5305)
    assert encoded["latents"].shape == (3, 16, 16, 16)


def test_flow_matching_inputs_are_per_sample_and_give_a_trainable_velocity(adapter):
    encoded = adapter.encode(*random_batch(adapter))
    seeds = random_seeds(3)
    inputs = adapter.sample_inputs(encoded, seeds)
    x0, noise, sigma = encoded["latents"], inputs["noise"], inputs["sigmas"].view(-1, 1, 1, 1)
    torch.testing.assert_close(inputs["target"], noise - x0, rtol=0, atol=0)  # logit_normal: λ = 1
    assert torch.equal(inputs["loss_weights"], torch.ones(3))
    torch.testing.assert_close(inputs["noisy_latents"], (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(inputs["sigmas"], inputs["timesteps"] / 1000)  # SD3's static shift: σ = t / 1000
    assert ((inputs["sigmas"] > 0) & (inputs["sigmas"] <= 1)).all()

    alone = adapter.sample_inputs({k: v[1:2] for k, v in encoded.items()}, seeds[1:2])
    for key in inputs:
        torch.testing.assert_close(alone[key], inputs[key][1:2], rtol=0, atol=0, msg=key)
    reseeded = adapter.sample_inputs(encoded, torch.stack([seeds[0] + 1, seeds[1], seeds[2]]))
    assert not torch.equal(reseeded["noise"][0], noise[0]) and torch.equal(reseeded["noise"][1:], noise[1:])
    with pytest.raises(ValueError, match="3 samples"):
        adapter.sample_inputs(encoded, seeds[:2])

    prediction = adapter.forward(adapter.backbone, encoded, inputs)
    assert prediction.shape == x0.shape
    adapter.backbone.zero_grad()
    (prediction - inputs["target"]).pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.backbone.parameters())
    adapter.backbone.zero_grad()


@pytest.mark.parametrize("scheme, options", [("logit_normal", dict(logit_mean=0.5, logit_std=2.0)),
                                             ("mode", dict(mode_scale=1.29)), ("cosmap", {}), ("none", {})])
def test_timestep_density_is_diffusers_sd3_sampling_from_each_samples_seed(scheme, options):
    """u_i is drawn from sample i's generator right after its noise: logit_normal u = sigmoid(N(m, s)),
    mode u = 1 − v − scale·(cos²(πv/2) − 1 + v), else uniform; then σ = sigmas[⌊1000·u⌋]."""
    adapter = build_adapter("sd3", None, resolution=32, weighting_scheme=scheme, **options)
    encoded = adapter.encode(*random_batch(adapter, 2))
    seeds = random_seeds(2)
    sigmas = adapter.sample_inputs(encoded, seeds)["sigmas"]
    for seed, sigma in zip(seeds.tolist(), sigmas):
        generator = torch.Generator().manual_seed(seed)
        torch.randn(tuple(encoded["latents"].shape[1:]), generator=generator)
        if scheme == "logit_normal":
            u = torch.sigmoid(torch.normal(0.5, 2.0, (1,), generator=generator))
        elif scheme == "mode":
            v = torch.rand(1, generator=generator)
            u = 1 - v - 1.29 * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
        else:
            u = torch.rand(1, generator=generator)
        index = min(int(u * 1000), 999)
        assert sigma == adapter.noise_scheduler.sigmas[index]


@pytest.mark.parametrize("scheme", ["cosmap", "sigma_sqrt"])
def test_loss_weighting_schemes_weight_the_per_sample_error(scheme):
    """cosmap λ = 2 / (π(1 − 2σ + 2σ²)), sigma_sqrt λ = σ⁻²: mean((forward − target)²) = λ·mean((v̂ − v)²)."""
    adapter = build_adapter("sd3", None, resolution=32, weighting_scheme=scheme)
    encoded = adapter.encode(*random_batch(adapter, 2))
    inputs = adapter.sample_inputs(encoded, random_seeds(2))
    sigma = inputs["sigmas"]
    expected = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)) if scheme == "cosmap" else sigma**-2
    torch.testing.assert_close(inputs["loss_weights"], expected)
    with torch.no_grad():
        weighted = (adapter.forward(adapter.backbone, encoded, inputs) - inputs["target"]).pow(2).mean(dim=(1, 2, 3))
        plain = (velocity(adapter, encoded, inputs) - (inputs["noise"] - encoded["latents"])).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(weighted, expected * plain, rtol=1e-4, atol=0)


def test_bad_options_are_clear_errors(adapter):
    with pytest.raises(ValueError, match="weighting_scheme must be one of"):
        build_adapter("sd3", None, weighting_scheme="uniform")
    with pytest.raises(ValueError, match="max_sequence_length must be a positive int"):
        build_adapter("sd3", None, max_sequence_length=0)
    with pytest.raises(ValueError, match="resolution must be a positive multiple of 8"):
        build_adapter("sd3", None, resolution=60)
    with pytest.raises(ValueError, match=r"too large for this transformer: at most 128 px \(pos_embed_max_size=16\)"):
        build_adapter("sd3", None, resolution=136)
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        adapter.encode(torch.zeros(1, 3, 32, 32), PROMPTS[:1])
    with pytest.raises(ValueError, match="cannot load .* from pretrained="):
        build_adapter("sd3", "/nonexistent/sd3")


def test_generate_is_seeded_per_image(adapter):
    images = adapter.generate(adapter.backbone, PROMPTS[:2], seed=3, num_inference_steps=2)
    assert len(images) == 2 and all(isinstance(image, PIL.Image.Image) and image.size == (64, 64) for image in images)
    alone = adapter.generate(adapter.backbone, PROMPTS[1:2], seeds=[4], num_inference_steps=2)
    assert alone[0].tobytes() == images[1].tobytes()


def test_from_pretrained_loads_a_saved_pipeline_and_keeps_the_vae_in_fp32(adapter, tmp_path):
    adapter.build_pipeline().save_pretrained(tmp_path)
    loaded = build_adapter("sd3", str(tmp_path))
    assert loaded.resolution == adapter.resolution and loaded.max_sequence_length == adapter.max_sequence_length
    assert_same_state(loaded.backbone, adapter.backbone)
    pixel_values, prompts = random_batch(adapter, 2)
    encoded = adapter.encode(pixel_values, prompts)
    for key, value in loaded.encode(pixel_values, prompts).items():
        torch.testing.assert_close(value, encoded[key], msg=key)
    seeds = random_seeds(2)
    for key, value in adapter.sample_inputs(encoded, seeds).items():
        torch.testing.assert_close(loaded.sample_inputs(encoded, seeds)[key], value, rtol=0, atol=0, msg=key)

    bf16 = build_adapter("sd3", str(tmp_path), dtype=torch.bfloat16)
    assert bf16.vae.dtype == torch.float32  # diffusers' SD3 examples keep the VAE in fp32
    assert_same_state(bf16.vae, AutoencoderKL.from_pretrained(tmp_path / "vae"))
    assert {m.dtype for m in (bf16.backbone, bf16.text_encoder, bf16.text_encoder_2, bf16.text_encoder_3)} == {
        torch.bfloat16}
    assert bf16.encode(pixel_values, prompts)["latents"].dtype == torch.float32
    assert len(bf16.generate(bf16.backbone, prompts, seed=0, num_inference_steps=1)) == 2


# ------------------------------------------------------------------------------------------------- export
def model_output(adapter, model):
    pixel_values = torch.rand(2, 3, adapter.resolution, adapter.resolution, generator=torch.Generator().manual_seed(0))
    encoded = adapter.encode(pixel_values * 2 - 1, PROMPTS[:2])
    inputs = adapter.sample_inputs(encoded, torch.tensor([3, 4]))
    with torch.no_grad():
        return adapter.forward(model, encoded, inputs)


def test_lora_reloads_through_the_sd3_pipeline_at_the_trained_scaling(tmp_path):
    from peft.tuners.lora import LoraLayer

    adapter, config = lora_adapter("sd3", resolution=32)
    save_lora(adapter, adapter.backbone, adapter.backbone.state_dict(), config, tmp_path)
    fresh = build_adapter("sd3", None, resolution=32)
    pipeline = fresh.build_pipeline()
    pipeline.load_lora_weights(str(tmp_path), weight_name=LORA_WEIGHT_NAME)
    layers = [m for m in pipeline.transformer.modules() if isinstance(m, LoraLayer)]
    assert layers and {scale for layer in layers for scale in layer.scaling.values()} == {4.0}
    torch.testing.assert_close(model_output(fresh, pipeline.transformer), model_output(adapter, adapter.backbone))


def test_pipeline_folder_loads_and_runs_the_trained_model(tmp_path):
    adapter, config = lora_adapter("sd3", resolution=32)
    save_lora(adapter, adapter.backbone, adapter.backbone.state_dict(), config, tmp_path / "lora")
    save_pipeline(adapter, merge_lora(adapter.backbone.state_dict(), config), tmp_path)
    pipeline = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(pipeline) is StableDiffusion3Pipeline
    torch.testing.assert_close(model_output(adapter, pipeline.transformer), model_output(adapter, adapter.backbone))
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(PROMPTS[:1], height=32, width=32, num_inference_steps=2,
                     guidance_scale=adapter.validation_guidance_scale,
                     **adapter.pipeline_call_kwargs(PROMPTS[:1], [0])).images[0]
    ours = adapter.generate(adapter.backbone, PROMPTS[:1], seed=0, num_inference_steps=2)[0]
    assert image.size == ours.size == (32, 32)
    assert np.abs(np.asarray(image, dtype=int) - np.asarray(ours, dtype=int)).max() <= 2  # merged vs LoRA rounding


# ------------------------------------------------------------------------------------------------- config
def test_sd3_yaml_is_the_sd35_medium_recipe():
    """(The rule every family yaml follows is tested in test_trainer_config.py.)"""
    cfg = load_config(ROOT / "configs" / "sd3.yaml")
    assert cfg.pretrained == "stabilityai/stable-diffusion-3.5-medium"
    assert cfg.model_options() == {"weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0}


def test_sd3_options_reach_the_adapter(tmp_path):
    import types

    from tgo_fast.trainer.trainer import Trainer

    path = tmp_path / "run.yaml"
    path.write_text("model: sd3\nresolution: 32\nweighting_scheme: mode\n")
    cfg, _ = parse_args(["--config", str(path), "--mode_scale", "0.5", "--max_sequence_length", "16"])
    assert cfg.model_options() == {"weighting_scheme": "mode", "mode_scale": 0.5, "max_sequence_length": 16}
    adapter = Trainer._build_adapter(types.SimpleNamespace(cfg=cfg, precision="fp32", device=torch.device("cpu")))
    assert isinstance(adapter, SD3Adapter) and adapter.max_sequence_length == 16
    assert adapter.flow_matching.density == {"weighting_scheme": "mode", "logit_mean": 0.0, "logit_std": 1.0,
                                             "mode_scale": 0.5}
    assert SD3_WEIGHTING_SCHEMES == WEIGHTING_SCHEMES
    # SD3's default density is logit_normal, so its parameters need no explicit weighting_scheme
    assert TrainConfig(model="sd3", logit_std=2.0).model_options() == {"logit_std": 2.0}


@pytest.mark.parametrize("values, message", [
    ({"model": "sd3", "weighting_scheme": "uniform"},
     "weighting_scheme must be one of logit_normal, mode, cosmap, sigma_sqrt, none"),
    ({"model": "flux", "weighting_scheme": "cosmap"}, "weighting_scheme must be one of none, logit_normal, mode"),
    ({"model": "sd3", "mode_scale": 1.0}, r"mode_scale shapes the 'mode' timestep density.*got 'logit_normal'"),
    ({"model": "sd3", "weighting_scheme": "cosmap", "logit_mean": 1.0}, "set weighting_scheme: logit_normal"),
    ({"model": "sd3", "guidance_scale": 3.5}, "guidance_scale is an option of model flux, not of model='sd3'"),
    ({"model": "sd3", "prediction_type": "epsilon"}, "prediction_type is an option of model sd15 | sdxl"),
])
def test_invalid_sd3_options_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**values)


# ------------------------------------------------------------------------------------------------ trainer
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One encoding cache for the module; the process group is torn down and the environment restored after."""
    from tgo_fast.trainer.distributed import world_of_one_session

    with world_of_one_session():
        yield tmp_path_factory.mktemp("encodings")


def train_config(tmp_path, cache_dir, **overrides) -> TrainConfig:
    values = dict(model="sd3", output_dir=str(tmp_path / "run"), cache_dir=str(cache_dir), builtin_num_samples=8,
                  train_batch_size=4, max_steps=2, resolution=32, validation_prompts=PROMPTS[:1],
                  validation_inference_steps=1, tensorboard=False, plots=False,
                  seed=int(torch.randint(0, 1000, ()).item()))
    values.update(overrides)
    return TrainConfig(**values)


def first_micro_batch(trainer):
    indices = trainer.schedule.global_batch(0)[0, 0].tolist()
    return trainer.collate([trainer.train_dataset[i] for i in indices])


@pytest.mark.slow
@pytest.mark.parametrize("ref_mode", ["separate", "lora", "precomputed"])
def test_each_reference_mode_trains_two_steps_and_exports(ref_mode, tmp_path, cache_dir):
    """π_θ = π_ref at step 0, so ŝ = 0 and the loss is ln 2 · mean(w); two optimizer steps move the weights;
    final/ is a StableDiffusion3Pipeline folder with the trained transformer (LoRA merged, and final/lora)."""
    from tgo_fast.trainer import Trainer

    cfg = train_config(tmp_path, cache_dir, ref_mode=ref_mode)
    trainer = Trainer(cfg, str(DS_CONFIG))
    loss, stats = trainer.compute_loss(first_micro_batch(trainer), epoch=0, backward=False)
    assert stats["implicit_score"].abs().max() < 1e-3
    torch.testing.assert_close(loss, math.log(2) * stats["weights"].mean(), rtol=1e-5, atol=1e-5)
    before = {k: v.clone() for k, v in trainer._state_dict().items()}
    rows = trainer.train()
    assert [row["step"] for row in rows] == [1, 2] and all(math.isfinite(row["loss"]) for row in rows)
    after = trainer._state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(("lora_" in k) == cfg.trains_lora for k in changed)

    final = trainer.run_dir / "final"
    expected = merge_lora(after, trainer.lora_config) if cfg.trains_lora else after
    pipeline = DiffusionPipeline.from_pretrained(final)
    assert type(pipeline) is StableDiffusion3Pipeline
    for key, value in pipeline.transformer.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(PROMPTS[:1], height=32, width=32, num_inference_steps=1, max_sequence_length=32).images[0]
    assert image.size == (32, 32)
    if cfg.trains_lora:
        assert (final / "lora" / LORA_WEIGHT_NAME).is_file()
        assert json.loads((final / "lora" / "lora_config.json").read_text())["r"] == cfg.lora_rank
    # tgo_fast.pipeline rebuilds the trained model from the run (base + final/transformer or final/lora)
    sampler = load_sampler(trained_run(trainer.run_dir))
    torch.testing.assert_close(model_output(sampler.adapter, sampler.backbone),
                               model_output(sampler.adapter, pipeline.transformer))


@pytest.mark.slow
def test_the_tiny_run_config_trains_sd3_on_the_builtin_images(tmp_path, cache_dir):
    """`--config configs/tiny.yaml --model sd3 --pretrained null --data builtin`, cut to one step."""
    from tgo_fast.trainer import Trainer

    cfg, _ = parse_args(["--config", str(ROOT / "configs" / "tiny.yaml"), "--model", "sd3", "--pretrained", "null",
                         "--data", "builtin", "--output_dir", str(tmp_path / "run"), "--cache_dir", str(cache_dir),
                         "--max_steps", "1", "--train_batch_size", "4", "--builtin_num_samples", "8",
                         "--lr_warmup_steps", "0", "--validation_inference_steps", "1",
                         "--validation_images_per_prompt", "1", "--tensorboard", "false", "--plots", "false"])
    assert cfg.resolution == 64 and cfg.reward == "builtin"
    trainer = Trainer(cfg, str(DS_CONFIG))
    assert isinstance(trainer.adapter, SD3Adapter) and trainer.adapter.resolution == 64
    rows = trainer.train()
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"]) and "validation_reward" in rows[-1]
    assert os.path.isdir(trainer.run_dir / "final" / "transformer")
