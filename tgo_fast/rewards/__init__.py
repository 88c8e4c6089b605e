"""Reward functions: score (image, prompt) pairs, e.g. to re-estimate τ on a fresh proxy set.

A reward is any callable ``reward(images, prompts) -> scores`` taking a list of PIL images and their
prompts and returning one finite number per image (a sequence, a numpy array or a torch tensor)::

    reward = load_reward("builtin")                      # or "my_package.my_module:my_reward"
    reward = load_reward("hpsv2", "/ckpt/HPS_v2.1_compressed.pt", device="cuda", dtype=torch.float16)
    scores = score_images(reward, images, prompts)       # float64 (N,) CPU tensor, validated
    tau = percentile_threshold(scores, 50)

``"builtin"`` is :func:`synthetic_reward` (:mod:`tgo_fast.rewards.builtin`): the embedded synthetic set's
programmatic score (:func:`tgo_fast.data.synthetic_scored_dataset`) measured back from pixels, so no
download is needed. The five reward models of the paper's evaluation (``hpsv2``, ``pickscore``, ``imagereward``,
``clip``, ``aesthetic``) read their official checkpoints: :mod:`.clip_family` and :mod:`.imagereward`;
docs/rewards.md gives each formula and its source.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from PIL import Image as PILImage

from .builtin import measure_synthetic_attributes, parse_synthetic_prompt, synthetic_reward

__all__ = ["MODEL_REWARDS", "Reward", "check_reward_prompts", "load_reward", "measure_synthetic_attributes",
           "parse_synthetic_prompt", "score_images", "synthetic_reward"]


class Reward(Protocol):
    """``reward(images, prompts) -> scores``: one finite number per (PIL image, prompt) pair."""

    def __call__(self, images: list[PILImage.Image], prompts: list[str]) -> Sequence[float] | np.ndarray | torch.Tensor:
        ...


_BUILTIN = "builtin"
# name → (module, loader, what pretrained= names)
MODEL_REWARDS = {
    "hpsv2": ("clip_family", "load_hpsv2", "HPS_v2.1_compressed.pt (file, folder or hub id xswu/HPSv2)"),
    "pickscore": ("clip_family", "load_pickscore", "the PickScore_v1 CLIPModel (folder or hub id "
                                                   "yuvalkirstain/PickScore_v1)"),
    "imagereward": ("imagereward", "load_imagereward", "ImageReward.pt with med_config.json beside it (file, folder "
                                                       "or hub id THUDM/ImageReward)"),
    "clip": ("clip_family", "load_clip_score", "a CLIP ViT-L/14 CLIPModel (folder or hub id "
                                               "openai/clip-vit-large-patch14)"),
    "aesthetic": ("clip_family", "load_aesthetic", "sac+logos+ava1-l14-linearMSE.pth (file or folder; from "
                                                   "christophschuhmann/improved-aesthetic-predictor)"),
}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_SPEC_FORM = f"expected 'builtin', one of {', '.join(MODEL_REWARDS)} or 'package.module:function'"


def load_reward(name: str, pretrained: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, batch_size: int = 32, **options) -> Reward:
    """A reward callable by name.

    ``"builtin"`` -> :func:`synthetic_reward`; ``"package.module:function"`` -> that callable (both take no
    other argument). A model name (``hpsv2``, ``pickscore``, ``imagereward``, ``clip``, ``aesthetic``) loads its
    official checkpoint from ``pretrained`` (a local path, or a hub id, downloaded only then) onto ``device`` in
    ``dtype`` and returns ``reward(images, prompts) -> (N,) float32 CPU tensor`` scoring ``batch_size`` pairs at
    a time (``dtype`` may be spelled "fp16", "bf16", ...; ``batch_size`` may be a digit string, as a command line
    gives them). ``options`` go to the loader: ``tokenizer=``/``model_config=`` (hpsv2), ``processor=`` (pickscore),
    ``med_config=``/``tokenizer=``/``vision_config=`` (imagereward), ``clip=`` (aesthetic).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"reward spec: {_SPEC_FORM}, got {name!r}")
    name = name.strip()
    if name in MODEL_REWARDS:
        module_name, loader, what = MODEL_REWARDS[name]
        if pretrained is None:
            raise ValueError(f"reward {name!r}: pass pretrained= {what}")
        if isinstance(dtype, str):  # command lines and configs spell it
            if dtype.lower() not in _DTYPES:
                raise ValueError(f"reward {name!r}: dtype {dtype!r} is none of {', '.join(_DTYPES)}")
            dtype = _DTYPES[dtype.lower()]
        if isinstance(batch_size, str) and batch_size.strip().isdigit():
            batch_size = int(batch_size)
        module = importlib.import_module(f"{__name__}.{module_name}")
        return getattr(module, loader)(pretrained, device=device, dtype=dtype, batch_size=batch_size, **options)
    if pretrained is not None or options:
        given = ["pretrained"] * (pretrained is not None) + sorted(options)
        raise ValueError(f"reward spec {name!r}: {', '.join(given)} only apply to the model rewards "
                         f"({', '.join(MODEL_REWARDS)})")
    if name == _BUILTIN:
        return synthetic_reward
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"reward spec {name!r}: {_SPEC_FORM}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward spec {name!r}: cannot import module {module_name!r}: {error}") from error
    if not hasattr(module, attribute):
        raise ValueError(f"reward spec {name!r}: module {module_name!r} has no attribute {attribute!r}")
    reward = getattr(module, attribute)
    if not callable(reward):
        raise ValueError(f"reward spec {name!r}: {module_name}.{attribute} is a {type(reward).__name__}, "
                         f"not callable")
    return reward


def check_reward_prompts(reward: Reward, prompts: Sequence[str]) -> None:
    """Fail early on prompts ``reward`` cannot score: :func:`synthetic_reward` reads only the synthetic set's
    captions (ValueError naming the first other one); any other reward is trusted with every prompt."""
    if reward is synthetic_reward:
        for prompt in dict.fromkeys(prompts):
            parse_synthetic_prompt(prompt)


def score_images(reward: Reward, images: list[PILImage.Image], prompts: list[str]) -> torch.Tensor:
    """``reward(images, prompts)`` as a validated float64 (N,) CPU tensor of finite scores."""
    if len(images) != len(prompts):
        raise ValueError(f"images and prompts: expected the same length, got {len(images)} images and "
                         f"{len(prompts)} prompts")
    raw = reward(list(images), list(prompts))
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().to("cpu", torch.float64)
    try:
        scores = torch.as_tensor(np.asarray(raw, dtype=np.float64))
    except (TypeError, ValueError) as error:
        raise ValueError(f"reward output: expected a 1-D sequence of numbers, got {type(raw).__name__} "
                         f"({error})") from error
    if scores.ndim != 1:
        raise ValueError(f"reward output: expected a 1-D sequence of numbers, got shape {tuple(scores.shape)}")
    if scores.numel() != len(images):
        raise ValueError(f"reward output: expected {len(images)} scores (one per image), got {scores.numel()}")
    bad = (~torch.isfinite(scores)).nonzero()
    if bad.numel():
        index = int(bad[0])
        raise ValueError(f"reward output: non-finite score {scores[index].item()} at position {index} "
                         f"(prompt {prompts[index]!r})")
    return scores
