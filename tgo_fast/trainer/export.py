"""The final export in the formats diffusers loads.

``save_pipeline``: for the families with a diffusers pipeline (SD1.5, SDXL, FLUX, SD3, Wan), a pipeline folder that
``DiffusionPipeline.from_pretrained`` loads, with the trained backbone; ``merge_lora`` folds trained LoRA
factors into the backbone weights for it.

``save_lora``: the LoRA factors alone, which ``pipeline.load_lora_weights(dir)`` loads for the families whose
pipeline has a LoRA loader (SD1.5, SDXL, FLUX, SD3, Wan), ``backbone.load_lora_adapter(dir, prefix=...)`` for all.

The safetensors header carries the adapter metadata (r, lora_alpha, target_modules) under diffusers'
``lora_adapter_metadata`` key, so both loaders rebuild the trained scaling alpha / r (without it diffusers
assumes alpha = r)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["save_lora", "save_pipeline", "merge_lora", "has_pipeline_export", "LORA_WEIGHT_NAME"]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# family → (pipeline class name, the backbone's component name = save_lora_weights keyword and key prefix)
_PIPELINE_LORA = {
    "sd15": ("StableDiffusionPipeline", "unet"),
    "sdxl": ("StableDiffusionXLPipeline", "unet"),
    "flux": ("FluxPipeline", "transformer"),
    "sd3": ("StableDiffusion3Pipeline", "transformer"),
    "wan": ("WanPipeline", "transformer"),
}


def save_lora(adapter, backbone: torch.nn.Module, state_dict: dict[str, torch.Tensor], lora_config,
              output_dir: str | Path) -> Path:
    """Write the LoRA factors of ``state_dict`` (a gathered full state dict of the LoRA-injected backbone)."""
    from peft.utils import get_peft_model_state_dict

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lora_state = {k: v.detach().cpu().contiguous()
                  for k, v in get_peft_model_state_dict(backbone, state_dict=state_dict).items()}
    if not lora_state:
        raise ValueError("the backbone holds no LoRA weights to export")
    metadata = {k: v for k, v in lora_config.to_dict().items() if k in ("r", "lora_alpha", "target_modules")}
    metadata["target_modules"] = sorted(metadata["target_modules"])
    if adapter.name in _PIPELINE_LORA:
        import diffusers

        pipeline_name, component = _PIPELINE_LORA[adapter.name]
        getattr(diffusers, pipeline_name).save_lora_weights(
            output_dir, weight_name=LORA_WEIGHT_NAME,
            **{f"{component}_lora_layers": lora_state, f"{component}_lora_adapter_metadata": metadata})
    else:
        from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
        from safetensors.torch import save_file

        prefix = "transformer"  # diffusers' pipelines prefix each component's keys and metadata the same way
        header = {"format": "pt",
                  LORA_ADAPTER_METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in metadata.items()})}
        save_file({f"{prefix}.{k}": v for k, v in lora_state.items()}, str(output_dir / LORA_WEIGHT_NAME),
                  metadata=header)
    (output_dir / "lora_config.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return output_dir


def has_pipeline_export(adapter) -> bool:
    """Whether ``adapter``'s family exports a diffusers pipeline folder (the others export their backbone)."""
    return adapter.name in _PIPELINE_LORA


def save_pipeline(adapter, state_dict: dict[str, torch.Tensor], output_dir: str | Path) -> Path:
    """``output_dir`` as a diffusers pipeline folder (``model_index.json`` + one folder per component) that
    ``DiffusionPipeline.from_pretrained`` loads: the adapter's frozen parts and validation scheduler as
    they are, the backbone from ``state_dict`` (a gathered full state dict, no LoRA layers)."""
    from ..models.base import unwrap_model

    if not has_pipeline_export(adapter):
        raise ValueError(f"model {adapter.name!r} has no diffusers pipeline export; use adapter.save_pretrained")
    output_dir = Path(output_dir)
    pipeline = adapter.build_pipeline()
    backbone = unwrap_model(adapter.backbone)
    for name, component in pipeline.components.items():
        if component is not None and component is not backbone:
            component.save_pretrained(output_dir / name)
    adapter.save_pretrained(state_dict, output_dir)  # the backbone, from the gathered weights
    pipeline.save_config(output_dir)  # model_index.json, last: a folder that has it is complete
    return output_dir


def merge_lora(state_dict: dict[str, torch.Tensor], lora_config, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The backbone's plain state dict from a LoRA-injected one: W + (lora_alpha / r) · B @ A for every LoRA
    layer (peft's ``base_layer`` / ``lora_A.<adapter>`` / ``lora_B.<adapter>`` keys), other keys unchanged."""
    from ..models.base import plain_key

    scaling = lora_config.lora_alpha / lora_config.r
    merged = {plain_key(key): value for key, value in state_dict.items() if ".lora_" not in key}
    suffix = f".lora_A.{adapter_name}.weight"
    for key in (k for k in state_dict if k.endswith(suffix)):
        prefix = key[: -len(suffix)]
        down, up = state_dict[key].float(), state_dict[f"{prefix}.lora_B.{adapter_name}.weight"].float()
        if down.ndim != 2:
            raise ValueError(f"merge_lora: {prefix} is not a linear LoRA layer (lora_A of shape {tuple(down.shape)})")
        weight = merged[f"{prefix}.weight"]
        merged[f"{prefix}.weight"] = (weight.float() + scaling * up @ down).to(weight.dtype)
    return merged
