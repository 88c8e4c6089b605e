"""Reward functions: score (image, prompt) pairs, e.g. to re-estimate τ on a fresh proxy set.

A reward is any callable ``reward(images, prompts) -> scores`` taking a list of PIL images and their
prompts and returning one finite number per image (a sequence, a numpy array or a torch tensor)::

    reward = load_reward("builtin")                      # or "my_package.my_module:my_reward"
    scores = score_images(reward, images, prompts)       # float64 (N,) CPU tensor, validated
    tau = percentile_threshold(scores, 50)

``"builtin"`` is :func:`synthetic_reward` (:mod:`tgo_fast.rewards.builtin`): the embedded synthetic set's
programmatic score (:func:`tgo_fast.data.synthetic_scored_dataset`) measured back from pixels, so no
download is needed.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image as PILImage

from .builtin import measure_synthetic_attributes, parse_synthetic_prompt, synthetic_reward

__all__ = ["Reward", "check_reward_prompts", "load_reward", "measure_synthetic_attributes", "parse_synthetic_prompt", "score_images",
           "synthetic_reward"]

Reward = Callable[[list[PILImage.Image], list[str]], Sequence[float] | np.ndarray | torch.Tensor]

_BUILTIN = "builtin"


def load_reward(spec: str) -> Reward:
    """``"builtin"`` -> :func:`synthetic_reward`; ``"package.module:function"`` -> that callable."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec: expected 'builtin' or 'package.module:function', got {spec!r}")
    spec = spec.strip()
    if spec == _BUILTIN:
        return synthetic_reward
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"reward spec {spec!r}: expected 'builtin' or 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward spec {spec!r}: cannot import module {module_name!r}: {error}") from error
    if not hasattr(module, attribute):
        raise ValueError(f"reward spec {spec!r}: module {module_name!r} has no attribute {attribute!r}")
    reward = getattr(module, attribute)
    if not callable(reward):
        raise ValueError(f"reward spec {spec!r}: {module_name}.{attribute} is a {type(reward).__name__}, "
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
