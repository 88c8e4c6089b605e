"""Score a manifest's images with a reward: a scored dataset the trainer's ``--data`` reads directly.

    rows = score("samples/manifest.jsonl", "builtin", "samples/scored.jsonl")
    load_scored_dataset("samples/scored.jsonl")          # tgo_fast.data: prompt, image, score, id, extras

Input: any JSON-lines file with ``prompt`` and ``image`` (a path relative to the file, or absolute) per row,
e.g. a :func:`tgo_fast.pipeline.generate` manifest; ``id`` defaults to the row's index.
Output rows, in the manifest's order: ``{"id", "prompt", "image", "score", ...}`` with ``image`` relative to
the output file, ``score`` the reward's float and every other field of the manifest row kept (prompt_index,
k, seed, ...). Chunks live under ``<out stem>.shards/`` next to the output (sharded and resumable, see
tgo_fast.pipeline.shards).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from PIL import Image as PILImage

from tgo_fast.rewards import Reward, check_reward_prompts, load_reward, score_images

from .shards import read_jsonl, run_in_chunks

__all__ = ["score"]


def score(manifest: str | os.PathLike, reward_spec: str, out_file: str | os.PathLike, *, batch_size: int = 32,
          chunk_size: int = 256) -> list[dict]:
    """Score every image of ``manifest`` with ``reward_spec`` (``"builtin"`` or ``"package.module:function"``,
    see tgo_fast.rewards) into the scored dataset ``out_file`` (JSON lines); returns its rows on every rank.

    Every prompt is checked against the reward (``check_reward_prompts``) before any image is read.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    manifest, out_file = Path(manifest), Path(out_file)
    if not manifest.is_file():
        raise ValueError(f"manifest {str(manifest)!r} is not a file; expected the manifest.jsonl that generate writes")
    rows = _read_manifest(manifest)
    reward = load_reward(reward_spec)
    check_reward_prompts(reward, [row["prompt"] for row in rows])
    job = {"verb": "score", "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(), "reward": reward_spec}
    scorer = _ChunkScorer(reward, image_root=manifest.parent, out_dir=out_file.parent, batch_size=batch_size)
    return run_in_chunks(rows, scorer, shard_dir=out_file.with_name(f"{out_file.stem}.shards"), manifest=out_file,
                         job=job, chunk_size=chunk_size, desc=f"score ({reward_spec})")


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
