"""FLUX.1 adapter (FluxTransformer2DModel, rectified-flow matching).

Conventions follow diffusers' ``train_dreambooth_flux.py`` and FlowMatchEulerDiscreteScheduler:

    x0     = (vae.encode(x).latent_dist.mode() − shift_factor) · scaling_factor      (encode)
    ε ~ N(0, I);  u ~ density(weighting_scheme) on [0, 1)                            (per sample, from its seed)
    k      = ⌊u · T_train⌋,  t = scheduler.timesteps[k],  σ = scheduler.sigmas[k]    (training tables)
    x_σ    = (1 − σ) · x0 + σ · ε
    target = ε − x0                                                                  (the flow velocity)

The transformer sees 2×2-packed latents (B, h/2 · w/2, 4C) with their latent image ids, the T5
sequence embeddings (+ zero text ids), CLIP's pooled output, ``timestep = t / 1000`` and, for
guidance-distilled checkpoints (FLUX.1-dev), the guidance embedding (``guidance_scale``, 3.5 as in
the diffusers example). The prediction is unpacked back to (B, C, h, w), the target's shape.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from .base import (
    ModelAdapter,
    check_pixel_values,
    freeze,
    load_component,
    model_dtype,
    place,
    save_backbone_state_dict,
    unwrap_model,
)
from .flow import DENSITY_SCHEMES, FlowMatching, timestep_density
from .sd import resolve_resolution, tiny_vae, vae_scale_factor
from .text import prompt_length, seeded_init, tiny_clip_text, tiny_t5_text

__all__ = ["FluxAdapter"]

WEIGHTING_SCHEMES = DENSITY_SCHEMES


class FluxAdapter(ModelAdapter):
    """FLUX.1-dev / -schnell. ``encode`` returns ``latents`` (B, C, R/8, R/8) (shifted and scaled),
    ``prompt_embeds`` (B, S, D_t5) and ``pooled_prompt_embeds`` (B, D_clip), all fp32.

    Extra keyword arguments: ``guidance_scale`` (training guidance embedding, 3.5),
    ``weighting_scheme`` ("none" | "logit_normal" | "mode"; ``logit_mean``, ``logit_std``,
    ``mode_scale``) for the timestep density, ``max_sequence_length`` (T5 tokens; default
    min(tokenizer_2.model_max_length, 512): 512 for FLUX.1, 32 for the tiny model),
    ``revision``, ``variant``.
    """

    name: ClassVar[str] = "flux"
    kind: ClassVar[str] = "diffusion"
    lora_target_modules: ClassVar[list[str]] = [
        "attn.to_k",
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    ]
    validation_guidance_scale = 3.5

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    tokenizer_2: T5TokenizerFast
    text_encoder_2: T5EncoderModel
    vae: AutoencoderKL
    noise_scheduler: FlowMatchEulerDiscreteScheduler
    backbone: FluxTransformer2DModel

    def __init__(
        self,
        pretrained: str | None,
        *,
        resolution: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        tiny_seed: int = 0,
        guidance_scale: float = 3.5,
        weighting_scheme: str = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        max_sequence_length: int | None = None,
        revision: str | None = None,
        variant: str | None = None,
    ) -> None:
        density = timestep_density(weighting_scheme, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)
        self.pretrained, self.dtype, self.device = pretrained, dtype, torch.device(device)
        self.guidance_scale = float(guidance_scale)
        if pretrained is None:
            self._build_tiny(tiny_seed)
        else:
            self._load_pretrained(pretrained, dtype=dtype, revision=revision, variant=variant)
        self.max_sequence_length = prompt_length(max_sequence_length, self.tokenizer_2, 512)  # FluxPipeline's default

        self.vae_scale_factor = vae_scale_factor(self.vae)
        # Latents are packed in 2×2 patches, so the latent side must be even. Default: the VAE's
        # training size (1024 for FLUX.1).
        default_resolution = self.vae.config.sample_size
        if isinstance(default_resolution, (list, tuple)):
            default_resolution = default_resolution[0]
        self.resolution = resolve_resolution(resolution, default_resolution, 2 * self.vae_scale_factor)
        self.flow_matching = FlowMatching(self.noise_scheduler, density)
        frozen = [self.vae, self.text_encoder, self.text_encoder_2]
        for module in [*frozen, self.backbone]:
            place(module, self.device, dtype)
        for module in frozen:
            freeze(module)

    # --- construction -------------------------------------------------------------------------
    def _build_tiny(self, seed: int) -> None:
        self.tokenizer, self.text_encoder = tiny_clip_text(seed + 1, 32, 32, with_projection=False)
        self.tokenizer_2, self.text_encoder_2 = tiny_t5_text(seed + 2, 32, max_length=32)
        self.vae = tiny_vae(seed + 3, scaling_factor=0.3611, shift_factor=0.1159)
        transformer_config = dict(
            patch_size=1,
            in_channels=4 * self.vae.config.latent_channels,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=self.text_encoder_2.config.d_model,
            pooled_projection_dim=self.text_encoder.config.hidden_size,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        self.backbone = seeded_init(seed, lambda: FluxTransformer2DModel(**transformer_config))
        # FLUX.1-dev's scheduler configuration.
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )

    def _load_pretrained(self, pretrained: str, *, dtype, revision, variant) -> None:
        models = dict(dtype=dtype, revision=revision, variant=variant)
        self.tokenizer = load_component(CLIPTokenizer, pretrained, "tokenizer", revision=revision)
        self.tokenizer_2 = load_component(T5TokenizerFast, pretrained, "tokenizer_2", revision=revision)
        self.text_encoder = load_component(CLIPTextModel, pretrained, "text_encoder", **models)
        self.text_encoder_2 = load_component(T5EncoderModel, pretrained, "text_encoder_2", **models)
        self.vae = load_component(AutoencoderKL, pretrained, "vae", **models)
        self.backbone = load_component(FluxTransformer2DModel, pretrained, "transformer", **models)
        self.noise_scheduler = load_component(
            FlowMatchEulerDiscreteScheduler, pretrained, "scheduler", revision=revision
        )

    # --- training -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, pixel_values: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        check_pixel_values(pixel_values, prompts, self.resolution)
        clip_ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        t5_ids = self.tokenizer_2(
            prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        pooled_prompt_embeds = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        prompt_embeds = self.text_encoder_2(t5_ids, output_hidden_states=False)[0]

        pixel_values = pixel_values.to(device=self.device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixel_values).latent_dist.mode()
        latents = (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        return {
            "latents": latents.float(),
            "prompt_embeds": prompt_embeds.float(),
            "pooled_prompt_embeds": pooled_prompt_embeds.float(),
        }

    def sample_inputs(self, encoded: dict[str, Tensor], seeds: Tensor) -> dict[str, Tensor]:
        """Per sample i (generator seeded with seeds[i]): ε ~ N(0, I) first, then u for the timestep.

        Returns ``noisy_latents`` packed (B, h/2 · w/2, 4C) fp32, ``timesteps`` (B,) fp32 in
        [0, 1000], ``sigmas`` (B,), ``noise`` and ``target`` = ε − x0 (B, C, h, w).
        """
        latents = encoded["latents"].float()
        draw = self.flow_matching.draw(latents, seeds)
        packed = FluxPipeline._pack_latents(draw.noisy_latents, *latents.shape)
        return {
            "noisy_latents": packed,
            "timesteps": draw.timesteps,
            "sigmas": draw.sigmas,
            "noise": draw.noise,
            "target": draw.noise - latents,
        }

    def forward(self, model: nn.Module, encoded: dict[str, Tensor], inputs: dict[str, Tensor]) -> Tensor:
        """Velocity prediction, unpacked to the target's (B, C, h, w), in the model's dtype."""
        dtype = model_dtype(model)
        target = inputs["target"]
        batch_size, _, height, width = target.shape
        device = target.device
        image_ids = FluxPipeline._prepare_latent_image_ids(batch_size, height // 2, width // 2, device, dtype)
        text_ids = torch.zeros(encoded["prompt_embeds"].shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if unwrap_model(model).config.guidance_embeds:
            guidance = torch.full((batch_size,), self.guidance_scale, device=device, dtype=torch.float32)
        prediction = model(
            hidden_states=inputs["noisy_latents"].to(dtype),
            timestep=(inputs["timesteps"] / 1000).to(dtype),
            guidance=guidance,
            pooled_projections=encoded["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=encoded["prompt_embeds"].to(dtype),
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(
            prediction, height * self.vae_scale_factor, width * self.vae_scale_factor, self.vae_scale_factor
        )

    # --- export and validation ----------------------------------------------------------------
    def build_pipeline(self, model: nn.Module | None = None) -> FluxPipeline:
        """A ``FluxPipeline`` with ``model`` (default: the backbone) as its transformer and a fresh copy
        of the scheduler; ``.save_pretrained`` writes a loadable model repository."""
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config),
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            transformer=unwrap_model(self.backbone if model is None else model),
        )

    def pipeline_call_kwargs(self, prompts: list[str], seeds: list[int]) -> dict:
        return {**super().pipeline_call_kwargs(prompts, seeds), "max_sequence_length": self.max_sequence_length}

    def save_pretrained(self, state_dict: dict[str, Tensor], output_dir: str | os.PathLike) -> None:
        """Write ``output_dir/transformer``, loadable by ``FluxTransformer2DModel.from_pretrained``."""
        save_backbone_state_dict(self.backbone, state_dict, Path(output_dir) / "transformer")
