"""Command lines of ``scripts/generate.py``, ``scripts/score.py`` and ``scripts/evaluate.py``: argparse → one
library call. Launch them as ``python``, ``torchrun --nproc_per_node N`` or ``deepspeed --num_gpus N``."""
from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist

from tgo_fast.models import ADAPTERS

from .evaluate import evaluate, summary_markdown
from .generate import DTYPES, ModelSource, generate, run_base, trained_run
from .pickapic import pickapic_to_scored
from .prompts import PICKAPIC_DEFAULT_SPLIT, load_prompt_set, load_prompts
from .report import evaluate_report, report_markdown
from .score import score
from .shards import init_distributed_from_env

__all__ = ["evaluate_main", "generate_main", "model_source", "pickapic_main", "score_main"]

_REWARD_HELP = ("reward spec NAME[=PRETRAINED][,KEY=VALUE...]: builtin, package.module:function, or a reward model of "
                "tgo_fast.rewards with its checkpoint, e.g. pickscore=yuvalkirstain/PickScore_v1")


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
    parser.add_argument("--reward", action="append", required=True,
                        help=_REWARD_HELP + "; repeat for several: one score_<NAME> column each")
    parser.add_argument("--score_column", default=None,
                        help="with several --reward: the NAME whose score fills 'score' (default: the first)")
    parser.add_argument("--out", required=True, help="output .jsonl file (chunks go to <out stem>.shards/ beside it)")
    parser.add_argument("--batch_size", type=int, default=32, help="images per reward call (default: 32)")
    parser.add_argument("--chunk_size", type=int, default=256,
                        help="images per resumable chunk, the unit a rank takes and a rerun skips (default: 256)")
    args = parser.parse_args(argv)

    def run() -> None:
        rewards = args.reward[0] if len(args.reward) == 1 else args.reward
        rows = score(args.manifest, rewards, args.out, score_column=args.score_column, batch_size=args.batch_size,
                     chunk_size=args.chunk_size)
        _print_main(f"{len(rows)} scored images → {args.out}")

    _run(parser, run)


def evaluate_main(argv: list[str] | None = None) -> None:
    """``scripts/evaluate.py``: base vs a run (``--run``), or a report over models × prompt sets × rewards (``--model``)."""
    parser = _parser("Evaluate a trained run against its base on the same prompts and seeds (--run: out/samples.jsonl, "
                     "summary.json, summary.md, score_distribution.png, before_after.png), or several models against a "
                     "base over several prompt sets and rewards (--model, repeated: out/report.md, report.json, "
                     "samples.jsonl, score_distribution_<reward>.png); see docs/pipeline.md.")
    models = parser.add_mutually_exclusive_group(required=True)
    models.add_argument("--run", help="trained run directory (the policy), compared with its own base")
    models.add_argument("--model", action="append", metavar="NAME=SOURCE",
                        help="report mode, repeat: a model to compare with the base; SOURCE is a trained run directory "
                             "or FAMILY:PRETRAINED (an exported pipeline folder or hub id, e.g. sd15:runs/x/final)")
    parser.add_argument("--base", default=None, metavar="SOURCE",
                        help="report mode: the base, a run directory or FAMILY:PRETRAINED (default: the base model of "
                             "the first --model that is a trained run)")
    parser.add_argument("--base_model", choices=sorted(ADAPTERS), default=None,
                        help="with --run: model family of the base (default: the run's own)")
    parser.add_argument("--base_pretrained", default=None,
                        help="with --run: base weights, hub id, local directory or 'builtin' (default: the run's own "
                             "base when neither --base_* is given, else tiny random init); resolution and tiny seed "
                             "are the run's")
    _add_prompt_arguments(parser, default_prompts="builtin:heldout", default_num_prompts=128, repeatable=True)
    parser.add_argument("--reward", action="append", default=None,
                        help=_REWARD_HELP + "; repeat for several (default: builtin)")
    _add_sampling_arguments(parser, default_images_per_prompt=2)
    parser.add_argument("--num_before_after", type=int, default=6, help="with --run: prompts shown in before_after.png (default: 6)")
    parser.add_argument("--out", default=None, help="output directory (default: <run>/eval; required with --model)")
    args = parser.parse_args(argv)

    def run() -> None:
        prompt_specs = args.prompts or ["builtin:heldout"]
        rewards = args.reward or ["builtin"]
        if args.model is not None:
            if args.base_model is not None or args.base_pretrained is not None:
                raise ValueError("--base_model / --base_pretrained go with --run; with --model name the base with --base")
            if args.out is None:
                raise ValueError("--out: name the report's output directory")
            models = _report_models(args.model, args.base)
            prompt_sets = [load_prompt_set(spec, args.num_prompts) for spec in prompt_specs]
            report = evaluate_report(models, prompt_sets, args.out, rewards=rewards, **_sampling(args))
            _print_main(report_markdown(report) + f"\n\n→ {args.out}/report.json")
            return
        if args.base is not None:
            raise ValueError("--base goes with --model; with --run use --base_model / --base_pretrained")
        if len(prompt_specs) != 1:
            raise ValueError("--run evaluates one prompt set; for several, compare models with --model NAME=SOURCE")
        base = run_base(args.run)
        if args.base_model is not None or args.base_pretrained is not None:
            base = ModelSource(args.base_model or base.model, args.base_pretrained, resolution=base.resolution,
                               tiny_seed=base.tiny_seed)
        out = args.out or f"{args.run}/eval"
        summary = evaluate(trained_run(args.run), load_prompts(prompt_specs[0], args.num_prompts), out, base=base,
                           rewards=rewards, num_before_after=args.num_before_after, **_sampling(args))
        _print_main(summary_markdown(summary) + f"\n\n→ {out}/summary.json")

    _run(parser, run)


def pickapic_main(argv: list[str] | None = None) -> None:
    """``scripts/pickapic_to_scored.py``: a local Pick-a-Pic v2 split → the scored format (win fraction per image)."""
    parser = argparse.ArgumentParser(description="Convert a local Pick-a-Pic v2 download (parquet: image_0_uid, "
                                     "image_1_uid, label_0, label_1, caption, jpg_0, jpg_1) into the scored format: "
                                     "out/images/<uid>.jpg and out/scored.jsonl, score = the image's win fraction over "
                                     "its comparisons (ties 1/2). The trainer's --data reads out/scored.jsonl.")
    parser.add_argument("--source", required=True, help="hub snapshot directory (data/<split>-*.parquet), a directory "
                                                        "of <split>-*.parquet, or one parquet file")
    parser.add_argument("--split", default="train", help="split to convert (default: train)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--batch_size", type=int, default=256, help="parquet rows read at a time (default: 256)")
    args = parser.parse_args(argv)
    try:
        rows = pickapic_to_scored(args.source, args.out, split=args.split, batch_size=args.batch_size)
    except ValueError as error:
        parser.error(str(error))
    print(f"{len(rows)} images scored → {args.out}/scored.jsonl")


def model_source(text: str) -> ModelSource:
    """A model on the command line: a trained run directory (its policy) or ``FAMILY:PRETRAINED``."""
    if (Path(text) / "config.yaml").is_file():
        return trained_run(text)
    family, sep, pretrained = text.partition(":")
    if not sep or family not in ADAPTERS or not pretrained:
        raise ValueError(f"model source {text!r}: expected a trained run directory (with config.yaml) or "
                         f"FAMILY:PRETRAINED with FAMILY in {sorted(ADAPTERS)} (e.g. sd15:runs/x/final, "
                         "sdxl:stabilityai/stable-diffusion-xl-base-1.0)")
    return ModelSource(family, pretrained)


def _report_models(model_args: list[str], base_arg: str | None) -> dict[str, ModelSource]:
    """``{"base": ..., NAME: ...}`` from ``--model NAME=SOURCE`` and ``--base``."""
    models = {}
    for item in model_args:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"--model {item!r}: expected NAME=SOURCE (e.g. tgo=runs/sd15_tgo)")
        if name in models or name == "base":
            raise ValueError(f"--model {item!r}: the name {name!r} is {'the base' if name == 'base' else 'taken'}; "
                             "give each model its own name")
        models[name] = model_source(source)
    if base_arg is not None:
        base = model_source(base_arg)
    else:
        runs = [source for source in models.values() if source.run is not None]
        if not runs:
            raise ValueError("--base: no --model is a trained run, so there is no default base; name one")
        base = run_base(runs[0].run)
    return {"base": base, **models}


# ----------------------------------------------------------------------------------------------
def _parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--local_rank", type=int, default=None,
                        help="set by the deepspeed launcher; the rank is read from the environment (LOCAL_RANK)")
    return parser


def _add_prompt_arguments(parser: argparse.ArgumentParser, *, default_prompts: str | None = None,
                          default_num_prompts: int | None = None, repeatable: bool = False) -> None:
    parser.add_argument("--prompts", required=default_prompts is None, default=None if repeatable else default_prompts,
                        action="append" if repeatable else "store",
                        help="prompt set: builtin:train | builtin:heldout, text:FILE, pickapic:PATH[?split=S] (default "
                             f"split {PICKAPIC_DEFAULT_SPLIT}), parti:PartiPrompts.tsv[?category=C], "
                             "hpsv2:DIR_OR_FILE[?style=S], or a .txt file (one per line, '#' comments) or "
                             ".jsonl/.json/.csv/.parquet file with a 'prompt' column"
                             + (" (repeat with --model for several)" if repeatable else "")
                             + ("" if default_prompts is None else f" (default: {default_prompts})"))
    parser.add_argument("--num_prompts", type=int, default=default_num_prompts,
                        help=f"use the first N prompts of each set (default: {default_num_prompts or 'all'})")


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
