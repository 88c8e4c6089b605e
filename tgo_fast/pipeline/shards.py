"""Work split into fixed chunks, spread over ranks, resumable after a kill, merged into one manifest.

    rows = run_in_chunks(items, process, shard_dir=out / "shards", manifest=out / "manifest.jsonl",
                         job={"what": ...}, chunk_size=32)

- Chunk c is ``items[c * chunk_size:(c + 1) * chunk_size]``; the chunking depends on ``chunk_size`` only,
  never on the number of ranks, so a job killed under N ranks resumes under M.
- ``process(chunk_items) -> rows`` (JSON-serialisable dicts); the rows of chunk c are written to
  ``shard_dir/chunk_<c>.jsonl`` atomically (temporary file + ``os.replace``), so a chunk file exists only
  when the chunk is complete. Files a chunk produces on the side (images) are written before its rows.
- On (re)start every rank lists the finished chunks; the unfinished ones are dealt round-robin:
  the i-th unfinished chunk goes to rank i % world_size (on a fresh job: chunk c to rank c % world_size).
- ``shard_dir/job.json`` records ``job`` (plus the chunking): a directory holding another job's chunks is
  a ValueError rather than a silent mix.
- After a barrier, rank 0 concatenates the chunk files in chunk order into ``manifest`` (atomically); after a
  second barrier every rank returns the merged rows.

Ranks are those of ``torch.distributed`` (torchrun / deepspeed, see :func:`init_distributed_from_env`);
without a process group this is a world of one. All ranks must see the same filesystem under ``shard_dir``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from tgo_fast.trainer import distributed as D

__all__ = ["init_distributed_from_env", "read_jsonl", "run_in_chunks", "write_atomically", "write_jsonl_atomically"]

Item = TypeVar("Item")
JOB_FILE = "job.json"


def init_distributed_from_env() -> None:
    """Join the process group a launcher (torchrun, deepspeed) describes in the environment; a no-op for a
    single process, so a plain ``python scripts/...`` never imports DeepSpeed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        D.init_distributed()


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def write_jsonl_atomically(path: Path, rows: Sequence[dict]) -> None:
    """``rows`` as JSON lines (UTF-8), written atomically."""
    write_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped); ValueError naming the line of a malformed row."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{os.fspath(path)!r} line {number}: not a JSON object ({error})") from error
    return rows


def run_in_chunks(
    items: Sequence[Item],
    process: Callable[[list[Item]], list[dict]],
    *,
    shard_dir: str | os.PathLike,
    manifest: str | os.PathLike,
    job: dict[str, Any],
    chunk_size: int,
    desc: str = "chunks",
) -> list[dict]:
    """Run ``process`` over ``items`` chunk by chunk on every rank (see the module docstring); the merged rows."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size!r}")
    shard_dir, manifest = Path(shard_dir), Path(manifest)
    chunks = [list(items[start:start + chunk_size]) for start in range(0, len(items), chunk_size)]
    _claim_shard_dir(shard_dir, {**job, "num_items": len(items), "chunk_size": chunk_size})
    D.barrier()  # job.json exists before anyone lists
    pending = [c for c in range(len(chunks)) if not _chunk_path(shard_dir, c).is_file()]
    D.barrier()  # everyone listed before anyone writes a chunk
    mine = pending[D.rank()::D.world_size()]
    with tqdm(total=sum(len(chunks[c]) for c in mine), desc=desc, disable=not D.is_main()) as bar:
        for c in mine:
            write_jsonl_atomically(_chunk_path(shard_dir, c), process(chunks[c]))
            bar.update(len(chunks[c]))
    D.barrier()
    if D.is_main():
        write_jsonl_atomically(manifest, _merge_chunks(shard_dir, len(chunks)))
    D.barrier()
    return read_jsonl(manifest)


def _chunk_path(shard_dir: Path, chunk: int) -> Path:
    return shard_dir / f"chunk_{chunk:06d}.jsonl"


def _claim_shard_dir(shard_dir: Path, job: dict[str, Any]) -> None:
    """Check that ``shard_dir`` is empty or holds this very job; rank 0 records the job in a fresh one."""
    job = json.loads(json.dumps(job))  # the form it takes once stored
    job_file = shard_dir / JOB_FILE
    if job_file.is_file():
        recorded = json.loads(job_file.read_text(encoding="utf-8"))
        if recorded != job:
            changed = sorted(key for key in {**recorded, **job} if recorded.get(key) != job.get(key))
            raise ValueError(
                f"{str(shard_dir)!r} holds the chunks of another job (differs in {', '.join(changed)}); "
                f"write to a new output directory, or delete {str(shard_dir)!r} to start this one afresh"
            )
        return
    if shard_dir.is_dir() and any(shard_dir.glob("chunk_*.jsonl")):
        raise ValueError(f"{str(shard_dir)!r} holds chunk files but no {JOB_FILE}; delete the directory to start afresh")
    if D.is_main():
        write_atomically(job_file, (json.dumps(job, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _merge_chunks(shard_dir: Path, num_chunks: int) -> list[dict]:
    rows = []
    for c in range(num_chunks):
        path = _chunk_path(shard_dir, c)
        if not path.is_file():
            raise ValueError(f"chunk {c} ({str(path)!r}) is missing after every rank finished; rerun to redo it")
        rows.extend(read_jsonl(path))
    return rows
