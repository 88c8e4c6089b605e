"""The shipped tiny pretrained bases of the synthetic world, one diffusers folder per family.

    >>> from tgo_fast.models import build_adapter
    >>> adapter = build_adapter("sd15", "builtin")        # = build_adapter("sd15", str(base_path("sd15")))
    >>> base_card("sd15")["evaluation"]["reward_mean"]

Each folder is what the family's diffusers pipeline writes (``model_index.json``, ``unet/`` or
``transformer/``, ``vae/`` or ``vqvae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``; fp32
safetensors) plus ``model_card.json``: the pretraining data, budget, losses, wall time and the built-in
reward of the base's own samples on held-out prompts. ``scripts/pretrain_base.py --family F``
reproduces a folder (:mod:`tgo_fast.bases.pretrain`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["BASE_FAMILIES", "BUILTIN", "base_card", "base_fingerprint", "base_path", "resolve_pretrained"]

BUILTIN = "builtin"
BASE_FAMILIES = ("sd15", "amused")
_ROOT = Path(__file__).resolve().parent
MODEL_CARD = "model_card.json"


def base_path(family: str) -> Path:
    """The shipped base folder of ``family`` (ValueError naming the families that have one)."""
    if family not in BASE_FAMILIES:
        raise ValueError(f"pretrained='builtin': no tiny pretrained base ships for model {family!r}; bases exist "
                         f"for {list(BASE_FAMILIES)} (or pass pretrained=null for a random-init tiny model, or a "
                         f"hub id / local diffusers folder)")
    path = _ROOT / family
    if not (path / "model_index.json").is_file():
        raise ValueError(f"pretrained='builtin': the {family} base is missing from {path}; rebuild it with "
                         f"`python scripts/pretrain_base.py --family {family}`")
    return path


def resolve_pretrained(family: str, pretrained: str | None) -> str | None:
    """``"builtin"`` → the shipped base folder of ``family``; anything else unchanged."""
    return str(base_path(family)) if pretrained == BUILTIN else pretrained


def base_card(family: str) -> dict:
    """The base's ``model_card.json``."""
    return json.loads((base_path(family) / MODEL_CARD).read_text())


def base_fingerprint(family: str) -> str:
    """A digest of the base's weights and configs (changes whenever the base is retrained)."""
    digest = hashlib.sha256()
    root = base_path(family)
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MODEL_CARD):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
