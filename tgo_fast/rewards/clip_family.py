"""The CLIP-tower rewards: HPS v2.1, PickScore, CLIP score and the LAION aesthetic predictor.

All four embed with a transformers :class:`~transformers.CLIPModel` (HPS v2.1's open_clip state dict is mapped onto
one) and differ in preprocessing and head; with ê = e/‖e‖ the L2-normalised image / text embeddings:

- ``hpsv2``      HPS v2.1 = ê_img · ê_txt                  (``hpsv2/img_score.py``: ``image_features @ text_features.T``)
- ``pickscore``  exp(logit_scale) · ê_img · ê_txt            (PickScore README inference snippet)
- ``clip``       max(100 · ê_img · ê_txt, 0)                 (torchmetrics ``CLIPScore``)
- ``aesthetic``  MLP(ê_img), the ``layers.*`` affine head    (improved-aesthetic-predictor ``simple_inference.py``)
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from PIL import Image as PILImage

from ._common import (ModelReward, check_keys, check_shapes, clip_pil_pixels, load_state_dict_file, mlp_head,
                      open_clip_tensor_pixels, resolve_file)

__all__ = ["AestheticReward", "CLIPScoreReward", "HPSv2Reward", "OPEN_CLIP_VIT_H_14", "PickScoreReward",
           "load_aesthetic", "load_clip_score", "load_hpsv2", "load_pickscore", "open_clip_to_clip_model"]

LAION_VIT_H_14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's processor, HPS v2.1's tokenizer
OPENAI_VIT_L_14 = "openai/clip-vit-large-patch14"
# open_clip's model_configs/ViT-H-14.json, the architecture HPS v2.1 fine-tunes (nn.GELU, not QuickGELU)
OPEN_CLIP_VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
_TEXT_CONTEXT = 77  # CLIP's position table; PickScore and torchmetrics truncate prompts to it


def _image_processor(source: str | os.PathLike):
    """The PIL-backed CLIPImageProcessor of ``source`` (RGB, PIL bicubic resize of the shorter side, centre crop at
    ``(side − crop) // 2``, rescale, normalise): what PickScore's ``AutoProcessor`` and torchmetrics ran."""
    try:  # transformers ≥ 5 splits the PIL backend from the torchvision one, which would resample differently
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class
    return processor_class.from_pretrained(str(source))


def _tokenizer(source: str | os.PathLike):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(source))


def _normalized(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=-1, keepdim=True)


class _CLIPPairReward(ModelReward):
    """A CLIPModel scoring (image, prompt) pairs from ê_img · ê_txt; the tokenizer and image processor are the
    official ones of each reward."""

    def __init__(self, model, tokenizer, image_processor, **kwargs):
        super().__init__(**kwargs)
        self.model, self.tokenizer, self.image_processor = self._place(model), tokenizer, image_processor

    def _image_embeds(self, images: list[PILImage.Image]) -> torch.Tensor:
        # RGB first, as transformers did when PickScore and torchmetrics were released (newer versions composite
        # RGBA onto white instead of dropping alpha)
        pixels = self.image_processor(images=[image.convert("RGB") for image in images],
                                      return_tensors="pt")["pixel_values"]
        output = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype))
        return self.model.visual_projection(output.pooler_output)

    def _text_embeds(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=_TEXT_CONTEXT,
                                return_tensors="pt").to(self.device)
        output = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return self.model.text_projection(output.pooler_output)

    def _cosine(self, images: list[PILImage.Image], prompts: list[str]) -> torch.Tensor:
        image, text = _normalized(self._image_embeds(images).float()), _normalized(self._text_embeds(prompts).float())
        return (image * text).sum(-1)


class PickScoreReward(_CLIPPairReward):
    """PickScore = exp(logit_scale) · ê_img · ê_txt (about 18–23 for typical images)."""

    name = "pickscore"

    def _score_batch(self, images, prompts):
        return self.model.logit_scale.float().exp() * self._cosine(images, prompts)


class CLIPScoreReward(_CLIPPairReward):
    """torchmetrics' CLIP score = max(100 · ê_img · ê_txt, 0), per image."""

    name = "clip"

    def _score_batch(self, images, prompts):
        return (100.0 * self._cosine(images, prompts)).clamp(min=0.0)


class HPSv2Reward(ModelReward):
    """HPS v2.1 = ê_img · ê_txt of the fine-tuned open_clip ViT-H-14 (about 0.25–0.35 for typical images).

    As open_clip: prompts padded to the full context with the tokenizer's pad id, no padding mask (the causal
    mask hides it), the text feature taken at ``argmax(token ids)`` (the end-of-text token, CLIP's largest id)."""

    name = "hpsv2"

    def __init__(self, model, tokenizer, **kwargs):
        super().__init__(**kwargs)
        self.model, self.tokenizer = self._place(model), tokenizer
        self.image_size = model.config.vision_config.image_size
        self.context_length = model.config.text_config.max_position_embeddings

    def _score_batch(self, images, prompts):
        pixels = torch.stack([open_clip_tensor_pixels(image, self.image_size) for image in images])
        image = self.model.visual_projection(self.model.vision_model(
            pixel_values=pixels.to(self.device, self.dtype)).pooler_output)
        ids = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.context_length,
                             return_tensors="pt")["input_ids"].to(self.device)
        hidden = self.model.text_model(input_ids=ids).last_hidden_state  # after ln_final
        text = self.model.text_projection(hidden[torch.arange(len(ids), device=self.device), ids.argmax(-1)])
        return (_normalized(image.float()) * _normalized(text.float())).sum(-1)


class AestheticReward(ModelReward):
    """LAION aesthetic predictor v2 = MLP(ê_img) on CLIP ViT-L/14 image embeddings (about 1–10, ~5–6 for photos)."""

    name = "aesthetic"

    def __init__(self, model, head: torch.nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.model, self.head = self._place(model), head.to(self.device).eval().requires_grad_(False)
        self.image_size = model.config.vision_config.image_size

    def _score_batch(self, images, prompts):
        pixels = torch.stack([clip_pil_pixels(image, self.image_size) for image in images])
        embeds = self.model.visual_projection(self.model.vision_model(
            pixel_values=pixels.to(self.device, self.dtype)).pooler_output)
        return self.head(_normalized(embeds.float()))[:, 0]  # the head runs in fp32, as upstream's FloatTensor cast


# ----------------------------------------------------------------------------------------------
# HPS v2.1: open_clip state dict → CLIPModel
# ----------------------------------------------------------------------------------------------
_RESBLOCK = {  # open_clip residual block → transformers CLIPEncoderLayer (in_proj is split into q, k, v)
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_SINGLE = {  # open_clip key → (CLIPModel key, transpose): the projections are stored as (in, out) matrices
    "logit_scale": ("logit_scale", False),
    "token_embedding.weight": ("text_model.embeddings.token_embedding.weight", False),
    "positional_embedding": ("text_model.embeddings.position_embedding.weight", False),
    "ln_final.weight": ("text_model.final_layer_norm.weight", False),
    "ln_final.bias": ("text_model.final_layer_norm.bias", False),
    "text_projection": ("text_projection.weight", True),
    "visual.class_embedding": ("vision_model.embeddings.class_embedding", False),
    "visual.positional_embedding": ("vision_model.embeddings.position_embedding.weight", False),
    "visual.conv1.weight": ("vision_model.embeddings.patch_embedding.weight", False),
    "visual.ln_pre.weight": ("vision_model.pre_layrnorm.weight", False),
    "visual.ln_pre.bias": ("vision_model.pre_layrnorm.bias", False),
    "visual.ln_post.weight": ("vision_model.post_layernorm.weight", False),
    "visual.ln_post.bias": ("vision_model.post_layernorm.bias", False),
    "visual.proj": ("visual_projection.weight", True),
}
_TOWERS = {"transformer.resblocks.": "text_model.encoder.layers.",
           "visual.transformer.resblocks.": "vision_model.encoder.layers."}
_RESBLOCK_KEY = re.compile(r"^(?P<tower>(?:visual\.)?transformer\.resblocks\.)(?P<layer>\d+)\.(?P<rest>.+)$")
_SUPPORTED_VISION = {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio"}
_SUPPORTED_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}


def _open_clip_keys(config: dict) -> list[str]:
    """Every key of an open_clip ``CLIP`` state dict with plain ViT towers (``attn_mask`` is not persistent)."""
    block = [f"{name}.{kind}" for name in ("ln_1", "ln_2", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")
             for kind in ("weight", "bias")] + ["attn.in_proj_weight", "attn.in_proj_bias"]
    keys = list(_SINGLE)
    for tower, cfg in (("transformer.resblocks.", config["text_cfg"]), ("visual.transformer.resblocks.",
                                                                         config["vision_cfg"])):
        keys += [f"{tower}{layer}.{name}" for layer in range(cfg["layers"]) for name in block]
    return keys


def _clip_config(config: dict, eos_token_id: int):
    """transformers' CLIPConfig for an open_clip model config (``model_configs/*.json`` format)."""
    from transformers import CLIPConfig
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    unsupported = sorted({f"vision_cfg.{k}" for k in vision.keys() - _SUPPORTED_VISION}
                         | {f"text_cfg.{k}" for k in text.keys() - _SUPPORTED_TEXT}
                         | set(config.keys() - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}))
    if unsupported:
        raise ValueError(f"hpsv2: model_config options {unsupported} are not supported: only plain-ViT open_clip "
                         f"towers (as ViT-H-14) map onto transformers' CLIPModel")
    act = "quick_gelu" if config.get("quick_gelu") else "gelu"
    return CLIPConfig(
        projection_dim=config["embed_dim"],
        vision_config=dict(hidden_size=vision["width"], num_hidden_layers=vision["layers"],
                           num_attention_heads=vision["width"] // vision.get("head_width", 64),
                           intermediate_size=int(vision["width"] * vision.get("mlp_ratio", 4.0)),
                           image_size=vision.get("image_size", 224), patch_size=vision["patch_size"],
                           hidden_act=act, layer_norm_eps=1e-5),
        text_config=dict(hidden_size=text["width"], num_hidden_layers=text["layers"],
                         num_attention_heads=text.get("heads", 8),
                         intermediate_size=int(text["width"] * text.get("mlp_ratio", 4.0)),
                         max_position_embeddings=text.get("context_length", 77),
                         vocab_size=text.get("vocab_size", 49408), hidden_act=act, layer_norm_eps=1e-5,
                         eos_token_id=eos_token_id))


def open_clip_to_clip_model(state: dict[str, torch.Tensor], config: dict, path: Path, eos_token_id: int = 49407):
    """A transformers CLIPModel holding an open_clip CLIP state dict (keys checked against ``config``)."""
    from transformers import CLIPModel
    what = "hpsv2"
    try:
        clip_config = _clip_config(config, eos_token_id)
    except KeyError as error:
        raise ValueError(f"hpsv2: model_config lacks {error}; it needs embed_dim, vision_cfg (width, layers, "
                         f"patch_size) and text_cfg (width, layers), as open_clip's model_configs/*.json") from None
    check_keys(state, _open_clip_keys(config), path, what)
    tensors, names = {}, {}
    for key, value in state.items():
        if key in _SINGLE:
            target, transpose = _SINGLE[key]
            tensors[target], names[target] = (value.T if transpose else value), key
            continue
        match = _RESBLOCK_KEY.match(key)
        prefix = f"{_TOWERS[match['tower']]}{match['layer']}."
        rest = match["rest"]
        if rest.startswith("attn.in_proj_"):  # rows [q; k; v]
            kind = rest[len("attn.in_proj_"):]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                tensors[f"{prefix}self_attn.{name}.{kind}"], names[f"{prefix}self_attn.{name}.{kind}"] = part, key
        else:
            module, kind = rest.rsplit(".", 1)
            tensors[f"{prefix}{_RESBLOCK[module]}.{kind}"], names[f"{prefix}{_RESBLOCK[module]}.{kind}"] = value, key
    model = CLIPModel(clip_config)
    check_shapes(tensors, model, names, path, what,
                 transposed=[target for target, transpose in _SINGLE.values() if transpose])
    incompatible = model.load_state_dict(tensors, strict=False)
    left = [key for key in incompatible.missing_keys if not key.endswith("position_ids")]
    assert not left and not incompatible.unexpected_keys, (left, incompatible.unexpected_keys)
    return model


def _model_config(model_config: dict | str | os.PathLike | None) -> dict:
    if model_config is None:
        return OPEN_CLIP_VIT_H_14
    if isinstance(model_config, dict):
        return model_config
    with open(model_config) as handle:
        return json.load(handle)


# ----------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------
def load_hpsv2(pretrained: str | os.PathLike, *, tokenizer: str | os.PathLike = LAION_VIT_H_14,
               model_config: dict | str | os.PathLike | None = None, **kwargs) -> HPSv2Reward:
    """HPS v2.1 from ``HPS_v2.1_compressed.pt`` (a file, a folder holding it, or a hub id such as ``xswu/HPSv2``):
    ``{"state_dict": open_clip ViT-H-14 state dict}``. ``tokenizer``: CLIP's BPE (the laion ViT-H-14 folder or hub
    id); ``model_config``: an open_clip model config (dict or JSON path), default ViT-H-14."""
    path = resolve_file(pretrained, "HPS_v2.1_compressed.pt", "hpsv2")
    checkpoint = load_state_dict_file(path, "hpsv2")
    state = checkpoint.get("state_dict", checkpoint)  # the released file nests it; a bare state dict is accepted
    text_tokenizer = _tokenizer(tokenizer)
    model = open_clip_to_clip_model(state, _model_config(model_config), path, eos_token_id=text_tokenizer.eos_token_id)
    return HPSv2Reward(model, text_tokenizer, **kwargs)


def load_pickscore(pretrained: str | os.PathLike, *, processor: str | os.PathLike = LAION_VIT_H_14,
                   **kwargs) -> PickScoreReward:
    """PickScore from the ``yuvalkirstain/PickScore_v1`` CLIPModel (folder or hub id) with the ``processor``'s
    tokenizer and image processor (default the laion ViT-H-14 one, as the PickScore README)."""
    from transformers import CLIPModel
    return PickScoreReward(CLIPModel.from_pretrained(str(pretrained)), _tokenizer(processor),
                           _image_processor(processor), **kwargs)


def load_clip_score(pretrained: str | os.PathLike, **kwargs) -> CLIPScoreReward:
    """torchmetrics' CLIP score with the CLIPModel ``pretrained`` (e.g. ``openai/clip-vit-large-patch14``) and its
    own processor."""
    from transformers import CLIPModel
    return CLIPScoreReward(CLIPModel.from_pretrained(str(pretrained)), _tokenizer(pretrained),
                           _image_processor(pretrained), **kwargs)


def load_aesthetic(pretrained: str | os.PathLike, *, clip: str | os.PathLike = OPENAI_VIT_L_14,
                   **kwargs) -> AestheticReward:
    """The LAION aesthetic predictor: the ``sac+logos+ava1-l14-linearMSE.pth`` head (file, folder or hub id) on the
    image embeddings of the CLIP ViT-L/14 ``clip`` (folder or hub id)."""
    from transformers import CLIPModel
    path = resolve_file(pretrained, "sac+logos+ava1-l14-linearMSE.pth", "aesthetic")
    head = mlp_head(load_state_dict_file(path, "aesthetic"), path, "aesthetic")
    model = CLIPModel.from_pretrained(str(clip))
    if head[0].in_features != model.config.projection_dim:
        raise ValueError(f"aesthetic: the head {path} takes {head[0].in_features}-d embeddings but the CLIP model "
                         f"{clip} embeds in {model.config.projection_dim} dimensions (the head needs ViT-L/14: 768)")
    return AestheticReward(model, head, **kwargs)
