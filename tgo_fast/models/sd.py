"""Stable Diffusion 1.5 and SDXL adapters (UNet2DConditionModel, ε- or v-prediction).

Conventions follow diffusers' ``train_text_to_image.py`` / ``train_text_to_image_sdxl.py``:

    z0      = vae.encode(x).latent_dist.mode() · scaling_factor        (encode, deterministic)
    ε ~ N(0, I),  t ~ U{0, …, T_train − 1}                             (per sample, from its seed)
    z_t     = √ᾱ_t · z0 + √(1 − ᾱ_t) · ε                               (scheduler.add_noise)
    target  = ε                           (prediction_type "epsilon")
            = √ᾱ_t · ε − √(1 − ᾱ_t) · z0  (prediction_type "v_prediction", scheduler.get_velocity)

SD1.5 conditions on the last hidden state of one CLIP text encoder; SDXL on the penultimate hidden
states of both encoders (concatenated), the pooled projection of the second one and the six
``add_time_ids`` (original size, crop top-left, target size; here (R, R, 0, 0, R, R) as the data
pipeline resizes and centre-crops to R).
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .base import (
    ModelAdapter,
    check_pixel_values,
    freeze,
    load_component,
    model_dtype,
    place,
    randn_per_sample,
    sample_generators,
    save_backbone_state_dict,
    unwrap_model,
)
from .text import seeded_init, tiny_clip_text

__all__ = ["SD15Adapter", "SDXLAdapter", "tiny_vae"]

TINY_RESOLUTION = 64
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_vae(
    seed: int, *, latent_channels: int = 4, scaling_factor: float, shift_factor: float | None = None
) -> AutoencoderKL:
    """A 3-level AutoencoderKL (downsampling ×4) small enough for CPU training steps."""
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )
    return seeded_init(seed, lambda: AutoencoderKL(**config))


def vae_scale_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def resolve_resolution(resolution: int | None, default: int, multiple: int) -> int:
    """``resolution`` (or ``default``), checked to be a positive multiple of ``multiple``."""
    resolution = default if resolution is None else resolution
    if not isinstance(resolution, int) or resolution <= 0 or resolution % multiple:
        raise ValueError(f"resolution must be a positive multiple of {multiple} for this model, got {resolution!r}")
    return resolution


class _UNetAdapter(ModelAdapter):
    """Shared UNet2DConditionModel logic; subclasses supply text encoding, conditioning and the pipeline."""

    kind: ClassVar[str] = "diffusion"
    lora_target_modules: ClassVar[list[str]] = UNET_LORA_TARGETS
    vae_keeps_fp32: ClassVar[bool] = False  # see _frozen_dtype

    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler

    def __init__(
        self,
        pretrained: str | None,
        *,
        resolution: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        tiny_seed: int = 0,
        prediction_type: str | None = None,
        revision: str | None = None,
        variant: str | None = None,
    ) -> None:
        self.pretrained, self.dtype, self.device = pretrained, dtype, torch.device(device)
        if pretrained is None:
            self._build_tiny(tiny_seed)
        else:
            self._load_pretrained(pretrained, dtype=dtype, revision=revision, variant=variant)
        if prediction_type is not None:
            if prediction_type not in ("epsilon", "v_prediction"):
                raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
            self.noise_scheduler.register_to_config(prediction_type=prediction_type)
        if self.noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"unsupported scheduler prediction_type {self.noise_scheduler.config.prediction_type!r}; "
                "expected 'epsilon' or 'v_prediction'"
            )

        self.vae_scale_factor = vae_scale_factor(self.vae)
        down_factor = 2 ** (len(self.backbone.config.block_out_channels) - 1)
        self.resolution = resolve_resolution(
            resolution, self.backbone.config.sample_size * self.vae_scale_factor, self.vae_scale_factor * down_factor
        )
        place(self.backbone, self.device, dtype)
        for module in self._frozen_modules():
            freeze(place(module, self.device, self._frozen_dtype(module, dtype)))

    # --- construction -------------------------------------------------------------------------
    @abc.abstractmethod
    def _build_tiny(self, seed: int) -> None:
        """Random-init tokenizers, text encoders, VAE, UNet and scheduler, deterministic from ``seed``."""

    @abc.abstractmethod
    def _load_pretrained(self, pretrained: str, *, dtype, revision, variant) -> None:
        """Every component through ``from_pretrained(pretrained, subfolder=...)``."""

    @abc.abstractmethod
    def _frozen_modules(self) -> list[nn.Module]:
        """The VAE and text encoders."""

    def _frozen_dtype(self, module: nn.Module, dtype: torch.dtype) -> torch.dtype:
        """The training dtype, except for a VAE that diffusers keeps in fp32: SDXL's, when its config says
        ``force_upcast`` (it overflows in half precision; StableDiffusionXLPipeline, train_text_to_image_sdxl.py)."""
        if module is self.vae and self.vae_keeps_fp32 and self.vae.config.force_upcast:
            return torch.float32
        return dtype

    def _load_unet_vae_scheduler(self, pretrained: str, *, dtype, revision, variant) -> None:
        # The VAE loads in its stored precision; __init__ casts it (or keeps it in fp32, vae_keeps_fp32).
        self.vae = load_component(AutoencoderKL, pretrained, "vae", revision=revision, variant=variant)
        self.backbone = load_component(
            UNet2DConditionModel, pretrained, "unet", dtype=dtype, revision=revision, variant=variant
        )
        self.noise_scheduler = load_component(DDPMScheduler, pretrained, "scheduler", revision=revision)

    @staticmethod
    def _tiny_scheduler() -> DDPMScheduler:
        # Stable Diffusion's training schedule.
        return DDPMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            steps_offset=1,
            prediction_type="epsilon",
        )

    # --- training -----------------------------------------------------------------------------
    def _tokenize(self, tokenizer: CLIPTokenizer, prompts: list[str]) -> Tensor:
        return tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    def _encode_latents(self, pixel_values: Tensor) -> Tensor:
        pixel_values = pixel_values.to(device=self.device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixel_values).latent_dist.mode()
        return (latents * self.vae.config.scaling_factor).float()

    def sample_inputs(self, encoded: dict[str, Tensor], seeds: Tensor) -> dict[str, Tensor]:
        """Per sample i (generator seeded with seeds[i]): ε ~ N(0, I) first, then t ~ U{0..T−1}.

        Returns ``noisy_latents`` (B, C, h, w) fp32, ``timesteps`` (B,) int64, ``noise`` and ``target``.
        """
        latents = encoded["latents"]
        generators = sample_generators(seeds, latents.shape[0])
        noise = randn_per_sample(generators, tuple(latents.shape[1:]), device=latents.device)
        num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.cat([torch.randint(0, num_train_timesteps, (1,), generator=g) for g in generators])
        timesteps = timesteps.to(latents.device)
        latents = latents.float()
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return {"noisy_latents": noisy_latents, "timesteps": timesteps, "noise": noise, "target": target}

    @abc.abstractmethod
    def _conditioning(self, encoded: dict[str, Tensor], dtype: torch.dtype) -> dict:
        """The UNet's conditioning keyword arguments from ``encoded``, cast to ``dtype``."""

    def forward(self, model: nn.Module, encoded: dict[str, Tensor], inputs: dict[str, Tensor]) -> Tensor:
        """UNet prediction (B, C, h, w) in the model's dtype."""
        dtype = model_dtype(model)
        return model(
            inputs["noisy_latents"].to(dtype),
            inputs["timesteps"],
            **self._conditioning(encoded, dtype),
            return_dict=False,
        )[0]

    # --- export and validation ----------------------------------------------------------------
    def _validation_scheduler(self) -> DPMSolverMultistepScheduler:
        return DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)

    def save_pretrained(self, state_dict: dict[str, Tensor], output_dir: str | os.PathLike) -> None:
        """Write ``output_dir/unet`` (config + safetensors), loadable by ``UNet2DConditionModel.from_pretrained``."""
        save_backbone_state_dict(self.backbone, state_dict, Path(output_dir) / "unet")


class SD15Adapter(_UNetAdapter):
    """Stable Diffusion 1.x/2.x: one CLIP text encoder, ``encoder_hidden_states`` = its last hidden state.

    ``encode`` returns ``latents`` (B, 4, R/8, R/8) and ``prompt_embeds`` (B, 77, D), both fp32.
    """

    name: ClassVar[str] = "sd15"
    validation_guidance_scale = 7.5

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel

    def _build_tiny(self, seed: int) -> None:
        self.tokenizer, self.text_encoder = tiny_clip_text(seed + 1, 32, 32, with_projection=False)
        self.vae = tiny_vae(seed + 2, scaling_factor=0.18215)
        unet_config = dict(
            sample_size=TINY_RESOLUTION // vae_scale_factor(self.vae),
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=32,
            attention_head_dim=4,
        )
        self.backbone = seeded_init(seed, lambda: UNet2DConditionModel(**unet_config))
        self.noise_scheduler = self._tiny_scheduler()

    def _load_pretrained(self, pretrained: str, *, dtype, revision, variant) -> None:
        self.tokenizer = load_component(CLIPTokenizer, pretrained, "tokenizer", revision=revision)
        self.text_encoder = load_component(
            CLIPTextModel, pretrained, "text_encoder", dtype=dtype, revision=revision, variant=variant
        )
        self._load_unet_vae_scheduler(pretrained, dtype=dtype, revision=revision, variant=variant)

    def _frozen_modules(self) -> list[nn.Module]:
        return [self.vae, self.text_encoder]

    @torch.no_grad()
    def encode(self, pixel_values: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        check_pixel_values(pixel_values, prompts, self.resolution)
        prompt_embeds = self.text_encoder(self._tokenize(self.tokenizer, prompts), return_dict=False)[0]
        return {"latents": self._encode_latents(pixel_values), "prompt_embeds": prompt_embeds.float()}

    def _conditioning(self, encoded: dict[str, Tensor], dtype: torch.dtype) -> dict:
        return {"encoder_hidden_states": encoded["prompt_embeds"].to(dtype)}

    def build_pipeline(self, model: nn.Module | None = None) -> StableDiffusionPipeline:
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=unwrap_model(self.backbone if model is None else model),
            scheduler=self._validation_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


class SDXLAdapter(_UNetAdapter):
    """SDXL: two CLIP text encoders, pooled embeds and ``add_time_ids`` as micro-conditioning.

    ``encode`` returns ``latents`` (B, 4, R/8, R/8), ``prompt_embeds`` (B, 77, D1 + D2) (penultimate
    hidden states of both encoders), ``pooled_prompt_embeds`` (B, P) (text_encoder_2 projection) and
    ``add_time_ids`` (B, 6), all fp32.
    """

    name: ClassVar[str] = "sdxl"
    validation_guidance_scale = 5.0
    vae_keeps_fp32 = True

    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection

    def _build_tiny(self, seed: int) -> None:
        self.tokenizer, self.text_encoder = tiny_clip_text(seed + 1, 32, 32, with_projection=False)
        self.tokenizer_2, self.text_encoder_2 = tiny_clip_text(seed + 2, 32, 32, with_projection=True)
        self.vae = tiny_vae(seed + 3, scaling_factor=0.13025)
        addition_time_embed_dim = 8
        unet_config = dict(
            sample_size=TINY_RESOLUTION // vae_scale_factor(self.vae),
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=32 + 32,
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim,
            projection_class_embeddings_input_dim=6 * addition_time_embed_dim
            + self.text_encoder_2.config.projection_dim,
        )
        self.backbone = seeded_init(seed, lambda: UNet2DConditionModel(**unet_config))
        self.noise_scheduler = self._tiny_scheduler()

    def _load_pretrained(self, pretrained: str, *, dtype, revision, variant) -> None:
        self.tokenizer = load_component(CLIPTokenizer, pretrained, "tokenizer", revision=revision)
        self.tokenizer_2 = load_component(CLIPTokenizer, pretrained, "tokenizer_2", revision=revision)
        self.text_encoder = load_component(
            CLIPTextModel, pretrained, "text_encoder", dtype=dtype, revision=revision, variant=variant
        )
        self.text_encoder_2 = load_component(
            CLIPTextModelWithProjection, pretrained, "text_encoder_2", dtype=dtype, revision=revision, variant=variant
        )
        self._load_unet_vae_scheduler(pretrained, dtype=dtype, revision=revision, variant=variant)

    def _frozen_modules(self) -> list[nn.Module]:
        return [self.vae, self.text_encoder, self.text_encoder_2]

    @torch.no_grad()
    def encode(self, pixel_values: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        check_pixel_values(pixel_values, prompts, self.resolution)
        hidden_states = []
        for tokenizer, text_encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            output = text_encoder(self._tokenize(tokenizer, prompts), output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
        pooled_prompt_embeds = output.text_embeds  # the second (projection) encoder's pooled output
        size = self.resolution
        add_time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=self.device)
        return {
            "latents": self._encode_latents(pixel_values),
            "prompt_embeds": torch.cat(hidden_states, dim=-1).float(),
            "pooled_prompt_embeds": pooled_prompt_embeds.float(),
            "add_time_ids": add_time_ids.expand(len(prompts), -1).contiguous(),
        }

    def _conditioning(self, encoded: dict[str, Tensor], dtype: torch.dtype) -> dict:
        added_cond_kwargs = {
            "text_embeds": encoded["pooled_prompt_embeds"].to(dtype),
            "time_ids": encoded["add_time_ids"].to(dtype),
        }
        return {"encoder_hidden_states": encoded["prompt_embeds"].to(dtype), "added_cond_kwargs": added_cond_kwargs}

    def _run_pipeline(self, pipeline, prompts: list[str], seeds: list[int], **call_kwargs) -> list:
        """The pipeline's latents, decoded in the VAE's own precision: StableDiffusionXLPipeline hands an fp32 VAE
        latents in the UNet's dtype (it only upcasts an fp16 VAE itself)."""
        output_type = call_kwargs.pop("output_type")
        latents = super()._run_pipeline(pipeline, prompts, seeds, output_type="latent", **call_kwargs)
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        return pipeline.image_processor.postprocess(images, output_type=output_type)

    def build_pipeline(self, model: nn.Module | None = None) -> StableDiffusionXLPipeline:
        return StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=unwrap_model(self.backbone if model is None else model),
            scheduler=self._validation_scheduler(),
        )
