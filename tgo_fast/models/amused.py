"""aMUSEd (diffusers ``UVit2DModel`` + ``VQModel`` + CLIP) and the machinery shared by masked-token families.

Conventions follow diffusers' ``examples/amused/train_amused.py`` and ``AmusedPipeline``:

    tokens   = vqvae.quantize(vqvae.encode(x01).latents) indices, (B, R/f, R/f)   x01 = (x + 1)/2 ∈ [0, 1]
    text     = CLIP penultimate hidden states (B, 77, D) + projected pooled embedding (B, P)
    micro    = (width, height, crop top, crop left, aesthetic score) = (R, R, 0, 0, 6)
    mask     = cosine schedule from per-sample seeds (tgo_fast.models.masking), mask id = vocab_size − 1
    labels   = true token at masked positions, −100 elsewhere, (B, L) row-major over the token grid

The VQ model stays in fp32 whatever ``dtype`` is: token ids are an argmin over codebook distances
and a lower precision would change them. ``forward`` returns the (B, L, C) input of the 1×1 logits
conv (``mlm_layer.conv2``) and ``output_head`` that conv as a (V, C) weight (+ bias), so the fused
masked TGO loss never materialises (B, L, V) logits; ``logits`` runs the unmodified model forward.
"""
from __future__ import annotations

import abc
import functools
import os
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers
from torch import Tensor, nn
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from .base import (
    ModelAdapter,
    check_pixel_values,
    freeze,
    load_component,
    model_dtype,
    save_backbone_state_dict,
    unwrap_model,
)
from .masking import cosine_mask
from .text import seeded_init, tiny_clip_text

__all__ = ["AmusedAdapter", "AmusedTransformer", "MaskedTokenAdapter", "clip_prompt_embeds", "tiny_vq_model"]

TINY_RESOLUTION = 64
TINY_CODEBOOK_SIZE = 64
TINY_VOCAB_SIZE = 72  # codebook + mask token, rounded up to a multiple of 8 as aMUSEd's 8256 = 8192 + 64
MASKED_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
AESTHETIC_SCORE = 6.0  # the micro-conditioning value of the aMUSEd / Meissonic training data and pipelines


def tiny_vq_model(seed: int) -> VQModel:
    """A 3-level VQModel (downsampling ×4: 64 px → 16×16 tokens) with aMUSEd's codebook-lookup decoder."""
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=16,
        num_vq_embeddings=TINY_CODEBOOK_SIZE,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        mid_block_add_attention=False,
        lookup_from_codebook=True,
        force_upcast=True,
    )
    return seeded_init(seed, lambda: VQModel(**config))


@torch.no_grad()
def clip_prompt_embeds(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModelWithProjection, prompts: list[str], device=None
) -> tuple[Tensor, Tensor]:
    """CLIP penultimate hidden states (B, T, D) and projected pooled embedding (B, P), as the aMUSEd and
    Meissonic pipelines and training scripts compute them (prompts padded / truncated to 77 tokens)."""
    max_length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
    input_ids = tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    output = text_encoder(input_ids, return_dict=True, output_hidden_states=True)
    return output.hidden_states[-2], output.text_embeds


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``module.to(device, dtype)``, casting only when the dtype differs (diffusers warns on every cast)."""
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module.to(device=device)


def _lora_scale(attention_kwargs: dict | None) -> tuple[dict | None, float]:
    """Split diffusers' LoRA ``scale`` off the attention kwargs (as ``apply_lora_scale`` does)."""
    if attention_kwargs is None or "scale" not in attention_kwargs:
        return attention_kwargs, 1.0
    attention_kwargs = dict(attention_kwargs)
    return attention_kwargs, float(attention_kwargs.pop("scale"))


class AmusedTransformer(UVit2DModel):
    """``UVit2DModel`` whose forward can stop before the logits head.

    Same parameters, config and (with ``return_hidden_states=False``) the unmodified diffusers forward;
    ``return_hidden_states=True`` returns the (B, h·w, in_channels) input of ``mlm_layer.conv2``. Going
    through the module's own ``__call__`` (not its submodules) keeps DeepSpeed ZeRO-3's per-forward
    hooks and peft's LoRA layers working. With gradient checkpointing on (and grad enabled) the logits
    also come from this path, as diffusers' UVit checkpointing wrapper fails on keyword arguments.
    Exports are written as plain ``UVit2DModel``.
    """

    def forward(
        self,
        input_ids: Tensor,
        encoder_hidden_states: Tensor,
        pooled_text_emb: Tensor,
        micro_conds: Tensor,
        cross_attention_kwargs: dict | None = None,
        return_hidden_states: bool = False,
    ) -> Tensor:
        checkpointing = torch.is_grad_enabled() and self.gradient_checkpointing
        if not return_hidden_states and not checkpointing:
            return super().forward(input_ids, encoder_hidden_states, pooled_text_emb, micro_conds, cross_attention_kwargs)
        cross_attention_kwargs, lora_scale = _lora_scale(cross_attention_kwargs)
        if USE_PEFT_BACKEND:
            scale_lora_layers(self, lora_scale)
        try:
            hidden = self._head_inputs(
                input_ids, encoder_hidden_states, pooled_text_emb, micro_conds, cross_attention_kwargs
            )
        finally:
            if USE_PEFT_BACKEND:
                unscale_lora_layers(self, lora_scale)
        if return_hidden_states:
            return hidden.flatten(1, 2)
        # diffusers' UVit checkpointing wrapper drops keyword arguments: logits from this path instead
        return self.mlm_layer.conv2(hidden.permute(0, 3, 1, 2))

    def _head_inputs(
        self, input_ids, encoder_hidden_states, pooled_text_emb, micro_conds, cross_attention_kwargs
    ) -> Tensor:
        """UVit2DModel.forward up to (not including) ``mlm_layer.conv2``, channels last: (B, h, w, C)."""
        encoder_hidden_states = self.encoder_proj_layer_norm(self.encoder_proj(encoder_hidden_states))
        micro_cond_embeds = get_timestep_embedding(
            micro_conds.flatten(), self.config.micro_cond_encode_dim, flip_sin_to_cos=True, downscale_freq_shift=0
        ).reshape(input_ids.shape[0], -1)
        pooled_text_emb = torch.cat([pooled_text_emb, micro_cond_embeds], dim=1).to(dtype=self.dtype)
        pooled_text_emb = self.cond_embed(pooled_text_emb).to(encoder_hidden_states.dtype)
        block_kwargs = dict(
            pooled_text_emb=pooled_text_emb,
            encoder_hidden_states=encoder_hidden_states,
            cross_attention_kwargs=cross_attention_kwargs,
        )

        hidden_states = self.down_block(self.embed(input_ids), **block_kwargs)
        batch_size, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch_size, height * width, channels)
        hidden_states = self.project_to_hidden(self.project_to_hidden_norm(hidden_states))

        checkpointing = torch.is_grad_enabled() and self.gradient_checkpointing
        for layer in self.transformer_layers:
            layer = functools.partial(
                layer,
                encoder_hidden_states=encoder_hidden_states,
                cross_attention_kwargs=cross_attention_kwargs,
                added_cond_kwargs={"pooled_text_emb": pooled_text_emb},
            )
            if checkpointing:
                hidden_states = self._gradient_checkpointing_func(layer, hidden_states)
            else:
                hidden_states = layer(hidden_states)

        hidden_states = self.project_from_hidden(self.project_from_hidden_norm(hidden_states))
        hidden_states = hidden_states.reshape(batch_size, height, width, channels).permute(0, 3, 1, 2)
        hidden_states = self.mlm_layer.conv1(self.up_block(hidden_states, **block_kwargs))
        return self.mlm_layer.layer_norm(hidden_states.permute(0, 2, 3, 1))


def _check_resolution(resolution: int, multiple: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0 or resolution % multiple:
        raise ValueError(f"resolution: expected a positive multiple of {multiple} for this model, got {resolution!r}")
    return resolution


class MaskedTokenAdapter(ModelAdapter):
    """Shared logic of the VQ-token families (aMUSEd, Meissonic): VQ tokens, CLIP text, cosine masks.

    ``encode`` → ``tokens`` (B, h, w) int64, ``encoder_hidden_states`` (B, T, D) fp32,
    ``pooled_text_emb`` (B, P) fp32, ``micro_conds`` (B, 5) fp32.
    ``sample_inputs`` → ``input_ids`` (B, h, w) masked tokens, ``labels`` (B, L) int64, ``mask_ratio`` (B,)
    (+ ``timestep`` (B,) = mask_ratio × 1000 for backbones that take it).
    """

    kind: ClassVar[str] = "masked"
    lora_target_modules: ClassVar[list[str]] = MASKED_LORA_TARGETS
    backbone_class: ClassVar[type[nn.Module]]
    export_class: ClassVar[type[nn.Module]]  # the class written into the exported config.json
    takes_timestep: ClassVar[bool] = False

    vqvae: VQModel
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModelWithProjection
    scheduler: AmusedScheduler

    def __init__(
        self,
        pretrained: str | None,
        *,
        resolution: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        tiny_seed: int = 0,
        revision: str | None = None,
        variant: str | None = None,
    ) -> None:
        self.pretrained, self.dtype, self.device = pretrained, dtype, torch.device(device)
        if pretrained is None:
            self._build_tiny(tiny_seed)
        else:
            kwargs = dict(revision=revision, variant=variant)
            self.vqvae = load_component(VQModel, pretrained, "vqvae", **kwargs)
            self.tokenizer = load_component(CLIPTokenizer, pretrained, "tokenizer", revision=revision)
            self.text_encoder = load_component(
                CLIPTextModelWithProjection, pretrained, "text_encoder", dtype=dtype, **kwargs
            )
            self.backbone = load_component(self.backbone_class, pretrained, "transformer", dtype=dtype, **kwargs)
            self.scheduler = load_component(AmusedScheduler, pretrained, "scheduler", revision=revision)

        self.vae_scale_factor = 2 ** (len(self.vqvae.config.block_out_channels) - 1)
        default = self._default_resolution()
        self.resolution = _check_resolution(default if resolution is None else resolution, self._resolution_multiple())
        _place(freeze(self.vqvae), self.device, torch.float32)
        _place(freeze(self.text_encoder), self.device, dtype)
        _place(self.backbone, self.device, dtype)

    # --- construction (per family) ------------------------------------------------------------
    @abc.abstractmethod
    def _build_tiny(self, seed: int) -> None:
        """Random-init VQ model, CLIP text encoder, tokenizer, backbone and scheduler, deterministic from ``seed``."""

    @abc.abstractmethod
    def _default_resolution(self) -> int:
        """The pixel side the family's backbone config implies."""

    def _resolution_multiple(self) -> int:
        return self.vae_scale_factor

    def _tiny_text_and_vq(self, seed: int) -> None:
        self.tokenizer, self.text_encoder = tiny_clip_text(seed + 1, 32, 32, with_projection=True)
        self.vqvae = tiny_vq_model(seed + 2)
        self.scheduler = AmusedScheduler(mask_token_id=TINY_VOCAB_SIZE - 1, masking_schedule="cosine")

    # --- training -----------------------------------------------------------------------------
    @property
    def mask_token_id(self) -> int:
        """``vocab_size − 1``, as the aMUSEd and Meissonic training scripts (and their schedulers) use."""
        return unwrap_model(self.backbone).config.vocab_size - 1

    @torch.no_grad()
    def encode_tokens(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, R, R) in [−1, 1] → VQ indices (B, R/f, R/f) int64 (the VQ model works in [0, 1])."""
        pixels01 = ((pixel_values.to(device=self.device, dtype=torch.float32) + 1) / 2).clamp(0, 1)
        latents = self.vqvae.encode(pixels01).latents
        indices = self.vqvae.quantize(latents)[2][2]
        return indices.reshape(pixel_values.shape[0], latents.shape[-2], latents.shape[-1]).long()

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """CLIP penultimate hidden states (B, T, D) and projected pooled embedding (B, P)."""
        return clip_prompt_embeds(self.tokenizer, self.text_encoder, prompts, self.device)

    @torch.no_grad()
    def encode(self, pixel_values: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        check_pixel_values(pixel_values, prompts, self.resolution)
        encoder_hidden_states, pooled_text_emb = self.encode_prompt(prompts)
        micro_conds = torch.tensor(
            [[self.resolution, self.resolution, 0.0, 0.0, AESTHETIC_SCORE]], dtype=torch.float32, device=self.device
        )
        return {
            "tokens": self.encode_tokens(pixel_values),
            "encoder_hidden_states": encoder_hidden_states.float(),
            "pooled_text_emb": pooled_text_emb.float(),
            "micro_conds": micro_conds.expand(len(prompts), -1).contiguous(),
        }

    def sample_inputs(self, encoded: dict[str, Tensor], seeds: Tensor) -> dict[str, Tensor]:
        """Cosine-schedule mask of ``encoded["tokens"]`` from ``seeds`` (B,): same seeds → same mask."""
        masked = cosine_mask(encoded["tokens"], seeds, self.mask_token_id)
        inputs = {"input_ids": masked.input_ids, "labels": masked.labels, "mask_ratio": masked.mask_ratio}
        if self.takes_timestep:
            inputs["timestep"] = masked.timestep
        return inputs

    @abc.abstractmethod
    def _call_backbone(
        self, model: nn.Module, encoded: dict[str, Tensor], inputs: dict[str, Tensor], return_hidden_states: bool
    ) -> Tensor:
        """The backbone call with the family's conditioning: hidden states before the head, or its logits."""

    def forward(self, model: nn.Module, encoded: dict[str, Tensor], inputs: dict[str, Tensor]) -> Tensor:
        """Hidden states (B, L, C) right before the logits head, in the model's dtype; row-major like ``labels``."""
        return self._call_backbone(model, encoded, inputs, return_hidden_states=True)

    def logits(self, model: nn.Module, encoded: dict[str, Tensor], inputs: dict[str, Tensor]) -> Tensor:
        """(B, L, V) logits from the model's own (unfused) forward, ordered like ``labels``."""
        logits = self._call_backbone(model, encoded, inputs, return_hidden_states=False)
        return logits.flatten(2).transpose(1, 2)

    def output_head_module(self, model: nn.Module) -> nn.Conv2d:
        """The logits head ``mlm_layer.conv2`` (1×1 Conv2d, weight (V, C, 1, 1)) as a module — what
        ``fused_head_loss`` / ``head_token_logprob`` (tgo_fast.kernels.fused_linear_masked_loss) take to
        run the fused loss as the head's forward, the way that works with a ZeRO-3-partitioned head."""
        return unwrap_model(model).mlm_layer.conv2

    def output_head(self, model: nn.Module) -> tuple[Tensor, Tensor | None]:
        """``mlm_layer.conv2`` as a linear head: (weight (V, C, 1, 1) viewed as (V, C), bias or None).

        The view shares storage with the parameter, so gradients reach it. Under ZeRO-3 the weight is
        partitioned (empty) outside the model's forward: use :meth:`output_head_module` with
        ``fused_head_loss`` / ``head_token_logprob`` instead.
        """
        conv = self.output_head_module(model)
        if conv.weight.numel() != conv.out_channels * conv.in_channels:
            raise ValueError(
                f"output head weight has {conv.weight.numel()} elements, expected {conv.out_channels}×{conv.in_channels}: "
                "it is ZeRO-3 partitioned; pass adapter.output_head_module(model) to fused_head_loss / "
                "head_token_logprob (tgo_fast.kernels.fused_linear_masked_loss), which run the loss as the head's forward"
            )
        return conv.weight.view(conv.out_channels, conv.in_channels), conv.bias

    # --- export and validation ----------------------------------------------------------------
    def pipeline_call_kwargs(self, prompts: list[str], seeds: list[int]) -> dict:
        """The scheduler samples from a single CPU generator, so a call draws one image (see ``_run_pipeline``)."""
        if len(seeds) != 1:
            raise ValueError(f"{type(self).__name__}: one pipeline call per image, got {len(seeds)} seeds")
        return {"generator": torch.Generator().manual_seed(seeds[0])}

    def _run_pipeline(self, pipeline, prompts: list[str], seeds: list[int], **call_kwargs) -> list:
        """One pipeline call per image: the scheduler's single generator would otherwise tie an image to
        the others in its batch. Every rank makes as many calls as it has prompts (ZeRO-3 safe when the
        ranks' prompt lists are equally long)."""
        run_one = super()._run_pipeline
        return [run_one(pipeline, [prompt], [seed], **call_kwargs)[0] for prompt, seed in zip(prompts, seeds)]

    def save_pretrained(self, state_dict: dict[str, Tensor], output_dir: str | os.PathLike) -> None:
        """Write ``output_dir/transformer`` (config + safetensors), loadable by ``export_class.from_pretrained``."""
        with torch.device("meta"):  # a parameter-free stand-in that carries the config and the key set
            exported = self.export_class.from_config(unwrap_model(self.backbone).config)
        save_backbone_state_dict(exported, state_dict, Path(output_dir) / "transformer")


class AmusedAdapter(MaskedTokenAdapter):
    """aMUSEd (``amused/amused-256``, ``amused/amused-512``): diffusers ``UVit2DModel`` on VQ tokens."""

    name: ClassVar[str] = "amused"
    backbone_class = AmusedTransformer
    export_class = UVit2DModel
    validation_guidance_scale = 10.0  # AmusedPipeline's default

    def _build_tiny(self, seed: int) -> None:
        self._tiny_text_and_vq(seed)
        micro_cond_encode_dim = 8
        config = dict(
            hidden_size=32,
            use_bias=False,
            cond_embed_dim=self.text_encoder.config.projection_dim,
            micro_cond_encode_dim=micro_cond_encode_dim,
            micro_cond_embed_dim=5 * micro_cond_encode_dim,
            encoder_hidden_size=self.text_encoder.config.hidden_size,
            vocab_size=TINY_VOCAB_SIZE,
            codebook_size=TINY_CODEBOOK_SIZE,
            in_channels=32,
            block_out_channels=32,
            num_res_blocks=1,
            downsample=False,
            upsample=False,
            block_num_heads=2,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            sample_size=TINY_RESOLUTION // 4,
        )
        self.backbone = seeded_init(seed, lambda: AmusedTransformer(**config))

    def _default_resolution(self) -> int:
        return self.backbone.config.sample_size * self.vae_scale_factor

    def _resolution_multiple(self) -> int:
        return self.vae_scale_factor * (2 if self.backbone.config.downsample else 1)

    def _call_backbone(self, model, encoded, inputs, return_hidden_states):
        dtype = model_dtype(model)
        return model(
            inputs["input_ids"],
            encoder_hidden_states=encoded["encoder_hidden_states"].to(dtype),
            pooled_text_emb=encoded["pooled_text_emb"].to(dtype),
            micro_conds=encoded["micro_conds"].to(dtype),
            return_hidden_states=return_hidden_states,
        )

    def build_pipeline(self, model: nn.Module | None = None) -> AmusedPipeline:
        return AmusedPipeline(
            vqvae=self.vqvae, tokenizer=self.tokenizer, text_encoder=self.text_encoder,
            transformer=unwrap_model(self.backbone if model is None else model), scheduler=self.scheduler,
        )
