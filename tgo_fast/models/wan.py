"""Wan 2.1 text-to-video adapter (WanTransformer3DModel, rectified-flow matching on video latents).

Conventions follow diffusers' ``WanPipeline`` (the Wan 2.1 T2V 1.3B / 14B layout) and the flow-matching
recipe of ``train_dreambooth_flux.py`` / ``train_dreambooth_sd3.py``:

    clip x: (B, 3, F, R, R) in [-1, 1], F = 1 + 4k (an image is the one-frame clip F = 1)
    x0     = (vae.encode(x).latent_dist.mode() − latents_mean) / latents_std      (B, C, 1 + k, R/8, R/8)
    ε ~ N(0, I);  u ~ density(weighting_scheme) on [0, 1)                         (per sample, from its seed)
    k      = ⌊u · T_train⌋,  t = timesteps[k],  σ = sigmas[k]                     (shifted by flow_shift)
    x_σ    = (1 − σ) · x0 + σ · ε
    target = ε − x0                                                               (the flow velocity)

The transformer sees the 5-D noisy latents, ``timestep = t`` (in [0, 1000]) and the UMT5 sequence
embeddings with the padding positions zeroed (as ``WanPipeline._get_t5_prompt_embeds``); it predicts
(B, C, F', h, w) directly, the target's shape. The VAE stays fp32 whatever the training dtype (diffusers'
Wan examples load it so, the rest in bf16). Sampling uses the pipeline's own scheduler (UniPC with flow
sigmas for the hub checkpoints), exported with the pipeline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import PIL.Image
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.utils import make_image_grid
from torch import Tensor, nn
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from .base import (
    ModelAdapter,
    freeze,
    load_component,
    model_dtype,
    place,
    save_backbone_state_dict,
    unwrap_model,
)
from .flow import DENSITY_SCHEMES, FlowMatching, timestep_density
from .sd import resolve_resolution
from .text import prompt_length, seeded_init, tiny_t5_tokenizer

__all__ = ["WanAdapter", "frame_grid", "save_clip"]

WEIGHTING_SCHEMES = DENSITY_SCHEMES
SAMPLING_SCHEDULERS = (UniPCMultistepScheduler, FlowMatchEulerDiscreteScheduler)
GRID_FRAMES = 8  # frames shown in a validation frame grid (evenly spaced, first and last included)


class WanAdapter(ModelAdapter):
    """Wan 2.1 T2V. ``encode`` takes images (B, 3, R, R) (one-frame clips) or clips (B, 3, F, R, R) and returns
    ``latents`` (B, C, F', R/8, R/8) (normalised, F' = 1 + (F − 1)/4) and ``prompt_embeds`` (B, S, D), both fp32.

    Extra keyword arguments: ``num_frames`` (clip length of generation and video data; Wan 2.1's 81, the tiny
    model's 5), ``fps`` (frame rate of video data and exported clips, 16), ``flow_shift`` (σ shift of the
    training timesteps and the sampler; None = the pipeline scheduler's, 3.0 for Wan 2.1 at 480p),
    ``weighting_scheme`` ("none" | "logit_normal" | "mode"; ``logit_mean``, ``logit_std``, ``mode_scale``),
    ``max_sequence_length`` (UMT5 tokens; default min(tokenizer length, 512)), ``revision``, ``variant``.
    """

    name: ClassVar[str] = "wan"
    kind: ClassVar[str] = "diffusion"
    lora_target_modules: ClassVar[list[str]] = [
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
        "ffn.net.0.proj",
        "ffn.net.2",
    ]
    validation_guidance_scale = 5.0  # WanPipeline's default

    tokenizer: AutoTokenizer
    text_encoder: UMT5EncoderModel
    vae: AutoencoderKLWan
    sampling_scheduler: UniPCMultistepScheduler | FlowMatchEulerDiscreteScheduler
    noise_scheduler: FlowMatchEulerDiscreteScheduler
    backbone: WanTransformer3DModel

    def __init__(
        self,
        pretrained: str | None,
        *,
        resolution: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        tiny_seed: int = 0,
        num_frames: int | None = None,
        fps: int = 16,
        flow_shift: float | None = None,
        weighting_scheme: str = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        max_sequence_length: int | None = None,
        revision: str | None = None,
        variant: str | None = None,
    ) -> None:
        density = timestep_density(weighting_scheme, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)
        if not isinstance(fps, int) or isinstance(fps, bool) or fps <= 0:
            raise ValueError(f"fps must be a positive int, got {fps!r}")
        if flow_shift is not None and not flow_shift > 0:
            raise ValueError(f"flow_shift must be > 0, got {flow_shift!r}")
        self.pretrained, self.dtype, self.device = pretrained, dtype, torch.device(device)
        self.fps = fps
        if pretrained is None:
            self._build_tiny(tiny_seed)
            default_frames, default_resolution = 5, 32
        else:
            self._load_pretrained(pretrained, dtype=dtype, revision=revision, variant=variant)
            default_frames, default_resolution = 81, 480  # Wan 2.1: 5 s at 16 fps, 480p
        self.temporal_scale = self.vae.config.scale_factor_temporal
        self.vae_scale_factor = self.vae.config.scale_factor_spatial
        self.num_frames = default_frames if num_frames is None else num_frames
        if not isinstance(self.num_frames, int) or self.num_frames < 1 or (self.num_frames - 1) % self.temporal_scale:
            raise ValueError(
                f"num_frames must be 1 + {self.temporal_scale}·k (the VAE compresses time {self.temporal_scale}×, "
                f"keeping the first frame), e.g. 1, 5, 17, 81; got {self.num_frames!r}"
            )
        # WanPipeline needs sides divisible by 16 = the VAE's 8× times the transformer's 2×2 patches.
        patch_side = self.backbone.config.patch_size[1]
        self.resolution = resolve_resolution(resolution, default_resolution, max(16, self.vae_scale_factor * patch_side))
        self.max_sequence_length = prompt_length(max_sequence_length, self.tokenizer, 512)  # WanPipeline's default

        self._set_schedulers(flow_shift)
        self.flow_matching = FlowMatching(self.noise_scheduler, density)
        # The VAE stays fp32 (diffusers' Wan examples), the text encoder and transformer take the training dtype.
        freeze(place(self.vae, self.device, torch.float32))
        freeze(place(self.text_encoder, self.device, dtype))
        place(self.backbone, self.device, dtype)

    # --- construction -------------------------------------------------------------------------
    def _build_tiny(self, seed: int) -> None:
        self.tokenizer = tiny_t5_tokenizer(max_length=32)
        text_config = UMT5Config(
            vocab_size=len(self.tokenizer),
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            decoder_start_token_id=self.tokenizer.pad_token_id,
        )
        self.text_encoder = seeded_init(seed + 1, lambda: UMT5EncoderModel(text_config))
        latent_channels = 4
        vae_config = dict(
            base_dim=8,
            z_dim=latent_channels,
            dim_mult=[1, 1, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],  # 8× in space, 4× in time (as Wan 2.1's)
            latents_mean=[0.1, -0.2, 0.3, 0.0],
            latents_std=[1.5, 2.0, 0.8, 1.2],
        )
        self.vae = seeded_init(seed + 2, lambda: AutoencoderKLWan(**vae_config))
        transformer_config = dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=latent_channels,
            out_channels=latent_channels,
            text_dim=text_config.d_model,
            freq_dim=32,
            ffn_dim=32,
            num_layers=1,
            rope_max_seq_len=32,
        )
        self.backbone = seeded_init(seed, lambda: WanTransformer3DModel(**transformer_config))
        # Wan 2.1's sampler (the hub pipelines' scheduler_config.json at 480p).
        self.sampling_scheduler = UniPCMultistepScheduler(
            num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        )

    def _load_pretrained(self, pretrained: str, *, dtype, revision, variant) -> None:
        models = dict(revision=revision, variant=variant)
        self.tokenizer = load_component(AutoTokenizer, pretrained, "tokenizer", revision=revision)
        self.text_encoder = load_component(UMT5EncoderModel, pretrained, "text_encoder", dtype=dtype, **models)
        self.vae = load_component(AutoencoderKLWan, pretrained, "vae", dtype=torch.float32, **models)
        self.backbone = load_component(WanTransformer3DModel, pretrained, "transformer", dtype=dtype, **models)
        try:
            config = UniPCMultistepScheduler.load_config(pretrained, subfolder="scheduler", revision=revision)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"cannot load the scheduler from pretrained={pretrained!r}: expected a diffusers model repository id "
                f"or a local directory with a scheduler/ folder ({err})"
            ) from err
        sampler = next((cls for cls in SAMPLING_SCHEDULERS if cls.__name__ == config["_class_name"]), None)
        if sampler is None:
            raise ValueError(
                f"pretrained={pretrained!r}: scheduler {config['_class_name']!r} is not a flow-matching sampler "
                f"Wan runs with; expected one of {[cls.__name__ for cls in SAMPLING_SCHEDULERS]}"
            )
        self.sampling_scheduler = sampler.from_config(config)

    def _set_schedulers(self, flow_shift: float | None) -> None:
        """The sampler with ``flow_shift`` (if given) and the training scheduler at the same shift."""
        shift_key = "flow_shift" if isinstance(self.sampling_scheduler, UniPCMultistepScheduler) else "shift"
        if flow_shift is not None:
            self.sampling_scheduler.register_to_config(**{shift_key: float(flow_shift)})
        self.flow_shift = float(self.sampling_scheduler.config[shift_key])
        # σ_k = shift·s / (1 + (shift − 1)·s) on s = k / T_train: the sampler's own flow sigmas.
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=self.sampling_scheduler.config.num_train_timesteps, shift=self.flow_shift
        )

    # --- training -----------------------------------------------------------------------------
    def _check_clips(self, pixel_values: Tensor, prompts: list[str]) -> Tensor:
        """(B, 3, R, R) or (B, 3, F, R, R) float → (B, 3, F, R, R), cut to ``num_frames`` frames."""
        if not isinstance(pixel_values, Tensor) or not pixel_values.dtype.is_floating_point:
            raise TypeError(
                "pixel_values must be a floating-point torch.Tensor, "
                f"got {getattr(pixel_values, 'dtype', type(pixel_values))}"
            )
        side = self.resolution
        if pixel_values.ndim == 4:
            pixel_values = pixel_values.unsqueeze(2)  # an image is a one-frame clip
        if pixel_values.ndim != 5 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[3:]) != (side, side):
            raise ValueError(
                f"pixel_values must have shape (B, 3, {side}, {side}) (images) or (B, 3, F, {side}, {side}) (clips), "
                f"got {tuple(pixel_values.shape)}"
            )
        frames = min(pixel_values.shape[2], self.num_frames)
        if (frames - 1) % self.temporal_scale:
            raise ValueError(
                f"a clip of {frames} frames does not fit the VAE's {self.temporal_scale}× time compression: "
                f"use 1 + {self.temporal_scale}·k frames (num_frames={self.num_frames} cuts longer clips)"
            )
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of str")
        if len(prompts) != pixel_values.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {pixel_values.shape[0]} clips")
        return pixel_values[:, :, :frames]

    def _latent_statistics(self) -> tuple[Tensor, Tensor]:
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean, dtype=torch.float32).view(shape)
        std = torch.tensor(self.vae.config.latents_std, dtype=torch.float32).view(shape)
        return mean.to(self.device), std.to(self.device)

    @torch.no_grad()
    def encode(self, pixel_values: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        clips = self._check_clips(pixel_values, prompts)
        text = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = text.attention_mask.to(self.device)
        prompt_embeds = self.text_encoder(text.input_ids.to(self.device), mask).last_hidden_state
        prompt_embeds = prompt_embeds * mask.unsqueeze(-1).to(prompt_embeds.dtype)  # padding → 0, as WanPipeline

        clips = clips.to(device=self.device, dtype=self.vae.dtype)
        latents = self.vae.encode(clips).latent_dist.mode().float()
        mean, std = self._latent_statistics()
        return {"latents": (latents - mean) / std, "prompt_embeds": prompt_embeds.float()}

    def sample_inputs(self, encoded: dict[str, Tensor], seeds: Tensor) -> dict[str, Tensor]:
        """Per sample i (generator seeded with seeds[i]): ε ~ N(0, I) first, then u for the timestep.

        Returns ``noisy_latents`` (B, C, F', h, w) fp32, ``timesteps`` (B,) fp32 in [0, 1000], ``sigmas`` (B,),
        ``noise`` and ``target`` = ε − x0 (B, C, F', h, w).
        """
        latents = encoded["latents"].float()
        draw = self.flow_matching.draw(latents, seeds)
        return {
            "noisy_latents": draw.noisy_latents,
            "timesteps": draw.timesteps,
            "sigmas": draw.sigmas,
            "noise": draw.noise,
            "target": draw.noise - latents,
        }

    def forward(self, model: nn.Module, encoded: dict[str, Tensor], inputs: dict[str, Tensor]) -> Tensor:
        """Velocity prediction (B, C, F', h, w) in the model's dtype."""
        dtype = model_dtype(model)
        return model(
            hidden_states=inputs["noisy_latents"].to(dtype),
            timestep=inputs["timesteps"],
            encoder_hidden_states=encoded["prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]

    # --- export and validation ----------------------------------------------------------------
    def build_pipeline(self, model: nn.Module | None = None) -> WanPipeline:
        """A ``WanPipeline`` with ``model`` (default: the backbone) as its transformer and a fresh copy of the
        sampler; ``.save_pretrained`` writes a folder ``DiffusionPipeline.from_pretrained`` loads."""
        return WanPipeline(
            tokenizer=self.tokenizer,
            text_encoder=self.text_encoder,
            vae=self.vae,
            scheduler=type(self.sampling_scheduler).from_config(self.sampling_scheduler.config),
            transformer=unwrap_model(self.backbone if model is None else model),
        )

    def pipeline_call_kwargs(self, prompts: list[str], seeds: list[int]) -> dict:
        return {
            **super().pipeline_call_kwargs(prompts, seeds),
            "num_frames": self.num_frames,
            "max_sequence_length": self.max_sequence_length,
        }

    @torch.no_grad()
    def generate_clips(
        self,
        model: nn.Module,
        prompts: list[str],
        *,
        seed: int | None = None,
        seeds: list[int] | None = None,
        num_inference_steps: int = 4,
        guidance_scale: float | None = None,
    ) -> list[list[PIL.Image.Image]]:
        """``num_frames``-frame clips (lists of PIL frames) from ``WanPipeline``, one per prompt; clip i drawn with
        a CPU generator seeded ``seeds[i]`` (or ``seed + i``). ``guidance_scale`` None = 5.0 (WanPipeline's)."""
        return super().generate(model, prompts, seed=seed, seeds=seeds, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale)

    def _run_pipeline(self, pipeline, prompts: list[str], seeds: list[int], **call_kwargs) -> list[list[PIL.Image.Image]]:
        """WanPipeline's output is clips: ``.frames``, a list of PIL frames per prompt."""
        return pipeline(prompts, **call_kwargs, **self.pipeline_call_kwargs(prompts, seeds)).frames

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: list[str], **kwargs) -> list[PIL.Image.Image]:
        """One frame grid per prompt (:func:`frame_grid` of :meth:`generate_clips`; a one-frame clip is its frame),
        the image the trainer's validation grid, the rewards and ``pipeline.generate`` take."""
        return [frame_grid(frames) for frames in self.generate_clips(model, prompts, **kwargs)]

    def save_pretrained(self, state_dict: dict[str, Tensor], output_dir: str | os.PathLike) -> None:
        """Write ``output_dir/transformer``, loadable by ``WanTransformer3DModel.from_pretrained``."""
        save_backbone_state_dict(self.backbone, state_dict, Path(output_dir) / "transformer")


def frame_grid(frames: list[PIL.Image.Image], max_frames: int = GRID_FRAMES) -> PIL.Image.Image:
    """One row of up to ``max_frames`` evenly spaced frames of a clip (first and last included)."""
    if not frames:
        raise ValueError("frame_grid: the clip has no frame")
    count = min(len(frames), max_frames)
    picked = [frames[round(i * (len(frames) - 1) / max(count - 1, 1))] for i in range(count)]
    return make_image_grid(picked, rows=1, cols=count)


def save_clip(frames: list[PIL.Image.Image], path: str | os.PathLike, fps: int) -> Path:
    """Write a clip as ``.gif`` (PIL only) or ``.mp4`` (needs ``imageio`` and ``imageio-ffmpeg``:
    ``pip install tgo_fast[video]``); the format follows the suffix."""
    from diffusers.utils import export_to_gif, export_to_video

    path = Path(path)
    if path.suffix == ".gif":
        export_to_gif(frames, str(path), fps=fps)
    elif path.suffix == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401  (export_to_video's writer)
        except ImportError as error:
            raise ImportError("writing .mp4 needs imageio and imageio-ffmpeg: pip install 'tgo_fast[video]'") from error
        export_to_video(frames, str(path), fps=fps)
    else:
        raise ValueError(f"save_clip: unsupported clip format {path.suffix!r}; use .gif or .mp4")
    return path
