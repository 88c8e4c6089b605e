"""The reference policy π_ref as one strategy object (``ref_mode``), so the trainer never switches on the mode.

Every strategy answers three questions:

* ``values(index, encoded, inputs)`` — π_ref on a micro-batch, under the policy's noise / timestep / mask draws:
  the reference prediction (diffusion; the objective forms e_ref from it) or a per-sample value (e_ref from the
  precomputed table, or log π_ref(y|x) for masked models).
* ``update()`` — Algorithm 1's optional π_ref ← π_θ.
* ``save(directory)`` / ``load(directory)`` — what a checkpoint must carry to resume with the same π_ref.

    separate      a frozen copy of the backbone (its own ZeRO-3 inference engine, or a plain module)
    lora          the policy itself with its LoRA adapters disabled: no second copy (π_ref = the base)
    precomputed   a pre-pass stores e_ref / log π_ref of every training item under its fixed seeds
"""
from __future__ import annotations

import abc
import contextlib
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from ..models.base import unwrap_model
from . import distributed as D
from .config import reference_deepspeed_config
from .objectives import reference_error, reference_logp

__all__ = ["ReferenceValues", "ReferencePolicy", "SeparateReference", "LoraReference", "PrecomputedReference",
           "frozen_reference_model"]

REFERENCE_TABLE_FILE = "reference_table.safetensors"
REFERENCE_MODEL_FILE = "reference_model.safetensors"


class ReferenceValues(NamedTuple):
    """π_ref on a micro-batch: a live reference's prediction (diffusion), or per-sample (B,) values."""

    prediction: torch.Tensor | None  # (B, *) reference prediction of a live diffusion reference
    value: torch.Tensor | None  # (B,) e_ref (precomputed diffusion) or log π_ref(y|x) (masked)


def _live_values(adapter, model, encoded, inputs, impl: str) -> ReferenceValues:
    output = adapter.forward(model, encoded, inputs)
    if adapter.kind == "diffusion":
        return ReferenceValues(prediction=output, value=None)
    return ReferenceValues(prediction=None,
                           value=reference_logp(adapter.output_head_module(model), output, inputs["labels"], impl))


def _stored_value(adapter, model, encoded, inputs, impl: str) -> torch.Tensor:
    """What the precomputed table keeps per sample: e_ref (diffusion) or log π_ref (masked)."""
    output = adapter.forward(model, encoded, inputs)
    if adapter.kind == "diffusion":
        return reference_error(output, inputs["target"])
    return reference_logp(adapter.output_head_module(model), output, inputs["labels"], impl)


def _gathered(params, modifier_rank=None):
    """ZeRO-3 parameters gathered for the block (a no-op for plain tensors)."""
    import deepspeed

    params = [p for p in params if hasattr(p, "ds_id")]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank) if params else contextlib.nullcontext()


class ReferencePolicy(abc.ABC):
    """π_ref for the objectives (see the module docstring)."""

    #: the stored values depend on each sample's noise draw, so the draws must not change between epochs
    fixed_noise: bool = False

    @abc.abstractmethod
    def values(self, index: torch.Tensor, encoded: dict, inputs: dict) -> ReferenceValues:
        """π_ref on the micro-batch of training items ``index`` (encoded and with its sampled inputs)."""

    def start(self) -> None:
        """Called once the run is built (after any resume), before the first step."""

    @abc.abstractmethod
    def update(self) -> None:
        """π_ref ← π_θ."""

    def save(self, directory: Path) -> None:
        """Write what resuming needs into the checkpoint ``directory`` (called on every rank)."""

    def load(self, directory: Path) -> None:
        """Read back what :meth:`save` wrote (called on every rank)."""


def frozen_reference_model(module: torch.nn.Module, ds_config: dict, *, zero3: bool, device: torch.device,
                           dtype: torch.dtype):
    """The frozen copy as its own ZeRO-3 inference engine (sharded like the policy, no optimizer state, as TRL
    does), or as a plain module on this rank's device."""
    module.requires_grad_(False).eval()
    if zero3:
        import deepspeed

        model, *_ = deepspeed.initialize(model=module, config=reference_deepspeed_config(ds_config))
    else:
        model = module.to(device=device, dtype=dtype)
    model.eval()  # (DeepSpeedEngine.eval returns None)
    return model


class SeparateReference(ReferencePolicy):
    """A frozen copy of the backbone; ``update`` copies the policy's weights into it. Checkpoints carry its weights
    only when they can have changed (``keeps_weights``: ``ref_update: epoch``); otherwise it is the initial model."""

    def __init__(self, model, policy, adapter, impl: str, *, keeps_weights: bool):
        self.model = model
        self.policy = policy
        self.adapter = adapter
        self.impl = impl
        self.keeps_weights = keeps_weights

    @torch.no_grad()
    def values(self, index, encoded, inputs) -> ReferenceValues:
        return _live_values(self.adapter, self.model, encoded, inputs, self.impl)

    @torch.no_grad()
    def update(self) -> None:
        policy = dict(self.policy.module.named_parameters())
        for name, ref_param in unwrap_model(self.model).named_parameters():
            with _gathered([policy[name]]), _gathered([ref_param], modifier_rank=0):
                if D.is_main() or not hasattr(ref_param, "ds_id"):
                    ref_param.data.copy_(policy[name].data)

    @torch.no_grad()
    def save(self, directory: Path) -> None:
        if not self.keeps_weights:
            return
        state = {}
        for name, param in unwrap_model(self.model).named_parameters():
            with _gathered([param]):
                if D.is_main():
                    state[name] = param.data.detach().cpu().clone()
        if D.is_main():
            save_file(state, str(directory / REFERENCE_MODEL_FILE))

    @torch.no_grad()
    def load(self, directory: Path) -> None:
        if not self.keeps_weights:
            return
        state = load_file(str(directory / REFERENCE_MODEL_FILE)) if D.is_main() else {}
        for name, param in unwrap_model(self.model).named_parameters():
            with _gathered([param], modifier_rank=0):
                if D.is_main() or not hasattr(param, "ds_id"):
                    param.data.copy_(state[name].to(param.device, param.dtype))


class LoraReference(ReferencePolicy):
    """The policy engine with every peft LoRA layer's adapters disabled: π_ref is the frozen base model."""

    def __init__(self, policy, adapter, impl: str):
        self.policy = policy
        self.adapter = adapter
        self.impl = impl

    @contextlib.contextmanager
    def _adapters_disabled(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.policy.module.modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    @torch.no_grad()
    def values(self, index, encoded, inputs) -> ReferenceValues:
        with self._adapters_disabled():
            return _live_values(self.adapter, self.policy, encoded, inputs, self.impl)

    def update(self) -> None:
        raise ValueError("ref_mode='lora': the reference is the frozen base model and cannot take the policy's "
                         "weights; use ref_mode 'separate' or 'precomputed' for ref_update='epoch'")


ItemBatches = Callable[[], tuple[torch.Tensor, Iterator[tuple[dict, dict]]]]


class PrecomputedReference(ReferencePolicy):
    """A table of e_ref / log π_ref per training item, computed by a pre-pass of the current policy (= π_ref) under
    each item's fixed seeds; training then runs no reference at all. An item is one sample, or for DPO a pair
    (``rows_per_item`` = 2: its micro-batches hold the B winners, then the B losers); the flat table keeps each
    item's rows together, ``table.view(num_items, rows_per_item)``.

    ``item_batches()`` returns ``(order, batches)``: this rank's micro-batches of encoded items and their sampled
    inputs, and the item index of each value the ranks compute, in rank order (ranks take equal numbers of
    micro-batches, since ZeRO-3 forwards are collective; repeated items write the same value twice).
    """

    fixed_noise = True

    def __init__(self, policy, adapter, impl: str, item_batches: ItemBatches, num_items: int, device: torch.device,
                 rows_per_item: int = 1):
        self.policy = policy
        self.device = device
        self.rows_per_item = rows_per_item
        self.adapter = adapter
        self.impl = impl
        self.item_batches = item_batches
        self.num_items = num_items
        self.table: torch.Tensor | None = None

    def values(self, index, encoded, inputs) -> ReferenceValues:
        rows = self.table.view(self.num_items, self.rows_per_item)[index]  # (B, rows): back to row-major batches
        return ReferenceValues(prediction=None, value=rows.T.reshape(-1).to(self.device))

    def start(self) -> None:
        if self.table is None:
            self.table = self._compute_table()

    def update(self) -> None:
        self.table = self._compute_table()

    @torch.no_grad()
    def _compute_table(self) -> torch.Tensor:
        order, batches = self.item_batches()
        self.policy.eval()
        # each micro-batch's (rows·B,) values as (B, rows): one line per item
        values = [_stored_value(self.adapter, self.policy, encoded, inputs, self.impl).view(self.rows_per_item, -1).T
                  for encoded, inputs in batches]
        self.policy.train()
        gathered = D.all_gather_tensor(torch.cat(values).float().cpu())
        table = torch.empty(self.num_items, self.rows_per_item, dtype=torch.float32)
        table[order] = gathered
        return table.view(-1)

    def save(self, directory: Path) -> None:
        if D.is_main():
            save_file({"values": self.table}, str(directory / REFERENCE_TABLE_FILE))

    def load(self, directory: Path) -> None:
        self.table = load_file(str(directory / REFERENCE_TABLE_FILE))["values"]
