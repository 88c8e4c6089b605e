"""The shipped tiny pretrained bases (tgo_fast.bases) and their pretraining recipe."""
import json

import pytest
import torch

from tgo_fast.bases import BASE_FAMILIES, base_card, base_fingerprint, base_path, resolve_pretrained
from tgo_fast.bases.pretrain import PretrainConfig, pretrain_base
from tgo_fast.models import build_adapter
from tgo_fast.pipeline import load_prompts

CARD_KEYS = {"family", "data", "autoencoder", "backbone", "evaluation", "wall_time_s", "versions", "date", "command"}


@pytest.mark.parametrize("family", BASE_FAMILIES)
def test_shipped_base_loads_offline_and_generates(family):
    folder = base_path(family)
    sizes = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    assert sizes <= 10 * 2**20, f"{family} base is {sizes / 2**20:.1f} MB"
    adapter = build_adapter(family, "builtin")
    assert adapter.resolution == 64
    prompts = load_prompts("builtin:heldout", num_prompts=2)
    images = adapter.generate(adapter.backbone, prompts, seeds=[0, 1], num_inference_steps=2)
    assert [image.size for image in images] == [(64, 64)] * 2
    card = base_card(family)
    assert CARD_KEYS <= set(card) and card["family"] == family
    evaluation = card["evaluation"]
    assert set(evaluation["attribute_accuracy"]) == {"size", "colour", "shape", "position", "background"}
    assert 0.0 <= evaluation["all_five_fraction"] <= 1.0 and evaluation["n"] >= 128


def test_builtin_is_refused_for_families_without_a_base():
    with pytest.raises(ValueError, match="no tiny pretrained base ships for model 'flux'"):
        build_adapter("flux", "builtin")
    assert resolve_pretrained("sdxl", "some/hub-id") == "some/hub-id"


@pytest.mark.slow
@pytest.mark.parametrize("family", BASE_FAMILIES)
def test_pretrain_base_runs_a_few_steps(tmp_path, family):
    cfg = PretrainConfig(family=family, output_dir=str(tmp_path / family), num_images=64, autoencoder_steps=3,
                         autoencoder_batch_size=8, backbone_steps=3, backbone_batch_size=8, eval_prompts=8,
                         eval_inference_steps=2)
    folder = pretrain_base(cfg)
    card = json.loads((folder / "model_card.json").read_text())
    assert card["backbone"]["steps"] == 3 and card["autoencoder"]["steps"] == 3
    assert card["evaluation"]["n"] == 8 and (folder / "samples.png").is_file()
    adapter = build_adapter(family, str(folder))  # the real from_pretrained path of the family
    first = adapter.generate(adapter.backbone, ["a small red circle at the left on a blue background"], seeds=[3],
                             num_inference_steps=2)[0]
    again = build_adapter(family, str(folder))
    second = again.generate(again.backbone, ["a small red circle at the left on a blue background"], seeds=[3],
                            num_inference_steps=2)[0]
    assert torch.equal(torch.tensor(list(first.getdata())), torch.tensor(list(second.getdata())))


def test_pretrain_config_is_validated():
    with pytest.raises(ValueError, match="family"):
        PretrainConfig(family="flux")
    with pytest.raises(ValueError, match="backbone_steps"):
        PretrainConfig(family="sd15", backbone_steps=0)


def test_fingerprint_names_the_weights():
    assert base_fingerprint("sd15") != base_fingerprint("amused")
