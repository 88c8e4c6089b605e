"""Evaluate a trained policy against its base: same prompts, same seeds, one or more rewards.

    summary = evaluate(trained_run("runs/tiny"), load_prompts("builtin:heldout", 128), "runs/tiny/eval",
                       images_per_prompt=2, rewards=["builtin"])

Output directory::

    base/  policy/          generate's output (images/, manifest.jsonl) + scores_<reward>.jsonl per reward
    samples.jsonl           one row per image: {"model": "base" | "policy", "prompt", "seed", "prompt_index", "k",
                            "id", "image": "<model>/images/...", "rewards": {reward: score}}
    summary.json            {"n": pairs, "rewards": {reward: {"base": {"mean", "median", "std"}, "policy": {...},
                                                              "win_rate": w, "win_rate_ci95": [lo, hi]}}}
    summary.md              the same as a Markdown table
    score_distribution.png  base vs policy score histograms, one panel per reward
    before_after.png        base row over policy row, same prompt and seed per column

A pair is the base and the policy image of one (prompt, seed). The win rate of the policy is the mean over
pairs of 1 (policy scores higher), 0.5 (tie) or 0; its 95 % interval is a percentile bootstrap
(``scipy.stats.bootstrap``, 9999 resamples, ``numpy.random.default_rng(0)``), null below two pairs.
``summary.json`` is :func:`summarize` of ``samples.jsonl``, so it can be recomputed from that file alone.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from tgo_fast.rewards import check_reward_prompts
from tgo_fast.trainer import distributed as D

from .generate import ModelSource, generate, run_base
from .reward_specs import load_reward_spec, parse_reward_specs
from .score import score
from .shards import read_jsonl, write_atomically, write_jsonl_atomically

__all__ = ["evaluate", "plot_before_after", "plot_score_distributions", "summarize", "summary_markdown", "win_rate"]

MODELS = ("base", "policy")
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0


def evaluate(
    policy: ModelSource,
    prompts: list[str],
    out_dir: str | os.PathLike,
    *,
    base: ModelSource | None = None,
    rewards: Sequence[str] = ("builtin",),
    images_per_prompt: int = 2,
    seed: int = 0,
    guidance_scale: float | None = None,
    num_inference_steps: int = 20,
    batch_size: int = 8,
    dtype: str = "fp32",
    num_before_after: int = 6,
) -> dict:
    """Generate from ``base`` (default: the run's own base model) and ``policy`` at identical seeds, score both
    with every reward, write the files of the module docstring; returns the summary on every rank.

    Every prompt is checked against every reward before anything is generated.
    """
    specs = parse_reward_specs(list(rewards))
    if base is None:
        if policy.run is None:
            raise ValueError("base: the policy is not a trained run, so it has no base of its own; pass base=")
        base = run_base(policy.run)
    for spec in specs:
        check_reward_prompts(load_reward_spec(spec, device=D.device()), prompts)
    out_dir = Path(out_dir)
    sampling = dict(images_per_prompt=images_per_prompt, seed=seed, guidance_scale=guidance_scale,
                    num_inference_steps=num_inference_steps, batch_size=batch_size, dtype=dtype)
    for name, source in zip(MODELS, (base, policy)):
        generate(source, prompts, out_dir / name, **sampling)
        for spec in specs:
            score(out_dir / name / "manifest.jsonl", spec.text, scores_path(out_dir / name, spec.name))
    if D.is_main():
        _write_report(out_dir, [spec.name for spec in specs], num_before_after)
    D.barrier()
    return json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))


def scores_path(model_dir: Path, reward_name: str) -> Path:
    """Where a model's images' scores under one reward go: ``<model_dir>/scores_<name>.jsonl``."""
    return model_dir / f"scores_{re.sub(r'[^A-Za-z0-9_.-]+', '-', reward_name)}.jsonl"


def _write_report(out_dir: Path, rewards: list[str], num_before_after: int) -> None:
    samples_path = out_dir / "samples.jsonl"
    write_jsonl_atomically(samples_path, _collect_samples(out_dir, rewards))
    summary = summarize(samples_path)
    write_atomically(out_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    write_atomically(out_dir / "summary.md", (summary_markdown(summary) + "\n").encode("utf-8"))
    samples = read_jsonl(samples_path)
    plot_score_distributions(samples, out_dir / "score_distribution.png")
    plot_before_after(samples, out_dir, out_dir / "before_after.png", num_before_after)


def _collect_samples(out_dir: Path, rewards: list[str]) -> list[dict]:
    """One row per generated image of each model, with its score under every reward."""
    samples = []
    for name in MODELS:
        scored = {spec: read_jsonl(scores_path(out_dir / name, spec)) for spec in rewards}
        for index, row in enumerate(read_jsonl(out_dir / name / "manifest.jsonl")):
            samples.append({"model": name, "prompt": row["prompt"], "seed": row["seed"],
                            "prompt_index": row["prompt_index"], "k": row["k"], "id": row["id"],
                            "image": f"{name}/{row['image']}",
                            "rewards": {spec: scored[spec][index]["score"] for spec in rewards}})
    return samples


# ----------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------
def summarize(samples_path: str | os.PathLike) -> dict:
    """The summary (module docstring) of a ``samples.jsonl``: per reward, base and policy statistics
    (mean, median, population std) and the policy's win rate over the (prompt, seed) pairs with its 95 % CI.

    Raises ValueError when a row lacks a field, the models' (prompt, seed) sets differ, a (prompt, seed)
    repeats within a model, or the rows do not all carry the same rewards.
    """
    pairs = _paired_rewards(read_jsonl(samples_path), os.fspath(samples_path))
    base_rows, policy_rows = pairs["base"], pairs["policy"]
    summary = {"n": len(base_rows), "rewards": {}}
    for name in base_rows[0]:
        base_scores = np.array([row[name] for row in base_rows], dtype=np.float64)
        policy_scores = np.array([row[name] for row in policy_rows], dtype=np.float64)
        rate, interval = win_rate(policy_scores, base_scores)
        summary["rewards"][name] = {"base": _statistics(base_scores), "policy": _statistics(policy_scores),
                                    "win_rate": rate, "win_rate_ci95": interval}
    return summary


def _paired_rewards(samples: list[dict], where: str) -> dict[str, list[dict[str, float]]]:
    """``{"base": [rewards], "policy": [rewards]}`` aligned by (prompt, seed), in the base rows' order."""
    by_model: dict[str, dict[tuple, dict[str, float]]] = {name: {} for name in MODELS}
    for index, row in enumerate(samples):
        missing = [field for field in ("model", "prompt", "seed", "rewards") if field not in row]
        if missing or row["model"] not in by_model:
            raise ValueError(f"{where!r} row {index}: expected fields model ('base' or 'policy'), prompt, seed, "
                             f"rewards; got {sorted(row)} with model={row.get('model')!r}")
        key = (row["prompt"], row["seed"])
        if key in by_model[row["model"]]:
            raise ValueError(f"{where!r} row {index}: a second {row['model']} sample for prompt {key[0]!r}, seed {key[1]}")
        by_model[row["model"]][key] = row["rewards"]
    base, policy = by_model["base"], by_model["policy"]
    if not base or set(base) != set(policy):
        raise ValueError(f"{where!r}: every (prompt, seed) needs one base and one policy sample; "
                         f"{len(set(base) ^ set(policy))} of {len(set(base) | set(policy))} are unpaired")
    names = {tuple(sorted(rewards)) for rewards in (*base.values(), *policy.values())}
    if len(names) != 1 or not next(iter(names)):
        raise ValueError(f"{where!r}: every row must carry the same non-empty set of rewards, got {sorted(names)}")
    return {"base": list(base.values()), "policy": [policy[key] for key in base]}


def _statistics(scores: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(scores)), "median": float(np.median(scores)), "std": float(np.std(scores))}


def win_rate(policy_scores: Sequence[float], base_scores: Sequence[float]) -> tuple[float, list[float] | None]:
    """Mean over pairs of 1 (policy > base), 0.5 (tie), 0 (policy < base), and its 95 % percentile-bootstrap
    interval ``[lo, hi]`` (None for fewer than two pairs)."""
    policy_scores, base_scores = np.asarray(policy_scores, np.float64), np.asarray(base_scores, np.float64)
    if policy_scores.shape != base_scores.shape or policy_scores.ndim != 1 or policy_scores.size == 0:
        raise ValueError(f"win_rate: expected two equally long non-empty 1-D score lists, got shapes "
                         f"{policy_scores.shape} and {base_scores.shape}")
    outcomes = np.where(policy_scores > base_scores, 1.0, np.where(policy_scores == base_scores, 0.5, 0.0))
    if outcomes.size < 2:
        return float(outcomes.mean()), None
    from scipy.stats import bootstrap

    result = bootstrap((outcomes,), np.mean, confidence_level=0.95, n_resamples=BOOTSTRAP_RESAMPLES,
                       method="percentile", random_state=np.random.default_rng(BOOTSTRAP_SEED))
    interval = result.confidence_interval
    return float(outcomes.mean()), [float(interval.low), float(interval.high)]


def summary_markdown(summary: dict) -> str:
    """A Markdown table of a summary: one row per reward."""
    lines = [f"Policy vs base on {summary['n']} (prompt, seed) pairs.", "",
             "| reward | base mean | policy mean | base median | policy median | base std | policy std "
             "| win rate | 95 % CI |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in summary["rewards"].items():
        base, policy, interval = entry["base"], entry["policy"], entry["win_rate_ci95"]
        shown = "n/a" if interval is None else f"[{interval[0]:.3f}, {interval[1]:.3f}]"
        lines.append(f"| {name} | {base['mean']:.4f} | {policy['mean']:.4f} | {base['median']:.4f} | "
                     f"{policy['median']:.4f} | {base['std']:.4f} | {policy['std']:.4f} | {entry['win_rate']:.3f} "
                     f"| {shown} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------
def plot_score_distributions(samples: list[dict], path: Path) -> None:
    """One histogram panel per reward: base and policy scores over shared bins."""
    from matplotlib.figure import Figure

    names = list(samples[0]["rewards"])
    figure = Figure(figsize=(5 * len(names), 3.5), layout="constrained")
    for axis, name in zip(figure.subplots(1, len(names), squeeze=False)[0], names):
        scores = {model: [row["rewards"][name] for row in samples if row["model"] == model] for model in MODELS}
        edges = np.histogram_bin_edges(scores["base"] + scores["policy"], bins="auto")
        for model, colour in zip(MODELS, ("tab:gray", "tab:blue")):
            axis.hist(scores[model], bins=edges, alpha=0.6, color=colour,
                      label=f"{model} (mean {np.mean(scores[model]):.3f})")
        axis.set(xlabel="score", ylabel="images", title=name)
        axis.legend()
    figure.savefig(path, dpi=100)


def plot_before_after(samples: list[dict], root: Path, path: Path, num_prompts: int) -> None:
    """The first image of the first ``num_prompts`` prompts: base row over policy row (``make_image_grid``)."""
    from diffusers.utils import make_image_grid

    first_of_prompt: dict[str, tuple] = {}
    for row in samples:
        if row["model"] == "base":
            first_of_prompt.setdefault(row["prompt"], (row["prompt"], row["seed"]))
    columns = list(first_of_prompt.values())[:num_prompts]
    image_of = {(row["model"], row["prompt"], row["seed"]): row["image"] for row in samples}
    images = [_open_rgb(root / image_of[(model, *key)]) for model in MODELS for key in columns]
    make_image_grid(images, rows=len(MODELS), cols=len(columns)).save(path)


def _open_rgb(path: Path) -> PILImage.Image:
    with PILImage.open(path) as image:
        return image.convert("RGB")
