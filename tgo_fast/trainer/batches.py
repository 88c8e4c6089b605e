"""Data order, per-sample seeds and the encoding cache.

Data order is a pure function of (seed, epoch, step): step ``s`` of epoch ``e`` takes the global batch
``perm_e[k·G : (k+1)·G]`` (``perm_e`` a seeded permutation, ``G = train_batch_size``, the last partial
batch of an epoch dropped), laid out as ``(accumulation, world, micro)`` so micro-step ``m`` of rank
``r`` reads ``[m, r]``. Resuming at step ``s`` therefore needs no sampler state.

A DPO run's items are preference pairs (:func:`preference_pairs`): item p is two samples, collated as
one batch of 2B rows (winners, then losers) that share the pair's seed.

Per-sample seeds (noise, timestep, mask) are ``seed·P + epoch·N + index`` (``epoch`` = 0 when the noise
is fixed across epochs, as the precomputed reference requires), so policy, reference and a precomputed
pre-pass see the same draws for a sample whatever the rank or the batch it lands in.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["StepSchedule", "sample_seeds", "EncodingCache", "EncodedDataset", "collate_encoded",
           "encoding_cache_key", "preference_pairs", "PreferencePairDataset", "collate_pairs"]

_SEED_STRIDE = 1_000_003
_CACHE_FORMAT = 1


class StepSchedule:
    """Which dataset indices each rank reads at each micro-step (see the module docstring)."""

    def __init__(self, num_samples: int, train_batch_size: int, micro_batch_size: int, accumulation: int,
                 world_size: int, seed: int, item_name: str = "samples"):
        if num_samples < train_batch_size:
            raise ValueError(
                f"the dataset has {num_samples} {item_name}, fewer than train_batch_size={train_batch_size}: "
                "use a smaller train_batch_size or more data"
            )
        if micro_batch_size * world_size * accumulation != train_batch_size:
            raise ValueError(
                f"micro_batch_size × world size × accumulation = {micro_batch_size} × {world_size} × "
                f"{accumulation} ≠ train_batch_size={train_batch_size}"
            )
        self.num_samples = num_samples
        self.train_batch_size = train_batch_size
        self.micro_batch_size = micro_batch_size
        self.accumulation = accumulation
        self.world_size = world_size
        self.seed = seed
        self.steps_per_epoch = num_samples // train_batch_size
        self._permutations: dict[int, torch.Tensor] = {}

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            self._permutations = {epoch: torch.randperm(
                self.num_samples, generator=torch.Generator().manual_seed(self.seed * _SEED_STRIDE + epoch))}
        return self._permutations[epoch]

    def global_batch(self, step: int) -> torch.Tensor:
        """(accumulation, world, micro) dataset indices of optimizer step ``step`` (0-based)."""
        position = step % self.steps_per_epoch
        indices = self.permutation(self.epoch_of(step))[position * self.train_batch_size:
                                                        (position + 1) * self.train_batch_size]
        return indices.view(self.accumulation, self.world_size, self.micro_batch_size)

    def rank_batches(self, rank: int, start_step: int, max_steps: int) -> Iterator[list[int]]:
        """This rank's micro-batches from ``start_step`` to ``max_steps`` (a DataLoader batch_sampler)."""
        for step in range(start_step, max_steps):
            batch = self.global_batch(step)
            for micro in range(self.accumulation):
                yield batch[micro, rank].tolist()


def sample_seeds(indices: torch.Tensor, *, seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    """(B,) int64 per-sample seeds for noise / timestep / mask draws."""
    return (seed * _SEED_STRIDE + epoch * num_samples + indices.to(torch.int64)) % (2**63 - 1)


def encoding_cache_key(dataset_fingerprint: str, adapter_identity: dict[str, Any]) -> str:
    """A stable hash of what the encodings depend on: the dataset and the frozen encoders."""
    payload = json.dumps({"format": _CACHE_FORMAT, "dataset": dataset_fingerprint, "adapter": adapter_identity},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class EncodingCache:
    """Encoded samples (latents / VQ tokens + text embeddings) in safetensors chunks of ``chunk_size``
    consecutive dataset indices: ``<root>/chunk_000012.safetensors`` holds indices 12·chunk … 13·chunk−1.
    Each chunk is written once (temporary file renamed into place), so concurrent runs and killed runs
    never leave a partial chunk behind."""

    def __init__(self, root: str | os.PathLike, num_samples: int, chunk_size: int = 64, max_open: int = 8):
        self.root = Path(root)
        self.num_samples = num_samples
        self.chunk_size = chunk_size
        self._loaded: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._max_open = max_open

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def chunk_path(self, chunk: int) -> Path:
        return self.root / f"chunk_{chunk:06d}.safetensors"

    def chunk_indices(self, chunk: int) -> range:
        return range(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.num_samples))

    def missing_chunks(self) -> list[int]:
        return [c for c in range(self.num_chunks) if not self.chunk_path(c).is_file()]

    def write_chunk(self, chunk: int, tensors: dict[str, torch.Tensor]) -> None:
        expected = len(self.chunk_indices(chunk))
        for name, tensor in tensors.items():
            if tensor.shape[0] != expected:
                raise ValueError(f"cache chunk {chunk}: {name!r} has {tensor.shape[0]} rows, expected {expected}")
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.chunk_path(chunk)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)

    def _chunk(self, chunk: int) -> dict[str, torch.Tensor]:
        if chunk not in self._loaded:
            with safe_open(str(self.chunk_path(chunk)), framework="pt") as f:
                self._loaded[chunk] = {key: f.get_tensor(key) for key in f.keys()}
            while len(self._loaded) > self._max_open:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(chunk)
        return self._loaded[chunk]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tensors = self._chunk(index // self.chunk_size)
        row = index % self.chunk_size
        return {key: value[row] for key, value in tensors.items()}


class EncodedDataset(torch.utils.data.Dataset):
    """Map-style view of the cache: ``{"index", "score", "encoded": {name: per-sample tensor}}``."""

    def __init__(self, cache: EncodingCache, scores: torch.Tensor):
        self.cache = cache
        self.scores = scores

    def __len__(self) -> int:
        return self.cache.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": int(index), "score": float(self.scores[index]), "encoded": self.cache[int(index)]}


def collate_encoded(examples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "index": torch.tensor([e["index"] for e in examples], dtype=torch.long),
        "score": torch.tensor([e["score"] for e in examples], dtype=torch.float64),
        "encoded": {key: torch.stack([e["encoded"][key] for e in examples]) for key in examples[0]["encoded"]},
    }


def preference_pairs(scores: torch.Tensor, groups: Sequence[str], min_gap: float = 0.0) -> torch.Tensor:
    """(P, 2) int64 ``[winner, loser]`` dataset indices for DPO: every pair of samples of one prompt group whose
    scores differ by more than zero and by at least ``min_gap`` (ties never pair). Groups in order of first
    appearance; within a group the pairs (i, j), i < j, in index order."""
    if len(groups) != len(scores):
        raise ValueError(f"groups has {len(groups)} entries but scores has {len(scores)}: one group per score")
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    values = scores.tolist()
    pairs = []
    for indices in members.values():
        for position, i in enumerate(indices):
            for j in indices[position + 1:]:
                gap = values[i] - values[j]
                if gap != 0 and abs(gap) >= min_gap:
                    pairs.append((i, j) if gap > 0 else (j, i))
    if not pairs:
        raise ValueError(
            f"loss='dpo' found no preference pair: it pairs samples of the same prompt (or 'group') whose scores "
            f"differ by at least dpo_min_gap={min_gap} and by more than 0, and none of the {len(members)} prompt "
            "groups has two such samples; score K ≥ 2 samples per prompt, or lower dpo_min_gap")
    return torch.tensor(pairs, dtype=torch.int64)


class PreferencePairDataset(torch.utils.data.Dataset):
    """Item p of a DPO run: ``{"index": p, "winner": samples[w_p], "loser": samples[l_p]}``."""

    def __init__(self, samples: torch.utils.data.Dataset, pairs: torch.Tensor):
        self.samples = samples
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        winner, loser = self.pairs[int(index)].tolist()
        return {"index": int(index), "winner": self.samples[winner], "loser": self.samples[loser]}


def collate_pairs(collate_samples: Callable[[list], dict[str, Any]], examples: list[dict[str, Any]]) -> dict[str, Any]:
    """B pairs → one batch of 2B rows, the winners first then the losers (``collate_samples`` stacks them);
    ``index`` holds the B pair indices (the per-pair seeds, so both images of a pair share noise and timestep),
    ``sample_index`` the 2B dataset indices."""
    rows = collate_samples([e["winner"] for e in examples] + [e["loser"] for e in examples])
    rows["sample_index"] = rows["index"]
    rows["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    return rows
