"""The DeepSpeed TGO trainer (Algorithm 1 of the paper, offline):

    π_ref ← π_θ;  τ ← Percentile(scores, p);  for each minibatch: l, w, ŝ, ℓ; step;
    optionally π_ref ← π_θ after each epoch.

Run layout (``output_dir``)::

    config.yaml  ds_config.json  threshold.json  metrics.jsonl  tensorboard/
    checkpoints/step_000010/ … checkpoints/latest      DeepSpeed checkpoints (+ trainer state)
    samples/step_000010.png                            validation grids
    plots/training_curves.png  plots/score_histogram.png
    final/unet|transformer (diffusers format)  or  final/lora (LoRA weights)
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml

from ..models.base import model_dtype
from ..threshold import ThresholdEstimate, estimate_threshold, sample_thresholds, with_group_thresholds
from . import distributed as D
from .batches import (EncodedDataset, EncodingCache, PreferencePairDataset, StepSchedule, collate_encoded,
                      collate_pairs, encoding_cache_key, preference_pairs, sample_seeds)
from .config import TrainConfig, batch_layout, deepspeed_precision, merge_deepspeed_config
from .objectives import diffusion_objective, masked_objective, needs_reference
from .ema import PolicyEMA
from .reference import (LoraReference, PrecomputedReference, ReferencePolicy, ReferenceValues, SeparateReference,
                        frozen_reference_model)
from .tracking import MetricsWriter, peak_memory_mib, plot_score_histogram, plot_training_curves, read_metrics

__all__ = ["Trainer", "default_ds_config"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_STAT_KEYS = ("implicit_score", "policy_error", "reference_error", "policy_logp", "reference_logp", "weights",
              "labels", "accuracy")
_CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


def default_ds_config() -> Path:
    return _CONFIGS_DIR / ("zero3_gpu_bf16.json" if torch.cuda.is_available() else "zero3_cpu.json")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Trainer:
    """Builds everything from a :class:`TrainConfig` on every rank; :meth:`train` runs to ``max_steps``."""

    def __init__(self, cfg: TrainConfig, ds_config: str | os.PathLike | dict | None = None):
        D.init_distributed()
        self.cfg = cfg
        # Same seed on every rank: LoRA initialisation and any dropout start identical and reproducible
        # (noise, timesteps and masks come from per-sample generators, see batches.py).
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.rank, self.world_size = D.rank(), D.world_size()
        self.device = D.device()
        self.run_dir = Path(cfg.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.ds_config = merge_deepspeed_config(ds_config if ds_config is not None else default_ds_config(), cfg,
                                                self.world_size, cpu=self.device.type == "cpu")
        self.micro_batch_size, self.accumulation = batch_layout(cfg, self.world_size)
        self.precision = deepspeed_precision(self.ds_config)
        self.zero3 = self.ds_config["zero_optimization"].get("stage", 0) == 3
        self.resume_tag = self._find_resume_tag()
        if D.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
        D.barrier()

        self.adapter = self._build_adapter()
        self.kind = self.adapter.kind
        self.dataset = self._load_dataset()
        from ..data import dataset_groups, dataset_scores

        self.scores = dataset_scores(self.dataset)  # a stream is read once here, scores only
        self.num_samples = len(self.scores)
        if self.num_samples == 0:
            raise ValueError(f"data={cfg.data!r}: the dataset is empty")
        # prompt groups (the `group` column, else the prompt): per-prompt thresholds and DPO's pairs
        self.groups = dataset_groups(self.dataset) if cfg.threshold_mode != "global" or cfg.loss == "dpo" else None
        self.pairs = preference_pairs(self.scores, self.groups, cfg.dpo_min_gap) if cfg.loss == "dpo" else None
        self.num_items = self.num_samples if self.pairs is None else len(self.pairs)  # what the schedule batches
        self.schedule = StepSchedule(self.num_items, cfg.train_batch_size, self.micro_batch_size,
                                     self.accumulation, self.world_size, cfg.seed,
                                     item_name="samples" if self.pairs is None else "preference pairs (loss: dpo)")
        self._use_threshold(self._estimate_threshold())  # of the training set (or the file)
        self.initial_threshold = self.threshold
        self.reward = self.proxy_prompts = None
        if cfg.reward is not None:  # fail before training if the reward cannot be loaded or read the prompts
            from ..rewards import check_reward_prompts, load_reward

            self.reward = load_reward(cfg.reward)
            if cfg.val_reward is None:
                check_reward_prompts(self.reward, cfg.validation_prompts)
        self.validation_reward = None  # None: the validation images are scored by `reward`
        if cfg.val_reward is not None:  # its own scorer of the validation images, any spec (e.g. pickscore=PATH)
            from ..pipeline.reward_specs import load_reward_spec
            from ..rewards import check_reward_prompts

            self.validation_reward = load_reward_spec(cfg.val_reward, device=self.device)
            check_reward_prompts(self.validation_reward, cfg.validation_prompts)
        if cfg.threshold_update == "proxy":
            from ..data import dataset_prompts

            self.proxy_prompts = dataset_prompts(self.dataset)
            check_reward_prompts(self.reward, self.proxy_prompts)
        self.train_dataset, self.collate = self._training_dataset()
        if self.pairs is not None:  # an item is a pair: 2B rows a micro-batch, winners then losers
            self.train_dataset = PreferencePairDataset(self.train_dataset, self.pairs)
            self.collate = functools.partial(collate_pairs, self.collate)

        self._build_engines()  # the policy engine and self.reference (None when the loss needs no π_ref)
        self.start_step = 0
        if self.resume_tag is not None:
            self._load_checkpoint(self.resume_tag)
        if self.reference is not None:
            self.reference.start()
        if D.is_main():
            self._write_run_files()
        self.metrics = MetricsWriter(self.run_dir, resume_step=self.start_step, tensorboard=cfg.tensorboard,
                                     log_interval=cfg.log_interval) if D.is_main() else None

    # ----------------------------------------------------------------------------------- set-up
    def _find_resume_tag(self) -> Path | None:
        if self.cfg.resume_from is None:
            return None
        if self.cfg.resume_from != "latest":
            return Path(self.cfg.resume_from)
        latest = self.ckpt_dir / "latest"
        if not latest.is_file():
            raise ValueError(f"resume_from='latest': no checkpoint in {self.ckpt_dir} (no 'latest' file)")
        return self.ckpt_dir / latest.read_text().strip()

    def _build_adapter(self):
        from ..models import build_adapter

        cfg = self.cfg
        if cfg.pretrained is not None:  # "builtin" resolves to the shipped base folder (a clear error if absent)
            from ..bases import resolve_pretrained

            _check_pretrained(cfg.model, resolve_pretrained(cfg.model, cfg.pretrained))
        dtype = _DTYPES[self.precision]
        try:
            # Frozen parts on this rank's device; the backbone is moved and sharded by DeepSpeed.
            return build_adapter(cfg.model, cfg.pretrained, resolution=cfg.resolution, dtype=dtype,
                                 device=self.device, tiny_seed=cfg.seed, **cfg.model_options())
        except (OSError, EnvironmentError) as error:
            raise ValueError(f"pretrained={cfg.pretrained!r}: cannot load the {cfg.model} model: {error}") from error

    def _load_dataset(self):
        from ..data import load_scored_dataset, synthetic_scored_dataset

        cfg = self.cfg
        if cfg.is_builtin_data:
            # Generated once (rank 0), then read by every rank from the on-disk cache.
            resolution = max(64, self.adapter.resolution)
            if D.is_main():
                synthetic_scored_dataset(cfg.builtin_num_samples, resolution=resolution, seed=0)
            D.barrier()
            dataset = synthetic_scored_dataset(cfg.builtin_num_samples, resolution=resolution, seed=0)
        else:
            dataset = load_scored_dataset(cfg.data, streaming=cfg.streaming)
        if not _is_stream(dataset) and len(dataset) == 0:
            raise ValueError(f"data={cfg.data!r}: the dataset is empty")
        return dataset

    def _estimate_threshold(self) -> ThresholdEstimate:
        """τ over every rank's share of the scores (gathered), or from ``threshold_file``; the statistics are
        always those of this training set."""
        shard = self.scores[self.rank::self.world_size]
        estimate = estimate_threshold(shard, self.cfg.percentile, source="training set")
        if self.cfg.threshold_file is not None:
            tau = _read_threshold_file(self.cfg.threshold_file)
            estimate = dataclasses.replace(
                estimate, tau=tau, positive_fraction=float((self.scores >= tau).double().mean()),
                source=f"threshold_file {self.cfg.threshold_file}")
        if self.cfg.threshold_mode != "global":  # every rank holds every score: the group thresholds are local
            estimate = with_group_thresholds(estimate, self.scores, self.groups, self.cfg.threshold_mode,
                                             log_partition_beta=self.cfg.log_partition_beta)
        return estimate

    def _use_threshold(self, estimate: ThresholdEstimate) -> None:
        """The threshold of the objectives from now on: τ, and with per-prompt modes each sample's own τ_i."""
        self.threshold = estimate
        self.tau = estimate.tau
        self.own_thresholds = (None if estimate.group_thresholds is None
                               else sample_thresholds(estimate.group_thresholds, self.groups))

    def _adapter_identity(self) -> dict[str, Any]:
        identity = {"model": self.cfg.model, "pretrained": self.cfg.pretrained, "resolution": self.adapter.resolution,
                    "tiny_seed": self.cfg.seed if self.cfg.pretrained is None else None, "dtype": self.precision,
                    "class": type(self.adapter).__qualname__,
                    **self.cfg.model_options()}  # revision, variant and max_sequence_length change the encodings
        frozen_dtypes = {name: model_dtype(module) for name, module in self._frozen_modules().items()}
        kept = {name: str(dtype) for name, dtype in frozen_dtypes.items() if dtype != _DTYPES[self.precision]}
        if kept:  # a frozen part in its own precision (SDXL's fp32 VAE) encodes differently
            identity["frozen_dtypes"] = kept
        from ..bases import BUILTIN, base_fingerprint

        if self.cfg.pretrained == BUILTIN:  # a retrained shipped base must not reuse stale encodings
            identity["base"] = base_fingerprint(self.cfg.model)
        return identity

    def _training_dataset(self):
        """The encoded cache (pre-pass: each rank encodes its chunks, every rank reads all) or raw images."""
        from ..data import collate_scored

        if not self.cfg.cache_encodings:
            return self._scored_images(self.dataset), collate_scored
        key = encoding_cache_key(self._dataset_fingerprint(), self._adapter_identity())
        root = Path(self.cfg.cache_dir or Path.home() / ".cache" / "tgo_fast" / "encodings") / f"{self.cfg.model}-{key}"
        cache = EncodingCache(root, self.num_samples)
        mine = cache.missing_chunks()[self.rank::self.world_size]
        if _is_stream(self.dataset):
            self._encode_stream(cache, mine)
        else:
            images = self._scored_images(self.dataset)
            for chunk in mine:
                self._encode_chunk(cache, chunk, images, list(cache.chunk_indices(chunk)))
        D.barrier()
        if cache.missing_chunks():
            raise RuntimeError(f"encoding cache {root} is incomplete after the pre-pass")
        self._move_frozen(torch.device("cpu"))  # idle until validation: off the accelerator
        return EncodedDataset(cache, self.scores), collate_encoded

    def _scored_images(self, dataset):
        """``dataset``'s rows decoded at the adapter's resolution; for a video family (``num_frames``, ``fps``) a
        clip row gives num_frames frames at fps, so clips of different lengths batch together."""
        from ..data import ScoredImageDataset

        clip_options = {key: getattr(self.adapter, key) for key in ("num_frames", "fps") if hasattr(self.adapter, key)}
        return ScoredImageDataset(dataset, resolution=self.adapter.resolution, **clip_options)

    def _encode_chunk(self, cache: EncodingCache, chunk: int, images, positions: list[int]) -> None:
        from ..data import collate_scored

        parts: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(positions), self.micro_batch_size):
            batch = collate_scored([images[i] for i in positions[start:start + self.micro_batch_size]])
            parts.append(self.adapter.encode(batch["pixel_values"].to(self.device), batch["prompt"]))
        cache.write_chunk(chunk, {k: torch.cat([p[k] for p in parts]) for k in parts[0]})

    def _encode_stream(self, cache: EncodingCache, chunks: list[int]) -> None:
        """One pass over the stream: the rows of this rank's chunks are collected and encoded chunk by chunk."""
        import datasets

        # Undecoded image values (path / bytes): the rows' loader reads video files and frame directories too.
        stream = self.dataset.cast_column("image", datasets.Image(decode=False))
        pending: dict[int, list[dict]] = {chunk: [] for chunk in chunks}
        for index, row in enumerate(stream):
            if not pending:
                break
            chunk = index // cache.chunk_size
            if chunk not in pending:
                continue
            pending[chunk].append(row)
            if len(pending[chunk]) == len(cache.chunk_indices(chunk)):
                rows = datasets.Dataset.from_list(pending.pop(chunk), features=stream.features)
                images = self._scored_images(rows)
                self._encode_chunk(cache, chunk, images, list(range(len(rows))))
        if pending:
            raise ValueError(f"data={self.cfg.data!r}: the stream ended before sample {min(pending) * cache.chunk_size} "
                             f"although its score pass counted {self.num_samples} samples")

    def _dataset_fingerprint(self) -> str:
        """``datasets``' fingerprint; for a stream, the source files' sizes and times plus the scores."""
        fingerprint = getattr(self.dataset, "_fingerprint", None)
        if fingerprint:
            return fingerprint
        import glob
        import hashlib

        files = sorted(glob.glob(self.cfg.data)) or [self.cfg.data]
        found = []
        for path in files:
            walk = [path] if os.path.isfile(path) else sorted(str(p) for p in Path(path).rglob("*") if p.is_file())
            found += [(p, os.path.getsize(p), os.path.getmtime(p)) for p in walk]
        digest = hashlib.sha256(json.dumps(found).encode())
        digest.update(self.scores.numpy().tobytes())
        return "stream-" + digest.hexdigest()

    def _frozen_modules(self) -> dict[str, torch.nn.Module]:
        """The adapter's frozen parts (VAE / VQ model, text encoders): every module attribute but the backbone."""
        return {name: m for name, m in vars(self.adapter).items() if isinstance(m, torch.nn.Module) and name != "backbone"}

    def _move_frozen(self, device: torch.device) -> None:
        """With cached encodings the frozen encoders only serve validation: on GPUs they wait in host memory."""
        if self.device.type == "cuda":
            for module in self._frozen_modules().values():
                module.to(device)

    def _build_engines(self) -> None:
        import deepspeed
        from diffusers.optimization import get_scheduler

        cfg = self.cfg
        backbone = self.adapter.backbone
        if cfg.gradient_checkpointing:
            if not hasattr(backbone, "enable_gradient_checkpointing"):
                raise ValueError(f"gradient_checkpointing: {type(backbone).__name__} does not support it")
            backbone.enable_gradient_checkpointing()
        uses_reference = needs_reference(cfg)
        frozen_copy = copy.deepcopy(backbone) if uses_reference and cfg.ref_mode == "separate" else None
        if cfg.trains_lora:
            self._inject_lora(backbone)
        trainable = [p for p in backbone.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=backbone, model_parameters=trainable, config=self.ds_config,
            lr_scheduler=lambda optimizer: get_scheduler(
                cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps),
        )
        if self.world_size == 1 and self.ds_config["zero_optimization"].get("stage", 0) == 0:
            # One process without ZeRO: the gradient all-reduce would only flatten and unflatten every gradient.
            self.engine.enable_backward_allreduce = False
        self.engine.train()
        self.reference = self._build_reference(frozen_copy) if uses_reference else None
        self.ema = PolicyEMA(self.engine.module, cfg.ema_decay) if cfg.ema_decay is not None else None

    def _build_reference(self, frozen_copy: torch.nn.Module | None) -> ReferencePolicy:
        cfg = self.cfg
        if cfg.ref_mode == "separate":
            model = frozen_reference_model(frozen_copy, self.ds_config, zero3=self.zero3, device=self.device,
                                           dtype=_DTYPES[self.precision])
            return SeparateReference(model, self.engine, self.adapter, cfg.impl,
                                     keeps_weights=cfg.ref_update == "epoch")
        if cfg.ref_mode == "lora":
            return LoraReference(self.engine, self.adapter, cfg.impl)
        return PrecomputedReference(self.engine, self.adapter, cfg.impl, self._item_batches, self.num_items,
                                    self.device, rows_per_item=1 if self.pairs is None else 2)

    def _inject_lora(self, backbone: torch.nn.Module) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        backbone.requires_grad_(False)
        self.lora_config = LoraConfig(r=self.cfg.lora_rank, lora_alpha=self.cfg.lora_alpha, lora_dropout=0.0,
                                      init_lora_weights=True, target_modules=list(self.adapter.lora_target_modules))
        inject_adapter_in_model(self.lora_config, backbone)  # only the LoRA factors require grad now

    # ------------------------------------------------------------------------------- forward
    def _noise_epoch(self, epoch: int) -> int:
        fixed = (self.reference is not None and self.reference.fixed_noise) or not self.cfg.resample_noise_each_epoch
        return 0 if fixed else epoch

    def _prepare(self, batch: dict[str, Any], epoch: int):
        if "encoded" in batch:
            encoded = {k: v.to(self.device) for k, v in batch["encoded"].items()}
        else:
            encoded = self.adapter.encode(batch["pixel_values"].to(self.device), batch["prompt"])
        seeds = sample_seeds(batch["index"], seed=self.cfg.seed, epoch=self._noise_epoch(epoch),
                             num_samples=self.num_items)
        seeds = seeds.repeat(len(batch["score"]) // len(batch["index"]))  # a pair's two rows share its seed
        return encoded, self.adapter.sample_inputs(encoded, seeds), batch["score"].to(self.device)

    def _labelled_scores(self, index: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(scores, τ) for the objectives. With per-prompt thresholds: (s_i − τ_i, 0), which gives each sample the
        label 1[s_i ≥ τ_i] and weight 1 + c·|s_i − τ_i| of its own threshold through every loss's scalar τ."""
        if self.own_thresholds is None:
            return scores, self.tau
        return scores - self.own_thresholds[index].to(scores.device), 0.0

    def compute_loss(self, batch: dict[str, Any], epoch: int, *, backward: bool) -> tuple[torch.Tensor, dict]:
        """One micro-batch: reference (live or precomputed), policy forward, objective, and backward."""
        encoded, inputs, scores = self._prepare(batch, epoch)
        scores, tau = self._labelled_scores(batch["index"], scores)
        cfg = self.cfg
        ref = (self.reference.values(batch["index"], encoded, inputs) if self.reference is not None
               else ReferenceValues(prediction=None, value=None))
        if self.kind == "diffusion":
            pred = self.adapter.forward(self.engine, encoded, inputs)
            loss, stats = diffusion_objective(cfg, pred, inputs["target"], scores, tau,
                                              ref_pred=ref.prediction, ref_error=ref.value)
            if backward:
                self.engine.backward(loss)
            return loss.detach(), stats
        hidden = self.adapter.forward(self.engine, encoded, inputs)
        loss, stats = masked_objective(cfg, self.adapter.output_head_module(self.engine), hidden, inputs["labels"],
                                       scores, tau, ref.value)
        if backward:
            self.engine.backward(loss)
        return loss.detach(), stats

    # -------------------------------------------------------------------- precomputed reference
    def _item_batches(self) -> tuple[torch.Tensor, Iterator[tuple[dict, dict]]]:
        """Every training item once for the precomputed reference's pre-pass, under its fixed (epoch-0) seeds:
        ``(order, this rank's micro-batches of (encoded, inputs))``, see :func:`precompute_layout`."""
        order, per_rank = precompute_layout(self.num_items, self.world_size, self.micro_batch_size)
        mine = order.view(self.world_size, per_rank)[self.rank]

        def batches():
            for start in range(0, per_rank, self.micro_batch_size):
                examples = self.collate([self.train_dataset[int(i)] for i in mine[start:start + self.micro_batch_size]])
                encoded, inputs, _ = self._prepare(examples, epoch=0)
                yield encoded, inputs

        return order, batches()

    # -------------------------------------------------------------------------- π_ref ← π_θ
    def update_reference(self) -> None:
        """Algorithm 1's optional step: π_ref ← π_θ (copy the weights, or recompute the precomputed table; nothing
        to do for a loss without a reference)."""
        if self.reference is not None:
            self.reference.update()

    # ----------------------------------------------------------------------- τ on a fresh proxy set
    @torch.no_grad()
    def reestimate_threshold(self, epoch: int) -> ThresholdEstimate:
        """τ ← Percentile(reward of a fresh proxy set sampled from π_ref, p), right after π_ref ← π_θ.

        The proxy set: ``proxy_size`` training prompts (rounded up to a multiple of the world size) drawn
        afresh for ``epoch``, one image each from the current policy (= π_ref now); every rank generates and
        scores an equal share, and :func:`estimate_threshold` gathers the scores.
        """
        from ..rewards import score_images

        cfg = self.cfg
        per_rank = -(-cfg.proxy_size // self.world_size)
        total = per_rank * self.world_size
        picks = np.random.default_rng([cfg.seed, epoch]).choice(len(self.proxy_prompts), size=total,
                                                                 replace=total > len(self.proxy_prompts))
        prompts = [self.proxy_prompts[i] for i in picks[self.rank::self.world_size]]
        scores = []
        with self._generating():
            for chunk, start in enumerate(range(0, per_rank, self.micro_batch_size)):
                batch = prompts[start:start + self.micro_batch_size]
                seed = int(np.random.SeedSequence([cfg.seed, epoch, self.rank, chunk]).generate_state(1)[0])
                images = self.adapter.generate(self.engine.module, batch, seed=seed,
                                               num_inference_steps=cfg.proxy_inference_steps)
                scores.append(score_images(self.reward, images, batch))
        self._use_threshold(estimate_threshold(torch.cat(scores), cfg.percentile,
                                               source=f"proxy set: {total} images from π_ref after epoch {epoch}"))
        if D.is_main():  # threshold.json keeps the training set's τ; each re-estimate gets its own file
            history = self.run_dir / "thresholds"
            history.mkdir(exist_ok=True)
            self.threshold.save(history / f"epoch_{epoch:04d}.json")
        return self.threshold

    # ----------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int) -> Path:
        """DeepSpeed checkpoint + trainer state, written under a temporary tag and renamed into place once
        every rank has finished, then ``latest`` replaced atomically: a kill at any moment leaves the
        previous checkpoint intact and ``latest`` pointing at a complete one."""
        tag = f"step_{step:06d}"
        tmp_tag = f"{tag}.tmp"
        if D.is_main() and (self.ckpt_dir / tmp_tag).exists():
            shutil.rmtree(self.ckpt_dir / tmp_tag)
        D.barrier()
        client_state = {"step": step, "tau": self.initial_threshold.tau, "threshold": self.threshold.to_dict(),
                        "config": self.cfg.to_dict()}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
        tmp_dir = self.ckpt_dir / tmp_tag
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   tmp_dir / f"rng_state_rank{self.rank}.pt")
        if self.reference is not None:
            self.reference.save(tmp_dir)
        if self.ema is not None:
            self.ema.save(tmp_dir, self.rank)
        D.barrier()
        final = self.ckpt_dir / tag
        if D.is_main():
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp_dir, final)
            _atomic_write_text(self.ckpt_dir / "latest", tag + "\n")
            self._prune_checkpoints()
        D.barrier()
        return final

    def _prune_checkpoints(self) -> None:
        limit = self.cfg.checkpoints_total_limit
        if limit == 0:
            return
        tags = sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in tags[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self, path: Path) -> None:
        if not path.is_dir():
            raise ValueError(f"resume_from: no checkpoint directory {str(path)!r}")
        writers = len(list(path.glob("rng_state_rank*.pt")))  # one per rank that wrote it
        if writers and writers != self.world_size:
            raise ValueError(f"resume_from: {str(path)!r} was written by {writers} rank(s), this run has "
                             f"{self.world_size}: ZeRO checkpoints are sharded per rank, so resume with "
                             f"{writers} rank(s) (e.g. deepspeed --num_gpus {writers})")
        load_path, client_state = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        if load_path is None:
            raise ValueError(f"resume_from: {str(path)!r} is not a DeepSpeed checkpoint")
        if abs(client_state["tau"] - self.tau) > 1e-12 * max(1.0, abs(self.tau)):
            raise ValueError(f"resume_from: the checkpoint's τ={client_state['tau']} differs from this run's "
                             f"τ={self.tau}: the data, percentile or threshold_file changed")
        saved = ThresholdEstimate(**client_state["threshold"])  # a proxy re-estimate, if any, continues
        if (saved.mode, saved.group_thresholds) != (self.threshold.mode, self.threshold.group_thresholds):
            raise ValueError(f"resume_from: the checkpoint's thresholds (threshold_mode={saved.mode!r}) differ from "
                             f"this run's (threshold_mode={self.cfg.threshold_mode!r}): the data, threshold_mode, "
                             "percentile or log_partition_beta changed")
        self._use_threshold(saved)
        self.start_step = int(client_state["step"])
        rng = torch.load(path / f"rng_state_rank{self.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if self.reference is not None:
            self.reference.load(path)
        if self.ema is not None:
            self.ema.load(path, self.rank)

    # ------------------------------------------------------------------------------ outputs
    def _write_run_files(self) -> None:
        _atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        _atomic_write_text(self.run_dir / "ds_config.json", json.dumps(self.ds_config, indent=2) + "\n")
        self.initial_threshold.save(self.run_dir / "threshold.json")

    def _published_weights(self):
        """The weights validation and export show: θ_ema with ``ema_decay``, else θ."""
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def _generating(self):
        """Eval mode for pipeline calls; with cached encodings on a GPU, the frozen encoders come back meanwhile.
        Every rank must generate (ZeRO-3 forwards are collective)."""
        self.engine.eval()
        if self.cfg.cache_encodings:
            self._move_frozen(self.device)
        try:
            yield
        finally:
            if self.cfg.cache_encodings:
                self._move_frozen(torch.device("cpu"))
            self.engine.train()

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        """Validation grid (a column per prompt, a row per seed; every rank runs the pipeline) under
        ``samples/``, and with ``val_reward`` or ``reward`` set the mean reward of its images, returned as
        ``validation_reward``."""
        from diffusers.utils import make_image_grid

        from ..rewards import score_images

        cfg = self.cfg
        rows = cfg.validation_images_per_prompt
        prompts = list(cfg.validation_prompts) * rows  # row r of the grid: every prompt once
        with self._generating(), self._published_weights():
            images = self.adapter.generate(self.engine.module, prompts, seeds=[cfg.seed + i for i in range(len(prompts))],
                                           num_inference_steps=cfg.validation_inference_steps,
                                           guidance_scale=cfg.validation_guidance_scale)
        if not D.is_main():
            return {}
        grid = make_image_grid(images, rows=rows, cols=len(cfg.validation_prompts))
        path = self.run_dir / "samples" / f"step_{step:06d}.png"
        path.parent.mkdir(exist_ok=True)
        grid.save(path)
        self.metrics.add_image("validation", grid, step)
        reward = self.reward if self.validation_reward is None else self.validation_reward
        if reward is None:
            return {}
        return {"validation_reward": float(score_images(reward, images, prompts).mean())}

    def _state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full policy state dict on rank 0 (gathered from the ZeRO-3 shards), None elsewhere."""
        if self.zero3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
            # the gathered tensors are views of flat buffers: own copies for safetensors
            return {k: v.detach().cpu().clone() for k, v in state.items()} if D.is_main() else None
        state = self.engine.module.state_dict()
        return {k: v.detach().cpu().clone() for k, v in state.items()} if D.is_main() else None

    def export(self) -> Path | None:
        with self._published_weights():
            state = self._state_dict()
        if not D.is_main():
            return None
        from .export import has_pipeline_export, merge_lora, save_lora, save_pipeline

        final = self.run_dir / "final"
        if self.cfg.trains_lora:
            save_lora(self.adapter, self.engine.module, state, self.lora_config, final / "lora")
            state = merge_lora(state, self.lora_config)
        if has_pipeline_export(self.adapter):
            save_pipeline(self.adapter, state, final)
        else:
            self.adapter.save_pretrained(state, final)
        return final

    def _finish_plots(self) -> None:
        plots = self.run_dir / "plots"
        plots.mkdir(exist_ok=True)
        plot_training_curves(read_metrics(self.run_dir / "metrics.jsonl"), plots / "training_curves.png")
        plot_score_histogram(self.scores, self.tau, plots / "score_histogram.png")

    # --------------------------------------------------------------------------------- train
    def _reduce_stats(self, sums: dict[str, torch.Tensor], loss_sum: torch.Tensor, micro_steps: int) -> dict[str, float]:
        keys = sorted(sums)
        packed = torch.stack([loss_sum.double().cpu(), torch.tensor(float(micro_steps), dtype=torch.float64)]
                             + [sums[k].double().cpu() for k in keys])
        total = D.all_reduce_sum(packed)
        row = {"loss": float(total[0] / total[1])}
        samples = self.cfg.train_batch_size
        for i, key in enumerate(keys):
            row[{"labels": "positive_fraction", "weights": "weight_mean", "implicit_score": "implicit_score_mean"}.get(key, key)] = \
                float(total[2 + i] / samples)
        return row

    def train(self) -> list[dict[str, Any]]:
        """Run from the current step to ``max_steps``; returns the metrics rows of this run (rank 0)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        rows: list[dict[str, Any]] = []
        if self.start_step >= cfg.max_steps:
            return rows
        loader = torch.utils.data.DataLoader(
            self.train_dataset,
            batch_sampler=list(self.schedule.rank_batches(self.rank, self.start_step, cfg.max_steps)),
            collate_fn=self.collate, num_workers=cfg.dataloader_num_workers)
        batches = iter(loader)
        progress = tqdm(total=cfg.max_steps, initial=self.start_step, desc="TGO" if cfg.loss == "tgo" else cfg.loss,
                        disable=not D.is_main(), dynamic_ncols=True)
        if self.start_step == 0 and (self.reward or self.validation_reward) is not None:  # the base's reward: where the curve starts
            before = self.validate(0)
            if D.is_main():
                self.metrics.log({"step": 0, **before})
        for step in range(self.start_step + 1, cfg.max_steps + 1):
            started = time.perf_counter()
            epoch = self.schedule.epoch_of(step - 1)
            lr = float(self.lr_scheduler.get_last_lr()[0])
            sums: dict[str, torch.Tensor] = {}
            loss_sum = torch.zeros((), dtype=torch.float64)
            for _ in range(self.accumulation):
                loss, stats = self.compute_loss(next(batches), epoch, backward=True)
                self.engine.step()
                loss_sum += loss.double().cpu()
                for key in _STAT_KEYS:
                    if key in stats:
                        sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64)) + stats[key].double().sum().cpu()
            if self.ema is not None:
                self.ema.update()
            row = {"step": step, "epoch": epoch, "tau": self.tau,
                   **self._reduce_stats(sums, loss_sum, self.accumulation)}
            grad_norm = self.engine.get_global_grad_norm()
            elapsed = time.perf_counter() - started
            row.update(lr=lr, samples_per_s=cfg.train_batch_size / elapsed, step_time_s=elapsed,
                       peak_memory_mib=peak_memory_mib(self.device))
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            if step == cfg.max_steps or (cfg.eval_interval and step % cfg.eval_interval == 0):
                row.update(self.validate(step))
            if D.is_main():
                self.metrics.log(row)
                progress.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row.get('accuracy', float('nan')):.2f}",
                                     samples_s=f"{row['samples_per_s']:.1f}", refresh=False)
                progress.update(1)
            rows.append(row)
            if cfg.ref_update == "epoch" and step % self.schedule.steps_per_epoch == 0 and step < cfg.max_steps:
                self.update_reference()
                if cfg.threshold_update == "proxy":
                    self.reestimate_threshold(epoch)
            if cfg.save_interval and step % cfg.save_interval == 0:
                self.save_checkpoint(step)
        progress.close()
        if cfg.export:
            self.export()
        if D.is_main():
            if cfg.plots:
                self._finish_plots()
            self.metrics.close()
            self._print_summary(rows)
        D.barrier()
        return rows

    def _print_summary(self, rows: list[dict[str, Any]]) -> None:
        last = rows[-1] if rows else {}
        exported = ("final/ + final/lora" if self.cfg.trains_lora else "final/") if self.cfg.export else "no export"
        result = f"last loss {last['loss']:.4f}" if last else "nothing left to train"
        if "accuracy" in last:
            result += f", accuracy {last['accuracy']:.2f}"
        print(f"[tgo_fast] {self.cfg.model} {self.cfg.loss} done: {self.cfg.max_steps} steps on {self.world_size} rank(s), "
              f"τ={self.tau:.4g} from the {self.threshold.source}, {result}; "
              f"run dir {self.run_dir} (metrics.jsonl, tensorboard/, plots/, samples/, {exported})", flush=True)


def precompute_layout(num_samples: int, world_size: int, micro_batch_size: int) -> tuple[torch.Tensor, int]:
    """(order, per_rank): rank r pre-computes ``order[r·per_rank : (r+1)·per_rank]`` in micro-batches; every rank
    gets the same number of whole micro-batches (the tail wraps around to the first samples)."""
    per_rank = -(-num_samples // (world_size * micro_batch_size)) * micro_batch_size
    return torch.arange(per_rank * world_size) % num_samples, per_rank


def _is_stream(dataset) -> bool:
    import datasets

    return isinstance(dataset, datasets.IterableDataset)


def _check_pretrained(model: str, pretrained: str) -> None:
    """A missing model is a clear error before anything heavy is built: a local path must exist; a hub id must
    be in the local cache when the hub is offline."""
    looks_local = os.path.isabs(pretrained) or pretrained.startswith((".", "~")) or pretrained.count("/") > 1
    if Path(pretrained).expanduser().is_dir():
        return
    if looks_local:
        raise ValueError(f"pretrained={pretrained!r}: no such directory (expected a local diffusers folder of a "
                         f"{model} model, or a Hugging Face hub id)")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        from huggingface_hub import scan_cache_dir

        try:
            cached = {repo.repo_id for repo in scan_cache_dir().repos}
        except Exception:  # no cache directory at all
            cached = set()
        if pretrained not in cached:
            raise ValueError(
                f"pretrained={pretrained!r}: not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids a download; "
                f"download it first (`huggingface-cli download {pretrained}`) or pass a local diffusers folder"
            )


def _read_threshold_file(path: str) -> float:
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"threshold_file: {path!r} is not JSON: {error}") from None
    tau = data.get("tau") if isinstance(data, dict) else data
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not np.isfinite(tau):
        raise ValueError(f"threshold_file: {path!r} must hold a finite number under 'tau' "
                         "(e.g. a previous run's threshold.json), got {tau!r}")
    return float(tau)
