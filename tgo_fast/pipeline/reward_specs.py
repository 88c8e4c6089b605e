"""Reward specs on command lines and in configs: ``NAME[=PRETRAINED][,KEY=VALUE...]``.

    builtin                                       the synthetic world's score (no checkpoint)
    package.module:function                       your callable
    pickscore=yuvalkirstain/PickScore_v1          a reward model of tgo_fast.rewards with its checkpoint (path or hub id)
    aesthetic=/ckpt/sac+logos+ava1-l14-linearMSE.pth,clip=/ckpt/clip-vit-large-patch14

``NAME`` and ``PRETRAINED`` go to ``tgo_fast.rewards.load_reward(name, pretrained, **options)``; the
``KEY=VALUE`` items after the first comma are its keyword options (strings). A reward's *label* is its
NAME: the key of its scores in evaluation files and, as ``score_<NAME>`` (characters other than letters,
digits and ``_`` replaced by ``_``), its column in a scored file.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import torch

from tgo_fast.rewards import Reward, load_reward

__all__ = ["RewardSpec", "load_reward_spec", "parse_reward_spec", "parse_reward_specs"]


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """A parsed reward spec: what :func:`load_reward_spec` loads and the name its scores go under."""

    name: str
    pretrained: str | None = None
    options: tuple[tuple[str, str], ...] = ()
    text: str = ""  # the spec as written

    @property
    def column(self) -> str:
        """``score_<name>``: the reward's column in a scored file with several rewards."""
        return "score_" + re.sub(r"[^A-Za-z0-9_]", "_", self.name)


def parse_reward_spec(text: str) -> RewardSpec:
    """``NAME[=PRETRAINED][,KEY=VALUE...]`` → :class:`RewardSpec` (ValueError saying what is malformed)."""
    if isinstance(text, RewardSpec):
        return text
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"reward spec: expected NAME, NAME=PRETRAINED or NAME=PRETRAINED,KEY=VALUE, got {text!r}")
    head, *items = text.strip().split(",")
    name, sep, pretrained = (part.strip() for part in head.partition("="))
    if not name or (sep and not pretrained):
        raise ValueError(f"reward spec {text!r}: expected NAME or NAME=PRETRAINED before the first comma, got {head!r}")
    options = []
    for item in items:
        key, sep, value = (part.strip() for part in item.partition("="))
        if not key or not sep or not value or not key.isidentifier():
            raise ValueError(f"reward spec {text!r}: option {item!r} is not KEY=VALUE (options follow a comma, "
                             f"e.g. aesthetic=/ckpt/mlp.pth,clip=openai/clip-vit-large-patch14)")
        options.append((key, value))
    return RewardSpec(name, pretrained or None, tuple(options), text.strip())


def parse_reward_specs(texts: Sequence[str]) -> list[RewardSpec]:
    """Several specs, with distinct names (their labels and columns)."""
    specs = [parse_reward_spec(text) for text in texts]
    if not specs:
        raise ValueError("rewards: expected one or more reward specs")
    columns = [spec.column for spec in specs]
    repeated = sorted({spec.text for spec in specs if columns.count(spec.column) > 1})
    if repeated:
        raise ValueError(f"rewards {repeated} share the name (column) {sorted(set(c for c in columns if columns.count(c) > 1))}; "
                         "give each reward once")
    return specs


def load_reward_spec(spec: str | RewardSpec, *, device: str | torch.device | None = None) -> Reward:
    """The reward a spec names, through ``tgo_fast.rewards.load_reward`` (on ``device`` when it is not the CPU)."""
    spec = parse_reward_spec(spec)
    keywords = dict(spec.options)
    if device is not None and torch.device(device).type != "cpu":
        keywords["device"] = device
    if spec.pretrained is None and not keywords:
        return load_reward(spec.name)
    return load_reward(spec.name, spec.pretrained, **keywords)
