"""ImageReward: BLIP's ViT-L image encoder, its BERT text encoder cross-attending to the image, an affine head.

Score (``ImageReward/ImageReward.py``, ``ImageReward.score``)::

    e = ViT(pixels)                                   BLIP ViT-L/16 at 224 px, all tokens after the final LayerNorm
    h = BERT(tokens, cross-attention to e)[:, 0]      [CLS] state; tokens: bert-base-uncased, padded/truncated to 35
    score = (MLP(h) − 0.16717362830052426) / 1.0333394966054072

The checkpoint ``ImageReward.pt`` is the state dict of upstream's ``ImageReward`` module (``blip.visual_encoder.*``,
``blip.text_encoder.*``, ``mlp.layers.*``); its ``med_config.json`` is the BERT config. The towers are transformers'
``BlipVisionModel`` and ``BlipTextModel`` (the port of BLIP's ``med.py``) under a key map.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ._common import (ModelReward, check_keys, check_shapes, clip_pil_pixels, load_state_dict_file, mlp_head,
                      resolve_file)

__all__ = ["BLIP_VIT_LARGE", "IMAGEREWARD_MEAN", "IMAGEREWARD_STD", "ImageRewardReward", "load_imagereward"]

IMAGEREWARD_MEAN = 0.16717362830052426  # ImageReward.__init__: self.mean / self.std of the raw head output
IMAGEREWARD_STD = 1.0333394966054072
_MAX_TOKENS = 35  # ImageReward.score: padding="max_length", truncation=True, max_length=35
# BLIP create_vit("large", image_size=224) as ImageReward builds it (transformers BlipVisionConfig names)
BLIP_VIT_LARGE = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                  "image_size": 224, "patch_size": 16}
_VIT_SINGLE = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
               "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
               "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
               "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
_VIT_BLOCK = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
              "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_VIT_BLOCK_KEY = re.compile(r"^blocks\.(?P<layer>\d+)\.(?P<module>.+)\.(?P<kind>weight|bias)$")
# in ImageReward.pt but unused by the score (upstream loads with strict=False): BLIP's contrastive projections and
# the BERT position-id buffer
_UNUSED = ("blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias",
           "blip.text_encoder.embeddings.position_ids")


class ImageRewardReward(ModelReward):
    """ImageReward v1.0: (MLP(BERT_cls(prompt | ViT(image))) − mean) / std, about −2…2 (0 = average image)."""

    name = "imagereward"

    def __init__(self, vision, text, head: torch.nn.Module, tokenizer, **kwargs):
        super().__init__(**kwargs)
        self.vision, self.text, self.tokenizer = self._place(vision), self._place(text), tokenizer
        self.head = head.to(self.device).eval().requires_grad_(False)
        self.image_size = vision.config.image_size

    def _score_batch(self, images, prompts):
        pixels = torch.stack([clip_pil_pixels(image, self.image_size) for image in images])
        image_embeds = self.vision(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=_MAX_TOKENS,
                                return_tensors="pt").to(self.device)
        hidden = self.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                           encoder_hidden_states=image_embeds,
                           encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long,
                                                             device=self.device)).last_hidden_state
        rewards = self.head(hidden[:, 0].float())[:, 0]  # upstream casts the [CLS] state to fp32 for the head
        return (rewards - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def _vision_keys(config: dict) -> list[str]:
    block = [f"{name}.{kind}" for name in _VIT_BLOCK for kind in ("weight", "bias")]
    return [f"blip.visual_encoder.{key}" for key in _VIT_SINGLE] + [
        f"blip.visual_encoder.blocks.{layer}.{name}" for layer in range(config["num_hidden_layers"]) for name in block]


def _vision_key(key: str) -> str:
    """BLIP's timm-style ViT key (after ``blip.visual_encoder.``) → transformers BlipVisionModel key."""
    if key in _VIT_SINGLE:
        return _VIT_SINGLE[key]
    match = _VIT_BLOCK_KEY.match(key)
    return f"encoder.layers.{match['layer']}.{_VIT_BLOCK[match['module']]}.{match['kind']}"


def _text_config(med_config: dict, vision_width: int, path: Path):
    """BlipTextConfig from BLIP's BertConfig JSON; the cross-attention reads ``vision_width``-d image tokens (as
    BLIP_Pretrain sets ``encoder_width = vision_width``)."""
    from transformers import BlipTextConfig
    if not med_config.get("add_cross_attention", False):
        raise ValueError(f"imagereward: {path} does not set add_cross_attention: true; ImageReward's text encoder "
                         f"cross-attends to the image (pass ImageReward's own med_config.json)")
    names = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id")
    missing = [name for name in names if name not in med_config]
    if missing:
        raise ValueError(f"imagereward: {path} lacks {missing}; expected BLIP's med_config.json (a BertConfig)")
    # is_decoder builds the cross-attention blocks; forward(is_decoder=False) keeps the self-attention
    # bidirectional, which is med.py's mode="multimodal"
    return BlipTextConfig(**{name: med_config[name] for name in names}, encoder_hidden_size=vision_width,
                          is_decoder=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _resolve_med_config(pretrained, checkpoint: Path, med_config) -> Path:
    if med_config is not None:
        return resolve_file(med_config, "med_config.json", "imagereward")
    source = pretrained if not Path(pretrained).expanduser().is_file() else checkpoint.parent
    try:
        return resolve_file(source, "med_config.json", "imagereward")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}; ImageReward needs its med_config.json beside ImageReward.pt or as "
                                f"med_config=") from None


def load_imagereward(pretrained: str | os.PathLike, *, med_config: str | os.PathLike | None = None,
                     tokenizer: str | os.PathLike = "bert-base-uncased",
                     vision_config: dict | str | os.PathLike | None = None,
                     **kwargs) -> ImageRewardReward:
    """ImageReward from ``ImageReward.pt`` (file, folder or hub id ``THUDM/ImageReward``) and its ``med_config.json``
    (default: beside the checkpoint). ``tokenizer``: bert-base-uncased (folder or hub id), to which BLIP adds
    ``[DEC]`` and ``[ENC]``; ``vision_config``: BlipVisionConfig sizes (dict or JSON path), default BLIP ViT-L/16 at
    224 px."""
    from transformers import BertTokenizer, BlipTextModel, BlipVisionConfig, BlipVisionModel
    path = resolve_file(pretrained, "ImageReward.pt", "imagereward")
    config_path = _resolve_med_config(pretrained, path, med_config)
    with open(config_path) as handle:
        med = json.load(handle)
    if isinstance(vision_config, (str, os.PathLike)):
        with open(vision_config) as handle:
            vision_config = json.load(handle)
    vision_sizes = {**BLIP_VIT_LARGE, **(vision_config or {})}
    state = load_state_dict_file(path, "imagereward")
    text_model = BlipTextModel(_text_config(med, vision_sizes["hidden_size"], config_path), add_pooling_layer=False)
    text_keys = [f"blip.text_encoder.{key}" for key in text_model.state_dict() if not key.endswith("position_ids")]
    head_keys = [f"mlp.layers.{i}.{kind}" for i in (0, 2, 4, 6, 7) for kind in ("weight", "bias")]
    check_keys(state, _vision_keys(vision_sizes) + text_keys + head_keys, path, "imagereward", optional=_UNUSED)

    vision_model = BlipVisionModel(BlipVisionConfig(**vision_sizes, hidden_act="gelu", layer_norm_eps=1e-6))
    vision_tensors, vision_names = {}, {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            target = _vision_key(key[len("blip.visual_encoder."):])
            vision_tensors[target], vision_names[target] = value, key
    text_tensors = {key[len("blip.text_encoder."):]: value for key, value in state.items()
                    if key.startswith("blip.text_encoder.") and key not in _UNUSED}
    text_names = {key: f"blip.text_encoder.{key}" for key in text_tensors}
    for model, tensors, names in ((vision_model, vision_tensors, vision_names), (text_model, text_tensors, text_names)):
        check_shapes(tensors, model, names, path, "imagereward")
        incompatible = model.load_state_dict(tensors, strict=False)
        assert not [key for key in incompatible.missing_keys if not key.endswith("position_ids")], incompatible
    head = mlp_head({key[len("mlp."):]: value for key, value in state.items() if key.startswith("mlp.")}, path,
                    "imagereward")
    if head[0].in_features != text_model.config.hidden_size:
        raise ValueError(f"imagereward: checkpoint {path} key 'mlp.layers.0.weight' takes {head[0].in_features}-d "
                         f"features, the text encoder is {text_model.config.hidden_size}-d")

    text_tokenizer = BertTokenizer.from_pretrained(str(tokenizer))
    text_tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's init_tokenizer
    text_tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return ImageRewardReward(vision_model, text_model, head, text_tokenizer, **kwargs)
