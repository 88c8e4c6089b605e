"""Prompt lists for generation and evaluation.

    load_prompts("prompts.txt")                 # one prompt per line; blank lines and "#" comments skipped
    load_prompts("prompts.jsonl")               # .jsonl / .json / .csv / .parquet with a "prompt" column
    load_prompts("builtin:heldout", 128)        # the synthetic world's held-out captions, first 128

The synthetic world is the one of the built-in scored set (``tgo_fast.data``) and reward
(``tgo_fast.rewards.synthetic_reward``): captions "a {size} {colour} {shape} at the {position} on a
{background} background" over every combination of the five attributes with background != colour
(2 · 8 · 3 · 5 · 7 = 1680), shuffled once with ``numpy.random.default_rng(0)``. ``builtin:heldout`` is the
first 512 of that order, ``builtin:train`` the other 1168: disjoint, fixed across versions and machines.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import datasets
import numpy as np

from tgo_fast.data import _COLOURS, _POSITIONS, _SHAPES, _SIZES

__all__ = ["BUILTIN_HELDOUT_SIZE", "BUILTIN_SPLITS", "builtin_prompts", "load_prompts", "synthetic_world_prompts"]

BUILTIN_PREFIX = "builtin:"
BUILTIN_SPLITS = ("train", "heldout")
BUILTIN_HELDOUT_SIZE = 512
_SHUFFLE_SEED = 0
# file suffix -> datasets packaged builder, for the table formats
_TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_FORMS = "a .txt file, a .jsonl/.json/.csv/.parquet file with a 'prompt' column, builtin:train or builtin:heldout"


def synthetic_world_prompts() -> list[str]:
    """Every caption of the synthetic world (1680), in the fixed shuffled order the builtin splits cut."""
    captions = [
        f"a {size} {colour} {shape} at the {position} on a {background} background"
        for size, colour, shape, position, background in itertools.product(_SIZES, _COLOURS, _SHAPES, _POSITIONS, _COLOURS)
        if background != colour
    ]
    order = np.random.default_rng(_SHUFFLE_SEED).permutation(len(captions))
    return [captions[i] for i in order]


def builtin_prompts(split: str) -> list[str]:
    """``"heldout"``: the first 512 synthetic-world captions; ``"train"``: the remaining 1168."""
    if split not in BUILTIN_SPLITS:
        raise ValueError(f"builtin prompts: unknown split {split!r}; expected builtin:train or builtin:heldout")
    prompts = synthetic_world_prompts()
    return prompts[:BUILTIN_HELDOUT_SIZE] if split == "heldout" else prompts[BUILTIN_HELDOUT_SIZE:]


def load_prompts(source: str | os.PathLike, num_prompts: int | None = None) -> list[str]:
    """The prompts of ``source`` (see the module docstring), the first ``num_prompts`` when given.

    Raises:
        ValueError: unknown source or format, a missing file or ``prompt`` column, an empty or non-text
            prompt (naming its row), no prompt at all, or fewer prompts than ``num_prompts``.
    """
    text = os.fspath(source)
    if text.startswith(BUILTIN_PREFIX):
        prompts = builtin_prompts(text[len(BUILTIN_PREFIX):])
    else:
        prompts = _read_prompt_file(Path(text))
    if not prompts:
        raise ValueError(f"prompts: {text!r} holds no prompt")
    return _first(prompts, num_prompts, text)


def _read_prompt_file(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"prompts: {str(path)!r} is not a file; expected {_FORMS}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_text_lines(path)
    if suffix in _TABLE_BUILDERS:
        return _read_prompt_column(path, _TABLE_BUILDERS[suffix])
    raise ValueError(f"prompts: unknown format {suffix or '(no suffix)'!r} of {str(path)!r}; expected {_FORMS}")


def _read_text_lines(path: Path) -> list[str]:
    """One prompt per line, stripped; blank lines and lines starting with ``#`` are skipped."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _read_prompt_column(path: Path, builder: str) -> list[str]:
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # datasets raises its own error types for malformed files
        raise ValueError(f"prompts: cannot read {str(path)!r} as {builder}: {error}") from error
    if "prompt" not in table.column_names:
        raise ValueError(f"prompts: {str(path)!r} has no 'prompt' column (columns: {table.column_names})")
    prompts = table["prompt"]
    for row, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompts: {str(path)!r} row {row}: expected a non-empty text prompt, got {prompt!r}")
    return [prompt.strip() for prompt in prompts]


def _first(prompts: list[str], num_prompts: int | None, source: str) -> list[str]:
    if num_prompts is None:
        return prompts
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts <= 0:
        raise ValueError(f"num_prompts: expected a positive integer or None, got {num_prompts!r}")
    if num_prompts > len(prompts):
        raise ValueError(f"num_prompts={num_prompts}, but {source!r} holds only {len(prompts)} prompts; "
                         f"pass at most {len(prompts)} (or none for all)")
    return prompts[:num_prompts]
