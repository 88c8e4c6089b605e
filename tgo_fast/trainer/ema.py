"""Exponential moving average of the policy's trainable weights (``ema_decay``), as diffusers' ``--use_ema``.

After every optimizer step, with t = steps taken so far (diffusers' ``EMAModel`` schedule without warm-up):

    d_t = min(ema_decay, (1 + t) / (10 + t));    θ_ema ← d_t·θ_ema + (1 − d_t)·θ

Validation grids and the exported ``final/`` use θ_ema (swapped in, then back), training continues on θ.
Under ZeRO-3 each rank averages only its own partition of every parameter (``param.ds_tensor``): no gather, the
memory of one fp32 shard, and the swap is local too, so the usual ZeRO-3 gather in export sees θ_ema. The average is
part of the checkpoint (one file per rank), so a resumed run continues the same average.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

__all__ = ["PolicyEMA"]


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _local_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The trainable weights this rank holds: the ZeRO-3 partition when the parameter is sharded."""
    return [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in _trainable(module)]


def _refresh_persistent(module: nn.Module) -> None:
    """ZeRO-3 keeps parameters below ``stage3_param_persistence_threshold`` gathered between steps: after their
    partitions changed, free the stale full copies and gather them again (collective; DeepSpeed's own pattern)."""
    persistent = [p for p in _trainable(module) if getattr(p, "ds_persist", False)]
    if persistent:
        persistent[0].partition(param_list=persistent)
        persistent[0].all_gather(param_list=persistent)


class PolicyEMA:
    """θ_ema of ``module``'s trainable parameters (see the module docstring)."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) (e.g. 0.99), got {decay}")
        self.module, self.decay = module, decay
        self.steps = 0
        self.average = [t.detach().float().clone() for t in _local_tensors(module)]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.steps) / (10 + self.steps))

    @torch.no_grad()
    def update(self) -> None:
        """One optimizer step was taken: move θ_ema towards θ."""
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self.average, [t.float() for t in _local_tensors(self.module)], weight)
        self.steps += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """θ_ema in the module for the block (validation, export); θ restored afterwards."""
        tensors = _local_tensors(self.module)
        saved = [t.clone() for t in tensors]
        for tensor, average in zip(tensors, self.average):
            tensor.copy_(average)
        _refresh_persistent(self.module)
        try:
            yield
        finally:
            for tensor, original in zip(tensors, saved):
                tensor.copy_(original)
            _refresh_persistent(self.module)

    def save(self, directory: Path, rank: int) -> None:
        tensors = {f"{i}": t.contiguous() for i, t in enumerate(self.average)}
        save_file(tensors, directory / f"ema_rank{rank}.safetensors", metadata={"steps": str(self.steps)})

    def load(self, directory: Path, rank: int) -> None:
        path = directory / f"ema_rank{rank}.safetensors"
        if not path.is_file():
            raise ValueError(f"resume_from: {str(directory)!r} has no {path.name}: it was written without ema_decay; "
                             "resume with the ema_decay it was trained with (null)")
        with safe_open(path, framework="pt") as handle:
            if len(handle.keys()) != len(self.average):
                raise ValueError(f"resume_from: {path} holds {len(handle.keys())} averaged tensors, this run trains "
                                 f"{len(self.average)}: the model or LoRA settings changed")
            self.steps = int(handle.metadata()["steps"])
            self.average = [handle.get_tensor(f"{i}") for i in range(len(self.average))]
