"""Generate images from a base model or a trained run: PNGs and a manifest, sharded over ranks, resumable.

    source = trained_run("runs/tiny")                     # or ModelSource("sd15", "builtin")
    rows = generate(source, load_prompts("builtin:heldout", 64), "runs/tiny/samples",
                    images_per_prompt=2, seed=0, num_inference_steps=20)

Output directory::

    images/<prompt_index>_<k>.png
    videos/<prompt_index>_<k>.gif      video families (wan): the clip (its image is the frame grid)
    manifest.jsonl      one row per image, in (prompt_index, k) order:
                        {"id": "<prompt_index>_<k>", "prompt", "prompt_index", "k", "seed", "image": "images/..."}
                        (+ "video": "videos/..." for video families)
    shards/             finished chunks and job.json (see tgo_fast.pipeline.shards)

Image k of prompt i is drawn with the seed :func:`image_seed` (seed, i, k): the same prompt list, seed and
model give the same pixels whatever the batch size or the number of ranks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import yaml
from torch import nn

from tgo_fast.bases import BUILTIN, base_fingerprint
from tgo_fast.models import ModelAdapter, adapter_class, build_adapter
from tgo_fast.trainer import distributed as D
from tgo_fast.trainer.config import MODEL_OPTIONS

from .shards import run_in_chunks, write_atomically

__all__ = ["DTYPES", "ModelSource", "Sampler", "generate", "image_seed", "load_sampler", "run_base", "trained_run"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_BACKBONE_FOLDERS = ("unet", "transformer")  # what ModelAdapter.save_pretrained writes under final/
_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # tgo_fast.trainer.export.LORA_WEIGHT_NAME


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What to sample from: a model family + ``pretrained`` (hub id, local dir, "builtin", or None for the
    tiny random-init model), optionally with a trained run's exported weights (``run``) on top."""

    model: str
    pretrained: str | None = None
    resolution: int | None = None
    tiny_seed: int = 0
    run: str | None = None
    options: dict = dataclasses.field(default_factory=dict)  # family options: build_adapter keywords (run config)

    def describe(self) -> dict:
        """A JSON-able description (recorded in a job's ``job.json``), with a digest of the weights that are
        ours to track (a run's ``final/``, a shipped base), so a retrained model never resumes stale images."""
        return {**dataclasses.asdict(self), "weights": _weights_digest(self)}


def _weights_digest(source: ModelSource) -> str | None:
    if source.run is not None:
        final = Path(source.run) / "final"
        digest = hashlib.sha256()
        for file in sorted(p for p in final.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(final)).encode())
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
        return digest.hexdigest()[:16]
    if source.pretrained == BUILTIN:
        return base_fingerprint(source.model)
    return None  # a hub id or a user's folder: the caller names a new out_dir when it changes


class Sampler(NamedTuple):
    """A loaded model source: the adapter (frozen parts, pipeline) and the backbone to sample with, in eval mode."""

    adapter: ModelAdapter
    backbone: nn.Module


def trained_run(run_dir: str | os.PathLike) -> ModelSource:
    """The source of a trained run directory: its ``config.yaml`` (as :func:`run_base`) and
    the export under ``final/`` (``unet/`` or ``transformer/``: full backbone; ``lora/``: LoRA weights)."""
    return dataclasses.replace(run_base(run_dir), run=os.fspath(run_dir))


def run_base(run_dir: str | os.PathLike) -> ModelSource:
    """The base model a run was trained from (its ``config.yaml``: model, pretrained, resolution, seed and the
    family options such as ``prediction_type``), without the run's weights."""
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"run {os.fspath(run_dir)!r}: no config.yaml; expected a directory written by scripts/train.py")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    if not config.get("model"):
        raise ValueError(f"run {os.fspath(run_dir)!r}: config.yaml names no model")
    # the trainer builds a tiny random-init model from its seed (tiny_seed=cfg.seed)
    return ModelSource(model=config["model"], pretrained=config.get("pretrained"),
                       resolution=config.get("resolution"), tiny_seed=int(config.get("seed", 0)),
                       options={name: config[name] for name in MODEL_OPTIONS if config.get(name) is not None})


def load_sampler(source: ModelSource, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> Sampler:
    """Build ``source``'s adapter on ``device`` and, for a run, load its exported backbone or LoRA weights."""
    adapter = build_adapter(source.model, source.pretrained, resolution=source.resolution, dtype=dtype,
                            device=device, tiny_seed=source.tiny_seed, **source.options)
    if source.run is not None:
        final = Path(source.run) / "final"
        if (final / "lora").is_dir():
            _apply_lora(adapter.backbone, final / "lora")
        else:
            adapter.backbone = _load_backbone(type(adapter.backbone), final, dtype).to(device)
    return Sampler(adapter, adapter.backbone.eval().requires_grad_(False))


def _load_backbone(backbone_class: type[nn.Module], final: Path, dtype: torch.dtype) -> nn.Module:
    folders = [final / name for name in _BACKBONE_FOLDERS if (final / name).is_dir()]
    if not folders:
        raise ValueError(f"{str(final)!r}: no exported weights (expected unet/, transformer/ or lora/); "
                         "train with export: true, or pass the base model instead")
    return backbone_class.from_pretrained(folders[0], torch_dtype=dtype)


def _apply_lora(backbone: nn.Module, lora_dir: Path) -> None:
    """Inject the LoRA layers ``lora_config.json`` describes (r, lora_alpha, target_modules) and load their
    weights (keys prefixed ``unet.`` / ``transformer.``, as tgo_fast.trainer.export writes them)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config_file, weights_file = lora_dir / "lora_config.json", lora_dir / _LORA_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise ValueError(f"{str(lora_dir)!r}: expected lora_config.json and {_LORA_WEIGHTS} (tgo_fast.trainer.export)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    weights = {key.split(".", 1)[1]: value for key, value in load_file(weights_file).items()}
    inject_adapter_in_model(LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], lora_dropout=0.0,
                                       target_modules=config["target_modules"]), backbone)
    result = set_peft_model_state_dict(backbone, weights)
    missing = [key for key in result.missing_keys if "lora_" in key]
    if result.unexpected_keys or missing:
        raise ValueError(f"{str(weights_file)!r} does not fit the model: {len(result.unexpected_keys)} unexpected "
                         f"(e.g. {result.unexpected_keys[:2]}), {len(missing)} missing LoRA keys (e.g. {missing[:2]})")


def image_seed(seed: int, prompt_index: int, k: int) -> int:
    """The seed of image ``k`` of prompt ``prompt_index``: a uint32 from ``numpy.random.SeedSequence``."""
    return int(np.random.SeedSequence([seed, prompt_index, k]).generate_state(1)[0])


def generate(
    source: ModelSource,
    prompts: list[str],
    out_dir: str | os.PathLike,
    *,
    images_per_prompt: int = 1,
    seed: int = 0,
    guidance_scale: float | None = None,
    num_inference_steps: int = 20,
    batch_size: int = 8,
    dtype: str = "fp32",
    chunk_size: int = 32,
) -> list[dict]:
    """Draw ``images_per_prompt`` images per prompt from ``source`` into ``out_dir`` (see the module docstring).

    Args:
        guidance_scale: classifier-free guidance; None = the family's ``validation_guidance_scale``.
        batch_size: images per pipeline call (does not change the images).
        dtype: "fp32", "bf16" or "fp16", for every model component.
        chunk_size: images per resumable chunk (the unit a rank takes and a restart skips).

    Returns the manifest rows, on every rank. A rerun with the same arguments skips the finished chunks and
    loads no model when there are none left; a rerun with other arguments into the same ``out_dir`` is a ValueError.
    """
    _check_positive(images_per_prompt=images_per_prompt, num_inference_steps=num_inference_steps,
                    batch_size=batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    if not prompts:
        raise ValueError("prompts: the list is empty; pass at least one prompt")
    out_dir = Path(out_dir)
    guidance = adapter_class(source.model).validation_guidance_scale if guidance_scale is None else float(guidance_scale)
    job = {"verb": "generate", "source": source.describe(), "prompts_sha256": _digest(prompts),
           "images_per_prompt": images_per_prompt, "seed": seed, "guidance_scale": guidance,
           "num_inference_steps": num_inference_steps, "dtype": dtype}
    items = [(index, k) for index in range(len(prompts)) for k in range(images_per_prompt)]
    draw = _ChunkDrawer(source, prompts, out_dir, seed=seed, guidance_scale=guidance,
                        num_inference_steps=num_inference_steps, batch_size=batch_size, dtype=DTYPES[dtype])
    return run_in_chunks(items, draw, shard_dir=out_dir / "shards", manifest=out_dir / "manifest.jsonl", job=job,
                         chunk_size=chunk_size, desc="generate")


class _ChunkDrawer:
    """``process`` of :func:`run_in_chunks` for :func:`generate`: loads the model on the first chunk it draws."""

    def __init__(self, source: ModelSource, prompts: list[str], out_dir: Path, *, seed: int, guidance_scale: float,
                 num_inference_steps: int, batch_size: int, dtype: torch.dtype) -> None:
        self.source, self.prompts, self.out_dir, self.seed = source, prompts, out_dir, seed
        self.call_kwargs = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        self.batch_size, self.dtype = batch_size, dtype
        self.sampler: Sampler | None = None

    def __call__(self, items: list[tuple[int, int]]) -> list[dict]:
        if self.sampler is None:
            self.sampler = load_sampler(self.source, dtype=self.dtype, device=D.device())
        rows = []
        for start in range(0, len(items), self.batch_size):
            rows.extend(self._draw_batch(items[start:start + self.batch_size]))
        return rows

    def _draw_batch(self, items: list[tuple[int, int]]) -> list[dict]:
        rows = [{"id": f"{index}_{k}", "prompt": self.prompts[index], "prompt_index": index, "k": k,
                 "seed": image_seed(self.seed, index, k), "image": f"images/{index}_{k}.png"} for index, k in items]
        adapter, backbone = self.sampler
        prompts, seeds = [row["prompt"] for row in rows], [row["seed"] for row in rows]
        if hasattr(adapter, "generate_clips"):  # video families: the image is the clip's frame grid
            images = self._draw_clips(adapter, backbone, rows, prompts, seeds)
        else:
            images = adapter.generate(backbone, prompts, seeds=seeds, **self.call_kwargs)
        for row, image in zip(rows, images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            write_atomically(self.out_dir / row["image"], buffer.getvalue())
        return rows

    def _draw_clips(self, adapter, backbone, rows: list[dict], prompts: list[str], seeds: list[int]) -> list:
        """Each clip as ``videos/<id>.gif`` (the row's ``video``); returns their frame grids."""
        from tgo_fast.models.wan import frame_grid, save_clip

        clips = adapter.generate_clips(backbone, prompts, seeds=seeds, **self.call_kwargs)
        for row, frames in zip(rows, clips):
            row["video"] = f"videos/{row['id']}.gif"
            path = self.out_dir / row["video"]
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = save_clip(frames, path.with_name(f".{path.stem}.partial.gif"), fps=adapter.fps)
            os.replace(partial, path)
        return [frame_grid(frames) for frames in clips]


def _digest(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode("utf-8")).hexdigest()


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
