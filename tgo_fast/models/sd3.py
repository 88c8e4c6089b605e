"""Stable Diffusion 3 / 3.5 adapter (SD3Transformer2DModel, rectified-flow matching).

Conventions follow diffusers' ``train_dreambooth_sd3.py`` / ``train_dreambooth_lora_sd3.py`` (without
EDM output preconditioning) and FlowMatchEulerDiscreteScheduler:

    x0     = (vae.encode(x).latent_dist.mode() − shift_factor) · scaling_factor      (encode)
    ε ~ N(0, I);  u ~ density(weighting_scheme) on [0, 1)                            (per sample, from its seed)
    k      = ⌊u · T_train⌋,  t = scheduler.timesteps[k],  σ = scheduler.sigmas[k]    (training tables)
    x_σ    = (1 − σ) · x0 + σ · ε
    v      = ε − x0                                                                  (the flow velocity)
    λ(σ)   = compute_loss_weighting_for_sd3(weighting_scheme, σ)                     (1, σ⁻², or cosmap)

The trainer's per-sample error is the plain mean squared difference of ``forward`` and ``target``, so
the loss weight is carried inside both: ``target = √λ · v`` and ``forward`` returns ``√λ · v̂``, which
makes mean((forward − target)²) = λ · mean((v̂ − v)²), the example's weighted loss. For the schemes
that shape only the timestep density (logit_normal, mode, none) λ = 1 and the target is v itself.

The transformer sees the latents (B, C, h, w) (it patchifies them itself), the joint text sequence
of the pipeline's ``encode_prompt`` (both CLIP encoders' penultimate hidden states, concatenated and
zero-padded to T5's width, followed by T5's last hidden state), the two CLIP projections concatenated
as pooled embedding, and ``timestep = t`` in [0, 1000].
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.training_utils import compute_loss_weighting_for_sd3
from torch import Tensor, nn
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

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
from .flow import FlowMatching, timestep_density
from .sd import TINY_RESOLUTION, resolve_resolution, tiny_vae, vae_scale_factor
from .text import prompt_length, seeded_init, tiny_clip_text, tiny_t5_text

__all__ = ["SD3Adapter", "WEIGHTING_SCHEMES"]

# diffusers' SD3 examples: the density schemes (logit_normal, mode) and the loss-weight schemes
# (sigma_sqrt, cosmap; uniform timesteps); "none" = uniform timesteps, no weight.
WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")


class SD3Adapter(ModelAdapter):
    """SD3 / SD3.5 (medium, large). ``encode`` returns ``latents`` (B, 16, R/8, R/8) (shifted and scaled),
    ``prompt_embeds`` (B, 77 + S, D_t5) and ``pooled_prompt_embeds`` (B, P1 + P2), all fp32.

    Extra keyword arguments: ``weighting_scheme`` (one of :data:`WEIGHTING_SCHEMES`, default
    "logit_normal" as in the diffusers example; ``logit_mean`` 0, ``logit_std`` 1, ``mode_scale`` 1.29),
    ``max_sequence_length`` (T5 tokens; default min(tokenizer_3.model_max_length, 256), the pipeline's:
    256 for SD3, 32 for the tiny model), ``revision``, ``variant``.
    """

    name: ClassVar[str] = "sd3"
    kind: ClassVar[str] = "diffusion"
    # train_dreambooth_lora_sd3.py's default: the joint attention's image and context projections.
    lora_target_modules: ClassVar[list[str]] = [
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    ]
    validation_guidance_scale = 7.0  # StableDiffusion3Pipeline's default

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModelWithProjection
    tokenizer_2: CLIPTokenizer
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer_3: T5TokenizerFast
    text_encoder_3: T5EncoderModel
    vae: AutoencoderKL
    noise_scheduler: FlowMatchEulerDiscreteScheduler
    backbone: SD3Transformer2DModel

    def __init__(
        self,
        pretrained: str | None,
        *,
        resolution: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        tiny_seed: int = 0,
        weighting_scheme: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        max_sequence_length: int | None = None,
        revision: str | None = None,
        variant: str | None = None,
    ) -> None:
        # cosmap / sigma_sqrt draw u uniformly (diffusers' density) and weight the loss instead.
        density = timestep_density(
            weighting_scheme, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale,
            schemes=WEIGHTING_SCHEMES,
        )
        self.pretrained, self.dtype, self.device = pretrained, dtype, torch.device(device)
        self.weighting_scheme = weighting_scheme
        if pretrained is None:
            self._build_tiny(tiny_seed)
        else:
            self._load_pretrained(pretrained, dtype=dtype, revision=revision, variant=variant)
        self.max_sequence_length = prompt_length(max_sequence_length, self.tokenizer_3, 256)  # StableDiffusion3Pipeline's

        self.vae_scale_factor = vae_scale_factor(self.vae)
        patch_size = self.backbone.config.patch_size
        self.resolution = resolve_resolution(
            resolution, self.backbone.config.sample_size * self.vae_scale_factor, self.vae_scale_factor * patch_size
        )
        max_patches = self.backbone.config.pos_embed_max_size
        if max_patches is not None and self.resolution // (self.vae_scale_factor * patch_size) > max_patches:
            raise ValueError(
                f"resolution {self.resolution} is too large for this transformer: at most "
                f"{max_patches * self.vae_scale_factor * patch_size} px (pos_embed_max_size={max_patches})"
            )
        self.flow_matching = FlowMatching(self.noise_scheduler, density)
        place(self.backbone, self.device, dtype)
        # The SD3 examples keep the VAE in fp32 whatever the training precision.
        freeze(place(self.vae, self.device, torch.float32))
        for module in (self.text_encoder, self.text_encoder_2, self.text_encoder_3):
            freeze(place(module, self.device, dtype))

    # --- construction -------------------------------------------------------------------------
    def _build_tiny(self, seed: int) -> None:
        self.tokenizer, self.text_encoder = tiny_clip_text(seed + 1, 32, 32, with_projection=True)
        self.tokenizer_2, self.text_encoder_2 = tiny_clip_text(seed + 2, 32, 32, with_projection=True)
        # T5's width must hold both CLIP widths side by side (the pipeline zero-pads them to it).
        self.tokenizer_3, self.text_encoder_3 = tiny_t5_text(seed + 3, 64, max_length=32)
        # SD3's VAE: 16 latent channels, its shift and scaling factors.
        self.vae = tiny_vae(seed + 4, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)
        transformer_config = dict(
            sample_size=TINY_RESOLUTION // vae_scale_factor(self.vae),
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=self.text_encoder_3.config.d_model,
            caption_projection_dim=32,  # = num_attention_heads · attention_head_dim, as in SD3
            pooled_projection_dim=self.text_encoder.config.projection_dim + self.text_encoder_2.config.projection_dim,
            pos_embed_max_size=16,
            dual_attention_layers=(0,),  # SD3.5's MMDiT-X block, plus one plain SD3 block
            qk_norm="rms_norm",
        )
        self.backbone = seeded_init(seed, lambda: SD3Transformer2DModel(**transformer_config))
        # SD3 / SD3.5's scheduler configuration (static shift 3).
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)

    def _load_pretrained(self, pretrained: str, *, dtype, revision, variant) -> None:
        models = dict(dtype=dtype, revision=revision, variant=variant)
        self.tokenizer = load_component(CLIPTokenizer, pretrained, "tokenizer", revision=revision)
        self.tokenizer_2 = load_component(CLIPTokenizer, pretrained, "tokenizer_2", revision=revision)
        self.tokenizer_3 = load_component(T5TokenizerFast, pretrained, "tokenizer_3", revision=revision)
        self.text_encoder = load_component(CLIPTextModelWithProjection, pretrained, "text_encoder", **models)
        self.text_encoder_2 = load_component(CLIPTextModelWithProjection, pretrained, "text_encoder_2", **models)
        self.text_encoder_3 = load_component(T5EncoderModel, pretrained, "text_encoder_3", **models)
        # The VAE loads in its stored precision; __init__ keeps it in fp32.
        self.vae = load_component(AutoencoderKL, pretrained, "vae", revision=revision, variant=variant)
        self.backbone = load_component(SD3Transformer2DModel, pretrained, "transformer", **models)
        self.noise_scheduler = load_component(
            FlowMatchEulerDiscreteScheduler, pretrained, "scheduler", revision=revision
        )

    # --- training -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, pixel_values: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        check_pixel_values(pixel_values, prompts, self.resolution)
        prompt_embeds, _, pooled_prompt_embeds, _ = self.build_pipeline().encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
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

        Returns ``noisy_latents`` (B, C, h, w), ``timesteps`` (B,) in [0, 1000], ``sigmas`` (B,),
        ``loss_weights`` λ(σ) (B,), ``noise`` and ``target`` = √λ · (ε − x0), all fp32.
        """
        latents = encoded["latents"].float()
        draw = self.flow_matching.draw(latents, seeds)
        loss_weights = compute_loss_weighting_for_sd3(self.weighting_scheme, draw.sigmas).float()
        return {
            "noisy_latents": draw.noisy_latents,
            "timesteps": draw.timesteps,
            "sigmas": draw.sigmas,
            "loss_weights": loss_weights,
            "noise": draw.noise,
            "target": loss_weights.sqrt().view(-1, 1, 1, 1) * (draw.noise - latents),
        }

    def forward(self, model: nn.Module, encoded: dict[str, Tensor], inputs: dict[str, Tensor]) -> Tensor:
        """√λ · velocity prediction (B, C, h, w), in the model's dtype (λ = 1 but for sigma_sqrt / cosmap)."""
        dtype = model_dtype(model)
        velocity = model(
            hidden_states=inputs["noisy_latents"].to(dtype),
            encoder_hidden_states=encoded["prompt_embeds"].to(dtype),
            pooled_projections=encoded["pooled_prompt_embeds"].to(dtype),
            timestep=inputs["timesteps"],  # fp32: the time projection casts its own output
            return_dict=False,
        )[0]
        return inputs["loss_weights"].sqrt().to(dtype).view(-1, 1, 1, 1) * velocity

    # --- export and validation ----------------------------------------------------------------
    def build_pipeline(self, model: nn.Module | None = None) -> StableDiffusion3Pipeline:
        """A ``StableDiffusion3Pipeline`` with ``model`` (default: the backbone) as its transformer and a fresh
        copy of the scheduler; ``.save_pretrained`` writes a loadable model repository."""
        return StableDiffusion3Pipeline(
            transformer=unwrap_model(self.backbone if model is None else model),
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config),
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            text_encoder_3=self.text_encoder_3,
            tokenizer_3=self.tokenizer_3,
        )

    def pipeline_call_kwargs(self, prompts: list[str], seeds: list[int]) -> dict:
        return {**super().pipeline_call_kwargs(prompts, seeds), "max_sequence_length": self.max_sequence_length}

    def _run_pipeline(self, pipeline, prompts: list[str], seeds: list[int], **call_kwargs) -> list:
        """The pipeline's latents, decoded by the fp32 VAE: StableDiffusion3Pipeline hands the VAE latents in the
        transformer's dtype."""
        output_type = call_kwargs.pop("output_type")
        latents = super()._run_pipeline(pipeline, prompts, seeds, output_type="latent", **call_kwargs)
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        images = self.vae.decode(latents, return_dict=False)[0]
        return pipeline.image_processor.postprocess(images, output_type=output_type)

    def save_pretrained(self, state_dict: dict[str, Tensor], output_dir: str | os.PathLike) -> None:
        """Write ``output_dir/transformer``, loadable by ``SD3Transformer2DModel.from_pretrained``."""
        save_backbone_state_dict(self.backbone, state_dict, Path(output_dir) / "transformer")
