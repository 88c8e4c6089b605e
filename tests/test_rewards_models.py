"""The five reward models on tiny random-init checkpoints saved in each official layout.

Each scorer loads through ``load_reward``, scores a batch, and is compared with an independent plain-torch
computation of the official forward and preprocessing written here from the official sources:
open_clip ``model.py``/``transformer.py``/``transform.py`` + HPSv2 ``img_score.py`` (hpsv2), the PickScore README
(pickscore), torchmetrics ``clip_score.py`` (clip), improved-aesthetic-predictor ``simple_inference.py`` + OpenAI
CLIP ``clip.py``/``model.py`` (aesthetic), ImageReward ``ImageReward.py`` + BLIP ``vit.py``/``med.py`` (imagereward).
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tgo_fast.rewards import load_reward, score_images

OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
PROMPTS = ["a red cat on a mat", "Hello world!", "x", "an extremely long prompt " * 6, "two dogs", "a blue sky"]
TOLERANCE = dict(rtol=1e-4, atol=1e-5)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _images(seed=0):
    """Sizes and modes that exercise the resize/crop rounding: odd offsets, portrait, landscape, L, RGBA, exact."""
    rng = np.random.default_rng(seed)
    shapes = [((45, 61), "RGB"), ((70, 37), "RGB"), ((32, 32), "RGB"), ((50, 39), "L"), ((41, 41), "RGBA"),
              ((36, 90), "RGB")]
    images = []
    for (width, height), mode in shapes:
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        images.append(Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode))
    return images


def _randomize(state: dict, seed: int, scale: float = 0.2) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {key: (torch.randn(value.shape, generator=generator) * scale if value.is_floating_point() else value)
            for key, value in state.items()}


# ---------------------------------------------------------------------------------------------
# tokenizers in the released formats (CLIP BPE vocab.json/merges.txt; BERT vocab.txt)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    chars = [chr(c) for c in range(33, 127)]  # printable ASCII: CLIP's byte-level alphabet maps them to themselves
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["ca"], vocab["cat</w>"] = len(vocab), len(vocab) + 1  # two merges
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1  # eot = the largest id, as CLIP's
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", "pad_token": "!"}))
    return folder


def _clip_tokenizer(folder):
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def bert_tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert_tokenizer")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "cat", "dog", "red", "!"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                              "do_lower_case": True}))
    return folder


# ---------------------------------------------------------------------------------------------
# plain-torch building blocks of the official forwards
# ---------------------------------------------------------------------------------------------
def _layer_norm(x, state, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps)


def _attention(q, k, v, heads, mask=None):
    """softmax(q kᵀ / √d + mask) v over ``heads`` heads; q (B, L, D), k/v (B, S, D), mask broadcast to (B, h, L, S)."""
    batch, length, width = q.shape
    split = lambda t: t.reshape(batch, t.shape[1], heads, width // heads).transpose(1, 2)
    logits = split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        logits = logits + mask
    return (logits.softmax(-1) @ split(v)).transpose(1, 2).reshape(batch, length, width)


def _open_clip_block(x, state, prefix, heads, mask=None, act=F.gelu):
    """open_clip / OpenAI CLIP ResidualAttentionBlock: x + attn(ln_1 x); x + c_proj(act(c_fc(ln_2 x)))."""
    h = _layer_norm(x, state, f"{prefix}.ln_1", 1e-5)
    q, k, v = F.linear(h, state[f"{prefix}.attn.in_proj_weight"], state[f"{prefix}.attn.in_proj_bias"]).chunk(3, -1)
    x = x + F.linear(_attention(q, k, v, heads, mask), state[f"{prefix}.attn.out_proj.weight"],
                     state[f"{prefix}.attn.out_proj.bias"])
    h = _layer_norm(x, state, f"{prefix}.ln_2", 1e-5)
    h = act(F.linear(h, state[f"{prefix}.mlp.c_fc.weight"], state[f"{prefix}.mlp.c_fc.bias"]))
    return x + F.linear(h, state[f"{prefix}.mlp.c_proj.weight"], state[f"{prefix}.mlp.c_proj.bias"])


def _hf_clip_block(x, state, prefix, heads, mask, act):
    """The same block in transformers' CLIPEncoderLayer names (q/k/v split, layer_norm1/2, fc1/fc2)."""
    h = _layer_norm(x, state, f"{prefix}.layer_norm1", 1e-5)
    q, k, v = (F.linear(h, state[f"{prefix}.self_attn.{n}_proj.weight"], state[f"{prefix}.self_attn.{n}_proj.bias"])
               for n in "qkv")
    x = x + F.linear(_attention(q, k, v, heads, mask), state[f"{prefix}.self_attn.out_proj.weight"],
                     state[f"{prefix}.self_attn.out_proj.bias"])
    h = act(F.linear(_layer_norm(x, state, f"{prefix}.layer_norm2", 1e-5), state[f"{prefix}.mlp.fc1.weight"],
                     state[f"{prefix}.mlp.fc1.bias"]))
    return x + F.linear(h, state[f"{prefix}.mlp.fc2.weight"], state[f"{prefix}.mlp.fc2.bias"])


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _causal(length):
    return torch.full((length, length), float("-inf")).triu(1)


# ---------------------------------------------------------------------------------------------
# the official preprocessing pipelines, written from torchvision's semantics
# ---------------------------------------------------------------------------------------------
def _short_side_size(width, height, size):
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def _openai_clip_transform(image, size):
    """OpenAI CLIP ``_transform``: Resize(size, BICUBIC) on PIL, CenterCrop (round), RGB, ToTensor, Normalize."""
    new = _short_side_size(*image.size, size)
    if new != image.size:
        image = image.resize(new, Image.BICUBIC)
    left, top = round((new[0] - size) / 2), round((new[1] - size) / 2)
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    return (torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255 - OPENAI_MEAN) / OPENAI_STD


def _hpsv2_transform(image, size):
    """HPSv2 preprocess_val: RGB(A), ToTensor, Resize(size, BICUBIC) on the tensor (antialias), CenterCrop, Normalize
    of the colour channels."""
    image = image if image.mode == "RGBA" else image.convert("RGB")
    x = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255
    new_width, new_height = _short_side_size(x.shape[2], x.shape[1], size)
    if (new_height, new_width) != tuple(x.shape[1:]):
        x = F.interpolate(x[None], (new_height, new_width), mode="bicubic", align_corners=False, antialias=True)[0]
    top, left = round((new_height - size) / 2), round((new_width - size) / 2)
    return (x[:3, top:top + size, left:left + size] - OPENAI_MEAN) / OPENAI_STD


def _hf_clip_processor(image, size):
    """transformers' (slow) CLIPImageProcessor: RGB, PIL bicubic resize of the shorter side, crop at floor
    offsets, rescale 1/255, normalise."""
    image = image.convert("RGB")
    new = _short_side_size(*image.size, size)
    image = image.resize(new, Image.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    x = torch.tensor(np.asarray(image, dtype=np.float64) / 255, dtype=torch.float32).permute(2, 0, 1)
    return (x[:, top:top + size, left:left + size] - OPENAI_MEAN) / OPENAI_STD


def test_crop_rounding_differs_between_the_pipelines():
    """The reason for three pipelines: torchvision rounds the crop offset, transformers floors it."""
    image = _images()[0]  # 45 × 61 → 32 × 43: offset (43 − 32)/2 = 5.5
    a, b = _openai_clip_transform(image, 32), _hf_clip_processor(image, 32)
    assert not torch.allclose(a, b)


# ---------------------------------------------------------------------------------------------
# HPS v2.1: open_clip state dict
# ---------------------------------------------------------------------------------------------
HPS_CONFIG = {"embed_dim": 24,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 192, "width": 32, "heads": 4, "layers": 2}}


def _open_clip_state(config, seed=0):
    vision, text, dim = config["vision_cfg"], config["text_cfg"], config["embed_dim"]
    grid = (vision["image_size"] // vision["patch_size"]) ** 2

    def blocks(prefix, width, layers):
        shapes = {"ln_1.weight": (width,), "ln_1.bias": (width,), "attn.in_proj_weight": (3 * width, width),
                  "attn.in_proj_bias": (3 * width,), "attn.out_proj.weight": (width, width),
                  "attn.out_proj.bias": (width,), "ln_2.weight": (width,), "ln_2.bias": (width,),
                  "mlp.c_fc.weight": (4 * width, width), "mlp.c_fc.bias": (4 * width,),
                  "mlp.c_proj.weight": (width, 4 * width), "mlp.c_proj.bias": (width,)}
        return {f"{prefix}.{layer}.{name}": shape for layer in range(layers) for name, shape in shapes.items()}

    vw, tw = vision["width"], text["width"]
    shapes = {"logit_scale": (), "positional_embedding": (text["context_length"], tw), "text_projection": (tw, dim),
              "token_embedding.weight": (text["vocab_size"], tw), "ln_final.weight": (tw,), "ln_final.bias": (tw,),
              "visual.class_embedding": (vw,), "visual.positional_embedding": (grid + 1, vw), "visual.proj": (vw, dim),
              "visual.conv1.weight": (vw, 3, vision["patch_size"], vision["patch_size"]),
              "visual.ln_pre.weight": (vw,), "visual.ln_pre.bias": (vw,), "visual.ln_post.weight": (vw,),
              "visual.ln_post.bias": (vw,),
              **blocks("transformer.resblocks", tw, text["layers"]),
              **blocks("visual.transformer.resblocks", vw, vision["layers"])}
    state = _randomize({key: torch.zeros(shape) for key, shape in shapes.items()}, seed)
    for key in state:  # LayerNorm gains around 1
        if key.endswith(("ln_1.weight", "ln_2.weight", "ln_final.weight", "ln_pre.weight", "ln_post.weight")):
            state[key] = state[key] + 1
    return state


def _open_clip_tokens(tokenizer, prompts, context):
    """open_clip ``tokenize``: [sot] + BPE + [eot], cut to the context with eot last, zero-padded."""
    rows = []
    for prompt in prompts:
        ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        if len(ids) > context:
            ids = ids[:context]
            ids[-1] = tokenizer.eos_token_id
        rows.append(ids + [0] * (context - len(ids)))
    return torch.tensor(rows)


def _hpsv2_reference(state, config, tokenizer, images, prompts):
    vision, text = config["vision_cfg"], config["text_cfg"]
    pixels = torch.stack([_hpsv2_transform(image, vision["image_size"]) for image in images])
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=vision["patch_size"]).flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + state["visual.positional_embedding"]
    x = _layer_norm(x, state, "visual.ln_pre", 1e-5)
    for layer in range(vision["layers"]):
        x = _open_clip_block(x, state, f"visual.transformer.resblocks.{layer}", vision["width"] // vision["head_width"])
    image = _layer_norm(x[:, 0], state, "visual.ln_post", 1e-5) @ state["visual.proj"]

    ids = _open_clip_tokens(tokenizer, prompts, text["context_length"])
    x = state["token_embedding.weight"][ids] + state["positional_embedding"]
    for layer in range(text["layers"]):
        x = _open_clip_block(x, state, f"transformer.resblocks.{layer}", text["heads"], _causal(ids.shape[1]))
    x = _layer_norm(x, state, "ln_final", 1e-5)
    txt = x[torch.arange(len(ids)), ids.argmax(-1)] @ state["text_projection"]
    image, txt = F.normalize(image, dim=-1), F.normalize(txt, dim=-1)
    return torch.diagonal(image @ txt.T)


@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    state = _open_clip_state(HPS_CONFIG)
    torch.save({"state_dict": state}, path)
    return path, state


def test_hpsv2_matches_open_clip_forward(hps_checkpoint, clip_tokenizer_dir):
    path, state = hps_checkpoint
    reward = load_reward("hpsv2", path.parent, tokenizer=clip_tokenizer_dir, model_config=HPS_CONFIG, batch_size=4)
    images = _images()
    scores = reward(images, PROMPTS)
    assert scores.dtype == torch.float32 and scores.shape == (6,) and scores.device.type == "cpu"
    expected = _hpsv2_reference(state, HPS_CONFIG, _clip_tokenizer(clip_tokenizer_dir), images, PROMPTS)
    torch.testing.assert_close(scores, expected, **TOLERANCE)
    assert scores.std() > 1e-3  # the prompts and images matter
    torch.testing.assert_close(score_images(reward, images, PROMPTS), expected.double(), **TOLERANCE)


# ---------------------------------------------------------------------------------------------
# PickScore and CLIP score: transformers CLIPModel folders
# ---------------------------------------------------------------------------------------------
def _save_clip_model(folder, tokenizer_dir, act, seed, text_sign=1.0):
    from transformers import CLIPConfig, CLIPModel
    tokenizer = _clip_tokenizer(tokenizer_dir)
    config = CLIPConfig(
        projection_dim=24,
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=len(tokenizer), max_position_embeddings=77, hidden_act=act,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, hidden_act=act))
    model = CLIPModel(config)
    state = _randomize(model.state_dict(), seed)
    state["logit_scale"] = torch.tensor(math.log(100.0))
    state["text_projection.weight"] = text_sign * state["text_projection.weight"]  # −1 flips every cosine
    model.load_state_dict(state)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _image_processor_class()(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return {key: value for key, value in model.state_dict().items()}


def _image_processor_class():
    try:
        from transformers import CLIPImageProcessorPil
        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor
        return CLIPImageProcessor


def _hf_clip_features(state, tokenizer, pixels, prompts, act):
    """transformers CLIPModel image / text embeddings in plain torch (pre-LN ViT, CLS pooling; causal text, first
    eos pooling)."""
    x = F.conv2d(pixels, state["vision_model.embeddings.patch_embedding.weight"], stride=8).flatten(2).transpose(1, 2)
    cls = state["vision_model.embeddings.class_embedding"].expand(len(x), 1, -1)
    x = torch.cat([cls, x], 1) + state["vision_model.embeddings.position_embedding.weight"]
    x = _layer_norm(x, state, "vision_model.pre_layrnorm", 1e-5)
    for layer in range(2):
        x = _hf_clip_block(x, state, f"vision_model.encoder.layers.{layer}", 4, None, act)
    image = _layer_norm(x[:, 0], state, "vision_model.post_layernorm", 1e-5) @ state["visual_projection.weight"].T

    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    ids, keep = tokens["input_ids"], tokens["attention_mask"]
    x = state["text_model.embeddings.token_embedding.weight"][ids]
    x = x + state["text_model.embeddings.position_embedding.weight"][: ids.shape[1]]
    mask = _causal(ids.shape[1]) + torch.where(keep[:, None, None, :].bool(), 0.0, float("-inf"))
    for layer in range(2):
        x = _hf_clip_block(x, state, f"text_model.encoder.layers.{layer}", 4, mask, act)
    x = _layer_norm(x, state, "text_model.final_layer_norm", 1e-5)
    eos = (ids == tokenizer.eos_token_id).int().argmax(-1)
    text = x[torch.arange(len(ids)), eos] @ state["text_projection.weight"].T
    return image, text


def test_pickscore_matches_readme_forward(tmp_path, clip_tokenizer_dir):
    state = _save_clip_model(tmp_path / "PickScore_v1", clip_tokenizer_dir, "gelu", seed=1)
    reward = load_reward("pickscore", tmp_path / "PickScore_v1", processor=tmp_path / "PickScore_v1", batch_size=5)
    images = _images(1)
    scores = reward(images, PROMPTS)
    pixels = torch.stack([_hf_clip_processor(image, 32) for image in images])
    image, text = _hf_clip_features(state, _clip_tokenizer(clip_tokenizer_dir), pixels, PROMPTS, F.gelu)
    image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
    expected = state["logit_scale"].exp() * (image * text).sum(-1)
    torch.testing.assert_close(scores, expected, **TOLERANCE)


@pytest.mark.parametrize("text_sign", [1.0, -1.0])
def test_clip_score_is_torchmetrics_convention(tmp_path, clip_tokenizer_dir, text_sign):
    state = _save_clip_model(tmp_path / "clip", clip_tokenizer_dir, "quick_gelu", seed=2, text_sign=text_sign)
    reward = load_reward("clip", tmp_path / "clip")
    images, prompts = _images(2) * 2, PROMPTS[::-1] + PROMPTS
    scores = reward(images, prompts)
    pixels = torch.stack([_hf_clip_processor(image, 32) for image in images])
    image, text = _hf_clip_features(state, _clip_tokenizer(clip_tokenizer_dir), pixels, prompts, _quick_gelu)
    cosine = F.cosine_similarity(image, text, dim=-1)
    assert ((cosine > 0) if text_sign > 0 else (cosine < 0)).all()  # both sides of the clamp are exercised
    torch.testing.assert_close(scores, torch.clamp(100 * cosine, min=0), **TOLERANCE)


# ---------------------------------------------------------------------------------------------
# aesthetic: the LAION head on CLIP ViT-L/14 image embeddings
# ---------------------------------------------------------------------------------------------
def _mlp_head_state(input_size, seed):
    sizes = [input_size, 1024, 128, 64, 16, 1]
    state = {}
    for (index, (fan_in, fan_out)) in zip((0, 2, 4, 6, 7), zip(sizes, sizes[1:])):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=torch.Generator().manual_seed(
            seed + index)) / math.sqrt(fan_in)
        state[f"layers.{index}.bias"] = torch.full((fan_out,), 0.1 * index)
    return state


def _mlp_head(state, x, prefix="layers."):
    for index in (0, 2, 4, 6, 7):  # Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear
        x = F.linear(x, state[f"{prefix}{index}.weight"], state[f"{prefix}{index}.bias"])
    return x[:, 0]


@pytest.fixture
def aesthetic_files(tmp_path, clip_tokenizer_dir):
    clip_state = _save_clip_model(tmp_path / "clip-vit-l", clip_tokenizer_dir, "quick_gelu", seed=3)
    head = _mlp_head_state(24, seed=4)
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head, path)
    return path, head, tmp_path / "clip-vit-l", clip_state


def test_aesthetic_matches_simple_inference(aesthetic_files, clip_tokenizer_dir):
    path, head, clip_folder, clip_state = aesthetic_files
    reward = load_reward("aesthetic", path, clip=clip_folder, batch_size=2)
    images = _images(3)
    scores = reward(images, PROMPTS)
    pixels = torch.stack([_openai_clip_transform(image, 32) for image in images])
    image, _ = _hf_clip_features(clip_state, _clip_tokenizer(clip_tokenizer_dir), pixels, PROMPTS, _quick_gelu)
    embedding = image.numpy() / np.linalg.norm(image.numpy(), axis=-1, keepdims=True)  # upstream's `normalized`
    torch.testing.assert_close(scores, _mlp_head(head, torch.from_numpy(embedding).float()), **TOLERANCE)
    # the prompt is not read
    torch.testing.assert_close(reward(images, ["anything"] * len(images)), scores)


# ---------------------------------------------------------------------------------------------
# ImageReward: BLIP ViT + BERT with cross-attention + head
# ---------------------------------------------------------------------------------------------
VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
       "image_size": 32, "patch_size": 8}
MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": 24, "initializer_range": 0.02, "intermediate_size": 48,
              "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert",
              "num_attention_heads": 4, "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2,
              "vocab_size": 40, "encoder_width": 768, "add_cross_attention": True}


def _imagereward_state(seed=5):
    d, vd, grid = MED_CONFIG["hidden_size"], VIT["hidden_size"], (VIT["image_size"] // VIT["patch_size"]) ** 2
    shapes = {"blip.visual_encoder.cls_token": (1, 1, vd), "blip.visual_encoder.pos_embed": (1, grid + 1, vd),
              "blip.visual_encoder.patch_embed.proj.weight": (vd, 3, 8, 8),
              "blip.visual_encoder.patch_embed.proj.bias": (vd,),
              "blip.visual_encoder.norm.weight": (vd,), "blip.visual_encoder.norm.bias": (vd,),
              "blip.text_encoder.embeddings.word_embeddings.weight": (MED_CONFIG["vocab_size"], d),
              "blip.text_encoder.embeddings.position_embeddings.weight": (64, d),
              "blip.text_encoder.embeddings.LayerNorm.weight": (d,),
              "blip.text_encoder.embeddings.LayerNorm.bias": (d,),
              "blip.vision_proj.weight": (256, vd), "blip.vision_proj.bias": (256,),
              "blip.text_proj.weight": (256, d), "blip.text_proj.bias": (256,)}
    for layer in range(2):
        block = f"blip.visual_encoder.blocks.{layer}"
        shapes.update({f"{block}.norm1.weight": (vd,), f"{block}.norm1.bias": (vd,),
                       f"{block}.attn.qkv.weight": (3 * vd, vd), f"{block}.attn.qkv.bias": (3 * vd,),
                       f"{block}.attn.proj.weight": (vd, vd), f"{block}.attn.proj.bias": (vd,),
                       f"{block}.norm2.weight": (vd,), f"{block}.norm2.bias": (vd,),
                       f"{block}.mlp.fc1.weight": (64, vd), f"{block}.mlp.fc1.bias": (64,),
                       f"{block}.mlp.fc2.weight": (vd, 64), f"{block}.mlp.fc2.bias": (vd,)})
        bert = f"blip.text_encoder.encoder.layer.{layer}"
        for attention, source in (("attention", d), ("crossattention", vd)):
            shapes.update({f"{bert}.{attention}.self.query.weight": (d, d), f"{bert}.{attention}.self.query.bias": (d,),
                           f"{bert}.{attention}.self.key.weight": (d, source),
                           f"{bert}.{attention}.self.key.bias": (d,),
                           f"{bert}.{attention}.self.value.weight": (d, source),
                           f"{bert}.{attention}.self.value.bias": (d,),
                           f"{bert}.{attention}.output.dense.weight": (d, d),
                           f"{bert}.{attention}.output.dense.bias": (d,),
                           f"{bert}.{attention}.output.LayerNorm.weight": (d,),
                           f"{bert}.{attention}.output.LayerNorm.bias": (d,)})
        shapes.update({f"{bert}.intermediate.dense.weight": (48, d), f"{bert}.intermediate.dense.bias": (48,),
                       f"{bert}.output.dense.weight": (d, 48), f"{bert}.output.dense.bias": (d,),
                       f"{bert}.output.LayerNorm.weight": (d,), f"{bert}.output.LayerNorm.bias": (d,)})
    state = _randomize({key: torch.zeros(shape) for key, shape in shapes.items()}, seed, scale=0.3)
    for key in state:
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "LayerNorm.weight")):
            state[key] = state[key] + 1
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]  # med.py's persistent buffer
    state.update({f"mlp.{key}": value for key, value in _mlp_head_state(d, seed=6).items()})
    return state


def _imagereward_reference(state, tokenizer, images, prompts):
    s = {key.removeprefix("blip."): value for key, value in state.items()}
    pixels = torch.stack([_openai_clip_transform(image, VIT["image_size"]) for image in images])
    # BLIP vit.py: patch conv (with bias), [CLS], + pos_embed, pre-norm blocks (LayerNorm eps 1e-6), final norm
    x = F.conv2d(pixels, s["visual_encoder.patch_embed.proj.weight"], s["visual_encoder.patch_embed.proj.bias"],
                 stride=VIT["patch_size"]).flatten(2).transpose(1, 2)
    x = torch.cat([s["visual_encoder.cls_token"].expand(len(x), -1, -1), x], 1) + s["visual_encoder.pos_embed"]
    for layer in range(2):
        p = f"visual_encoder.blocks.{layer}"
        h = _layer_norm(x, s, f"{p}.norm1", 1e-6)
        q, k, v = F.linear(h, s[f"{p}.attn.qkv.weight"], s[f"{p}.attn.qkv.bias"]).chunk(3, -1)
        x = x + F.linear(_attention(q, k, v, 4), s[f"{p}.attn.proj.weight"], s[f"{p}.attn.proj.bias"])
        h = F.gelu(F.linear(_layer_norm(x, s, f"{p}.norm2", 1e-6), s[f"{p}.mlp.fc1.weight"], s[f"{p}.mlp.fc1.bias"]))
        x = x + F.linear(h, s[f"{p}.mlp.fc2.weight"], s[f"{p}.mlp.fc2.bias"])
    image_embeds = _layer_norm(x, s, "visual_encoder.norm", 1e-6)

    # med.py BertModel, mode="multimodal": word + position embeddings (no token types), post-LN layers with
    # self-attention (padding mask −10000), cross-attention to every image token, GELU feed-forward
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    ids, keep = tokens["input_ids"], tokens["attention_mask"]
    t = "text_encoder"
    x = s[f"{t}.embeddings.word_embeddings.weight"][ids] + s[f"{t}.embeddings.position_embeddings.weight"][:35]
    x = _layer_norm(x, s, f"{t}.embeddings.LayerNorm", 1e-12)
    padding = (1.0 - keep[:, None, None, :].float()) * -10000.0
    for layer in range(2):
        p = f"{t}.encoder.layer.{layer}"
        for attention, source, mask in (("attention", x, padding), ("crossattention", image_embeds, None)):
            linear = lambda name, inputs: F.linear(inputs, s[f"{p}.{attention}.{name}.weight"],
                                                   s[f"{p}.{attention}.{name}.bias"])
            context = _attention(linear("self.query", x), linear("self.key", source), linear("self.value", source),
                                 4, mask)
            x = _layer_norm(linear("output.dense", context) + x, s, f"{p}.{attention}.output.LayerNorm", 1e-12)
        h = F.gelu(F.linear(x, s[f"{p}.intermediate.dense.weight"], s[f"{p}.intermediate.dense.bias"]))
        x = _layer_norm(F.linear(h, s[f"{p}.output.dense.weight"], s[f"{p}.output.dense.bias"]) + x, s,
                        f"{p}.output.LayerNorm", 1e-12)
    rewards = _mlp_head(state, x[:, 0], prefix="mlp.layers.")
    return (rewards - 0.16717362830052426) / 1.0333394966054072


@pytest.fixture(scope="module")
def imagereward_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagereward")
    state = _imagereward_state()
    torch.save(state, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(MED_CONFIG))
    return folder, state


def _blip_tokenizer(folder):
    from transformers import BertTokenizer
    tokenizer = BertTokenizer.from_pretrained(str(folder))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def test_imagereward_matches_blip_forward(imagereward_files, bert_tokenizer_dir):
    folder, state = imagereward_files
    reward = load_reward("imagereward", folder / "ImageReward.pt", tokenizer=bert_tokenizer_dir, vision_config=VIT,
                         batch_size=4)
    images = _images(4)
    prompts = [*PROMPTS[:-1], "a red [DEC] cat"]
    scores = reward(images, prompts)
    expected = _imagereward_reference(state, _blip_tokenizer(bert_tokenizer_dir), images, prompts)
    torch.testing.assert_close(scores, expected, **TOLERANCE)
    assert scores.std() > 1e-3


# ---------------------------------------------------------------------------------------------
# bad inputs: clear errors naming the file and the key
# ---------------------------------------------------------------------------------------------
def test_batch_errors(hps_checkpoint, clip_tokenizer_dir):
    path, _ = hps_checkpoint
    reward = load_reward("hpsv2", path, tokenizer=clip_tokenizer_dir, model_config=HPS_CONFIG)
    with pytest.raises(ValueError, match="hpsv2: empty batch"):
        reward([], [])
    with pytest.raises(ValueError, match="hpsv2: got 2 images and 1 prompts; pass one prompt per image"):
        reward(_images()[:2], ["a cat"])
    with pytest.raises(TypeError, match="image 1 is a ndarray, expected a PIL.Image"):
        reward([_images()[0], np.zeros((4, 4, 3))], ["a", "b"])
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        load_reward("hpsv2", path, tokenizer=clip_tokenizer_dir, model_config=HPS_CONFIG, batch_size=0)


@pytest.mark.parametrize("name", ["hpsv2", "pickscore", "imagereward", "clip", "aesthetic"])
def test_model_reward_needs_pretrained(name):
    with pytest.raises(ValueError, match=f"reward '{name}': pass pretrained="):
        load_reward(name)


def test_missing_checkpoint_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"hpsv2: checkpoint file {tmp_path}/nope.pt does not exist"):
        load_reward("hpsv2", tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match=f"imagereward: no ImageReward.pt in the folder {tmp_path}"):
        load_reward("imagereward", tmp_path)
    (tmp_path / "ImageReward.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="med_config.json"):
        load_reward("imagereward", tmp_path / "ImageReward.pt")


def test_checkpoint_key_errors_name_file_and_key(tmp_path, hps_checkpoint, clip_tokenizer_dir, imagereward_files,
                                                 bert_tokenizer_dir):
    _, hps = hps_checkpoint
    options = dict(tokenizer=clip_tokenizer_dir, model_config=HPS_CONFIG)
    broken = tmp_path / "missing.pt"
    torch.save({"state_dict": {k: v for k, v in hps.items() if k != "visual.proj"}}, broken)
    with pytest.raises(ValueError, match=f"checkpoint {broken} has 1 missing key\\(s\\): 'visual.proj'"):
        load_reward("hpsv2", broken, **options)
    torch.save({"state_dict": {**hps, "module.extra": torch.zeros(1)}}, broken)
    with pytest.raises(ValueError, match=f"checkpoint {broken} has 1 unexpected key\\(s\\): 'module.extra'"):
        load_reward("hpsv2", broken, **options)
    torch.save({"state_dict": {**hps, "visual.proj": torch.zeros(3, 5)}}, broken)
    with pytest.raises(ValueError, match="key 'visual.proj' has shape \\(3, 5\\), the model config expects \\(32, 24\\)"):
        load_reward("hpsv2", broken, **options)

    folder, state = imagereward_files
    (tmp_path / "med_config.json").write_text(json.dumps(MED_CONFIG))
    ir_options = dict(tokenizer=bert_tokenizer_dir, vision_config=VIT)
    key = "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"
    torch.save({k: v for k, v in state.items() if k != key}, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match=f"ImageReward.pt has 1 missing key\\(s\\): '{key}'"):
        load_reward("imagereward", tmp_path, **ir_options)
    torch.save({**state, "blip.itm_head.weight": torch.zeros(2, 24)}, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match="1 unexpected key\\(s\\): 'blip.itm_head.weight'"):
        load_reward("imagereward", tmp_path, **ir_options)

    head = tmp_path / "head.pth"
    torch.save({**_mlp_head_state(24, 0), "layers.8.weight": torch.zeros(1)}, head)
    with pytest.raises(ValueError, match=f"aesthetic: checkpoint {head} has 1 unexpected key\\(s\\): 'layers.8.weight'"):
        load_reward("aesthetic", head, clip=tmp_path)


def test_aesthetic_head_must_fit_the_clip_embedding(aesthetic_files, tmp_path):
    path, _, clip_folder, _ = aesthetic_files
    wrong = tmp_path / "wrong.pth"
    torch.save(_mlp_head_state(768, 0), wrong)
    with pytest.raises(ValueError, match="takes 768-d embeddings but the CLIP model .* embeds in 24 dimensions"):
        load_reward("aesthetic", wrong, clip=clip_folder)


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"logit_scale": torch.zeros(())}, "callback": print}, path)
    with pytest.raises(ValueError, match="cannot read .* as a weights-only torch checkpoint"):
        load_reward("hpsv2", path)


def test_command_line_spellings_of_dtype_batch_size_and_configs(imagereward_files, bert_tokenizer_dir, tmp_path):
    folder, _ = imagereward_files
    (tmp_path / "vit.json").write_text(json.dumps(VIT))
    reward = load_reward("imagereward", str(folder), dtype="fp32", batch_size="3", tokenizer=str(bert_tokenizer_dir),
                         vision_config=str(tmp_path / "vit.json"))
    assert reward.dtype == torch.float32 and reward.batch_size == 3
    with pytest.raises(ValueError, match="dtype 'fp8' is none of float32, fp32, float16"):
        load_reward("imagereward", str(folder), dtype="fp8")


def test_options_only_for_model_rewards():
    with pytest.raises(ValueError, match="'builtin': pretrained, tokenizer only apply to the model rewards"):
        load_reward("builtin", "x.pt", tokenizer="y")


# ---------------------------------------------------------------------------------------------
# CUDA: half precision and batching
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision(dtype, hps_checkpoint, clip_tokenizer_dir, imagereward_files, bert_tokenizer_dir,
                             aesthetic_files):
    hps_path, _ = hps_checkpoint
    ir_folder, _ = imagereward_files
    aesthetic_path, _, clip_folder, _ = aesthetic_files
    cases = [("hpsv2", hps_path, dict(tokenizer=clip_tokenizer_dir, model_config=HPS_CONFIG)),
             ("imagereward", ir_folder, dict(tokenizer=bert_tokenizer_dir, vision_config=VIT)),
             ("aesthetic", aesthetic_path, dict(clip=clip_folder)),
             ("pickscore", clip_folder, dict(processor=clip_folder)),
             ("clip", clip_folder, {})]
    images = _images(7)
    for name, pretrained, options in cases:
        reference = load_reward(name, pretrained, **options)(images, PROMPTS)
        half = load_reward(name, pretrained, device="cuda", dtype=dtype, batch_size=4, **options)
        scores = half(images, PROMPTS)
        assert scores.dtype == torch.float32 and scores.device.type == "cpu"
        scale = reference.abs().max().item() + 1.0
        torch.testing.assert_close(scores, reference, rtol=0, atol=0.05 * scale, msg=f"{name} in {dtype}")
