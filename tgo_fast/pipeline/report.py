"""The evaluation report: several models × several prompt sets × several rewards, against one base.

    report = evaluate_report({"base": run_base("runs/sd15"), "tgo": trained_run("runs/sd15")},
                             [load_prompt_set("pickapic:/data/pickapic_v2"), load_prompt_set("parti:/data/PartiPrompts.tsv")],
                             "eval/sd15", rewards=["pickscore=yuvalkirstain/PickScore_v1", "clip"])

Output directory::

    <prompt set>/<model>/       generate's output (images/, manifest.jsonl) + scores_<reward>.jsonl per reward
    samples.jsonl               one row per image: {"prompt_set", "model", "prompt", "prompt_index", "k", "seed", "id",
                                "image": "<prompt set>/<model>/images/...", "rewards": {reward: score}, **metadata}
    report.json                 {"base", "models", "rewards", "prompt_sets": {set: {"prompts", "images_per_prompt"}},
                                 "results": {set: {reward: {model: {"mean", "median", "std"[, "win_rate", "win_rate_ci95"]}}}}}
    report.md                   the same as one Markdown table
    score_distribution_<reward>.png   per reward: a panel per (prompt set, model), base vs that model

Every model draws image k of prompt i with the same seed (tgo_fast.pipeline.generate.image_seed), so each
(prompt, seed) has one image per model. The win rate of a model over the base is the mean over prompts of
its per-prompt outcome, the mean over that prompt's seeds of 1 (model scores higher), 0.5 (tie) or 0; its
95 % interval is a percentile bootstrap over prompts (``scipy.stats.bootstrap``, 9999 resamples,
``numpy.random.default_rng(0)``), null for a single prompt. With one image per prompt this is the pair-level
win rate of ``evaluate``. ``report.json`` is :func:`summarize_report` of ``samples.jsonl``.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tgo_fast.rewards import check_reward_prompts
from tgo_fast.trainer import distributed as D

from .evaluate import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, scores_path
from .generate import ModelSource, generate
from .prompts import PromptSet
from .reward_specs import load_reward_spec, parse_reward_specs
from .score import score_with_reward
from .shards import read_jsonl, write_atomically, write_jsonl_atomically

__all__ = ["evaluate_report", "prompt_win_rate", "report_markdown", "summarize_report"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # model and prompt-set names are directory names


def evaluate_report(
    models: Mapping[str, ModelSource],
    prompt_sets: Sequence[PromptSet],
    out_dir: str | os.PathLike,
    *,
    base: str | None = None,
    rewards: Sequence[str] = ("builtin",),
    images_per_prompt: int = 1,
    seed: int = 0,
    guidance_scale: float | None = None,
    num_inference_steps: int = 20,
    batch_size: int = 8,
    score_batch_size: int = 32,
    dtype: str = "fp32",
) -> dict:
    """Generate every prompt set with every model at identical seeds, score every image with every reward,
    and write the files of the module docstring; returns the report on every rank. ``base`` names the model the others are compared with (default: the first of ``models``).

    Every reward model is loaded once, up front, and every prompt checked against it before anything is generated.
    """
    specs = parse_reward_specs(list(rewards))
    names = list(models)
    base = names[0] if base is None else base
    if len(names) < 2 or base not in models:
        raise ValueError(f"models: expected a base and at least one model to compare, named; got {names} with "
                         f"base={base!r}")
    set_names = [prompt_set.name for prompt_set in prompt_sets]
    if not set_names or len(set(set_names)) != len(set_names):
        raise ValueError(f"prompt_sets: expected one or more sets with distinct names, got {set_names}")
    for name in (*names, *set_names):
        if not _NAME.match(name):
            raise ValueError(f"name {name!r}: model and prompt-set names become directory names; use letters, "
                             "digits, '_', '.' and '-'")
    out_dir = Path(out_dir)
    # every reward model is loaded once, before any image is drawn: a bad spec or prompt fails early
    loaded = {spec.name: load_reward_spec(spec, device=D.device()) for spec in specs}
    for reward in loaded.values():
        for prompt_set in prompt_sets:
            check_reward_prompts(reward, prompt_set.prompts)
    sampling = dict(images_per_prompt=images_per_prompt, seed=seed, guidance_scale=guidance_scale,
                    num_inference_steps=num_inference_steps, batch_size=batch_size, dtype=dtype)
    for prompt_set in prompt_sets:
        for name in names:
            generate(models[name], prompt_set.prompts, out_dir / prompt_set.name / name, **sampling)
    for spec in specs:
        for prompt_set in prompt_sets:
            for name in names:
                model_dir = out_dir / prompt_set.name / name
                score_with_reward(model_dir / "manifest.jsonl", loaded[spec.name], spec.text,
                                  scores_path(model_dir, spec.name), batch_size=score_batch_size)
    if D.is_main():
        samples_path = out_dir / "samples.jsonl"
        write_jsonl_atomically(samples_path, _collect_samples(out_dir, prompt_sets, names, [s.name for s in specs]))
        report = summarize_report(samples_path, base=base)
        write_atomically(out_dir / "report.json", (json.dumps(report, indent=2) + "\n").encode("utf-8"))
        write_atomically(out_dir / "report.md", (report_markdown(report) + "\n").encode("utf-8"))
        plot_report_distributions(read_jsonl(samples_path), report, out_dir)
    D.barrier()
    return json.loads((out_dir / "report.json").read_text(encoding="utf-8"))


def _collect_samples(out_dir: Path, prompt_sets: Sequence[PromptSet], models: list[str],
                     rewards: list[str]) -> list[dict]:
    samples = []
    for prompt_set in prompt_sets:
        for name in models:
            model_dir = out_dir / prompt_set.name / name
            scored = {reward: read_jsonl(scores_path(model_dir, reward)) for reward in rewards}
            for index, row in enumerate(read_jsonl(model_dir / "manifest.jsonl")):
                samples.append({"prompt_set": prompt_set.name, "model": name, "prompt": row["prompt"],
                                "prompt_index": row["prompt_index"], "k": row["k"], "seed": row["seed"],
                                "id": row["id"], "image": f"{prompt_set.name}/{name}/{row['image']}",
                                "rewards": {reward: scored[reward][index]["score"] for reward in rewards},
                                **prompt_set.metadata[row["prompt_index"]]})
    return samples


# ----------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------
def summarize_report(samples_path: str | os.PathLike, *, base: str) -> dict:
    """``report.json`` (module docstring) from ``samples.jsonl`` alone.

    Raises ValueError when a row lacks a field, a (prompt set, model, prompt_index, seed) repeats, a model's
    (prompt_index, seed) set differs from the base's within a prompt set, or the rows carry different rewards.
    """
    where = os.fspath(samples_path)
    samples = read_jsonl(samples_path)
    table: dict[str, dict[str, dict[tuple, dict]]] = {}  # set → model → (prompt_index, seed) → row
    for index, row in enumerate(samples):
        missing = [f for f in ("prompt_set", "model", "prompt_index", "seed", "rewards") if f not in row]
        if missing:
            raise ValueError(f"{where!r} row {index}: missing field(s) {missing}")
        cell = table.setdefault(row["prompt_set"], {}).setdefault(row["model"], {})
        key = (row["prompt_index"], row["seed"])
        if key in cell:
            raise ValueError(f"{where!r} row {index}: a second {row['model']} sample of prompt {key[0]}, seed "
                             f"{key[1]} in prompt set {row['prompt_set']!r}")
        cell[key] = row
    reward_sets = {tuple(row["rewards"]) for row in samples}
    if len(reward_sets) != 1 or not next(iter(reward_sets), ()):
        raise ValueError(f"{where!r}: every row must carry the same non-empty rewards, got {sorted(reward_sets)}")
    rewards = list(next(iter(reward_sets)))
    models = list(dict.fromkeys(row["model"] for row in samples))
    if base not in models:
        raise ValueError(f"{where!r}: no sample of the base model {base!r} (models: {models})")
    report = {"base": base, "models": models, "rewards": rewards, "prompt_sets": {}, "results": {}}
    for set_name, by_model in table.items():
        keys = list(by_model.get(base, {}))
        for name, cell in by_model.items():
            if set(cell) != set(keys):
                raise ValueError(f"{where!r}: prompt set {set_name!r}: model {name!r} and the base {base!r} differ in "
                                 f"{len(set(cell) ^ set(keys))} (prompt, seed) samples; every model needs the base's")
        prompts = [key[0] for key in keys]
        report["prompt_sets"][set_name] = {"prompts": len(set(prompts)), "images_per_prompt": len(keys) // len(set(prompts))}
        report["results"][set_name] = {}
        for reward in rewards:
            base_scores = np.array([by_model[base][key]["rewards"][reward] for key in keys], np.float64)
            entries = {}
            for name in models:
                if name not in by_model:
                    continue
                scores = np.array([by_model[name][key]["rewards"][reward] for key in keys], np.float64)
                entry = {"mean": float(scores.mean()), "median": float(np.median(scores)), "std": float(scores.std())}
                if name != base:
                    entry["win_rate"], entry["win_rate_ci95"] = prompt_win_rate(scores, base_scores, prompts)
                entries[name] = entry
            report["results"][set_name][reward] = entries
    return report


def prompt_win_rate(model_scores: Sequence[float], base_scores: Sequence[float],
                    prompt_ids: Sequence) -> tuple[float, list[float] | None]:
    """Win rate of a model over the base, pairs grouped by prompt: the mean over prompts of the mean pair outcome
    (1 model higher, 0.5 tie, 0 lower) and its 95 % percentile-bootstrap interval over prompts (None for one)."""
    model_scores, base_scores = np.asarray(model_scores, np.float64), np.asarray(base_scores, np.float64)
    if model_scores.shape != base_scores.shape or model_scores.ndim != 1 or len(prompt_ids) != model_scores.size \
            or model_scores.size == 0:
        raise ValueError(f"prompt_win_rate: expected equally long non-empty 1-D scores and prompt ids, got "
                         f"{model_scores.shape}, {base_scores.shape} and {len(prompt_ids)} ids")
    outcomes = np.sign(model_scores - base_scores) * 0.5 + 0.5  # 1, 0.5, 0
    groups = list(dict.fromkeys(prompt_ids))
    position = {prompt: i for i, prompt in enumerate(groups)}
    index = np.array([position[p] for p in prompt_ids])
    per_prompt = np.bincount(index, weights=outcomes) / np.bincount(index)
    if per_prompt.size < 2:
        return float(per_prompt.mean()), None
    from scipy.stats import bootstrap

    result = bootstrap((per_prompt,), np.mean, confidence_level=0.95, n_resamples=BOOTSTRAP_RESAMPLES,
                       method="percentile", random_state=np.random.default_rng(BOOTSTRAP_SEED))
    return float(per_prompt.mean()), [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def report_markdown(report: dict) -> str:
    """One Markdown table: a row per (prompt set, reward, model)."""
    lines = [f"Models vs the base `{report['base']}` at identical prompts and seeds; win rate over prompts, ties ½, "
             "95 % bootstrap CI.", "",
             "| prompt set | prompts × images | reward | model | mean | median | win rate vs base [95 % CI] |",
             "|---|---|---|---|---|---|---|"]
    for set_name, by_reward in report["results"].items():
        size = report["prompt_sets"][set_name]
        for reward, entries in by_reward.items():
            for name, entry in entries.items():
                if name == report["base"]:
                    shown = "(base)"
                else:
                    interval = entry["win_rate_ci95"]
                    shown = f"{entry['win_rate']:.3f}" + ("" if interval is None else
                                                           f" [{interval[0]:.3f}, {interval[1]:.3f}]")
                lines.append(f"| {set_name} | {size['prompts']} × {size['images_per_prompt']} | {reward} | {name} | "
                             f"{entry['mean']:.4f} | {entry['median']:.4f} | {shown} |")
    return "\n".join(lines)


def plot_report_distributions(samples: list[dict], report: dict, out_dir: Path) -> None:
    """Per reward, ``score_distribution_<reward>.png``: a row of panels per prompt set, a panel per compared
    model, each the base's and that model's score histograms over shared bins."""
    from matplotlib.figure import Figure

    base, others = report["base"], [name for name in report["models"] if name != report["base"]]
    sets = list(report["results"])
    for reward in report["rewards"]:
        figure = Figure(figsize=(4.5 * len(others), 3.2 * len(sets)), layout="constrained")
        axes = figure.subplots(len(sets), len(others), squeeze=False)
        for row, set_name in enumerate(sets):
            scores = {name: [s["rewards"][reward] for s in samples if s["prompt_set"] == set_name and s["model"] == name]
                      for name in report["models"]}
            for column, name in enumerate(others):
                axis = axes[row][column]
                edges = np.histogram_bin_edges(scores[base] + scores[name], bins="auto")
                for model, colour in ((base, "tab:gray"), (name, "tab:blue")):
                    axis.hist(scores[model], bins=edges, alpha=0.6, color=colour,
                              label=f"{model} (mean {np.mean(scores[model]):.3f})")
                axis.set(xlabel=reward, ylabel="images", title=f"{set_name}: {name} vs {base}")
                axis.legend()
        figure.savefig(out_dir / f"score_distribution_{re.sub(r'[^A-Za-z0-9_.-]+', '-', reward)}.png", dpi=100)
