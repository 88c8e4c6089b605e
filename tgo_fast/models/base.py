"""The model-adapter interface the TGO trainer drives, and helpers shared by the model families.

An adapter owns the frozen parts of a text-to-image model (VAE / VQ model, text encoders,
tokenizers, scheduler) and knows how to turn a batch into the backbone's inputs and its training
target. The trainable backbone is ``adapter.backbone``; policy and reference are both passed to
:meth:`ModelAdapter.forward` explicitly, so one adapter serves a policy, a frozen copy, a LoRA model
with adapters disabled, or a DeepSpeed engine.

Per-sample randomness: every draw (noise, timestep, mask) for sample ``i`` comes from a CPU
``torch.Generator`` seeded with ``seeds[i]``, so it depends neither on the batch composition, nor on
the device, nor on the rank, and the policy and reference see exactly the same inputs.
"""

from __future__ import annotations

import abc
import os
from typing import ClassVar

import PIL.Image
import torch
from diffusers import ModelMixin
from huggingface_hub import save_torch_state_dict
from torch import Tensor, nn
from transformers import PreTrainedModel

__all__ = [
    "ModelAdapter",
    "image_seeds",
    "sample_generators",
    "randn_per_sample",
    "rand_per_sample",
    "freeze",
    "model_dtype",
    "place",
    "unwrap_model",
    "check_pixel_values",
    "load_component",
    "save_backbone_state_dict",
    "plain_key",
]


class ModelAdapter(abc.ABC):
    """One model family (see the module docstring and ``docs/models.md``)."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "diffusion" | "masked"
    lora_target_modules: ClassVar[list[str]]

    backbone: nn.Module
    resolution: int

    @abc.abstractmethod
    def __init__(
        self,
        pretrained: str | None,
        *,
        resolution: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        tiny_seed: int = 0,
    ) -> None: ...

    @abc.abstractmethod
    @torch.no_grad()
    def encode(self, pixel_values: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """(B, 3, R, R) in [-1, 1] + B prompts → batch-first latents / token ids and text embeddings."""

    @abc.abstractmethod
    def sample_inputs(self, encoded: dict[str, Tensor], seeds: Tensor) -> dict[str, Tensor]:
        """Per-sample noise + timestep (or mask) from ``seeds`` (B,) int64 → model inputs + target / labels."""

    @abc.abstractmethod
    def forward(self, model: nn.Module, encoded: dict[str, Tensor], inputs: dict[str, Tensor]) -> Tensor:
        """Prediction shaped like ``inputs["target"]`` (diffusion) or hidden states (B, L, H) (masked)."""

    def output_head(self, model: nn.Module) -> tuple[Tensor, Tensor | None]:
        """Masked families only: the output projection ``(weight (V, H), bias or None)``."""
        raise NotImplementedError(f"{type(self).__name__} is a {self.kind} model: it has no token output head")

    def output_head_module(self, model: nn.Module) -> nn.Module:
        """Masked families only: the output-head module (Linear or 1×1 Conv2d), for ``fused_head_loss`` /
        ``head_token_logprob``, which run the loss as its forward (the ZeRO-3-safe way)."""
        raise NotImplementedError(f"{type(self).__name__} is a {self.kind} model: it has no token output head")

    validation_guidance_scale: ClassVar[float]

    @abc.abstractmethod
    def build_pipeline(self, model: nn.Module | None = None):
        """The diffusers text-to-image pipeline of this family around ``model`` (default: the backbone)."""

    def pipeline_call_kwargs(self, prompts: list[str], seeds: list[int]) -> dict:
        """Family-specific arguments of one pipeline call; by default one CPU generator per image."""
        return {"generator": [torch.Generator().manual_seed(seed) for seed in seeds]}

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        prompts: list[str],
        *,
        seed: int | None = None,
        seeds: list[int] | None = None,
        num_inference_steps: int = 4,
        guidance_scale: float | None = None,
    ) -> list[PIL.Image.Image]:
        """Images from the family's diffusers pipeline built around ``model``, one per prompt.

        Image i is drawn with a CPU generator seeded ``seeds[i]`` (or ``seed + i``): it depends on its
        prompt and seed only, not on the other prompts of the call. ``guidance_scale`` None = the
        family's ``validation_guidance_scale``.
        """
        prompts = list(prompts)
        seeds = image_seeds(len(prompts), seed=seed, seeds=seeds)
        pipeline = self.build_pipeline(model)
        pipeline.set_progress_bar_config(disable=True)
        return self._run_pipeline(
            pipeline,
            prompts,
            seeds,
            height=self.resolution,
            width=self.resolution,
            num_inference_steps=num_inference_steps,
            guidance_scale=self.validation_guidance_scale if guidance_scale is None else float(guidance_scale),
            output_type="pil",
        )

    def _run_pipeline(self, pipeline, prompts: list[str], seeds: list[int], **call_kwargs) -> list[PIL.Image.Image]:
        """One batched pipeline call (one generator per image)."""
        return pipeline(prompts, **call_kwargs, **self.pipeline_call_kwargs(prompts, seeds)).images

    @abc.abstractmethod
    def save_pretrained(self, state_dict: dict[str, Tensor], output_dir: str | os.PathLike) -> None:
        """Export a (gathered) backbone state dict in diffusers format under ``output_dir``."""


def image_seeds(count: int, *, seed: int | None = None, seeds: list[int] | None = None) -> list[int]:
    """The per-image seeds of a ``generate`` call: ``seeds`` as given (one per image), or ``seed + i``."""
    if (seed is None) == (seeds is None):
        raise ValueError("generate: pass exactly one of seed= (image i gets seed + i) or seeds= (one per image)")
    if seeds is None:
        return [int(seed) + i for i in range(count)]
    seeds = [int(value) for value in seeds]
    if len(seeds) != count:
        raise ValueError(f"generate: got {len(seeds)} seeds for {count} prompts; pass one seed per prompt")
    return seeds


def sample_generators(seeds: Tensor, batch_size: int | None = None) -> list[torch.Generator]:
    """One CPU generator per sample, ``manual_seed(seeds[i])``.

    seeds: (B,) integer tensor (any device). ``batch_size``, when given, must equal B.
    """
    if not isinstance(seeds, Tensor):
        raise TypeError(f"seeds must be a torch.Tensor of shape (B,), got {type(seeds).__name__}")
    if seeds.dtype.is_floating_point or seeds.dtype.is_complex or seeds.dtype == torch.bool or seeds.ndim != 1:
        raise ValueError(
            f"seeds must be a 1-D integer tensor (B,), got dtype {seeds.dtype} and shape {tuple(seeds.shape)}"
        )
    if batch_size is not None and seeds.numel() != batch_size:
        raise ValueError(f"seeds has {seeds.numel()} entries but the batch has {batch_size} samples")
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds.tolist()]


def randn_per_sample(
    generators: list[torch.Generator], shape: tuple[int, ...], *, device=None, dtype=torch.float32
) -> Tensor:
    """(B, *shape) standard normal; row i drawn from ``generators[i]`` on CPU in fp32, then moved."""
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return noise.to(device=device, dtype=dtype)


def rand_per_sample(generators: list[torch.Generator], *, device=None) -> Tensor:
    """(B,) fp32 uniform in [0, 1); entry i drawn from ``generators[i]``."""
    return torch.cat([torch.rand(1, generator=g) for g in generators]).to(device)


def freeze(module: nn.Module) -> nn.Module:
    """Frozen part of a pipeline: eval mode, no gradients."""
    return module.eval().requires_grad_(False)


def place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move ``module`` to ``device`` and cast its floating parameters to ``dtype`` (only if they differ)."""
    if model_dtype(module) != dtype:
        module.to(dtype=dtype)
    return module.to(device=device)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of ``model``'s first floating parameter (works on ZeRO-3-partitioned modules)."""
    for param in model.parameters():
        if param.dtype.is_floating_point:
            return param.dtype
    raise ValueError(f"{type(model).__name__} has no floating-point parameter to take a dtype from")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module under DeepSpeed engine / DDP wrappers (``.module``), for code that reads the
    model's ``.config`` (a DeepSpeed engine's own ``.config`` is its DeepSpeed configuration)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def check_pixel_values(pixel_values: Tensor, prompts: list[str], resolution: int) -> None:
    """Validate an ``encode`` batch: (B, 3, R, R) float images and B prompt strings."""
    if not isinstance(pixel_values, Tensor) or not pixel_values.dtype.is_floating_point:
        raise TypeError(
            "pixel_values must be a floating-point torch.Tensor, "
            f"got {getattr(pixel_values, 'dtype', type(pixel_values))}"
        )
    expected = (3, resolution, resolution)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(
            f"pixel_values must have shape (B, {', '.join(map(str, expected))}), got {tuple(pixel_values.shape)}"
        )
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of str")
    if len(prompts) != pixel_values.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {pixel_values.shape[0]} images")


def load_component(component_class, pretrained: str, subfolder: str, *, dtype=None, revision=None, variant=None):
    """``component_class.from_pretrained(pretrained, subfolder=subfolder, ...)`` with a clear error.

    Models get ``dtype`` (diffusers ``torch_dtype``, transformers ``dtype``) and ``variant``;
    tokenizers and schedulers only ``revision``.
    """
    kwargs: dict = {"subfolder": subfolder, "revision": revision}
    if issubclass(component_class, ModelMixin):
        kwargs.update(torch_dtype=dtype, variant=variant)
    elif issubclass(component_class, PreTrainedModel):
        kwargs.update(dtype=dtype, variant=variant)
    try:
        return component_class.from_pretrained(pretrained, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot load {component_class.__name__} from pretrained={pretrained!r} (subfolder {subfolder!r}): "
            f"expected a diffusers model repository id or a local directory with a {subfolder}/ folder ({err})"
        ) from err


def save_backbone_state_dict(
    backbone: nn.Module, state_dict: dict[str, Tensor], output_dir: str | os.PathLike, max_shard_size: str = "10GB"
) -> None:
    """Write ``state_dict`` as a diffusers model folder (``config.json`` + safetensors, sharded with an
    index when large) that ``type(backbone).from_pretrained(output_dir)`` loads.

    The config comes from ``backbone`` (also when it is ZeRO-3 partitioned or LoRA-injected); the keys must
    be exactly the plain backbone's, so a LoRA-wrapped or prefixed dict is refused rather than silently
    exported (merge LoRA factors first: ``tgo_fast.trainer.export.merge_lora``).
    """
    expected = {plain_key(key) for key in unwrap_model(backbone).state_dict() if ".lora_" not in key}
    received = set(state_dict)
    if received != expected:
        missing, unexpected = sorted(expected - received), sorted(received - expected)
        raise ValueError(
            f"state_dict does not match {type(unwrap_model(backbone)).__name__}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    os.makedirs(output_dir, exist_ok=True)
    unwrap_model(backbone).save_config(output_dir)
    save_torch_state_dict(
        {key: value.detach().cpu() for key, value in state_dict.items()},
        output_dir,
        filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )


def plain_key(key: str) -> str:
    """A backbone state-dict key as the plain model names it when peft LoRA layers are injected
    (``….to_q.base_layer.weight`` → ``….to_q.weight``); the ``lora_*`` factors have no plain name."""
    return key.replace(".base_layer.", ".")
