"""Model families for TGO training: one :class:`~tgo_fast.models.base.ModelAdapter` per family.

    >>> from tgo_fast.models import build_adapter
    >>> adapter = build_adapter("sd15", None)          # tiny random-init default, no download
    >>> adapter = build_adapter("sd15", "builtin")     # the shipped tiny pretrained base (tgo_fast.bases)
    >>> adapter = build_adapter("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", dtype=torch.bfloat16)

Adapters are imported lazily, so using one family never imports the others' modules.
"""

from __future__ import annotations

import importlib

from .base import ModelAdapter

__all__ = ["ADAPTERS", "ModelAdapter", "adapter_class", "build_adapter"]

# name → "module:Class", imported on first use.
ADAPTERS: dict[str, str] = {
    "sd15": "tgo_fast.models.sd:SD15Adapter",
    "sdxl": "tgo_fast.models.sd:SDXLAdapter",
    "flux": "tgo_fast.models.flux:FluxAdapter",
    "sd3": "tgo_fast.models.sd3:SD3Adapter",
    "wan": "tgo_fast.models.wan:WanAdapter",
    "amused": "tgo_fast.models.amused:AmusedAdapter",
    "meissonic": "tgo_fast.models.meissonic:MeissonicAdapter",
}


def adapter_class(name: str) -> type[ModelAdapter]:
    """The adapter class registered under ``name`` (one of :data:`ADAPTERS`)."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(ADAPTERS)}")
    module_name, class_name = ADAPTERS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_adapter(name: str, pretrained: str | None, **kwargs) -> ModelAdapter:
    """Build the ``name`` adapter from ``pretrained`` (hub id or local dir; ``"builtin"`` = the shipped tiny
    pretrained base of the family, see :mod:`tgo_fast.bases`) or, when None, the tiny random-init default;
    ``kwargs`` go to the adapter (resolution, dtype, device, tiny_seed, ...)."""
    from ..bases import resolve_pretrained

    cls = adapter_class(name)
    return cls(resolve_pretrained(name, pretrained), **kwargs)
