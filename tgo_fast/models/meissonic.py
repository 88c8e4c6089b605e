"""Meissonic (Bai et al. 2024): its released masked-token transformer and the TGO adapter.

:class:`MeissonicTransformer2DModel` is written from the public config of the ``transformer`` subfolder
of ``MeissonFlow/Meissonic`` with diffusers building blocks, so the released checkpoint loads with
``from_pretrained`` unchanged (same parameter names and shapes, no key remapping):

    embed (UVit2DConvEmbed: token embedding → RMSNorm → 1×1 conv)  ──► down_block (2×2 conv + RMSNorm, optional)
    ──► project_to_hidden_norm/project_to_hidden ──► num_layers × FluxTransformerBlock (text + image streams)
    ──► num_single_layers × FluxSingleTransformerBlock ──► project_from_hidden_norm/project_from_hidden
    ──► up_block (2×2 transposed conv + RMSNorm, optional) ──► mlm_layer (1×1 conv → RMSNorm → 1×1 head)

Conditioning, as in the released code: the 5 micro-conditions (width, height, crop top, crop left,
aesthetic score) are sinusoidally embedded (256 each), concatenated to the pooled CLIP embedding and
mapped by ``cond_embed`` to the model width; that vector and the timestep go through Flux's
``time_text_embed`` to the adaLN conditioning. The released forward multiplies ``timestep`` by 1000
internally and the released training script passes ``mask_ratio × 1000`` (SPEC §2); both are kept, so
the model sees exactly what it was trained with. Text tokens (``encoder_hidden_states``, CLIP's
penultimate hidden states) are projected by ``context_embedder`` + RMSNorm and attend jointly with the
image tokens under 3-axis RoPE (text ids 0, image ids (0, row, col) on the token grid after ``down_block``).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from diffusers import AmusedScheduler, DiffusionPipeline, ImagePipelineOutput, VQModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import (
    CombinedTimestepGuidanceTextProjEmbeddings,
    CombinedTimestepTextProjEmbeddings,
    TimestepEmbedding,
    get_timestep_embedding,
)
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_flux import (
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from diffusers.models.unets.uvit_2d import ConvMlmLayer, UVit2DConvEmbed
from diffusers.models.upsampling import Upsample2D
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from .amused import (
    AESTHETIC_SCORE,
    TINY_CODEBOOK_SIZE,
    TINY_RESOLUTION,
    TINY_VOCAB_SIZE,
    MaskedTokenAdapter,
    clip_prompt_embeds,
)
from .base import model_dtype, unwrap_model
from .text import seeded_init

__all__ = ["MeissonicAdapter", "MeissonicPipeline", "MeissonicTransformer2DModel", "MICRO_CONDS", "meissonic_image_ids"]

NATIVE_RESOLUTION = 1024  # the released model's resolution (its config has no sample_size)

# Fixed in the released model (not config keys): 5 micro-conditions × 256 sinusoidal channels.
MICRO_CONDS = 5
MICRO_COND_ENCODE_DIM = 256
_NORM_EPS = 1e-6


def meissonic_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """RoPE ids (height·width, 3) of an image token grid: (0, row, col), row-major."""
    rows = torch.arange(height, device=device, dtype=dtype)[:, None].expand(height, width)
    cols = torch.arange(width, device=device, dtype=dtype)[None, :].expand(height, width)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(height * width, 3)


class _Resample(nn.Module):
    """The released ``down_block`` / ``up_block``: an optional 2× down- or up-sampling, nothing else."""

    def __init__(self, channels: int, *, downsample: bool, upsample: bool):
        super().__init__()
        rms = dict(norm_type="rms_norm", eps=_NORM_EPS, elementwise_affine=True, bias=False)
        self.downsample = (
            Downsample2D(channels, use_conv=True, padding=0, name="Conv2d_0", kernel_size=2, **rms)
            if downsample
            else None
        )
        self.upsample = (
            Upsample2D(channels, use_conv_transpose=True, kernel_size=2, padding=0, name="conv", interpolate=False, **rms)
            if upsample
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class MeissonicTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Meissonic's masked-token transformer; config keys and defaults are the released ``transformer/config.json``.

    Args:
        patch_size: must be 1 (kept for config compatibility; tokens are not patched).
        in_channels: unused by the computation (kept for config compatibility).
        num_layers / num_single_layers: dual-stream / single-stream Flux blocks.
        attention_head_dim, num_attention_heads: width = heads × head_dim.
        joint_attention_dim: width of the text encoder's hidden states.
        pooled_projection_dim: width of the pooled text embedding; must equal the model width (the
            released model feeds the ``cond_embed`` output, of model width, to ``time_text_embed``).
        guidance_embeds: adds Flux's guidance embedder.
        axes_dims_rope: RoPE channels per id axis; must sum to ``attention_head_dim``.
        vocab_size: token embedding rows (codebook + mask token, rounded); the mask token id is ``vocab_size − 1``.
        codebook_size: VQ codebook size = output logits.
        downsample / upsample: 2× token-grid down/up-sampling around the transformer.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        num_layers: int = 14,
        num_single_layers: int = 28,
        attention_head_dim: int = 128,
        num_attention_heads: int = 8,
        joint_attention_dim: int = 1024,
        pooled_projection_dim: int = 1024,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, ...] = (16, 56, 56),
        vocab_size: int = 8256,
        codebook_size: int = 8192,
        downsample: bool = True,
        upsample: bool = True,
    ):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        if patch_size != 1:
            raise ValueError(f"patch_size: Meissonic does not patch its tokens, expected 1, got {patch_size}")
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(
                f"axes_dims_rope: expected channels summing to attention_head_dim={attention_head_dim}, "
                f"got {list(axes_dims_rope)} (sum {sum(axes_dims_rope)})"
            )
        if pooled_projection_dim != inner_dim:
            raise ValueError(
                f"pooled_projection_dim: expected the model width num_attention_heads × attention_head_dim = "
                f"{inner_dim}, got {pooled_projection_dim}"
            )
        if codebook_size >= vocab_size:
            raise ValueError(
                f"vocab_size: expected more rows than codebook_size={codebook_size} (the mask token is "
                f"vocab_size − 1), got {vocab_size}"
            )
        self.inner_dim = inner_dim

        self.pos_embed = FluxPosEmbed(theta=10000, axes_dim=list(axes_dims_rope))
        time_text_cls = (
            CombinedTimestepGuidanceTextProjEmbeddings if guidance_embeds else CombinedTimestepTextProjEmbeddings
        )
        self.time_text_embed = time_text_cls(embedding_dim=inner_dim, pooled_projection_dim=pooled_projection_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            [FluxTransformerBlock(inner_dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [
                FluxSingleTransformerBlock(inner_dim, num_attention_heads, attention_head_dim)
                for _ in range(num_single_layers)
            ]
        )

        # The UViT parts around the transformer: width inner_dim throughout, no biases, RMSNorm eps 1e-6.
        self.embed = UVit2DConvEmbed(inner_dim, inner_dim, vocab_size, True, _NORM_EPS, False)
        self.mlm_layer = ConvMlmLayer(inner_dim, inner_dim, False, True, _NORM_EPS, codebook_size)
        self.cond_embed = TimestepEmbedding(
            MICRO_CONDS * MICRO_COND_ENCODE_DIM + pooled_projection_dim, inner_dim, sample_proj_bias=False
        )
        self.encoder_proj_layer_norm = RMSNorm(inner_dim, _NORM_EPS, True)
        self.project_to_hidden_norm = RMSNorm(inner_dim, _NORM_EPS, True)
        self.project_to_hidden = nn.Linear(inner_dim, inner_dim, bias=False)
        self.project_from_hidden_norm = RMSNorm(inner_dim, _NORM_EPS, True)
        self.project_from_hidden = nn.Linear(inner_dim, inner_dim, bias=False)
        self.down_block = _Resample(inner_dim, downsample=downsample, upsample=False)
        self.up_block = _Resample(inner_dim, downsample=False, upsample=upsample)

        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        joint_attention_kwargs: dict | None = None,
        return_dict: bool = True,
        micro_conds: torch.Tensor | None = None,
        return_hidden_states: bool = False,
    ):
        """Logits over the codebook for every image token.

        Args:
            hidden_states: (B, h, w) int64 token ids (masked positions = ``vocab_size − 1``).
            encoder_hidden_states: (B, T, joint_attention_dim) text hidden states.
            pooled_projections: (B, pooled_projection_dim) pooled text embedding.
            timestep: (B,) or (1,) — ``mask_ratio × 1000`` in training; multiplied by 1000 inside, as released.
            img_ids / txt_ids: RoPE ids (N, 3) / (T, 3); None builds them (image grid after ``down_block``, zeros).
            guidance: (B,) guidance scale when ``guidance_embeds``.
            micro_conds: (B, 5) float (width, height, crop top, crop left, aesthetic score).
            return_dict: False → a 1-tuple (the released model returns the bare tensor otherwise).
            return_hidden_states: return the (B, h·w, width) input of the 1×1 logits head (``mlm_layer.conv2``)
                instead of the logits, so a fused loss can apply the head itself.

        Returns:
            logits (B, codebook_size, h, w), or hidden (B, h·w, width) when ``return_hidden_states``.
        """
        if micro_conds is None:
            raise ValueError(
                "micro_conds: expected a (B, 5) tensor (width, height, crop top, crop left, aesthetic score), got None"
            )
        if joint_attention_kwargs is not None and "scale" in joint_attention_kwargs:
            joint_attention_kwargs = dict(joint_attention_kwargs)
            lora_scale = joint_attention_kwargs.pop("scale")
        else:
            lora_scale = 1.0
        if USE_PEFT_BACKEND:
            scale_lora_layers(self, lora_scale)
        try:
            hidden = self._trunk(
                hidden_states, encoder_hidden_states, pooled_projections, timestep,
                img_ids, txt_ids, guidance, joint_attention_kwargs, micro_conds,
            )
        finally:
            if USE_PEFT_BACKEND:
                unscale_lora_layers(self, lora_scale)
        if return_hidden_states:  # mlm_layer without its last 1×1 conv, channels last
            hidden = self.mlm_layer.layer_norm(self.mlm_layer.conv1(hidden).permute(0, 2, 3, 1))
            return hidden.flatten(1, 2)
        logits = self.mlm_layer(hidden)
        return logits if return_dict else (logits,)

    def _trunk(
        self, token_ids, encoder_hidden_states, pooled_projections, timestep,
        img_ids, txt_ids, guidance, joint_attention_kwargs, micro_conds,
    ) -> torch.Tensor:
        """Everything before ``mlm_layer``: (B, width, h, w)."""
        batch_size = token_ids.shape[0]
        micro_embeds = get_timestep_embedding(
            micro_conds.flatten(), MICRO_COND_ENCODE_DIM, flip_sin_to_cos=True, downscale_freq_shift=0
        ).reshape(batch_size, -1)
        pooled = torch.cat([pooled_projections, micro_embeds], dim=1).to(self.dtype)
        pooled = self.cond_embed(pooled).to(encoder_hidden_states.dtype)

        hidden = self.down_block(self.embed(token_ids))
        encoder_hidden_states = self.encoder_proj_layer_norm(self.context_embedder(encoder_hidden_states))

        _, channels, height, width = hidden.shape
        hidden = hidden.permute(0, 2, 3, 1).reshape(batch_size, height * width, channels)
        hidden = self.project_to_hidden(self.project_to_hidden_norm(hidden))

        timestep = timestep.to(hidden.dtype) * 1000
        if guidance is None:
            temb = self.time_text_embed(timestep, pooled)
        else:
            temb = self.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled)

        if img_ids is None:
            img_ids = meissonic_image_ids(height, width, device=hidden.device)
        if txt_ids is None:
            txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=hidden.device)
        rotary = self.pos_embed(torch.cat([txt_ids.reshape(-1, 3), img_ids.reshape(-1, 3)], dim=0))

        checkpointing = torch.is_grad_enabled() and self.gradient_checkpointing
        for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
            if checkpointing:
                encoder_hidden_states, hidden = self._gradient_checkpointing_func(
                    block, hidden, encoder_hidden_states, temb, rotary, joint_attention_kwargs
                )
            else:
                encoder_hidden_states, hidden = block(
                    hidden_states=hidden,
                    encoder_hidden_states=encoder_hidden_states,
                    temb=temb,
                    image_rotary_emb=rotary,
                    joint_attention_kwargs=joint_attention_kwargs,
                )

        hidden = self.project_from_hidden(self.project_from_hidden_norm(hidden))
        hidden = hidden.reshape(batch_size, height, width, channels).permute(0, 3, 1, 2)
        return self.up_block(hidden)


class MeissonicPipeline(DiffusionPipeline):
    """Text-to-image sampling with :class:`MeissonicTransformer2DModel`, as the released Meissonic pipeline:
    all tokens start masked; each step predicts every masked token, classifier-free guidance on the
    logits, and ``AmusedScheduler`` (Meissonic's scheduler is a copy) re-masks the least confident
    ones along the cosine schedule. The step index is the model's timestep input, as released."""

    model_cpu_offload_seq = "text_encoder->transformer->vqvae"

    def __init__(
        self,
        vqvae: VQModel,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModelWithProjection,
        transformer: MeissonicTransformer2DModel,
        scheduler: AmusedScheduler,
    ):
        super().__init__()
        self.register_modules(
            vqvae=vqvae, tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, scheduler=scheduler
        )
        self.vae_scale_factor = 2 ** (len(vqvae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        height: int = NATIVE_RESOLUTION,
        width: int = NATIVE_RESOLUTION,
        num_inference_steps: int = 48,
        guidance_scale: float = 9.0,
        negative_prompt: str | list[str] | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        micro_conditioning_aesthetic_score: float = AESTHETIC_SCORE,
        micro_conditioning_crop_coord: tuple[int, int] = (0, 0),
        temperature: float | tuple[float, float] = (2, 0),
        return_dict: bool = True,
    ):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch_size, device = len(prompts), self._execution_device
        encoder_hidden_states, pooled = clip_prompt_embeds(self.tokenizer, self.text_encoder, prompts, device)
        do_guidance = guidance_scale > 1.0
        if do_guidance:
            negative = negative_prompt if negative_prompt is not None else ""
            negative = [negative] * batch_size if isinstance(negative, str) else list(negative)
            negative_hidden, negative_pooled = clip_prompt_embeds(self.tokenizer, self.text_encoder, negative, device)
            encoder_hidden_states = torch.cat([negative_hidden, encoder_hidden_states])
            pooled = torch.cat([negative_pooled, pooled])
        micro_conds = torch.tensor(
            [[width, height, *micro_conditioning_crop_coord, micro_conditioning_aesthetic_score]],
            device=device, dtype=encoder_hidden_states.dtype,
        ).expand(encoder_hidden_states.shape[0], -1)

        grid = (batch_size, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = torch.full(grid, self.scheduler.config.mask_token_id, dtype=torch.long, device=device)
        self.scheduler.set_timesteps(num_inference_steps, temperature, device)
        for timestep in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if do_guidance else latents
            logits = self.transformer(
                hidden_states=model_input,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled,
                timestep=timestep.reshape(1).expand(model_input.shape[0]),
                micro_conds=micro_conds,
            )
            if do_guidance:
                uncond_logits, cond_logits = logits.chunk(2)
                logits = uncond_logits + guidance_scale * (cond_logits - uncond_logits)
            latents = self.scheduler.step(
                model_output=logits, timestep=timestep, sample=latents, generator=generator
            ).prev_sample

        if output_type == "latent":
            images = latents
        else:
            shape = (*grid, self.vqvae.config.latent_channels)
            images = self.vqvae.decode(latents, force_not_quantize=True, shape=shape).sample.clip(0, 1)
            images = self.image_processor.postprocess(images, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images) if return_dict else (images,)


class MeissonicAdapter(MaskedTokenAdapter):
    """Meissonic (``MeissonFlow/Meissonic``): :class:`MeissonicTransformer2DModel` on aMUSEd-style VQ tokens,
    a CLIP-H text encoder, timestep = mask ratio × 1000 (the released training script)."""

    name: ClassVar[str] = "meissonic"
    backbone_class = MeissonicTransformer2DModel
    export_class = MeissonicTransformer2DModel
    takes_timestep = True
    validation_guidance_scale = 9.0  # the released pipeline's default

    def _build_tiny(self, seed: int) -> None:
        self._tiny_text_and_vq(seed)
        config = dict(
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=self.text_encoder.config.hidden_size,
            pooled_projection_dim=self.text_encoder.config.projection_dim,
            axes_dims_rope=(4, 6, 6),
            vocab_size=TINY_VOCAB_SIZE,
            codebook_size=TINY_CODEBOOK_SIZE,
            downsample=True,
            upsample=True,
        )
        self.backbone = seeded_init(seed, lambda: MeissonicTransformer2DModel(**config))

    def _default_resolution(self) -> int:
        return TINY_RESOLUTION if self.pretrained is None else NATIVE_RESOLUTION

    def _resolution_multiple(self) -> int:
        return self.vae_scale_factor * (2 if self.backbone.config.downsample else 1)

    def _call_backbone(self, model, encoded, inputs, return_hidden_states):
        dtype = model_dtype(model)
        return model(
            hidden_states=inputs["input_ids"],
            encoder_hidden_states=encoded["encoder_hidden_states"].to(dtype),
            pooled_projections=encoded["pooled_text_emb"].to(dtype),
            timestep=inputs["timestep"],
            micro_conds=encoded["micro_conds"].to(dtype),
            return_hidden_states=return_hidden_states,
        )

    def build_pipeline(self, model: nn.Module | None = None) -> MeissonicPipeline:
        return MeissonicPipeline(
            vqvae=self.vqvae, tokenizer=self.tokenizer, text_encoder=self.text_encoder,
            transformer=unwrap_model(self.backbone if model is None else model), scheduler=self.scheduler,
        )
