"""Exports of a trained model, train-free on the tiny random-init families: the LoRA file reloads through
diffusers at the trained scaling alpha / r; ``final/`` is a pipeline folder DiffusionPipeline loads and runs."""
import numpy as np
import pytest
import torch

from tgo_fast.models import build_adapter
from tgo_fast.trainer.export import LORA_WEIGHT_NAME, merge_lora, save_lora, save_pipeline

from model_helpers import lora_adapter

RESOLUTION = {"sd15": 32, "sdxl": 32, "flux": 32, "amused": None, "meissonic": None}
PROMPTS = ["a large red circle at the center on a blue background", "a small green square at the left"]


def model_output(adapter, model):
    pixel_values = torch.rand(2, 3, adapter.resolution, adapter.resolution, generator=torch.Generator().manual_seed(0))
    encoded = adapter.encode(pixel_values * 2 - 1, PROMPTS)
    inputs = adapter.sample_inputs(encoded, torch.tensor([3, 4]))
    with torch.no_grad():
        return adapter.forward(model, encoded, inputs)


def lora_scalings(model) -> set[float]:
    from peft.tuners.lora import LoraLayer

    return {scale for module in model.modules() if isinstance(module, LoraLayer) for scale in module.scaling.values()}


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux", "amused", "meissonic"])
def test_lora_reloads_at_the_trained_scaling(family, tmp_path):
    adapter, config = lora_adapter(family, resolution=RESOLUTION[family])
    save_lora(adapter, adapter.backbone, adapter.backbone.state_dict(), config, tmp_path)
    fresh = build_adapter(family, None, resolution=RESOLUTION[family], tiny_seed=0)
    if family in ("sd15", "sdxl", "flux"):  # the family pipeline's own loader
        pipeline = fresh.build_pipeline()
        pipeline.load_lora_weights(str(tmp_path), weight_name=LORA_WEIGHT_NAME)
        reloaded = pipeline.unet if family in ("sd15", "sdxl") else pipeline.transformer
    else:
        reloaded = fresh.backbone
        reloaded.load_lora_adapter(str(tmp_path), prefix="transformer", weight_name=LORA_WEIGHT_NAME)
    assert lora_scalings(reloaded) == {4.0}
    torch.testing.assert_close(model_output(fresh, reloaded), model_output(adapter, adapter.backbone))


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_pipeline_folder_loads_and_runs_the_trained_model(family, tmp_path):
    """A LoRA-trained backbone exports merged into a pipeline folder (+ the LoRA file): DiffusionPipeline loads
    the family's pipeline with the trained backbone, and it draws the adapter's own images."""
    from diffusers import DiffusionPipeline

    adapter, config = lora_adapter(family, resolution=RESOLUTION[family])
    save_lora(adapter, adapter.backbone, adapter.backbone.state_dict(), config, tmp_path / "lora")
    save_pipeline(adapter, merge_lora(adapter.backbone.state_dict(), config), tmp_path)
    pipeline = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(pipeline) is type(adapter.build_pipeline())
    backbone = pipeline.unet if family in ("sd15", "sdxl") else pipeline.transformer
    torch.testing.assert_close(model_output(adapter, backbone), model_output(adapter, adapter.backbone))
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(PROMPTS[:1], height=adapter.resolution, width=adapter.resolution, num_inference_steps=2,
                     guidance_scale=adapter.validation_guidance_scale,
                     **adapter.pipeline_call_kwargs(PROMPTS[:1], [0])).images[0]
    ours = adapter.generate(adapter.backbone, PROMPTS[:1], seed=0, num_inference_steps=2)[0]
    assert image.size == ours.size
    assert np.abs(np.asarray(image, dtype=int) - np.asarray(ours, dtype=int)).max() <= 2  # merged vs LoRA rounding


def test_merge_lora_rejects_a_conv_layer():
    from types import SimpleNamespace

    state = {"conv.base_layer.weight": torch.zeros(4, 4, 1, 1), "conv.lora_A.default.weight": torch.zeros(2, 4, 1, 1),
             "conv.lora_B.default.weight": torch.zeros(4, 2, 1, 1)}
    with pytest.raises(ValueError, match="conv is not a linear LoRA layer"):
        merge_lora(state, SimpleNamespace(r=2, lora_alpha=4))


def test_pipeline_export_is_refused_for_a_family_without_a_diffusers_pipeline(tmp_path):
    adapter = build_adapter("amused", None, tiny_seed=0)
    with pytest.raises(ValueError, match="no diffusers pipeline export; use adapter.save_pretrained"):
        save_pipeline(adapter, adapter.backbone.state_dict(), tmp_path)
