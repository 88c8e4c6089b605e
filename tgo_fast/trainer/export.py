"""LoRA export in the format diffusers loads: ``pipeline.load_lora_weights(dir)`` for the families whose
pipeline has a LoRA loader (SD1.5, SDXL, FLUX), ``backbone.load_lora_adapter(dir, prefix=...)`` for all.

The safetensors header carries the adapter metadata (r, lora_alpha, target_modules) under diffusers'
``lora_adapter_metadata`` key, so both loaders rebuild the trained scaling alpha / r (without it diffusers
assumes alpha = r)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["save_lora", "LORA_WEIGHT_NAME"]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# family → (pipeline class name, the backbone's component name = save_lora_weights keyword and key prefix)
_PIPELINE_LORA = {
    "sd15": ("StableDiffusionPipeline", "unet"),
    "sdxl": ("StableDiffusionXLPipeline", "unet"),
    "flux": ("FluxPipeline", "transformer"),
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
