"""Prompt lists for generation and evaluation, from a prompt-set spec.

    load_prompts("prompts.txt")                              # one prompt per line; blank lines and "#" comments skipped
    load_prompts("prompts.jsonl")                            # .jsonl / .json / .csv / .parquet with a "prompt" column
    load_prompts("builtin:heldout", 128)                     # the synthetic world's held-out captions, first 128
    load_prompt_set("pickapic:/data/pickapic_v2")            # Pick-a-Pic v2 captions, split test_unique
    load_prompt_set("parti:/data/PartiPrompts.tsv?category=Animals")
    load_prompt_set("hpsv2:/data/hpsv2_benchmark?style=anime")

A spec is ``[KIND:]SOURCE[?key=value&...]``:

    builtin:train | builtin:heldout        the synthetic world's captions (below)
    text:FILE                              plain text, one prompt per line (also any bare *.txt)
    pickapic:PATH[?split=S]                Pick-a-Pic v2 `caption` column; split default test_unique
    parti:FILE[?category=C]                PartiPrompts.tsv: `Prompt` column, `Category` / `Challenge` kept
    hpsv2:DIR_OR_FILE[?style=S]            HPSv2 benchmark JSON lists (anime, concept-art, paintings, photo)
    FILE                                   bare path: .txt, or .jsonl/.json/.csv/.parquet with a `prompt` column

:func:`load_prompt_set` returns the prompts with a per-prompt metadata row (``style``, ``category``, ...);
:func:`load_prompts` the prompts alone.

The synthetic world is the one of the built-in scored set (``tgo_fast.data``) and reward
(``tgo_fast.rewards.synthetic_reward``): captions "a {size} {colour} {shape} at the {position} on a
{background} background" over every combination of the five attributes with background != colour
(2 · 8 · 3 · 5 · 7 = 1680), shuffled once with ``numpy.random.default_rng(0)``. ``builtin:heldout`` is the
first 512 of that order, ``builtin:train`` the other 1168: disjoint, fixed across versions and machines.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import re
from pathlib import Path

import datasets
import numpy as np

from tgo_fast.data import _COLOURS, _POSITIONS, _SHAPES, _SIZES

__all__ = ["BUILTIN_HELDOUT_SIZE", "BUILTIN_SPLITS", "HPSV2_STYLES", "PICKAPIC_DEFAULT_SPLIT", "PromptSet",
           "builtin_prompts", "load_prompt_set", "load_prompts", "synthetic_world_prompts"]

BUILTIN_PREFIX = "builtin:"
BUILTIN_SPLITS = ("train", "heldout")
BUILTIN_HELDOUT_SIZE = 512
HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")  # the benchmark's files <style>.json, in this order
PICKAPIC_DEFAULT_SPLIT = "test_unique"
_SHUFFLE_SEED = 0
# file suffix -> datasets packaged builder, for the table formats
_TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_FORMS = ("builtin:train | builtin:heldout, text:FILE, pickapic:PATH[?split=S], parti:FILE[?category=C], "
          "hpsv2:DIR_OR_FILE[?style=S], or a bare .txt / .jsonl / .json / .csv / .parquet file with a 'prompt' column")
_KINDS = ("builtin", "text", "pickapic", "parti", "hpsv2")
_OPTIONS = {"pickapic": ("split",), "parti": ("category",), "hpsv2": ("style",)}


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """A named prompt list; ``metadata[i]`` holds prompt i's extra columns (``style``, ``category``, ...)."""

    name: str
    prompts: list[str]
    metadata: list[dict]


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
    """The prompts of ``source`` (a spec, see the module docstring), the first ``num_prompts`` when given."""
    return load_prompt_set(source, num_prompts).prompts


def load_prompt_set(spec: str | os.PathLike, num_prompts: int | None = None) -> PromptSet:
    """The prompt set a spec names (module docstring), cut to its first ``num_prompts`` when given.

    Raises:
        ValueError: unknown kind, option or format, a missing file, column or style file, an empty or
            non-text prompt (naming its file and row), no prompt at all, or fewer prompts than ``num_prompts``.
    """
    text = os.fspath(spec)
    kind, source, options = _parse_spec(text)
    if kind == "builtin":
        prompts, metadata, name = builtin_prompts(source), None, f"builtin-{source}"
    elif kind == "text":
        prompts, metadata, name = _read_text_lines(_existing_file(source, text)), None, Path(source).stem
    elif kind == "pickapic":
        split = options.get("split", PICKAPIC_DEFAULT_SPLIT)
        prompts, metadata, name = _read_pickapic(Path(source), split, text), None, f"pickapic-{split}"
    elif kind == "parti":
        prompts, metadata = _read_parti(_existing_file(source, text), options.get("category"))
        name = "parti" + (f"-{options['category']}" if "category" in options else "")
    elif kind == "hpsv2":
        prompts, metadata = _read_hpsv2(Path(source), options.get("style"), text)
        name = "hpsv2" + (f"-{options['style']}" if "style" in options else "")
    else:
        prompts, metadata, name = _read_prompt_file(_existing_file(source, text)), None, Path(source).stem
    if not prompts:
        raise ValueError(f"prompts: {text!r} holds no prompt")
    metadata = metadata or [{} for _ in prompts]
    count = len(_first(prompts, num_prompts, text))
    return PromptSet(name, prompts[:count], metadata[:count])


def _parse_spec(text: str) -> tuple[str | None, str, dict[str, str]]:
    """``[KIND:]SOURCE[?key=value&...]`` → (kind or None for a bare path, source, options)."""
    match = re.match(r"^([a-z0-9]+):(?!//)(.*)$", text)  # a one-letter drive ("C:") is not a kind
    kind, rest = (match.group(1), match.group(2)) if match and len(match.group(1)) > 1 else (None, text)
    if kind is not None and kind not in _KINDS:
        raise ValueError(f"prompts: unknown kind {kind!r} in {text!r}; expected {_FORMS}")
    source, _, query = rest.partition("?") if kind in _OPTIONS else (rest, "", "")
    options = {}
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if not sep or key not in _OPTIONS[kind] or not value:
            raise ValueError(f"prompts: bad option {item!r} in {text!r}; {kind}: takes "
                             f"{', '.join(f'?{k}=VALUE' for k in _OPTIONS[kind])}")
        options[key] = value
    if not source:
        raise ValueError(f"prompts: {text!r} names no source; expected {_FORMS}")
    return kind, source, options


def _existing_file(source: str, spec: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"prompts: {str(path)!r} (from {spec!r}) is not a file; expected {_FORMS}")
    return path


def _read_prompt_file(path: Path) -> list[str]:
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
    return _checked_texts(table["prompt"], str(path))


def _checked_texts(values: list, where: str) -> list[str]:
    for row, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"prompts: {where!r} row {row}: expected a non-empty text prompt, got {value!r}")
    return [value.strip() for value in values]


def _read_pickapic(path: Path, split: str, spec: str) -> list[str]:
    """The ``caption`` column of one Pick-a-Pic v2 split, in row order, blank captions dropped.

    ``path``: a hub snapshot directory (``data/<split>-*.parquet``), a directory of ``<split>-*.parquet``,
    a ``save_to_disk`` directory (a DatasetDict holding ``split``, or one Dataset), or one parquet file.
    Only the caption column is read (the jpg columns are never loaded).
    """
    if path.is_file():
        captions = _parquet_captions([path])
    elif (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"prompts: {str(path)!r} has splits {sorted(loaded)}, not {split!r}; "
                                 f"pick one with {spec.partition('?')[0]}?split=NAME")
            loaded = loaded[split]
        if "caption" not in loaded.column_names:
            raise ValueError(f"prompts: {str(path)!r} has no 'caption' column (columns: {loaded.column_names})")
        captions = loaded.select_columns(["caption"])["caption"]
    elif path.is_dir():
        files = sorted(path.glob(f"data/{split}-*.parquet")) or sorted(path.glob(f"{split}-*.parquet"))
        if not files:
            raise ValueError(f"prompts: {str(path)!r} holds no {split}-*.parquet (under data/ or at the top) and is "
                             f"no save_to_disk directory; download the split, e.g. huggingface-cli download "
                             f"yuvalkirstain/pickapic_v2 --repo-type dataset --include 'data/{split}-*' --local-dir DIR")
        captions = _parquet_captions(files)
    else:
        raise ValueError(f"prompts: {str(path)!r} (from {spec!r}) does not exist")
    return [caption.strip() for caption in captions if isinstance(caption, str) and caption.strip()]


def _parquet_captions(files: list[Path]) -> list:
    import pyarrow.parquet as pq

    captions = []
    for file in files:
        if "caption" not in pq.read_schema(file).names:
            raise ValueError(f"prompts: {str(file)!r} has no 'caption' column (columns: {pq.read_schema(file).names})")
        captions.extend(pq.read_table(file, columns=["caption"]).column("caption").to_pylist())
    return captions


def _read_parti(path: Path, category: str | None) -> tuple[list[str], list[dict]]:
    """PartiPrompts.tsv: tab-separated, unquoted, header ``Prompt  Category  Challenge  Note``."""
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [column for column in ("Prompt", "Category") if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"prompts: {str(path)!r} lacks column(s) {missing} (header: {reader.fieldnames}); "
                             "expected PartiPrompts.tsv (Prompt, Category, Challenge, Note)")
        rows = list(reader)
    prompts = _checked_texts([row["Prompt"] for row in rows], str(path))
    metadata = [{"category": row["Category"], "challenge": row.get("Challenge")} for row in rows]
    if category is not None:
        keep = [i for i, meta in enumerate(metadata) if meta["category"] == category]
        if not keep:
            raise ValueError(f"prompts: {str(path)!r} has no prompt of category {category!r}; categories: "
                             f"{sorted({meta['category'] for meta in metadata})}")
        prompts, metadata = [prompts[i] for i in keep], [metadata[i] for i in keep]
    return prompts, metadata


def _read_hpsv2(path: Path, style: str | None, spec: str) -> tuple[list[str], list[dict]]:
    """The HPSv2 benchmark: ``<style>.json`` = a JSON list of prompt strings per style; a directory gives
    every style in the order of ``HPSV2_STYLES`` (or the one ``style`` names), a file its own style."""
    if path.is_file():
        if style is not None:
            raise ValueError(f"prompts: {spec!r}: ?style= selects a file of a benchmark directory; "
                             f"{str(path)!r} is already one style's file")
        files = [(path.stem, path)]
    elif path.is_dir():
        if style is not None and style not in HPSV2_STYLES:
            raise ValueError(f"prompts: unknown HPSv2 style {style!r}; expected one of {', '.join(HPSV2_STYLES)}")
        files = [(name, path / f"{name}.json") for name in ([style] if style else HPSV2_STYLES)]
        absent = [str(file) for _, file in files if not file.is_file()]
        if absent:
            raise ValueError(f"prompts: the HPSv2 benchmark directory {str(path)!r} lacks {absent}; it holds "
                             f"{', '.join(f'{name}.json' for name in HPSV2_STYLES)} (JSON lists of prompts)")
    else:
        raise ValueError(f"prompts: {str(path)!r} (from {spec!r}) does not exist")
    prompts, metadata = [], []
    for name, file in files:
        try:
            values = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"prompts: {str(file)!r} is not JSON: {error}") from error
        if not isinstance(values, list):
            raise ValueError(f"prompts: {str(file)!r} holds a {type(values).__name__}; expected a JSON list of prompts")
        prompts += _checked_texts(values, str(file))
        metadata += [{"style": name} for _ in values]
    return prompts, metadata


def _first(prompts: list[str], num_prompts: int | None, source: str) -> list[str]:
    if num_prompts is None:
        return prompts
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts <= 0:
        raise ValueError(f"num_prompts: expected a positive integer or None, got {num_prompts!r}")
    if num_prompts > len(prompts):
        raise ValueError(f"num_prompts={num_prompts}, but {source!r} holds only {len(prompts)} prompts; "
                         f"pass at most {len(prompts)} (or none for all)")
    return prompts[:num_prompts]
