"""Masked-token model families (aMUSEd, Meissonic) and the cosine mask schedule of SPEC §2.

Tiny random-init adapters (no download), built once per module. The reference for the split
forward (hidden states + output head) is each model's own unmodified logits forward.
"""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import PIL.Image
import pytest
import torch

from tgo_fast.loss import logprob_from_logits, masked_token_logprob, tgo_fused_linear_masked_loss
from tgo_fast.models import build_adapter
from tgo_fast.models.amused import AmusedAdapter, AmusedTransformer
from tgo_fast.models.masking import cosine_mask, sample_token_mask
from tgo_fast.models.meissonic import MeissonicAdapter, MeissonicTransformer2DModel, meissonic_image_ids

PROMPTS = ["a red circle in the center", "two blue squares on the left", "a cat near a tree"]


def random_seeds(n: int) -> torch.Tensor:
    return torch.randint(-(2**62), 2**62, (n,), dtype=torch.int64)


def random_pixels(n: int, resolution: int) -> torch.Tensor:
    return torch.rand(n, 3, resolution, resolution) * 2 - 1


# ------------------------------------------------------------------------------------ mask schedule
def test_mask_marks_rounded_cosine_count_with_labels_at_masked_positions_only():
    tokens = torch.randint(0, 50, (64, 3, 5))
    masked = cosine_mask(tokens, random_seeds(64), mask_token_id=99)
    flat = tokens.reshape(64, -1)
    expected_count = torch.round(masked.mask_ratio * 15).clamp(min=1)
    assert torch.equal(masked.mask.sum(1), expected_count.long())
    assert torch.equal(masked.labels, torch.where(masked.mask, flat, torch.full_like(flat, -100)))
    assert torch.equal(masked.input_ids.reshape(64, -1), torch.where(masked.mask, torch.full_like(flat, 99), flat))
    assert masked.input_ids.shape == tokens.shape and masked.labels.dtype == torch.int64
    assert torch.allclose(masked.timestep, masked.mask_ratio * 1000)


@pytest.mark.parametrize("num_tokens", [1, 2, 7])
def test_every_sample_has_a_masked_token(num_tokens):
    mask, ratio = sample_token_mask(random_seeds(2000), num_tokens)
    assert mask.shape == (2000, num_tokens)
    assert bool((mask.sum(1) >= 1).all())
    assert bool((ratio > 0).all() and (ratio <= 1).all())


def test_ratio_follows_cos_of_uniform():
    # ratio = cos(rπ/2), r ~ U(0,1)  ⇒  P(ratio ≤ x) = 1 − (2/π)·arccos(x), E[ratio] = 2/π
    n = 4000
    _, ratio = sample_token_mask(random_seeds(n), 256)
    ratio = np.sort(ratio.double().numpy())
    cdf = 1 - (2 / np.pi) * np.arccos(ratio)
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert ks < 1.95 / math.sqrt(n)  # Kolmogorov–Smirnov at α ≈ 0.001
    std = math.sqrt(0.5 - (2 / math.pi) ** 2)
    assert abs(ratio.mean() - 2 / math.pi) < 4 * std / math.sqrt(n)


def test_masked_positions_are_uniform_over_the_grid():
    n, num_tokens = 3000, 16
    mask, ratio = sample_token_mask(random_seeds(n), num_tokens)
    per_position = mask.double().mean(0)
    expected = mask.double().sum() / (n * num_tokens)
    # each position: binomial(n, ≈ expected); allow 5 standard deviations
    assert torch.all((per_position - expected).abs() < 5 * math.sqrt(0.25 / n))


def test_mask_depends_only_on_each_samples_seed():
    tokens = torch.randint(0, 50, (6, 4, 4))
    seeds = random_seeds(6)
    first = cosine_mask(tokens, seeds, 63)
    again = cosine_mask(tokens.clone(), seeds.clone(), 63)
    subset = cosine_mask(tokens[[4, 1]], seeds[[4, 1]], 63)
    for field in ("input_ids", "labels", "mask", "mask_ratio"):
        assert torch.equal(getattr(first, field), getattr(again, field))
        assert torch.equal(getattr(first, field)[[4, 1]], getattr(subset, field))
    other = cosine_mask(tokens, seeds + 1, 63)
    assert not torch.equal(first.mask, other.mask)


def test_min_mask_ratio_clips_the_schedule():
    _, ratio = sample_token_mask(random_seeds(500), 32, min_mask_ratio=0.5)
    assert bool((ratio >= 0.5).all()) and bool((ratio == 0.5).any())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(tokens=torch.rand(2, 4, 4)), TypeError, "tokens"),
        (dict(tokens=torch.zeros(0, 4, 4, dtype=torch.long)), ValueError, "tokens"),
        (dict(seeds=torch.tensor([1.0, 2.0])), TypeError, "seeds"),
        (dict(seeds=torch.tensor([1, 2, 3])), ValueError, "seeds"),
        (dict(mask_token_id=-1), ValueError, "mask_token_id"),
        (dict(min_mask_ratio=1.5), ValueError, "min_mask_ratio"),
    ],
)
def test_mask_rejects_bad_input(kwargs, error, match):
    args = dict(tokens=torch.randint(0, 9, (2, 4, 4)), seeds=random_seeds(2), mask_token_id=9)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        cosine_mask(args.pop("tokens"), args.pop("seeds"), args.pop("mask_token_id"), **args)


# ------------------------------------------------------------------------------------ adapters
@pytest.fixture(scope="module", params=["amused", "meissonic"])
def family(request):
    """(adapter, encoded batch of 3) for each masked family, built once."""
    adapter = build_adapter(request.param, None, tiny_seed=0)
    encoded = adapter.encode(random_pixels(3, adapter.resolution), PROMPTS)
    return adapter, encoded


def test_registry_builds_the_masked_adapters(family):
    adapter, _ = family
    expected = {"amused": (AmusedAdapter, AmusedTransformer), "meissonic": (MeissonicAdapter, MeissonicTransformer2DModel)}
    adapter_cls, backbone_cls = expected[adapter.name]
    assert type(adapter) is adapter_cls and type(adapter.backbone) is backbone_cls
    assert adapter.kind == "masked" and adapter.resolution == 64
    assert not any(p.requires_grad for p in adapter.vqvae.parameters())
    assert not any(p.requires_grad for p in adapter.text_encoder.parameters())
    assert not adapter.vqvae.training and not adapter.text_encoder.training


def test_encode_gives_vq_tokens_and_text(family):
    adapter, encoded = family
    tokens = encoded["tokens"]
    grid = adapter.resolution // adapter.vae_scale_factor
    assert tokens.shape == (3, grid, grid) and tokens.dtype == torch.int64
    assert 0 <= int(tokens.min()) and int(tokens.max()) < adapter.backbone.config.codebook_size
    assert encoded["encoder_hidden_states"].shape == (3, 77, adapter.text_encoder.config.hidden_size)
    assert encoded["pooled_text_emb"].shape == (3, adapter.text_encoder.config.projection_dim)
    assert torch.equal(encoded["micro_conds"][0], torch.tensor([64.0, 64.0, 0.0, 0.0, 6.0]))
    # deterministic, and the tokens are the VQ model's quantisation of the [0, 1] image
    pixels = random_pixels(2, adapter.resolution)
    again = adapter.encode(pixels, PROMPTS[:2])
    assert torch.equal(adapter.encode(pixels, PROMPTS[:2])["tokens"], again["tokens"])
    latents = adapter.vqvae.encode((pixels + 1) / 2).latents
    codebook = adapter.vqvae.quantize.embedding.weight
    distances = torch.cdist(latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]), codebook)
    assert torch.equal(again["tokens"].flatten(), distances.argmin(1))


def test_sample_inputs_share_the_mask_between_calls(family):
    adapter, encoded = family
    seeds = random_seeds(3)
    inputs, again = adapter.sample_inputs(encoded, seeds), adapter.sample_inputs(encoded, seeds)
    assert inputs.keys() == again.keys()
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)
    assert inputs["input_ids"].shape == encoded["tokens"].shape
    assert inputs["labels"].shape == (3, encoded["tokens"][0].numel())
    masked = inputs["labels"] != -100
    assert bool(masked.any(1).all())
    assert bool((inputs["input_ids"].flatten(1)[masked] == adapter.mask_token_id).all())
    assert adapter.mask_token_id == adapter.backbone.config.vocab_size - 1 == adapter.scheduler.config.mask_token_id
    assert ("timestep" in inputs) == (adapter.name == "meissonic")
    if "timestep" in inputs:
        assert torch.allclose(inputs["timestep"], inputs["mask_ratio"] * 1000)


def unmodified_logits(adapter, model, encoded, inputs):
    """(B, L, V) from the model's own forward (for aMUSEd: diffusers' UVit2DModel.forward itself)."""
    if adapter.name == "amused":
        logits = super(AmusedTransformer, model).forward(
            inputs["input_ids"], encoded["encoder_hidden_states"], encoded["pooled_text_emb"], encoded["micro_conds"]
        )
    else:
        logits = model(
            inputs["input_ids"], encoded["encoder_hidden_states"], encoded["pooled_text_emb"], inputs["timestep"],
            micro_conds=encoded["micro_conds"],
        )
    return logits.flatten(2).transpose(1, 2)


def test_hidden_states_times_head_are_the_model_logits(family):
    adapter, encoded = family
    inputs = adapter.sample_inputs(encoded, random_seeds(3))
    hidden = adapter.forward(adapter.backbone, encoded, inputs)
    weight, bias = adapter.output_head(adapter.backbone)
    num_tokens = encoded["tokens"][0].numel()
    assert hidden.shape == (3, num_tokens, weight.shape[1])
    assert weight.shape == (adapter.backbone.config.codebook_size, hidden.shape[-1])
    assert weight.data_ptr() == adapter.backbone.mlm_layer.conv2.weight.data_ptr()  # a view: gradients reach the head
    logits = hidden @ weight.T + (0 if bias is None else bias)
    reference = unmodified_logits(adapter, adapter.backbone, encoded, inputs)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter.logits(adapter.backbone, encoded, inputs), reference, rtol=1e-5, atol=1e-5)
    # the fused-path log-likelihood equals log-softmax of the model's logits
    labels = inputs["labels"]
    torch.testing.assert_close(
        masked_token_logprob(hidden, weight, labels, bias=bias, impl="torch"), logprob_from_logits(reference, labels)
    )


def test_gradient_checkpointing_keeps_values_and_gradients(family):
    adapter, encoded = family
    inputs = adapter.sample_inputs(encoded, random_seeds(3))
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(adapter.backbone).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        hidden = adapter.forward(model, encoded, inputs)
        weight, _ = adapter.output_head(model)
        logits = hidden @ weight.T
        torch.testing.assert_close(adapter.logits(model, encoded, inputs), logits, rtol=1e-5, atol=1e-5)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), inputs["labels"].flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "mlm_layer.conv2.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_step_zero_policy_and_reference_agree(family):
    adapter, encoded = family
    reference = copy.deepcopy(adapter.backbone).eval().requires_grad_(False)
    seeds = random_seeds(3)
    policy_inputs, reference_inputs = adapter.sample_inputs(encoded, seeds), adapter.sample_inputs(encoded, seeds)
    with torch.no_grad():
        ref_weight, ref_bias = adapter.output_head(reference)
        ref_logp = masked_token_logprob(
            adapter.forward(reference, encoded, reference_inputs), ref_weight, reference_inputs["labels"], bias=ref_bias, impl="torch"
        )
    weight, bias = adapter.output_head(adapter.backbone)
    loss, stats = tgo_fused_linear_masked_loss(
        adapter.forward(adapter.backbone, encoded, policy_inputs), weight, policy_inputs["labels"],
        torch.randn(3), 0.0, bias=bias, ref_logp=ref_logp, impl="torch", return_stats=True,
    )
    assert torch.equal(stats["implicit_score"], torch.zeros(3))
    loss.backward()
    assert adapter.backbone.mlm_layer.conv2.weight.grad is not None
    adapter.backbone.zero_grad(set_to_none=True)


def test_lora_targets_exist_and_disabling_adapters_gives_the_base_model(family):
    from peft import LoraConfig

    adapter, encoded = family
    inputs = adapter.sample_inputs(encoded, random_seeds(3))
    base = adapter.forward(adapter.backbone, encoded, inputs)
    model = copy.deepcopy(adapter.backbone)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=adapter.lora_target_modules, init_lora_weights=False)
    model.add_adapter(config)
    assert any("lora_A" in name for name, _ in model.named_parameters())
    assert not torch.allclose(adapter.forward(model, encoded, inputs), base)
    model.disable_adapters()
    torch.testing.assert_close(adapter.forward(model, encoded, inputs), base, rtol=0, atol=0)


def test_output_head_refuses_a_partitioned_weight(family):
    adapter, _ = family
    model = copy.deepcopy(adapter.backbone)
    model.mlm_layer.conv2.weight.data = torch.empty(0)  # what ZeRO-3 leaves outside a gather
    with pytest.raises(ValueError, match="partitioned.*output_head_module"):
        adapter.output_head(model)
    assert adapter.output_head_module(model) is model.mlm_layer.conv2


def test_generate_returns_pil_images(family):
    adapter, _ = family
    images = adapter.generate(adapter.backbone, PROMPTS[:2], seed=3, num_inference_steps=2)
    assert len(images) == 2 and all(isinstance(image, PIL.Image.Image) for image in images)
    assert images[0].size == (adapter.resolution, adapter.resolution)
    again = adapter.generate(adapter.backbone, PROMPTS[:2], seed=3, num_inference_steps=2)
    assert np.array_equal(np.asarray(images[1]), np.asarray(again[1]))


def test_save_pretrained_round_trip_through_from_pretrained(family, tmp_path):
    adapter, encoded = family
    trained = {k: v + 0.01 * torch.randn_like(v) for k, v in adapter.backbone.state_dict().items()}
    # the hub layout: vqvae / tokenizer / text_encoder / scheduler / transformer
    adapter.vqvae.save_pretrained(tmp_path / "vqvae")
    adapter.tokenizer.save_pretrained(tmp_path / "tokenizer")
    adapter.text_encoder.save_pretrained(tmp_path / "text_encoder")
    adapter.scheduler.save_pretrained(tmp_path / "scheduler")
    adapter.save_pretrained(trained, tmp_path)
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert config["_class_name"] == {"amused": "UVit2DModel", "meissonic": "MeissonicTransformer2DModel"}[adapter.name]

    loaded = type(adapter)(str(tmp_path), resolution=adapter.resolution)
    assert type(loaded.backbone) is type(adapter.backbone)
    for key, value in loaded.backbone.state_dict().items():
        assert torch.equal(value, trained[key]), key
    pixels = random_pixels(2, adapter.resolution)
    assert torch.equal(loaded.encode(pixels, PROMPTS[:2])["tokens"], adapter.encode(pixels, PROMPTS[:2])["tokens"])
    inputs = adapter.sample_inputs(encoded, random_seeds(3))
    model = copy.deepcopy(adapter.backbone)
    model.load_state_dict(trained)
    torch.testing.assert_close(loaded.forward(loaded.backbone, encoded, inputs), adapter.forward(model, encoded, inputs))

    with pytest.raises(ValueError, match="state_dict"):
        adapter.save_pretrained({"lora_A.weight": torch.zeros(1)}, tmp_path / "bad")


def test_bad_resolution_and_missing_model_are_clear_errors(family, tmp_path):
    adapter, _ = family
    with pytest.raises(ValueError, match="resolution"):
        type(adapter)(None, resolution=30)
    with pytest.raises(ValueError, match="vqvae"):
        type(adapter)(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="pixel_values"):
        adapter.encode(random_pixels(1, 32), PROMPTS[:1])


def test_tiny_build_is_deterministic_from_tiny_seed(family):
    adapter, _ = family
    same, other = type(adapter)(None, tiny_seed=0), type(adapter)(None, tiny_seed=1)
    state, same_state, other_state = adapter.backbone.state_dict(), same.backbone.state_dict(), other.backbone.state_dict()
    assert all(torch.equal(state[k], same_state[k]) for k in state)
    assert not all(torch.equal(state[k], other_state[k]) for k in state)


# ------------------------------------------------------------------------------------ Meissonic layout
def released_meissonic_layout(*, layers, single_layers, width, head_dim, text_dim, vocab, codebook, resample=True):
    """Parameter names and shapes of the released Meissonic ``Transformer2DModel`` (viiika/Meissonic
    src/transformer.py), written out from its source: Flux dual/single blocks with qk RMSNorm, a UViT
    token embedding / MLM head of the model width, no biases outside the Flux parts, and 2×2 RMSNorm'd
    down/up-sampling convs."""
    d, mlp = width, 4 * width
    shapes = {
        "time_text_embed.timestep_embedder.linear_1.weight": (d, 256), "time_text_embed.timestep_embedder.linear_1.bias": (d,),
        "time_text_embed.timestep_embedder.linear_2.weight": (d, d), "time_text_embed.timestep_embedder.linear_2.bias": (d,),
        "time_text_embed.text_embedder.linear_1.weight": (d, d), "time_text_embed.text_embedder.linear_1.bias": (d,),
        "time_text_embed.text_embedder.linear_2.weight": (d, d), "time_text_embed.text_embedder.linear_2.bias": (d,),
        "context_embedder.weight": (d, text_dim), "context_embedder.bias": (d,),
        "embed.embeddings.weight": (vocab, d), "embed.layer_norm.weight": (d,), "embed.conv.weight": (d, d, 1, 1),
        "mlm_layer.conv1.weight": (d, d, 1, 1), "mlm_layer.layer_norm.weight": (d,), "mlm_layer.conv2.weight": (codebook, d, 1, 1),
        "cond_embed.linear_1.weight": (d, 5 * 256 + d), "cond_embed.linear_2.weight": (d, d),
        "encoder_proj_layer_norm.weight": (d,),
        "project_to_hidden_norm.weight": (d,), "project_to_hidden.weight": (d, d),
        "project_from_hidden_norm.weight": (d,), "project_from_hidden.weight": (d, d),
    }
    if resample:
        shapes.update({
            "down_block.downsample.norm.weight": (d,), "down_block.downsample.conv.weight": (d, d, 2, 2),
            "up_block.upsample.norm.weight": (d,), "up_block.upsample.conv.weight": (d, d, 2, 2),
        })
    linear = lambda prefix, n_out, n_in: {f"{prefix}.weight": (n_out, n_in), f"{prefix}.bias": (n_out,)}  # noqa: E731
    for i in range(layers):
        p = f"transformer_blocks.{i}"
        shapes.update(linear(f"{p}.norm1.linear", 6 * d, d) | linear(f"{p}.norm1_context.linear", 6 * d, d))
        for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            shapes.update(linear(f"{p}.attn.{name}", d, d))
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            shapes[f"{p}.attn.{name}.weight"] = (head_dim,)
        for ff in ("ff", "ff_context"):
            shapes.update(linear(f"{p}.{ff}.net.0.proj", mlp, d) | linear(f"{p}.{ff}.net.2", d, mlp))
    for i in range(single_layers):
        p = f"single_transformer_blocks.{i}"
        shapes.update(linear(f"{p}.norm.linear", 3 * d, d) | linear(f"{p}.proj_mlp", mlp, d) | linear(f"{p}.proj_out", d, d + mlp))
        for name in ("to_q", "to_k", "to_v"):
            shapes.update(linear(f"{p}.attn.{name}", d, d))
        shapes[f"{p}.attn.norm_q.weight"] = shapes[f"{p}.attn.norm_k.weight"] = (head_dim,)
    return shapes


def test_meissonic_state_dict_matches_the_released_layout():
    model = MeissonicTransformer2DModel(
        num_layers=2, num_single_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
        pooled_projection_dim=16, axes_dims_rope=(2, 2, 4), vocab_size=40, codebook_size=32,
    )
    expected = released_meissonic_layout(layers=2, single_layers=1, width=16, head_dim=8, text_dim=24, vocab=40, codebook=32)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    flat = MeissonicTransformer2DModel(
        num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        pooled_projection_dim=16, axes_dims_rope=(2, 2, 4), vocab_size=40, codebook_size=32, downsample=False, upsample=False,
    )
    expected = released_meissonic_layout(
        layers=1, single_layers=1, width=16, head_dim=8, text_dim=16, vocab=40, codebook=32, resample=False
    )
    assert {k: tuple(v.shape) for k, v in flat.state_dict().items()} == expected


def test_meissonic_published_config_builds_the_published_layout():
    published = {  # MeissonFlow/Meissonic transformer/config.json
        "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "codebook_size": 8192, "downsample": True,
        "guidance_embeds": False, "in_channels": 64, "joint_attention_dim": 1024, "num_attention_heads": 8,
        "num_layers": 14, "num_single_layers": 28, "patch_size": 1, "pooled_projection_dim": 1024,
        "upsample": True, "vocab_size": 8256,
    }
    with torch.device("meta"):
        model = MeissonicTransformer2DModel.from_config(published)
    expected = released_meissonic_layout(
        layers=14, single_layers=28, width=1024, head_dim=128, text_dim=1024, vocab=8256, codebook=8192
    )
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


@pytest.mark.parametrize(
    "override, match",
    [({"axes_dims_rope": (2, 2, 2)}, "axes_dims_rope"), ({"pooled_projection_dim": 8}, "pooled_projection_dim"),
     ({"vocab_size": 32}, "vocab_size"), ({"patch_size": 2}, "patch_size")],
)
def test_meissonic_config_errors(override, match):
    config = dict(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                  joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4), vocab_size=40, codebook_size=32)
    with pytest.raises(ValueError, match=match):
        MeissonicTransformer2DModel(**(config | override))


def test_meissonic_image_ids_are_row_major_grid_positions():
    ids = meissonic_image_ids(2, 3)
    assert torch.equal(ids, torch.tensor([[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]], dtype=torch.float32))


def test_one_meissonic_hub_id_across_code_docs_and_config():
    """The released checkpoint is ``MeissonFlow/Meissonic`` on the hub; code, docs and the run config name it alike."""
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent
    files = [*root.glob("tgo_fast/**/*.py"), *root.glob("docs/**/*.md"), *root.glob("configs/*.yaml"), root / "README.md"]
    ids = {match for path in files for match in re.findall(r"[\w.-]+/Meissonic\b", path.read_text())}
    assert ids == {"MeissonFlow/Meissonic"}
    assert yaml.safe_load((root / "configs" / "meissonic.yaml").read_text())["pretrained"] == "MeissonFlow/Meissonic"
