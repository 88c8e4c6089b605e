"""Scored image datasets for TGO: unpaired (prompt, image, score) triples.

One format, read through Hugging Face ``datasets``::

    prompt  str     the caption the image was generated from
    image   str     path (absolute, or relative to the file holding the row), or bytes, or an HF Image;
                    for video models also a video file (.mp4, .webm, ... ; animated GIF/WebP) or a directory
                    of frame images (sorted by file name): see :func:`load_clip`
    score   float   scalar feedback (human rating, reward model, ...); finite
    id      str     optional; default: the row's index in the loaded dataset, as str
    ...             any extra column is kept as is

from jsonl/json, csv or parquet files (one path, a list, a glob or a directory of such files) or a
directory written by ``Dataset.save_to_disk``. ``None`` / ``"builtin"`` is the embedded default: a
procedural synthetic set generated deterministically on first use and cached on disk, so the trainer
runs offline.

    ds = load_scored_dataset("data/*.parquet")          # datasets.Dataset, validated
    train = ScoredImageDataset(ds, resolution=512)      # torch Dataset of {"pixel_values", "score", ...}
    loader = DataLoader(train, batch_size=8, collate_fn=collate_scored)
    tau = percentile_threshold(dataset_scores(ds), 50)  # scores without decoding a single image

``streaming=True`` gives a lazily validated ``datasets.IterableDataset`` instead; turn its rows into
the same items with ``prepare_scored_example(row, index, resolution)``.
"""
from __future__ import annotations

import glob
import io
import json
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image as PILImage
from PIL import ImageSequence

__all__ = [
    "REQUIRED_COLUMNS",
    "ScoredImageDataset",
    "collate_scored",
    "dataset_groups",
    "dataset_prompts",
    "dataset_scores",
    "frame_indices",
    "load_clip",
    "load_scored_dataset",
    "prepare_scored_example",
    "synthetic_caption",
    "synthetic_renders",
    "synthetic_scored_dataset",
]

REQUIRED_COLUMNS = ("prompt", "image", "score")
# file suffix (after any compression suffix) -> datasets packaged builder
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_BUILTIN = "builtin"
# bump when the generator below changes, so stale caches are not reused
_SYNTHETIC_VERSION = 1


# ----------------------------------------------------------------------------------------------
# loading and validation
# ----------------------------------------------------------------------------------------------
def load_scored_dataset(
    source: str | os.PathLike | Sequence[str | os.PathLike] | None,
    *,
    streaming: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load and validate a scored dataset.

    Args:
        source: a jsonl/json/csv/parquet file, a list of them, a glob (``"shards/*.parquet"``), a
            directory of such files, a ``save_to_disk`` directory, or ``None``/``"builtin"`` for the
            embedded synthetic default (256 images at 64 px, seed 0).
        streaming: return a ``datasets.IterableDataset`` that reads and validates rows lazily
            (large sets); otherwise a memory-mapped ``datasets.Dataset`` validated up front.
        cache_dir: ``datasets`` cache for the Arrow conversion of files; for the builtin default, the
            parent directory of its cache (default ``~/.cache/tgo_fast``).

    Returns:
        columns ``id`` (str), ``prompt`` (str), ``image`` (``datasets.Image``; paths made absolute),
        ``score`` (float64) and the extra columns of the source.

    Raises:
        ValueError: unreadable or unknown source, a malformed row (names the file and the 0-based
            row: missing column or value, non-numeric or non-finite score, missing image file),
            or an empty dataset.
    """
    if source is None or (isinstance(source, str) and source == _BUILTIN):
        dataset = synthetic_scored_dataset(
            root=None if cache_dir is None else Path(cache_dir) / _synthetic_dirname(256, 64, 0)
        )
        return dataset.to_iterable_dataset() if streaming else dataset

    saved_dir, files = _resolve_source(source)
    if saved_dir is not None:
        return _load_saved(saved_dir, streaming)
    if streaming:
        return _load_files_streaming(files, cache_dir)
    return _load_files(files, cache_dir)


def _resolve_source(source) -> tuple[Path | None, list[Path]]:
    """-> (save_to_disk directory, None) or (None, data files in order)."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if glob.has_magic(text):
            files = [Path(p) for p in sorted(glob.glob(text, recursive=True)) if os.path.isfile(p)]
            if not files:
                raise ValueError(f"source: the glob {text!r} matches no file")
        else:
            path = Path(text)
            if path.is_dir():
                if _is_saved_dataset(path):
                    return path, []
                files = sorted(p for p in path.iterdir() if p.is_file() and _builder_for(p, strict=False))
                if not files:
                    raise ValueError(
                        f"source: the directory {text!r} is neither a `save_to_disk` dataset nor holds "
                        f"{'/'.join(_BUILDERS)} files"
                    )
            elif path.is_file():
                files = [path]
            else:
                raise ValueError(f"source: {text!r} does not exist (expected a file, a glob, a directory or 'builtin')")
    elif isinstance(source, Sequence):
        files = []
        for item in source:
            if not isinstance(item, (str, os.PathLike)):
                raise TypeError(f"source: list items must be paths, got {type(item).__name__}")
            if not os.path.isfile(item):
                raise ValueError(f"source: {os.fspath(item)!r} is not a file")
            files.append(Path(item))
        if not files:
            raise ValueError("source: the list of files is empty")
    else:
        raise TypeError(f"source: expected a path, a list of paths, a glob or None, got {type(source).__name__}")
    for file in files:
        _builder_for(file, strict=True)
    return None, files


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _builder_for(path: Path, *, strict: bool) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    builder = _BUILDERS.get(suffixes[-1]) if suffixes else None
    if builder is None and strict:
        raise ValueError(f"source: {str(path)!r} has an unsupported format; expected one of {', '.join(_BUILDERS)}")
    return builder


def _load_saved(path: Path, streaming: bool):
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(loaded) == 1:
            loaded = next(iter(loaded.values()))
        else:
            raise ValueError(f"source: {str(path)!r} holds splits {list(loaded)}; expected 'train' or a single split")
    if len(loaded) == 0:
        raise ValueError(f"source: the dataset {str(path)!r} is empty")
    dataset = _validate_and_normalise(loaded, str(path), path.resolve(), id_offset=0)
    return dataset.to_iterable_dataset() if streaming else dataset


def _read_file(file: Path, cache_dir, streaming: bool):
    builder = _builder_for(file, strict=True)
    try:
        return datasets.load_dataset(builder, data_files=[str(file)], split="train", streaming=streaming,
                                     cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as error:  # the reader's own error, made to name the file (and the row if we can)
        raise ValueError(f"{file}: {_locate_unreadable_row(file, builder)}cannot be read as {builder}: {error}") from error


def _locate_unreadable_row(file: Path, builder: str) -> str:
    """For json lines files, 'row N: ' of the first line that is not a JSON object, else ''."""
    if builder != "json" or file.suffix.lower() != ".jsonl":
        return ""
    with open(file, encoding="utf-8", errors="replace") as lines:
        row = 0
        for line in lines:
            if not line.strip():
                continue
            try:
                if not isinstance(json.loads(line), dict):
                    return f"row {row}: "
            except json.JSONDecodeError:
                return f"row {row}: "
            row += 1
    return ""


def _load_files(files: list[Path], cache_dir) -> datasets.Dataset:
    parts, offset = [], 0
    for file in files:
        raw = _read_file(file, cache_dir, streaming=False)
        if len(raw) == 0:
            continue
        parts.append(_validate_and_normalise(raw, str(file), file.parent.resolve(), id_offset=offset))
        offset += len(raw)
    if not parts:
        raise ValueError(f"source: the dataset is empty (no row in {', '.join(map(str, files))})")
    if len(parts) == 1:
        return parts[0]
    # (concatenate_datasets may reorder the columns of tables built by select_columns; restore the order)
    return datasets.concatenate_datasets(_align_features(parts, files)).select_columns(parts[0].column_names)


def _align_features(parts: list, files: list) -> list:
    """Same columns everywhere; types follow the first file where they are castable (csv reads
    large_string where json reads string)."""
    first = parts[0].features
    aligned = [parts[0]]
    for part, file in zip(parts[1:], files[1:]):
        if part.features != first:
            try:
                if part.column_names != parts[0].column_names:
                    raise ValueError("different column names")
                part = part.cast(first)
            except (ValueError, TypeError, pa.ArrowException) as error:
                raise ValueError(
                    f"source: {str(file)!r} has columns {dict(part.features)}, but {str(files[0])!r} has "
                    f"{dict(first)}; all files of one dataset need the same columns and types"
                ) from error
        aligned.append(part)
    return aligned


def _row_error(where: str, row: int, message: str) -> ValueError:
    return ValueError(f"{where}: row {row}: {message}")


def _check_columns(column_names, where: str, row: int = 0) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in column_names]
    if missing:
        raise _row_error(where, row, f"missing column(s) {missing}; the scored format needs "
                                   f"{list(REQUIRED_COLUMNS)} (found {list(column_names)})")


# -- one value at a time (streaming, and the slow paths of the map-style checks) --
def _parse_score(value: Any, where: str, row: int) -> float:
    if value is None:
        raise _row_error(where, row, "missing value in column 'score'")
    if isinstance(value, bool):
        raise _row_error(where, row, f"score must be a number, got {value!r}")
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise _row_error(where, row, f"score must be a number, got {value!r}") from None
    if not math.isfinite(score):
        raise _row_error(where, row, f"score must be finite, got {value!r}")
    return score


def _check_text(value: Any, column: str, where: str, row: int) -> str:
    if value is None:
        raise _row_error(where, row, f"missing value in column {column!r}")
    return value if isinstance(value, str) else str(value)


def _resolve_image_path(path: str, base_dir: Path, where: str, row: int) -> str:
    resolved = os.path.abspath(os.path.join(base_dir, os.path.expanduser(path)))
    if not (os.path.isfile(resolved) or os.path.isdir(resolved)):  # a directory: the frames of a clip
        raise _row_error(where, row, f"image file (or frames directory) {resolved!r} does not exist")
    return resolved


def _normalise_image(value: Any, base_dir: Path, where: str, row: int) -> dict:
    """path | bytes | {"bytes", "path"} | PIL image -> {"bytes", "path"} as datasets.Image stores it."""
    if value is None:
        raise _row_error(where, row, "missing value in column 'image'")
    if isinstance(value, str):
        if not value:
            raise _row_error(where, row, "empty image path")
        return {"bytes": None, "path": _resolve_image_path(value, base_dir, where, row)}
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise _row_error(where, row, "empty image bytes")
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, dict):
        if value.get("bytes"):
            return {"bytes": value["bytes"], "path": value.get("path")}
        if value.get("path"):
            return {"bytes": None, "path": _resolve_image_path(value["path"], base_dir, where, row)}
        raise _row_error(where, row, "image has neither bytes nor a path")
    if isinstance(value, PILImage.Image):
        return datasets.Image().encode_example(value)
    raise _row_error(where, row, f"image must be a path, bytes or an image, got {type(value).__name__}")


# -- whole columns at once (map-style) --
def _first(mask: pa.ChunkedArray | pa.Array) -> int | None:
    """Index of the first true entry of a boolean Arrow array (nulls count as false), or None."""
    hits = np.flatnonzero(np.asarray(pc.fill_null(mask, False)))
    return int(hits[0]) if hits.size else None


def _text_column(table: pa.Table, column: str, where: str) -> pa.ChunkedArray:
    values = table.column(column)
    if _is_json(values.type):  # mixed types in a json file: check and stringify value by value
        return pa.chunked_array([pa.array([_check_text(v, column, where, row) for row, v in
                                           enumerate(_python_values(values))], pa.string())])
    if (row := _first(pc.is_null(values))) is not None:
        raise _row_error(where, row, f"missing value in column {column!r}")
    return values if pa.types.is_string(values.type) else values.cast(pa.string())


def _is_json(arrow_type: pa.DataType) -> bool:
    return getattr(arrow_type, "extension_name", None) == "arrow.json"


def _python_values(values: pa.ChunkedArray) -> list:
    """Python values of a column; JSON-typed columns (a json file with mixed types) decoded."""
    if _is_json(values.type):
        return [None if v is None else json.loads(v) for v in values.cast(values.type.storage_type).to_pylist()]
    return values.to_pylist()


def _score_column(table: pa.Table, where: str) -> pa.ChunkedArray:
    values = table.column("score")
    if (row := _first(pc.is_null(values))) is not None:
        raise _row_error(where, row, "missing value in column 'score'")
    if pa.types.is_floating(values.type) or pa.types.is_integer(values.type):
        values = values.cast(pa.float64())
        if (row := _first(pc.invert(pc.is_finite(values)))) is not None:
            raise _row_error(where, row, f"score must be finite, got {values[row].as_py()!r}")
        return values
    # strings or mixed JSON values: parse one by one (this is also where the bad one gets its row)
    return pa.chunked_array([pa.array([_parse_score(v, where, row) for row, v in
                                       enumerate(_python_values(values))], pa.float64())])


def _image_column(table: pa.Table, base_dir: Path, where: str) -> pa.ChunkedArray | None:
    """Check the image column; return it rebuilt as datasets.Image storage (struct<bytes, path>) with
    absolute paths, or None when the stored column can be cast as it is (bytes everywhere)."""
    column, chunks, offset, rebuilt = table.column("image"), [], 0, False
    for chunk in column.chunks:
        chunk_or_none = _image_chunk(chunk, offset, base_dir, where)
        rebuilt |= chunk_or_none is not None
        chunks.append(chunk_or_none)
        offset += len(chunk)
    if not rebuilt:
        return None
    return pa.chunked_array([_image_storage(c) if r is None else r for c, r in zip(column.chunks, chunks)],
                            _IMAGE_STRUCT)


_IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _image_storage(values: pa.Array) -> pa.StructArray:
    if pa.types.is_struct(values.type):
        image_bytes, paths = values.field("bytes"), values.field("path")
    else:
        image_bytes, paths = values, pa.nulls(len(values), pa.string())
    return pa.StructArray.from_arrays([image_bytes.cast(pa.binary()), paths.cast(pa.string())],
                                      fields=list(_IMAGE_STRUCT))


def _image_chunk(values: pa.Array, offset: int, base_dir: Path, where: str) -> pa.StructArray | None:
    """Check one chunk (rows offset...); the rebuilt storage if paths had to be resolved, else None."""
    if (row := _first(values.is_null())) is not None:
        raise _row_error(where, offset + row, "missing value in column 'image'")
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        paths = [_normalise_image(p, base_dir, where, offset + row)["path"] for row, p in enumerate(values.to_pylist())]
        return pa.StructArray.from_arrays([pa.nulls(len(paths), pa.binary()), pa.array(paths, pa.string())],
                                          fields=list(_IMAGE_STRUCT))
    if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
        if (row := _first(pc.equal(pc.binary_length(values), 0))) is not None:
            raise _row_error(where, offset + row, "empty image bytes")
        return None
    if pa.types.is_struct(values.type) and {"bytes", "path"} <= {f.name for f in values.type}:
        # rows that carry bytes are done; rows with only a path get it resolved and checked
        without_bytes = pc.fill_null(pc.equal(pc.binary_length(values.field("bytes")), 0), True)
        rows = np.flatnonzero(np.asarray(without_bytes))
        if rows.size == 0:
            return None
        resolved = values.field("path").cast(pa.string()).to_pylist()
        for row in rows.tolist():
            if not resolved[row]:
                raise _row_error(where, offset + row, "image has neither bytes nor a path")
            resolved[row] = _resolve_image_path(resolved[row], base_dir, where, offset + row)
        return pa.StructArray.from_arrays([values.field("bytes").cast(pa.binary()), pa.array(resolved, pa.string())],
                                          fields=list(_IMAGE_STRUCT))
    raise _row_error(where, offset, f"column 'image' must hold paths, bytes or datasets.Image values, "
                                    f"got Arrow type {values.type}")


_FORMAT_FEATURES = datasets.Features(
    id=datasets.Value("string"), prompt=datasets.Value("string"), image=datasets.Image(),
    score=datasets.Value("float64"),
)


def _validate_and_normalise(raw: datasets.Dataset, where: str, base_dir: Path, *, id_offset: int) -> datasets.Dataset:
    """Map-style: check every row column by column, then rebuild the format columns (extras untouched).

    Checks run on Arrow columns: no image is decoded and no image bytes are copied. A column of image
    bytes stays in the memory-mapped Arrow cache (so the dataset pickles cheaply, e.g. to spawned
    DataLoader workers); only paths, prompts, ids and scores are rebuilt in memory.
    """
    _check_columns(raw.column_names, where)
    table = raw.with_format("arrow")[:]
    columns = {"prompt": _text_column(table, "prompt", where), "score": _score_column(table, where)}
    if "id" in raw.column_names:
        columns["id"] = _text_column(table, "id", where)
    else:
        columns["id"] = pa.array([str(id_offset + i) for i in range(raw.num_rows)], pa.string())
    image = _image_column(table, base_dir, where)
    if image is not None:
        columns["image"] = image
    extras = [c for c in raw.column_names if c not in (*REQUIRED_COLUMNS, "id")]
    # add under temporary names first: removing every column first would leave a table of 0 rows
    dataset = raw
    for name, values in columns.items():
        dataset = dataset.add_column(f"__new_{name}", values, feature=_FORMAT_FEATURES[name])
    dataset = dataset.remove_columns([c for c in columns if c in raw.column_names])
    dataset = dataset.rename_columns({f"__new_{name}": name for name in columns})
    if image is None:
        dataset = dataset.cast_column("image", datasets.Image())
    return dataset.select_columns([*_FORMAT_FEATURES, *extras])


# -- streaming --
def _normalise_example(example: dict, row: int, *, where: str, base_dir: str) -> dict:
    _check_columns(example, where, row)
    return {
        "id": None if "id" not in example else _check_text(example["id"], "id", where, row),
        "prompt": _check_text(example["prompt"], "prompt", where, row),
        "image": _normalise_image(example["image"], Path(base_dir), where, row),
        "score": _parse_score(example["score"], where, row),
    }


def _default_id(example: dict, index: int) -> dict:
    return {"id": str(index) if example["id"] is None else example["id"]}


def _load_files_streaming(files: list[Path], cache_dir) -> datasets.IterableDataset:
    """Lazily validated stream: a malformed row raises when the iteration reaches it."""
    streams, features = [], None
    for file in files:
        stream = _read_file(file, cache_dir, streaming=True)
        source_features = stream.features
        if source_features is None:  # csv: types are only known once read; infer them from the head
            head = list(stream.take(_HEAD_ROWS))
            if not head:
                continue
            source_features = datasets.Dataset.from_list(head).features
        _check_columns(list(source_features), str(file))
        if isinstance(source_features["image"], datasets.Image):
            stream = stream.cast_column("image", datasets.Image(decode=False))
        extras = {k: v for k, v in source_features.items() if k not in (*REQUIRED_COLUMNS, "id")}
        file_features = datasets.Features({**_FORMAT_FEATURES, **extras})
        if features is None:
            features = file_features
        elif file_features.keys() != features.keys():
            raise ValueError(f"source: {str(file)!r} has columns {list(file_features)}, but {str(files[0])!r} has "
                             f"{list(features)}; all files of one dataset need the same columns")
        streams.append(stream.map(_normalise_example, with_indices=True,
                                  fn_kwargs={"where": str(file), "base_dir": str(file.parent.resolve())}))
    if not streams:
        raise ValueError(f"source: the dataset is empty (no row in {', '.join(map(str, files))})")
    stream = streams[0] if len(streams) == 1 else datasets.concatenate_datasets(streams)
    # ids default to the row index in the whole stream; cast last, so images decode (lazily, per row)
    stream = stream.map(_default_id, with_indices=True).cast(features).select_columns(list(features))
    try:
        next(iter(stream))
    except StopIteration:
        raise ValueError(f"source: the dataset is empty (no row in {', '.join(map(str, files))})") from None
    return stream


_HEAD_ROWS = 100


# ----------------------------------------------------------------------------------------------
# the embedded synthetic default
# ----------------------------------------------------------------------------------------------
_COLOURS = {  # name -> RGB
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
_SHAPES = ("circle", "square", "triangle")
_POSITIONS = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7), "center": (0.5, 0.5)}
_SIZES = {"small": 0.14, "large": 0.26}  # half-extent as a fraction of the side


def _synthetic_dirname(num_samples: int, resolution: int, seed: int) -> str:
    return f"synthetic-v{_SYNTHETIC_VERSION}-n{num_samples}-r{resolution}-s{seed}"


def _default_cache_root() -> Path:
    return Path(os.environ.get("TGO_FAST_CACHE", Path.home() / ".cache" / "tgo_fast"))


def synthetic_scored_dataset(
    num_samples: int = 256, resolution: int = 64, seed: int = 0, root: str | os.PathLike | None = None
) -> datasets.Dataset:
    """The embedded default scored set: procedural images, their captions and a programmatic score.

    Each image is one shape (circle/square/triangle) of a named colour, size and position on a
    two-tone gradient background with some pixel noise. Its caption names shape, colour, size,
    position and background colour, but for a random subset of samples one to three of the
    caption's attributes are swapped for wrong ones. The score mixes

        agreement  = fraction of the five caption attributes the image matches        (weight 0.6)
        aesthetics = contrast(shape, background) * (1 - 2 noise) * centring bonus      (weight 0.4)

    so it spreads over [0, 1] (not just two modes). Everything follows from ``seed`` through one
    ``numpy.random.Generator``; the set is written once under ``root`` (default
    ``$TGO_FAST_CACHE`` or ``~/.cache/tgo_fast``, ``synthetic-v<version>-n<N>-r<R>-s<seed>``) by an
    atomic rename, so concurrent ranks may all call this, and later calls memory-map the cache.

    Columns: id, prompt, image (PNG bytes), score, plus the generating attributes (shape, colour,
    size, position, background, agreement, aesthetics).
    """
    for name, value, low in (("num_samples", num_samples, 1), ("resolution", resolution, 8)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    root = Path(root) if root is not None else _default_cache_root() / _synthetic_dirname(num_samples, resolution, seed)
    if not _is_saved_dataset(root):
        _write_atomically(_generate_synthetic(num_samples, resolution, seed), root)
    return datasets.load_from_disk(str(root))


def _write_atomically(dataset: datasets.Dataset, root: Path) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        dataset.save_to_disk(str(staging))
        try:
            os.rename(staging, root)
        except OSError:
            if not _is_saved_dataset(root):  # not "another process got there first"
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_SYNTHETIC_FEATURES = datasets.Features(
    id=datasets.Value("string"), prompt=datasets.Value("string"), image=datasets.Image(),
    score=datasets.Value("float64"), shape=datasets.Value("string"), colour=datasets.Value("string"),
    size=datasets.Value("string"), position=datasets.Value("string"), background=datasets.Value("string"),
    agreement=datasets.Value("float64"), aesthetics=datasets.Value("float64"),
)
_ATTRIBUTE_VALUES = {"size": list(_SIZES), "colour": list(_COLOURS), "shape": list(_SHAPES),
                     "position": list(_POSITIONS), "background": list(_COLOURS)}


def _pixel_grid(resolution: int):
    coords = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
    return np.meshgrid(coords, coords, indexing="ij")  # (y, x) pixel centres in [0, 1]


def _draw_synthetic(rng: np.random.Generator, grid, max_noise: float = 0.25):
    """One synthetic sample: (true attributes, pixel noise std, (R, R, 3) uint8 render, noisy caption)."""
    truth = {"shape": _SHAPES[rng.integers(len(_SHAPES))]}
    truth["colour"], truth["background"] = rng.choice(list(_COLOURS), size=2, replace=False).tolist()
    truth["size"] = list(_SIZES)[rng.integers(len(_SIZES))]
    truth["position"] = list(_POSITIONS)[rng.integers(len(_POSITIONS))]
    noise = float(rng.uniform(0.0, max_noise))  # pixel noise std, as a fraction of 255
    image = _render(truth, noise, grid, rng)
    return truth, noise, image, _perturb_caption(truth, rng)


def synthetic_caption(attributes: dict[str, str]) -> str:
    """``"a {size} {colour} {shape} at the {position} on a {background} background"``."""
    return (f"a {attributes['size']} {attributes['colour']} {attributes['shape']} at the "
            f"{attributes['position']} on a {attributes['background']} background")


def synthetic_renders(num_samples: int, resolution: int = 64, seed: int = 0, *,
                      max_noise: float = 0.25) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    """Raw synthetic renders for pretraining (no PNG, no score): ``(images (N, R, R, 3) uint8, captions,
    true attributes)``. Same generator as :func:`synthetic_scored_dataset` (60 % of the captions name one to
    three wrong attributes, like noisy web captions); pixel noise std ~ U(0, ``max_noise``)·255."""
    rng = np.random.default_rng(seed)
    grid = _pixel_grid(resolution)
    images = np.empty((num_samples, resolution, resolution, 3), np.uint8)
    captions, truths = [], []
    for index in range(num_samples):
        truth, _, images[index], caption = _draw_synthetic(rng, grid, max_noise)
        captions.append(synthetic_caption(caption))
        truths.append(truth)
    return images, captions, truths


def _generate_synthetic(num_samples: int, resolution: int, seed: int) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    grid = _pixel_grid(resolution)
    columns: dict[str, list] = {name: [] for name in _SYNTHETIC_FEATURES}
    for index in range(num_samples):
        truth, noise, image, caption = _draw_synthetic(rng, grid)
        agreement = sum(caption[key] == truth[key] for key in _ATTRIBUTE_VALUES) / len(_ATTRIBUTE_VALUES)
        # aesthetics proxy: shape/background contrast, less noise, a centred subject
        contrast = float(np.linalg.norm(np.subtract(_COLOURS[truth["colour"]], _COLOURS[truth["background"]]))
                         / (255.0 * math.sqrt(3)))
        aesthetics = contrast * (1.0 - 2.0 * noise) * (1.0 if truth["position"] == "center" else 0.85)

        buffer = io.BytesIO()
        PILImage.fromarray(image, "RGB").save(buffer, format="PNG", compress_level=1)
        row = {"id": f"synthetic-{seed}-{index:06d}",
               "prompt": synthetic_caption(caption),
               "image": {"bytes": buffer.getvalue(), "path": None},
               "score": round(0.6 * agreement + 0.4 * aesthetics, 6),
               **truth, "agreement": agreement, "aesthetics": aesthetics}
        for name, value in row.items():
            columns[name].append(value)
    return datasets.Dataset.from_dict(columns, features=_SYNTHETIC_FEATURES)


def _render(truth: dict[str, str], noise: float, grid, rng: np.random.Generator) -> np.ndarray:
    """(R, R, 3) uint8: the shape over a vertical gradient (background colour down to 70% of it), plus noise."""
    yy, xx = grid
    pixels = np.asarray(_COLOURS[truth["background"]], np.float32) * (1.0 - 0.3 * yy)[..., None]
    cx, cy = np.asarray(_POSITIONS[truth["position"]]) + rng.uniform(-0.05, 0.05, size=2)
    r = _SIZES[truth["size"]]
    dx, dy = xx - cx, yy - cy
    if truth["shape"] == "circle":
        mask = dx * dx + dy * dy <= r * r
    elif truth["shape"] == "square":
        mask = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    else:  # triangle, apex up: the half-width grows from 0 at the top to r at the bottom
        mask = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    pixels[mask] = _COLOURS[truth["colour"]]
    pixels += rng.normal(0.0, 255.0 * noise, size=pixels.shape).astype(np.float32)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _perturb_caption(truth: dict[str, str], rng: np.random.Generator) -> dict[str, str]:
    """The true attributes with 0 (40%), 1 (30%), 2 (20%) or 3 (10%) of them swapped for wrong ones."""
    caption = {key: truth[key] for key in _ATTRIBUTE_VALUES}
    num_wrong = int(rng.choice(4, p=[0.4, 0.3, 0.2, 0.1]))
    for key in rng.choice(list(caption), size=num_wrong, replace=False).tolist():
        caption[key] = rng.choice([v for v in _ATTRIBUTE_VALUES[key] if v != caption[key]]).item()
    return caption


# ----------------------------------------------------------------------------------------------
# torch side
# ----------------------------------------------------------------------------------------------
def _to_pil(value: Any) -> PILImage.Image:
    if isinstance(value, PILImage.Image):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return PILImage.open(io.BytesIO(value))
    if isinstance(value, (str, os.PathLike)):
        return PILImage.open(value)
    raise TypeError(f"image: expected a PIL image, bytes, a path or a datasets.Image dict, got {type(value).__name__}")


def resize_center_crop(image: PILImage.Image, resolution: int) -> PILImage.Image:
    """Resize the shorter side to ``resolution`` (bilinear), then crop the centre square."""
    width, height = image.size
    if (width, height) != (resolution, resolution):
        scale = resolution / min(width, height)
        new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        image = image.resize(new_size, PILImage.Resampling.BILINEAR)
        left = int(round((new_size[0] - resolution) / 2.0))
        top = int(round((new_size[1] - resolution) / 2.0))
        image = image.crop((left, top, left + resolution, top + resolution))
    return image


def image_to_tensor(image: PILImage.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) float32 in [-1, 1] (RGB; alpha dropped, greyscale expanded)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0)


VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")  # decoded by diffusers' load_video (imageio)
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # the frames of a frames directory


def load_clip(value: Any, resolution: int, *, num_frames: int | None = None, fps: int | None = None) -> torch.Tensor:
    """A row's ``image`` value → pixels in [-1, 1], resized and centre-cropped like an image:
    (3, R, R) for a still image, (3, F, R, R) for a clip (a video file, an animated GIF/WebP or a directory
    of frame images sorted by file name).

    A clip's frames are taken from its start at ``fps`` (every ``source_fps / fps``-th frame when the source
    records its frame rate; every frame otherwise): ``num_frames`` of them, or all that fit when None.
    A source that cannot be read, or that is too short for ``num_frames``, is a ValueError naming it.
    """
    value = (value.get("bytes") or value.get("path")) if isinstance(value, dict) else value
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if path is not None and os.path.isdir(path):
        files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise ValueError(f"frames directory {path!r} holds no frame image ({', '.join(FRAME_SUFFIXES)})")
        picked = frame_indices(len(files), None, num_frames=num_frames, fps=fps, where=path)
        return torch.stack([_frame_tensor(files[i], resolution) for i in picked], dim=1)
    if path is not None and path.lower().endswith(VIDEO_SUFFIXES):
        frames, source_fps = _read_video(path)
    else:
        where = path or "image bytes"
        try:
            image = _to_pil(value)
        except (OSError, SyntaxError) as error:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"cannot read {where!r} as an image or a clip: {error}") from error
        with image:
            if getattr(image, "n_frames", 1) == 1:
                return image_to_tensor(resize_center_crop(image, resolution))
            duration = image.info.get("duration")  # ms per frame (GIF, WebP), read at the first frame
            source_fps = 1000.0 / duration if duration else None
            frames = [frame.convert("RGB") for frame in ImageSequence.Iterator(image)]
    picked = frame_indices(len(frames), source_fps, num_frames=num_frames, fps=fps, where=path or "image bytes")
    return torch.stack([image_to_tensor(resize_center_crop(frames[i], resolution)) for i in picked], dim=1)


def frame_indices(count: int, source_fps: float | None, *, num_frames: int | None, fps: int | None,
                  where: str = "clip") -> list[int]:
    """Indices of the frames of a ``count``-frame clip taken at ``fps``: ⌊k · source_fps / fps⌋ for k = 0, 1, …
    (stride 1 when either rate is unknown), ``num_frames`` of them or all that fit."""
    stride = source_fps / fps if source_fps and fps else 1.0
    available = math.floor((count - 1) / stride) + 1
    if num_frames is not None and num_frames > available:
        at = f" at {fps} fps (source {source_fps:g} fps)" if stride != 1.0 else ""
        raise ValueError(f"{where!r} gives {available} frames{at}, fewer than num_frames={num_frames}: "
                         "use longer clips or a smaller num_frames")
    return [math.floor(k * stride) for k in range(available if num_frames is None else num_frames)]


def _frame_tensor(path: Path, resolution: int) -> torch.Tensor:
    try:
        with PILImage.open(path) as frame:
            return image_to_tensor(resize_center_crop(frame, resolution))
    except (OSError, SyntaxError) as error:
        raise ValueError(f"cannot read frame {str(path)!r} as an image: {error}") from error


def _read_video(path: str) -> tuple[list[PILImage.Image], float | None]:
    """Every frame of a video file and its frame rate, through diffusers' ``load_video`` (imageio + ffmpeg)."""
    try:
        import imageio_ffmpeg  # noqa: F401  (load_video's decoder)
    except ImportError as error:
        raise ImportError(f"reading the video {path!r} needs imageio and imageio-ffmpeg: "
                          "pip install 'tgo_fast[video]' (or give the clip as a directory of frames or a GIF)") from error
    from diffusers.utils import load_video

    try:
        frames, source_fps = load_video(path, return_fps=True)
    except Exception as error:  # imageio/ffmpeg raise several types for a corrupt or unsupported file
        raise ValueError(f"cannot read the video {path!r}: {type(error).__name__}: {error}") from error
    if not frames:
        raise ValueError(f"the video {path!r} holds no frame")
    return frames, source_fps


class ScoredImageDataset(torch.utils.data.Dataset):
    """Map-style torch view of a scored ``datasets.Dataset``: decoded, resized, centre-cropped.

    ``dataset[i]`` -> ``{"index": i, "id": str, "prompt": str, "pixel_values": (3, R, R) float32 in
    [-1, 1], "score": float}``; a clip row (video file, animated image, frames directory) gives
    ``pixel_values`` (3, F, R, R), ``num_frames`` frames at ``fps`` (:func:`load_clip`). Deterministic (no
    random augmentation), so a cached latent for index ``i`` stays valid across epochs and runs.
    """

    def __init__(self, dataset: datasets.Dataset, resolution: int = 64, *, num_frames: int | None = None,
                 fps: int | None = None):
        if isinstance(dataset, datasets.IterableDataset):
            raise TypeError("dataset: ScoredImageDataset needs a map-style datasets.Dataset; load with "
                            "streaming=False, or map the transform over the IterableDataset yourself")
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(f"dataset: expected a datasets.Dataset, got {type(dataset).__name__}")
        _check_columns(dataset.column_names, "dataset")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution: expected a positive int, got {resolution!r}")
        for name, value in (("num_frames", num_frames), ("fps", fps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected a positive int or None, got {value!r}")
        image_feature = dataset.features.get("image")
        if isinstance(image_feature, datasets.Image) and image_feature.decode:  # load_clip decodes (videos too)
            dataset = dataset.cast_column("image", datasets.Image(decode=False))
        self.dataset = dataset
        self.resolution = resolution
        self.num_frames, self.fps = num_frames, fps

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} samples")
        index %= len(self)
        return prepare_scored_example(self.dataset[index], index, self.resolution, num_frames=self.num_frames,
                                      fps=self.fps)


def prepare_scored_example(row: dict[str, Any], index: int, resolution: int, *, num_frames: int | None = None,
                           fps: int | None = None) -> dict[str, Any]:
    """One row of a scored dataset -> the ``ScoredImageDataset`` item (for streams, row by row)::

        for i, row in enumerate(load_scored_dataset(src, streaming=True)):
            item = prepare_scored_example(row, i, 512)
    """
    return {
        "index": index,
        "id": str(row["id"]) if row.get("id") is not None else str(index),
        "prompt": row["prompt"],
        "pixel_values": load_clip(row["image"], resolution, num_frames=num_frames, fps=fps),
        "score": float(row["score"]),
    }


def collate_scored(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``ScoredImageDataset`` items: index (B,) int64, id/prompt lists, pixel_values (B, 3, R, R) (or clips
    (B, 3, F, R, R)), score (B,) float64."""
    if len(examples) == 0:
        raise ValueError("examples: cannot collate an empty batch")
    shapes = sorted({tuple(e["pixel_values"].shape) for e in examples})
    if len(shapes) > 1:
        raise ValueError(f"examples: pixel_values of shapes {shapes} cannot be batched: the batch mixes images and "
                         "clips or clips of different lengths; set num_frames (ScoredImageDataset) or keep images "
                         "and videos in separate datasets")
    return {
        "index": torch.tensor([e["index"] for e in examples], dtype=torch.long),
        "id": [e["id"] for e in examples],
        "prompt": [e["prompt"] for e in examples],
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "score": torch.tensor([e["score"] for e in examples], dtype=torch.float64),
    }


def dataset_scores(dataset) -> torch.Tensor:
    """All scores of a dataset as a (N,) float64 tensor, read from the ``score`` column (no image decoded).

    Accepts a ``datasets.Dataset``, a ``ScoredImageDataset`` or a ``datasets.IterableDataset`` (iterated
    over the score column only).
    """
    values = _read_column(dataset, "score")
    if isinstance(values, list):
        return torch.tensor(values, dtype=torch.float64)
    return torch.from_numpy(values.cast(pa.float64()).to_numpy().copy())


def dataset_prompts(dataset) -> list[str]:
    """All prompts of a dataset (same inputs as :func:`dataset_scores`; no image decoded)."""
    values = _read_column(dataset, "prompt")
    return values if isinstance(values, list) else values.to_pylist()


def dataset_groups(dataset) -> list[str]:
    """Each sample's prompt group, for per-prompt thresholds and DPO pairs: the optional ``group`` column (as str)
    when the dataset has one, else the prompt text (same inputs as :func:`dataset_scores`)."""
    columns = dataset.dataset.column_names if isinstance(dataset, ScoredImageDataset) else dataset.column_names
    if columns is not None and "group" in columns:
        values = _read_column(dataset, "group")
        values = values if isinstance(values, list) else values.to_pylist()
        missing = next((row for row, value in enumerate(values) if value is None), None)
        if missing is not None:
            raise _row_error("dataset", missing, "missing value in column 'group' (every row needs one when the "
                                                 "column is present)")
        return [str(value) for value in values]
    return dataset_prompts(dataset)


def _read_column(dataset, name: str):
    """One column without decoding images: a pyarrow array (map-style, honours select/shuffle) or a list (stream)."""
    if isinstance(dataset, ScoredImageDataset):
        dataset = dataset.dataset
    if isinstance(dataset, datasets.Dataset):
        if name not in dataset.column_names:
            raise ValueError(f"dataset: no {name!r} column (columns: {dataset.column_names})")
        return dataset.select_columns([name]).with_format("arrow")[name]
    if isinstance(dataset, datasets.IterableDataset):
        return [row[name] for row in dataset.select_columns([name])]
    raise TypeError(f"dataset: expected a datasets.Dataset, IterableDataset or ScoredImageDataset, "
                    f"got {type(dataset).__name__}")
