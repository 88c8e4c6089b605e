"""Score a manifest's images with one or more rewards: a scored dataset the trainer's ``--data`` reads directly.

    rows = score("samples/manifest.jsonl", "builtin", "samples/scored.jsonl")
    load_scored_dataset("samples/scored.jsonl")          # tgo_fast.data: prompt, image, score, id, extras
    score("samples/manifest.jsonl", ["hpsv2=/ckpt/HPS_v2.1_compressed.pt", "pickscore=yuvalkirstain/PickScore_v1"],
          "samples/scored.jsonl", score_column="pickscore")   # + score_hpsv2, score_pickscore columns

Input: any JSON-lines file with ``prompt`` and ``image`` (a path relative to the file, or absolute) per row,
e.g. a :func:`tgo_fast.pipeline.generate` manifest; ``id`` defaults to the row's index.
Output rows, in the manifest's order: ``{"id", "prompt", "image", "score", ...}`` with ``image`` relative to
the output file, ``score`` the reward's float and every other field of the manifest row kept (prompt_index,
k, seed, ...). Chunks live under ``<out stem>.shards/`` next to the output (sharded and resumable, see
tgo_fast.pipeline.shards).

Several rewards (reward specs of tgo_fast.pipeline.reward_specs, distinct names) are scored one after the
other, one model in memory at a time, each into its own scored file ``<out stem>.rewards/score_<name>.jsonl``
(with its own resumable chunks beside it, so adding a reward later scores only that one); the output then
holds every field of those rows, ``score_<name>`` per reward and ``score`` = the ``score_column`` reward's
(default: the first). Images are opened one batch at a time: memory never holds more than ``batch_size``.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image as PILImage

from tgo_fast.rewards import Reward, check_reward_prompts, score_images
from tgo_fast.trainer import distributed as D

from .reward_specs import load_reward_spec, parse_reward_spec, parse_reward_specs
from .shards import read_jsonl, run_in_chunks, write_jsonl_atomically

__all__ = ["score", "score_with_reward"]


def score(manifest: str | os.PathLike, reward_spec: str | Sequence[str], out_file: str | os.PathLike, *,
          score_column: str | None = None, batch_size: int = 32, chunk_size: int = 256) -> list[dict]:
    """Score every image of ``manifest`` with ``reward_spec`` (one spec, e.g. ``"builtin"``,
    ``"package.module:function"`` or ``"pickscore=PATH"``, or a list of them) into the scored dataset
    ``out_file`` (JSON lines); returns its rows on every rank.

    With one reward the rows carry its ``score``; with several, ``score_<name>`` per reward and ``score`` from
    the reward named ``score_column`` (default: the first). Every prompt is checked against a reward
    (``check_reward_prompts``) before it reads any image.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    manifest, out_file = Path(manifest), Path(out_file)
    if not manifest.is_file():
        raise ValueError(f"manifest {str(manifest)!r} is not a file; expected the manifest.jsonl that generate writes")
    texts = [reward_spec] if isinstance(reward_spec, str) else list(reward_spec)
    specs = parse_reward_specs(texts)
    names = [spec.name for spec in specs]
    if score_column is not None and score_column not in names:
        raise ValueError(f"score_column {score_column!r} is none of the rewards' names {names}; pass one of them")
    rows = _read_manifest(manifest)
    if len(specs) == 1:
        return score_with_reward(manifest, load_reward_spec(texts[0], device=D.device()), texts[0], out_file,
                                 rows=rows, batch_size=batch_size, chunk_size=chunk_size)
    per_reward_dir = out_file.with_name(f"{out_file.stem}.rewards")
    scored = {spec.name: score_with_reward(manifest, load_reward_spec(spec, device=D.device()), spec.text,
                                           per_reward_dir / f"{spec.column}.jsonl", rows=rows, batch_size=batch_size,
                                           chunk_size=chunk_size) for spec in specs}
    if D.is_main():
        write_jsonl_atomically(out_file, _merge_reward_columns(specs, scored, score_column or names[0],
                                                               per_reward_dir, out_file.parent))
    D.barrier()
    return read_jsonl(out_file)


def score_with_reward(manifest: str | os.PathLike, reward: Reward, spec_text: str, out_file: str | os.PathLike, *,
                      rows: list[dict] | None = None, batch_size: int = 32, chunk_size: int = 256) -> list[dict]:
    """:func:`score` with one reward already loaded (``spec_text`` names it in the job record), so that a caller
    scoring many manifests loads each reward model once."""
    manifest, out_file = Path(manifest), Path(out_file)
    rows = _read_manifest(manifest) if rows is None else rows
    check_reward_prompts(reward, [row["prompt"] for row in rows])
    job = {"verb": "score", "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(), "reward": spec_text}
    scorer = _ChunkScorer(reward, image_root=manifest.parent, out_dir=out_file.parent, batch_size=batch_size)
    return run_in_chunks(rows, scorer, shard_dir=out_file.with_name(f"{out_file.stem}.shards"), manifest=out_file,
                         job=job, chunk_size=chunk_size, desc=f"score ({parse_reward_spec(spec_text).name})")


def _merge_reward_columns(specs: list, scored: dict[str, list[dict]], score_column: str, rows_dir: Path,
                          out_dir: Path) -> list[dict]:
    """The ``score_column`` reward's rows with ``score_<name>`` of every reward and ``image`` relative to ``out_dir``."""
    merged = []
    for index, row in enumerate(scored[score_column]):
        image = os.path.relpath(os.path.normpath(rows_dir / row["image"]), out_dir)
        merged.append({**row, "image": image, **{spec.column: scored[spec.name][index]["score"] for spec in specs}})
    return merged


def _read_manifest(manifest: Path) -> list[dict]:
    """The manifest's rows with an ``id`` each; ValueError naming a row without a text prompt or an image path."""
    rows = read_jsonl(manifest)
    if not rows:
        raise ValueError(f"manifest {str(manifest)!r} has no rows")
    for index, row in enumerate(rows):
        for field in ("prompt", "image"):
            if not isinstance(row.get(field), str) or not row[field]:
                raise ValueError(f"manifest {str(manifest)!r} row {index}: expected a non-empty text {field!r}, "
                                 f"got {row.get(field)!r}")
        row.setdefault("id", str(index))
    return rows


class _ChunkScorer:
    """``process`` of :func:`run_in_chunks` for :func:`score`."""

    def __init__(self, reward: Reward, *, image_root: Path, out_dir: Path, batch_size: int) -> None:
        self.reward, self.image_root, self.out_dir, self.batch_size = reward, image_root, out_dir, batch_size

    def __call__(self, rows: list[dict]) -> list[dict]:
        scored = []
        for start in range(0, len(rows), self.batch_size):
            scored.extend(self._score_batch(rows[start:start + self.batch_size]))
        return scored

    def _score_batch(self, rows: list[dict]) -> list[dict]:
        paths = [self.image_root / row["image"] for row in rows]
        images = [_open_image(path) for path in paths]
        scores = score_images(self.reward, images, [row["prompt"] for row in rows]).tolist()
        return [{"id": row["id"], "prompt": row["prompt"], "image": os.path.relpath(path, self.out_dir),
                 "score": value, **{k: v for k, v in row.items() if k not in ("id", "prompt", "image", "score")}}
                for row, path, value in zip(rows, paths, scores)]


def _open_image(path: Path) -> PILImage.Image:
    try:
        with PILImage.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the image {str(path)!r}: {error}") from error
