"""Command lines of ``scripts/generate.py``, ``scripts/score.py`` and ``scripts/evaluate.py``: argparse → one
library call. Launch them as ``python``, ``torchrun --nproc_per_node N`` or ``deepspeed --num_gpus N``."""
from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist

from tgo_fast.models import ADAPTERS

from .evaluate import evaluate, summary_markdown
from .generate import DTYPES, ModelSource, generate, run_base, trained_run
from .prompts import load_prompts
from .score import score
from .shards import init_distributed_from_env

__all__ = ["evaluate_main", "generate_main", "score_main"]


def generate_main(argv: list[str] | None = None) -> None:
    """``scripts/generate.py``: images and manifest.jsonl from a base model or a trained run."""
    parser = _parser("Generate images (out/images/<prompt_index>_<k>.png) and out/manifest.jsonl; sharded over "
                     "the ranks of a torchrun/deepspeed launch, resumable (rerun the same command).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=sorted(ADAPTERS), help="model family of a base model")
    source.add_argument("--run", help="trained run directory (config.yaml + final/unet|transformer|lora)")
    parser.add_argument("--pretrained", default=None,
                        help="with --model: hub id, local diffusers directory or 'builtin'; omitted = tiny random init")
    parser.add_argument("--resolution", type=int, default=None, help="with --model: image side (default: the model's)")
    _add_prompt_arguments(parser)
    _add_sampling_arguments(parser)
    parser.add_argument("--chunk_size", type=int, default=32,
                        help="images per resumable chunk, the unit a rank takes and a rerun skips (default: 32)")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)

    def run() -> None:
        if args.run is not None and (args.pretrained is not None or args.resolution is not None):
            raise ValueError("--pretrained and --resolution go with --model; a run brings its own (config.yaml)")
        source = (trained_run(args.run) if args.run is not None
                  else ModelSource(args.model, args.pretrained, resolution=args.resolution))
        rows = generate(source, load_prompts(args.prompts, args.num_prompts), args.out, chunk_size=args.chunk_size,
                        **_sampling(args))
        _print_main(f"{len(rows)} images → {args.out}/manifest.jsonl")

    _run(parser, run)


def score_main(argv: list[str] | None = None) -> None:
    """``scripts/score.py``: a scored dataset (prompt, image, score, id, ...) from a manifest and a reward."""
    parser = _parser("Score a manifest's images with a reward into a scored dataset (JSON lines) that "
                     "tgo_fast.data.load_scored_dataset and the trainer's --data read directly.")
    parser.add_argument("--manifest", required=True, help="manifest.jsonl written by scripts/generate.py "
                                                          "(rows with prompt and image relative to the file)")
    parser.add_argument("--reward", required=True, help="'builtin' (the synthetic world's score) or "
                                                        "'package.module:function'")
    parser.add_argument("--out", required=True, help="output .jsonl file (chunks go to <out stem>.shards/ beside it)")
    parser.add_argument("--batch_size", type=int, default=32, help="images per reward call (default: 32)")
    parser.add_argument("--chunk_size", type=int, default=256,
                        help="images per resumable chunk, the unit a rank takes and a rerun skips (default: 256)")
    args = parser.parse_args(argv)

    def run() -> None:
        rows = score(args.manifest, args.reward, args.out, batch_size=args.batch_size, chunk_size=args.chunk_size)
        _print_main(f"{len(rows)} scored images → {args.out}")

    _run(parser, run)


def evaluate_main(argv: list[str] | None = None) -> None:
    """``scripts/evaluate.py``: base vs policy at identical seeds, scored, summarised."""
    parser = _parser("Evaluate a trained run against its base on the same prompts and seeds: out/samples.jsonl, "
                     "summary.json, summary.md, score_distribution.png, before_after.png (see docs/pipeline.md).")
    parser.add_argument("--run", required=True, help="trained run directory (the policy)")
    parser.add_argument("--base_model", choices=sorted(ADAPTERS), default=None,
                        help="model family of the base (default: the run's own)")
    parser.add_argument("--base_pretrained", default=None,
                        help="base weights: hub id, local directory or 'builtin' (default: the run's own base when "
                             "neither --base_* is given, else tiny random init); resolution and tiny seed are the run's")
    _add_prompt_arguments(parser, default_prompts="builtin:heldout", default_num_prompts=128)
    parser.add_argument("--reward", action="append", default=None,
                        help="reward spec, 'builtin' or 'package.module:function'; repeat for several (default: builtin)")
    _add_sampling_arguments(parser, default_images_per_prompt=2)
    parser.add_argument("--num_before_after", type=int, default=6, help="prompts shown in before_after.png (default: 6)")
    parser.add_argument("--out", default=None, help="output directory (default: <run>/eval)")
    args = parser.parse_args(argv)

    def run() -> None:
        base = run_base(args.run)
        if args.base_model is not None or args.base_pretrained is not None:
            base = ModelSource(args.base_model or base.model, args.base_pretrained, resolution=base.resolution,
                               tiny_seed=base.tiny_seed)
        out = args.out or f"{args.run}/eval"
        summary = evaluate(trained_run(args.run), load_prompts(args.prompts, args.num_prompts), out, base=base,
                           rewards=args.reward or ["builtin"], num_before_after=args.num_before_after,
                           **_sampling(args))
        _print_main(summary_markdown(summary) + f"\n\n→ {out}/summary.json")

    _run(parser, run)


# ----------------------------------------------------------------------------------------------
def _parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--local_rank", type=int, default=None,
                        help="set by the deepspeed launcher; the rank is read from the environment (LOCAL_RANK)")
    return parser


def _add_prompt_arguments(parser: argparse.ArgumentParser, *, default_prompts: str | None = None,
                          default_num_prompts: int | None = None) -> None:
    parser.add_argument("--prompts", required=default_prompts is None, default=default_prompts,
                        help="a .txt file (one per line, '#' comments), a .jsonl/.json/.csv/.parquet file with a "
                             "'prompt' column, builtin:train or builtin:heldout"
                             + ("" if default_prompts is None else f" (default: {default_prompts})"))
    parser.add_argument("--num_prompts", type=int, default=default_num_prompts,
                        help=f"use the first N prompts (default: {default_num_prompts or 'all'})")


def _add_sampling_arguments(parser: argparse.ArgumentParser, *, default_images_per_prompt: int = 1) -> None:
    parser.add_argument("--images_per_prompt", type=int, default=default_images_per_prompt, help=f"images per prompt, K (default: {default_images_per_prompt})")
    parser.add_argument("--seed", type=int, default=0,
                        help="base seed; image k of prompt i uses SeedSequence([seed, i, k]) (default: 0)")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="classifier-free guidance (default: the family's validation guidance)")
    parser.add_argument("--num_inference_steps", type=int, default=20, help="sampling steps (default: 20)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per pipeline call; does not change the images (default: 8)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="precision of every model component (default: fp32)")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return dict(images_per_prompt=args.images_per_prompt, seed=args.seed, guidance_scale=args.guidance_scale,
                num_inference_steps=args.num_inference_steps, batch_size=args.batch_size, dtype=args.dtype)


def _run(parser: argparse.ArgumentParser, run: Callable[[], None]) -> None:
    """Run under the launcher's process group; a ValueError (bad input) becomes a usage error."""
    with _process_group():
        try:
            run()
        except ValueError as error:
            parser.error(str(error))


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    init_distributed_from_env()
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _print_main(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message)
