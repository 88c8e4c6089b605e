"""Pick-a-Pic v2 pairs → per-image scalar scores: the scored format TGO trains on, from human preferences.

    scores = image_win_fractions(rows["image_0_uid"], rows["image_1_uid"], rows["label_0"], rows["label_1"])
    pickapic_to_scored("/data/pickapic_v2", "/data/pickapic_scored", split="train")   # → scored.jsonl + images/

Each Pick-a-Pic row is one comparison of two images of one caption, ``label_0`` / ``label_1`` ∈ {1, 0.5, 0}
(0.5 each for a tie). An image's score is its win fraction over every comparison it appears in,

    score(u) = Σ_rows∋u label_u / #rows∋u,

so an image compared once keeps that comparison's label (1, 0.5 or 0), and ties count half.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from .shards import write_atomically, write_jsonl_atomically

__all__ = ["PICKAPIC_COLUMNS", "image_win_fractions", "pickapic_files", "pickapic_to_scored"]

PICKAPIC_COLUMNS = ("image_0_uid", "image_1_uid", "label_0", "label_1", "caption", "jpg_0", "jpg_1")
_LABEL_COLUMNS = PICKAPIC_COLUMNS[:5]  # the first pass reads no image bytes


def image_win_fractions(image_0_uids: Sequence[str], image_1_uids: Sequence[str], labels_0: Sequence[float],
                        labels_1: Sequence[float]) -> dict[str, tuple[float, int]]:
    """``{uid: (win fraction, number of comparisons)}`` over pairs (image_0, image_1) with their labels, in order
    of first appearance. Raises ValueError naming the pair of a label outside [0, 1] or of one image with itself.
    """
    if not len(image_0_uids) == len(image_1_uids) == len(labels_0) == len(labels_1):
        raise ValueError(f"image_win_fractions: expected equally long columns, got {len(image_0_uids)}, "
                         f"{len(image_1_uids)}, {len(labels_0)}, {len(labels_1)}")
    wins: dict[str, list[float]] = {}  # uid → [sum of labels, comparisons]
    for pair, (uid_0, uid_1, label_0, label_1) in enumerate(zip(image_0_uids, image_1_uids, labels_0, labels_1)):
        if (problem := _pair_problem(uid_0, uid_1, label_0, label_1)) is not None:
            raise ValueError(f"pair {pair}: {problem}")
        for uid, label in ((uid_0, label_0), (uid_1, label_1)):
            total = wins.setdefault(uid, [0.0, 0])
            total[0] += float(label)
            total[1] += 1
    return {uid: (total / count, count) for uid, (total, count) in wins.items()}


def pickapic_files(path: str | os.PathLike, split: str) -> list[Path]:
    """The parquet files of ``split`` in a local Pick-a-Pic v2 download: a hub snapshot (``data/<split>-*.parquet``),
    a directory of ``<split>-*.parquet``, or ``path`` itself when it is one parquet file."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    files = sorted(path.glob(f"data/{split}-*.parquet")) or sorted(path.glob(f"{split}-*.parquet"))
    if not files:
        raise ValueError(f"{str(path)!r} holds no {split}-*.parquet (under data/ or at the top); download the split, "
                         f"e.g. huggingface-cli download yuvalkirstain/pickapic_v2 --repo-type dataset "
                         f"--include 'data/{split}-*' --local-dir {path}")
    return files


def pickapic_to_scored(source: str | os.PathLike, out_dir: str | os.PathLike, *, split: str = "train",
                       batch_size: int = 256) -> list[dict]:
    """Write the scored format of a local Pick-a-Pic v2 split (:func:`pickapic_files`) into ``out_dir``:
    ``images/<uid>.jpg`` (the stored JPEG bytes, each image once) and ``scored.jsonl`` with rows
    ``{"id": uid, "prompt": caption, "image": "images/<uid>.jpg", "score": win fraction, "comparisons": n}``
    in order of first appearance. Two passes over the parquet files in record batches of ``batch_size``
    rows: the uid/label/caption columns, then the image bytes, so memory holds one batch of images.

    Returns the rows. Raises ValueError for a missing column (naming the file), a bad label (naming the
    file and row) or an image uid with two captions.
    """
    import pyarrow.parquet as pq

    files, out_dir = pickapic_files(source, split), Path(out_dir)
    for file in files:
        missing = [column for column in PICKAPIC_COLUMNS if column not in pq.read_schema(file).names]
        if missing:
            raise ValueError(f"{str(file)!r} lacks the Pick-a-Pic v2 column(s) {missing}; expected {list(PICKAPIC_COLUMNS)}")
    captions: dict[str, str] = {}
    columns = {name: [] for name in _LABEL_COLUMNS[:4]}
    for file, start, batch in _batches(files, _LABEL_COLUMNS, batch_size):
        for offset, row in enumerate(batch):
            for uid in (row["image_0_uid"], row["image_1_uid"]):
                if captions.setdefault(uid, row["caption"]) != row["caption"]:
                    raise ValueError(f"{str(file)!r} row {start + offset}: image {uid!r} appears with two captions, "
                                     f"{captions[uid]!r} and {row['caption']!r}")
            if (problem := _pair_problem(*(row[name] for name in columns))) is not None:
                raise ValueError(f"{str(file)!r} row {start + offset}: {problem}")
            for name in columns:
                columns[name].append(row[name])
    scores = image_win_fractions(*columns.values())

    written: set[str] = set()
    with tqdm(total=len(scores), desc="pickapic images") as bar:
        for _, _, batch in _batches(files, ("image_0_uid", "image_1_uid", "jpg_0", "jpg_1"), batch_size):
            for row in batch:
                for uid, jpg in ((row["image_0_uid"], row["jpg_0"]), (row["image_1_uid"], row["jpg_1"])):
                    if uid not in written:
                        write_atomically(out_dir / "images" / f"{uid}.jpg", jpg)
                        written.add(uid)
                        bar.update(1)
    rows = [{"id": uid, "prompt": captions[uid], "image": f"images/{uid}.jpg", "score": score, "comparisons": count}
            for uid, (score, count) in scores.items()]
    write_jsonl_atomically(out_dir / "scored.jsonl", rows)
    return rows


def _pair_problem(uid_0: str, uid_1: str, label_0: float, label_1: float) -> str | None:
    """What is wrong with one comparison, or None."""
    if uid_0 == uid_1:
        return f"image_0_uid == image_1_uid == {uid_0!r}; a comparison needs two images"
    for uid, label in ((uid_0, label_0), (uid_1, label_1)):
        if isinstance(label, bool) or not isinstance(label, (int, float)) or not 0.0 <= label <= 1.0:
            return f"label {label!r} of image {uid!r} is not a number in [0, 1]"
    return None


def _batches(files: list[Path], columns: Sequence[str], batch_size: int) -> Iterator[tuple[Path, int, list[dict]]]:
    """(file, first row index in the file, rows) per record batch of ``columns``."""
    import pyarrow.parquet as pq

    for file in files:
        start = 0
        for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_size, columns=list(columns)):
            rows = batch.to_pylist()
            yield file, start, rows
            start += len(rows)
