"""Diffusion model adapters (sd15, sdxl, flux) on their tiny random-init configs: shapes, per-sample
determinism, target conventions (SPEC §2), diffusers-format export and the from_pretrained path."""

import copy

import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel

from tgo_fast.models import ADAPTERS, ModelAdapter, build_adapter
from tgo_fast.models.base import sample_generators
from tgo_fast.models.text import tiny_clip_tokenizer, tiny_t5_tokenizer

from model_helpers import assert_same_state, random_seeds

FAMILIES = ["sd15", "sdxl", "flux"]
BACKBONE_FOLDER = {"sd15": "unet", "sdxl": "unet", "flux": "transformer"}
BACKBONE_CLASS = {"sd15": UNet2DConditionModel, "sdxl": UNet2DConditionModel, "flux": FluxTransformer2DModel}
PROMPTS = ["a red circle in the top left corner", "two blue squares on a white background", "a cat", "photo of a tree"]


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request):
    return build_adapter(request.param, None)


def random_batch(adapter, batch_size=3):
    pixel_values = torch.rand(batch_size, 3, adapter.resolution, adapter.resolution) * 2 - 1
    return pixel_values, PROMPTS[:batch_size]


def test_registry_builds_each_family_and_rejects_unknown_names():
    assert set(ADAPTERS) == {"sd15", "sdxl", "flux", "sd3", "wan", "amused", "meissonic"}
    with pytest.raises(ValueError, match="sd15"):
        build_adapter("sd4", None)


def test_tiny_build_is_deterministic_from_tiny_seed_and_frozen(adapter):
    same = build_adapter(adapter.name, None, tiny_seed=0)
    other = build_adapter(adapter.name, None, tiny_seed=1)
    assert isinstance(adapter, ModelAdapter) and adapter.kind == "diffusion"
    assert_same_state(adapter.backbone, same.backbone)
    assert_same_state(adapter.text_encoder, same.text_encoder)
    assert_same_state(adapter.vae, same.vae)
    assert any(
        not torch.equal(a, b) for a, b in zip(adapter.backbone.parameters(), other.backbone.parameters(), strict=True)
    )
    assert all(p.requires_grad for p in adapter.backbone.parameters())
    for frozen in (adapter.vae, adapter.text_encoder):
        assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_encode_sample_forward_shapes_and_gradient(adapter):
    pixel_values, prompts = random_batch(adapter)
    encoded = adapter.encode(pixel_values, prompts)
    latent_side = adapter.resolution // adapter.vae_scale_factor
    assert encoded["latents"].shape == (3, adapter.vae.config.latent_channels, latent_side, latent_side)
    assert all(value.shape[0] == 3 and value.dtype == torch.float32 for value in encoded.values())
    for key, value in adapter.encode(pixel_values, prompts).items():  # deterministic (cacheable)
        torch.testing.assert_close(value, encoded[key], rtol=0, atol=0)

    inputs = adapter.sample_inputs(encoded, random_seeds(3))
    prediction = adapter.forward(adapter.backbone, encoded, inputs)
    assert prediction.shape == inputs["target"].shape == encoded["latents"].shape
    adapter.backbone.zero_grad()
    (prediction.float() - inputs["target"]).pow(2).mean().backward()
    grads = [p.grad for p in adapter.backbone.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    adapter.backbone.zero_grad()


def test_sample_inputs_are_per_sample_deterministic_and_shared_by_policy_and_reference(adapter):
    pixel_values, prompts = random_batch(adapter)
    encoded = adapter.encode(pixel_values, prompts)
    seeds = random_seeds(3)
    first, again = adapter.sample_inputs(encoded, seeds), adapter.sample_inputs(encoded, seeds.clone())
    for key in first:
        torch.testing.assert_close(first[key], again[key], rtol=0, atol=0)
    # Sample 1 alone (same seed) gets exactly the draws it got inside the batch.
    alone = adapter.sample_inputs({k: v[1:2] for k, v in encoded.items()}, seeds[1:2])
    for key in first:
        torch.testing.assert_close(alone[key], first[key][1:2], rtol=0, atol=0)
    # A new seed for sample 0 changes its noise only.
    reseeded = adapter.sample_inputs(encoded, torch.stack([seeds[0] + 1, seeds[1], seeds[2]]))
    assert not torch.equal(reseeded["noise"][0], first["noise"][0])
    torch.testing.assert_close(reseeded["noise"][1:], first["noise"][1:], rtol=0, atol=0)

    # A frozen copy (the reference) sees the same inputs: identical predictions at step 0.
    reference = copy.deepcopy(adapter.backbone).requires_grad_(False)
    with torch.no_grad():
        policy_prediction = adapter.forward(adapter.backbone, encoded, first)
        reference_prediction = adapter.forward(reference, encoded, again)
    torch.testing.assert_close(policy_prediction, reference_prediction, rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad_seeds, match",
    [
        (torch.tensor([0.0, 1.0, 2.0]), "integer"),
        (torch.tensor([[0, 1, 2]]), "1-D"),
        (torch.tensor([0, 1]), "3 samples"),
    ],
)
def test_sample_inputs_rejects_bad_seeds(adapter, bad_seeds, match):
    encoded = adapter.encode(*random_batch(adapter))
    with pytest.raises(ValueError, match=match):
        adapter.sample_inputs(encoded, bad_seeds)


def test_encode_rejects_bad_batches(adapter):
    pixel_values, prompts = random_batch(adapter)
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        adapter.encode(pixel_values[:, :, :-8], prompts)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        adapter.encode(pixel_values, prompts[:2])
    with pytest.raises(TypeError, match="floating-point"):
        adapter.encode((pixel_values * 100).long(), prompts)


def test_unet_targets_follow_the_scheduler_parameterisation():
    for prediction_type in ("epsilon", "v_prediction"):
        adapter = build_adapter("sd15", None, prediction_type=prediction_type)
        encoded = adapter.encode(*random_batch(adapter, 4))
        inputs = adapter.sample_inputs(encoded, random_seeds(4))
        x0, noise, timesteps = encoded["latents"], inputs["noise"], inputs["timesteps"]
        assert timesteps.dtype == torch.int64 and ((timesteps >= 0) & (timesteps < 1000)).all()
        alpha_bar = adapter.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        torch.testing.assert_close(inputs["noisy_latents"], alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise)
        if prediction_type == "epsilon":
            torch.testing.assert_close(inputs["target"], noise, rtol=0, atol=0)
        else:
            torch.testing.assert_close(inputs["target"], alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0)
    with pytest.raises(ValueError, match="prediction_type"):
        build_adapter("sd15", None, prediction_type="sample")


def test_sdxl_conditioning_uses_both_encoders_pooled_embeds_and_time_ids():
    adapter = build_adapter("sdxl", None)
    pixel_values, prompts = random_batch(adapter, 2)
    encoded = adapter.encode(pixel_values, prompts)
    size = adapter.resolution
    assert encoded["add_time_ids"].tolist() == [[size, size, 0, 0, size, size]] * 2
    ids_2 = adapter.tokenizer_2(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    output_2 = adapter.text_encoder_2(ids_2, output_hidden_states=True)
    torch.testing.assert_close(encoded["pooled_prompt_embeds"], output_2.text_embeds)
    hidden_1 = adapter.text_encoder.config.hidden_size
    assert encoded["prompt_embeds"].shape[-1] == hidden_1 + adapter.text_encoder_2.config.hidden_size
    torch.testing.assert_close(encoded["prompt_embeds"][..., hidden_1:], output_2.hidden_states[-2])


def test_flux_flow_matching_target_packing_and_timestep_density():
    adapter = build_adapter("flux", None)
    encoded = adapter.encode(*random_batch(adapter, 4))
    inputs = adapter.sample_inputs(encoded, random_seeds(4))
    x0, noise = encoded["latents"], inputs["noise"]
    torch.testing.assert_close(inputs["target"], noise - x0, rtol=0, atol=0)
    batch_size, channels, height, width = x0.shape
    assert inputs["noisy_latents"].shape == (batch_size, height * width // 4, 4 * channels)
    sigma = inputs["sigmas"].view(-1, 1, 1, 1)
    unpacked = inputs["noisy_latents"].view(batch_size, height // 2, width // 2, channels, 2, 2)
    unpacked = unpacked.permute(0, 3, 1, 4, 2, 5).reshape(x0.shape)
    torch.testing.assert_close(unpacked, (1 - sigma) * x0 + sigma * noise)
    # FLUX.1-dev's scheduler uses dynamic shifting: training sigmas are t / 1000 on (0, 1].
    torch.testing.assert_close(inputs["sigmas"], inputs["timesteps"] / 1000)
    assert ((inputs["sigmas"] > 0) & (inputs["sigmas"] <= 1)).all()

    logit_normal = build_adapter("flux", None, weighting_scheme="logit_normal")
    sigmas = logit_normal.sample_inputs(encoded, random_seeds(4))["sigmas"]
    assert ((sigmas > 0) & (sigmas <= 1)).all()
    with pytest.raises(ValueError, match="weighting_scheme"):
        build_adapter("flux", None, weighting_scheme="cosmap")


def test_generate_returns_pil_images(adapter):
    images = adapter.generate(adapter.backbone, PROMPTS[:2], seed=3, num_inference_steps=2)
    assert len(images) == 2 and all(isinstance(image, PIL.Image.Image) for image in images)
    assert images[0].size == (adapter.resolution, adapter.resolution)
    again = adapter.generate(adapter.backbone, PROMPTS[:2], seed=3, num_inference_steps=2)
    assert [image.tobytes() for image in again] == [image.tobytes() for image in images]


def test_save_pretrained_exports_a_loadable_backbone(adapter, tmp_path):
    state_dict = {key: value + torch.randn_like(value) for key, value in adapter.backbone.state_dict().items()}
    adapter.save_pretrained(state_dict, tmp_path)
    folder = BACKBONE_FOLDER[adapter.name]
    loaded = BACKBONE_CLASS[adapter.name].from_pretrained(tmp_path / folder)
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state_dict[key], rtol=0, atol=0, msg=key)
    wrapped = {"base_model." + key: value for key, value in state_dict.items()}
    with pytest.raises(ValueError, match="missing keys"):
        adapter.save_pretrained(wrapped, tmp_path / "wrapped")


def test_from_pretrained_loads_a_saved_pipeline(adapter, tmp_path):
    adapter.build_pipeline().save_pretrained(tmp_path)
    loaded = build_adapter(adapter.name, str(tmp_path))
    assert loaded.resolution == adapter.resolution
    assert_same_state(loaded.backbone, adapter.backbone)
    pixel_values, prompts = random_batch(adapter, 2)
    encoded, encoded_loaded = adapter.encode(pixel_values, prompts), loaded.encode(pixel_values, prompts)
    for key in encoded:
        torch.testing.assert_close(encoded_loaded[key], encoded[key], msg=key)
    seeds = random_seeds(2)
    for key, value in adapter.sample_inputs(encoded, seeds).items():
        torch.testing.assert_close(loaded.sample_inputs(encoded, seeds)[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_parts_keep_the_precision_diffusers_keeps(family, tmp_path):
    """In bf16 everything takes the training dtype but SDXL's VAE (force_upcast), which stays fp32 with the
    checkpoint's exact weights; encoding and generation run across the mixed dtypes."""
    build_adapter(family, None).build_pipeline().save_pretrained(tmp_path)  # an fp32 checkpoint
    adapter = build_adapter(family, str(tmp_path), dtype=torch.bfloat16)
    keeps_fp32 = family == "sdxl"
    assert adapter.vae.config.force_upcast
    assert adapter.vae.dtype == (torch.float32 if keeps_fp32 else torch.bfloat16)
    text_encoders = [adapter.text_encoder] + ([adapter.text_encoder_2] if family != "sd15" else [])
    assert {module.dtype for module in [adapter.backbone, *text_encoders]} == {torch.bfloat16}
    if keeps_fp32:
        saved = AutoencoderKL.from_pretrained(tmp_path / "vae")
        assert_same_state(adapter.vae, saved)
    pixel_values, prompts = random_batch(adapter, 2)
    assert adapter.encode(pixel_values, prompts)["latents"].dtype == torch.float32
    assert len(adapter.generate(adapter.backbone, prompts, seed=0, num_inference_steps=1)) == 2


def test_missing_pretrained_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot load .* from pretrained="):
        build_adapter("sd15", str(tmp_path / "nowhere"))


def test_resolution_must_fit_the_latent_grid():
    with pytest.raises(ValueError, match="resolution must be a positive multiple of 8"):
        build_adapter("flux", None, resolution=60)
    assert build_adapter("sd15", None, resolution=32).resolution == 32


def test_tiny_tokenizers_roundtrip_and_keep_caption_words_whole(tmp_path):
    clip = tiny_clip_tokenizer()
    assert clip.tokenize("A red Circle!") == ["a</w>", "red</w>", "circle</w>", "!</w>"]
    assert clip.unk_token_id not in clip("zebra ✓ 42").input_ids[1:-1]  # byte-level: no unknowns
    t5 = tiny_t5_tokenizer()
    assert t5.convert_ids_to_tokens(t5("a red circle").input_ids) == ["▁a", "▁red", "▁circle", "</s>"]
    clip.save_pretrained(tmp_path / "clip")
    t5.save_pretrained(tmp_path / "t5")
    for tokenizer, folder in ((clip, "clip"), (t5, "t5")):
        reloaded = type(tokenizer).from_pretrained(tmp_path / folder)
        assert reloaded(PROMPTS).input_ids == tokenizer(PROMPTS).input_ids


def test_sample_generators_validates_seeds():
    generators = sample_generators(torch.tensor([5, 5, 6]))
    draws = [torch.randn(2, generator=g) for g in generators]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    with pytest.raises(TypeError, match="torch.Tensor"):
        sample_generators([1, 2])
