"""The alignment study of issue 12: one global τ against per-prompt baselines, TGO against SFT / KTO / DPO.

    study = AlignmentStudy(FULL_SIZE, out_dir="benchmarks/results/alignment", work_dir="runs/alignment_study",
                           config_dir="configs")
    study.run()            # every family × arm × seed not finished yet, then the report
    study.write_report()   # the report of whatever has finished

For each family (``sd15``: the shipped tiny diffusion base, ``amused``: the shipped tiny masked base), in order:

1. **π_ref proxy set.** ``proxy_prompts`` training prompts (``builtin:train``) × K images from the base (guidance 1,
   the family's sampling steps, seed 0), scored with the built-in reward. Every arm trains on these same samples.
2. **Thresholds.** The global τ (percentile p = 50 of all scores) against each prompt's b̂(x) = β_r·log mean_k
   exp(s_k/β_r) (β_r = the family's training β, so that b̂ estimates the baseline β·log Z(x) of the arm's own
   KL-regularised optimum) and its per-prompt median τ(x): :func:`threshold_spread`.
3. **Base evaluation.** ``eval_prompts`` held-out prompts (``builtin:heldout``) × ``eval_images`` from the base,
   seed 1, scored, with the synthetic attributes read back from each image.
4. **Arms × seeds.** Each arm trains from the base with the family's run config (``configs/tiny*.yaml``: β, T,
   lr, warm-up) and the study's steps and batch, in this process (one rank, ZeRO stage 0: nothing to shard), then
   samples the held-out prompts at the base's seeds. Per sample: reward, the base's reward at the same
   (prompt, seed), attribute matches, and the drift proxy :func:`policy_drift`.
5. **Report** (:meth:`AlignmentStudy.write_report`): ``summary.json``, ``summary.md`` and three figures.

Results (``out_dir``; everything here is recomputable from the per-sample rows it holds)::

    <family>/thresholds.json      τ, and per prompt: its K scores, b̂(x), τ(x), bootstrap SE of b̂(x); the spread
    <family>/base.json            the base's evaluation samples (reward, attribute matches) and metrics
    <family>/<arm>/seed_<s>.json  settings, training curve (validation reward per eval step), the evaluation
                                  samples and their metrics
    summary.json, summary.md      per family and arm, pooled over seeds; the threshold spread
    reward_vs_step.png  win_rate.png  tau_vs_baseline.png

Work files (``work_dir``: images, runs, the encoding cache) are kept so that every step resumes: generation and
scoring resume by chunks, a finished arm × seed (its JSON) is skipped, an unfinished one retrains from scratch.
A JSON written with other settings is an error rather than a silent mix.

Metrics. Win rate of a policy over the base: pairs are (prompt, image seed); an outcome is 1 (policy higher), ½
(tie) or 0; pooled over training seeds, the rate is the mean over prompts of each prompt's mean outcome, and its
95 % CI a percentile bootstrap over prompts (:func:`tgo_fast.pipeline.prompt_win_rate`). Prompts are the
resampled unit because every seed is evaluated on the same prompts. Attribute accuracy: the fraction of images
whose measured attribute (``measure_synthetic_attributes``) equals the caption's; an image without a detected
shape misses all four shape attributes.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage

from tgo_fast.pipeline import (ModelSource, generate, load_prompts, load_sampler, prompt_win_rate, score,
                               trained_run)
from tgo_fast.pipeline.shards import write_atomically
from tgo_fast.rewards import measure_synthetic_attributes, parse_synthetic_prompt
from tgo_fast.threshold import group_thresholds, percentile_threshold

__all__ = ["ARMS", "ATTRIBUTES", "BASE_ARM", "FAMILIES", "FULL_SIZE", "QUICK_SIZE", "AlignmentStudy", "StudySize",
           "attribute_matches", "policy_drift", "pooled_metrics", "sample_metrics", "threshold_spread"]

ATTRIBUTES = ("background", "colour", "shape", "size", "position")
PROXY_SEED, EVAL_SEED = 0, 1  # image seeds of the π_ref proxy set and of the held-out evaluation
GLOBAL_PERCENTILE = 50.0
BOOTSTRAP_RESAMPLES = 200  # per prompt, for the standard error of b̂(x)
BASE_ARM = "base"


@dataclasses.dataclass(frozen=True)
class Family:
    config: str  # the family's run config under config_dir: β, T, lr, warm-up, resolution, sampling steps
    drift_unit: str


FAMILIES = {
    "sd15": Family("tiny.yaml", "mean e_θ − e_ref (MSE of the v-prediction)"),
    "amused": Family("tiny_masked.yaml", "mean log π_ref − log π_θ of the masked tokens (nats)"),
}

# Arm → run-config overrides. "tgo_p50_c5" is the paper's setting; SFT and KTO label against the global median.
ARMS = {
    **{f"tgo_p{p}_c{c}": {"loss": "tgo", "threshold_mode": "global", "percentile": float(p), "c": float(c)}
       for p in (25, 50, 75) for c in (0, 5)},
    "tgo_per_prompt": {"loss": "tgo", "threshold_mode": "per_prompt", "percentile": 50.0, "c": 5.0},
    "tgo_log_partition": {"loss": "tgo", "threshold_mode": "log_partition", "c": 5.0},  # β_r = the family's β
    "sft": {"loss": "sft", "threshold_mode": "global", "percentile": 50.0},
    "kto": {"loss": "kto", "threshold_mode": "global", "percentile": 50.0},
    "dpo": {"loss": "dpo"},  # every within-prompt pair with a score gap; the batch counts pairs
}


@dataclasses.dataclass(frozen=True)
class StudySize:
    """How large the sets and runs are (the same for every arm of a family)."""

    proxy_prompts: dict[str, int]  # per family: training prompts sampled from π_ref
    images_per_prompt: int  # K of the proxy set
    max_steps: int
    train_batch_size: int
    eval_prompts: int
    eval_images: dict[str, int]  # per family: images per held-out prompt
    eval_interval: int  # validation reward every this many steps (the reward-vs-step curve)
    validation_prompts: int  # the first held-out prompts, one image each per validation
    inference_steps: dict[str, int] | None = None  # per family; None: the run config's validation steps
    seeds: tuple[int, ...] = (0, 1, 2)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "seeds": list(self.seeds)}


FULL_SIZE = StudySize(proxy_prompts={"sd15": 256, "amused": 128}, images_per_prompt=8, max_steps=120,
                      train_batch_size=32, eval_prompts=128, eval_images={"sd15": 2, "amused": 1}, eval_interval=40,
                      validation_prompts=16)
QUICK_SIZE = StudySize(proxy_prompts={"sd15": 4, "amused": 4}, images_per_prompt=4, max_steps=2, train_batch_size=4,
                       eval_prompts=3, eval_images={"sd15": 1, "amused": 1}, eval_interval=2, validation_prompts=2,
                       inference_steps={"sd15": 2, "amused": 2}, seeds=(0,))


# ----------------------------------------------------------------------------------------------
# per-sample measurements
# ----------------------------------------------------------------------------------------------
def attribute_matches(image: PILImage.Image, prompt: str) -> dict[str, bool]:
    """Whether each caption attribute is what ``measure_synthetic_attributes`` reads from the image (a
    missing foreground misses colour, shape, size and position)."""
    caption, measured = parse_synthetic_prompt(prompt), measure_synthetic_attributes(image)
    return {name: measured.get(name) == caption[name] for name in ATTRIBUTES}


@torch.no_grad()
def policy_drift(base, policy, images: Sequence[PILImage.Image], prompts: Sequence[str], seeds: Sequence[int],
                 *, batch_size: int = 32) -> list[float]:
    """Per-image drift of ``policy`` from ``base`` (two :class:`tgo_fast.pipeline.Sampler` of one family) on
    π_ref's own samples, each under the noise / timestep (or mask) its seed draws:

        diffusion   e_θ − e_ref,   e = mean squared error of the prediction against its target
        masked      log π_ref(y|x) − log π_θ(y|x)   summed over the masked tokens

    Its mean over y ~ π_ref is a one-draw Monte-Carlo proxy of KL(π_ref ‖ π_θ): 0 for the base itself,
    larger the worse the policy fits what π_ref generates.
    """
    from tgo_fast.data import image_to_tensor
    from tgo_fast.trainer.objectives import reference_error, reference_logp

    adapter = base.adapter
    drifts: list[float] = []
    for start in range(0, len(images), batch_size):
        stop = start + batch_size
        pixels = torch.stack([image_to_tensor(image) for image in images[start:stop]]).to(next(adapter.backbone.parameters()).device)
        encoded = adapter.encode(pixels, list(prompts[start:stop]))
        inputs = adapter.sample_inputs(encoded, torch.tensor(list(seeds[start:stop]), dtype=torch.int64))
        if adapter.kind == "diffusion":
            values = [reference_error(adapter.forward(sampler.backbone, encoded, inputs), inputs["target"])
                      for sampler in (policy, base)]
        else:
            values = [reference_logp(adapter.output_head_module(sampler.backbone),
                                     adapter.forward(sampler.backbone, encoded, inputs), inputs["labels"], "auto")
                      for sampler in (base, policy)]
        drifts.extend((values[0] - values[1]).double().tolist())
    return drifts


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------
def threshold_spread(scored_rows: Sequence[dict], beta_r: float, *, percentile: float = GLOBAL_PERCENTILE) -> dict:
    """The global τ against the per-prompt baselines of a scored π_ref set (rows with ``prompt`` and ``score``).

    Per prompt x with K scores: b̂(x) (log_partition, β_r), τ(x) (per_prompt, the same percentile) and the
    bootstrap standard error of b̂(x) (its K scores resampled, ``BOOTSTRAP_RESAMPLES`` times, rng 0). The
    spread is that of d(x) = τ − b̂(x) across prompts, with: the fraction of samples whose label 1[s ≥ τ] differs
    from 1[s ≥ b̂(x)] (or from 1[s ≥ τ(x)]), the share of the score variance that lies between prompts, and the
    mean SE of b̂(x) (the part of the spread that K samples alone would give).
    """
    scores = np.array([row["score"] for row in scored_rows], np.float64)
    groups = [row["prompt"] for row in scored_rows]
    tau = percentile_threshold(torch.from_numpy(scores), percentile)
    baselines, sizes = group_thresholds(scores, groups, "log_partition", log_partition_beta=beta_r)
    medians, _ = group_thresholds(scores, groups, "per_prompt", p=percentile)
    rng = np.random.default_rng(0)
    prompts = []
    for prompt in baselines:
        own = scores[[i for i, group in enumerate(groups) if group == prompt]]
        resampled = rng.choice(own, size=(BOOTSTRAP_RESAMPLES, own.size), replace=True)
        names = [str(r) for r in range(BOOTSTRAP_RESAMPLES) for _ in range(own.size)]
        boot, _ = group_thresholds(resampled.reshape(-1), names, "log_partition", log_partition_beta=beta_r)
        prompts.append({"prompt": prompt, "scores": own.tolist(), "b_hat": baselines[prompt],
                        "tau_prompt": medians[prompt], "b_hat_se": float(np.std(list(boot.values()), ddof=1))})
    gap = np.array([tau - entry["b_hat"] for entry in prompts])
    own_baseline = np.array([baselines[group] for group in groups])
    own_median = np.array([medians[group] for group in groups])
    prompt_means = np.array([np.mean(entry["scores"]) for entry in prompts])
    weights = np.array([sizes[entry["prompt"]] for entry in prompts], np.float64)
    between = float(np.sum(weights * (prompt_means - scores.mean()) ** 2) / scores.size)
    return {
        "percentile": percentile, "log_partition_beta": beta_r, "tau": tau, "num_prompts": len(prompts),
        "images_per_prompt": sorted(set(sizes.values())),
        "spread": {
            "tau_minus_b_hat": {"mean": float(gap.mean()), "std": float(gap.std()), "min": float(gap.min()),
                                **{f"q{q:02d}": float(np.percentile(gap, q)) for q in (5, 25, 50, 75, 95)},
                                "max": float(gap.max())},
            "fraction_prompts_b_hat_above_tau": float(np.mean(gap < 0)),
            "label_disagreement_b_hat": float(np.mean((scores >= tau) != (scores >= own_baseline))),
            "label_disagreement_tau_prompt": float(np.mean((scores >= tau) != (scores >= own_median))),
            "b_hat_std_across_prompts": float(np.std([entry["b_hat"] for entry in prompts])),
            "b_hat_se_mean": float(np.mean([entry["b_hat_se"] for entry in prompts])),
            "between_prompt_variance_share": between / float(scores.var()) if scores.var() > 0 else 0.0,
        },
        "prompts": prompts,
    }


def _win_rate(samples: Sequence[dict]) -> tuple[float, list[float] | None]:
    return prompt_win_rate([row["reward"] for row in samples], [row["base_reward"] for row in samples],
                           [row["prompt_index"] for row in samples])


def _attribute_accuracy(samples: Sequence[dict]) -> dict[str, float]:
    return {name: float(np.mean([row["attributes"][name] for row in samples])) for name in ATTRIBUTES}


def sample_metrics(samples: Sequence[dict], *, policy: bool = True) -> dict:
    """Reward mean / median and attribute accuracy of evaluation samples; for a policy also the win rate over
    the base (its 95 % CI over prompts) and the mean drift."""
    rewards = np.array([row["reward"] for row in samples], np.float64)
    metrics = {"n": len(samples), "reward_mean": float(rewards.mean()), "reward_median": float(np.median(rewards)),
               "attribute_accuracy": _attribute_accuracy(samples)}
    if policy:
        rate, interval = _win_rate(samples)
        metrics.update(base_reward_mean=float(np.mean([row["base_reward"] for row in samples])), win_rate=rate,
                       win_rate_ci95=interval, drift_mean=float(np.mean([row["drift"] for row in samples])))
    return metrics


def pooled_metrics(results: Sequence[dict]) -> dict:
    """An arm's metrics over its seeds' results (``seed_<s>.json`` contents): :func:`sample_metrics` of the pooled
    samples, the standard deviation over seeds of the per-seed reward mean, win rate and drift, and the mean
    validation-reward curve."""
    pooled = sample_metrics([row for result in results for row in result["samples"]])
    per_seed = [result["metrics"] for result in results]
    curves = [{row["step"]: row["validation_reward"] for row in result["train"]["curve"]} for result in results]
    steps = sorted(set.intersection(*(set(curve) for curve in curves)))
    return {**pooled, "seeds": [result["seed"] for result in results],
            "seed_std": {key: float(np.std([metrics[key] for metrics in per_seed]))
                         for key in ("reward_mean", "win_rate", "drift_mean")},
            "curve": [{"step": step, "validation_reward": float(np.mean([curve[step] for curve in curves]))}
                      for step in steps]}


# ----------------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------------
def _single_process_ds_config(config_dir: Path) -> dict:
    """The shipped CPU DeepSpeed config at ZeRO stage 0: one rank has nothing to shard (ZeRO-3 hooks would only
    add per-layer overhead)."""
    config = json.loads((config_dir / "zero3_cpu.json").read_text(encoding="utf-8"))
    config["zero_optimization"] = {"stage": 0}
    return config


def _write_json(path: Path, value: dict) -> None:
    write_atomically(path, (json.dumps(value, indent=1) + "\n").encode("utf-8"))


def _open_rgb(path: Path) -> PILImage.Image:
    with PILImage.open(path) as image:
        return image.convert("RGB")


class AlignmentStudy:
    """The study of the module docstring, restricted to ``families``, ``arms`` (``BASE_ARM`` is always
    evaluated) and ``seeds`` (default: the size's)."""

    def __init__(self, size: StudySize, *, out_dir: str | os.PathLike, work_dir: str | os.PathLike,
                 config_dir: str | os.PathLike, families: Sequence[str] = tuple(FAMILIES),
                 arms: Sequence[str] = tuple(ARMS), seeds: Sequence[int] | None = None,
                 sample_batch_size: int = 32) -> None:
        unknown = [name for name in families if name not in FAMILIES] + [name for name in arms if name not in ARMS]
        if unknown:
            raise ValueError(f"unknown family or arm {unknown}; families: {', '.join(FAMILIES)}; arms: "
                             f"{', '.join(ARMS)}")
        self.size, self.families, self.arms = size, list(families), list(arms)
        self.seeds = list(size.seeds if seeds is None else seeds)
        self.out_dir, self.work_dir, self.config_dir = Path(out_dir), Path(work_dir), Path(config_dir)
        self.sample_batch_size = sample_batch_size

    # ------------------------------------------------------------------------------ settings
    def base_config(self, family: str):
        """The family's run config with the study's steps and batch (the arm's overrides still to come)."""
        from tgo_fast.trainer.config import load_config

        cfg = load_config(self.config_dir / FAMILIES[family].config)
        return dataclasses.replace(cfg, max_steps=self.size.max_steps, train_batch_size=self.size.train_batch_size,
                                   micro_batch_size=None, validation_inference_steps=self.inference_steps(family))

    def inference_steps(self, family: str) -> int:
        if self.size.inference_steps is not None:
            return self.size.inference_steps[family]
        from tgo_fast.trainer.config import load_config

        return load_config(self.config_dir / FAMILIES[family].config).validation_inference_steps

    def sampling(self, family: str) -> dict:
        """Generation settings of the proxy set and the evaluation: π_ref itself (guidance 1)."""
        return dict(guidance_scale=1.0, num_inference_steps=self.inference_steps(family),
                    batch_size=self.sample_batch_size)

    def base_source(self, family: str) -> ModelSource:
        cfg = self.base_config(family)
        return ModelSource(family, cfg.pretrained, resolution=cfg.resolution, options=cfg.model_options())

    def eval_prompts(self) -> list[str]:
        return load_prompts("builtin:heldout", self.size.eval_prompts)

    def family_settings(self, family: str) -> dict:
        """What every result of a family depends on (recorded in each JSON, checked on resume)."""
        base = self.base_config(family)
        return {"family": family, "config": FAMILIES[family].config, "size": self.size.to_dict(),
                "beta": base.beta, "temperature": base.temperature, "learning_rate": base.learning_rate,
                "lr_warmup_steps": base.lr_warmup_steps, "guidance_scale": 1.0,
                "inference_steps": self.inference_steps(family),
                "proxy_seed": PROXY_SEED, "eval_seed": EVAL_SEED}

    def run_config(self, family: str, arm: str, seed: int):
        from tgo_fast.trainer.config import load_config

        base = self.base_config(family)
        validation = self.eval_prompts()[:self.size.validation_prompts]
        overrides = {**base.to_dict(), **ARMS[arm], "log_partition_beta": base.beta,
                     "data": str(self.family_dir(family) / "proxy" / "scored.jsonl"),
                     "output_dir": str(self.seed_dir(family, arm, seed) / "run"),
                     "cache_dir": str(self.family_dir(family) / "encodings"), "seed": seed,
                     "eval_interval": self.size.eval_interval, "validation_prompts": validation,
                     "validation_images_per_prompt": 1, "tensorboard": False, "plots": False, "export": True,
                     "save_interval": 0, "resume_from": None, "threshold_update": "none", "reward": "builtin"}
        return load_config(None, overrides)

    # ------------------------------------------------------------------------------ layout
    def family_dir(self, family: str) -> Path:
        return self.work_dir / family

    def seed_dir(self, family: str, arm: str, seed: int) -> Path:
        return self.work_dir / family / arm / f"seed_{seed}"

    def result_path(self, family: str, arm: str, seed: int | None = None) -> Path:
        if arm == BASE_ARM:
            return self.out_dir / family / "base.json"
        return self.out_dir / family / arm / f"seed_{seed}.json"

    # ------------------------------------------------------------------------------ running
    def run(self) -> dict:
        """Every requested family × arm × seed not finished yet, then :meth:`write_report`; returns the summary."""
        from tgo_fast.trainer.distributed import world_of_one_session

        with world_of_one_session():
            for family in self.families:
                self.prepare_family(family)
                for arm in self.arms:
                    for seed in self.seeds:
                        self.run_arm(family, arm, seed)
        return self.write_report()

    def prepare_family(self, family: str) -> None:
        """Proxy set, thresholds and the base's evaluation (each resumable)."""
        settings = self.family_settings(family)
        proxy = self.family_dir(family) / "proxy"
        generate(self.base_source(family), load_prompts("builtin:train", self.size.proxy_prompts[family]), proxy,
                 images_per_prompt=self.size.images_per_prompt, seed=PROXY_SEED, **self.sampling(family))
        scored = score(proxy / "manifest.jsonl", "builtin", proxy / "scored.jsonl")
        _write_json(self.out_dir / family / "thresholds.json",
                    {"settings": settings, **threshold_spread(scored, settings["beta"])})
        path = self.result_path(family, BASE_ARM)
        if self._finished(path, settings):
            return
        samples = [{key: row[key] for key in ("prompt_index", "k", "seed", "prompt")} |
                   {"reward": row["score"], "attributes": attribute_matches(_open_rgb(image), row["prompt"])}
                   for row, image in self._evaluate(family, self.base_source(family), self.base_eval_dir(family))]
        _write_json(path, {"settings": settings, "arm": BASE_ARM, "samples": samples,
                           "metrics": sample_metrics(samples, policy=False)})

    def base_eval_dir(self, family: str) -> Path:
        return self.family_dir(family) / "eval_base"

    def _evaluate(self, family: str, source: ModelSource, out_dir: Path) -> list[tuple[dict, Path]]:
        """Held-out samples of ``source`` at the evaluation seeds, scored: (scored row, image path) pairs."""
        generate(source, self.eval_prompts(), out_dir, images_per_prompt=self.size.eval_images[family],
                 seed=EVAL_SEED, **self.sampling(family))
        rows = score(out_dir / "manifest.jsonl", "builtin", out_dir / "scored.jsonl")
        return [(row, out_dir / row["image"]) for row in rows]

    def _finished(self, path: Path, settings: dict) -> bool:
        if not path.is_file():
            return False
        recorded = json.loads(path.read_text(encoding="utf-8")).get("settings")
        if recorded != settings:
            raise ValueError(f"{str(path)!r} was written with other settings ({recorded} vs {settings}); "
                             "pass another --out / --work_dir, or delete it to recompute")
        return True

    def run_arm(self, family: str, arm: str, seed: int) -> None:
        """Train one arm × seed (unless finished), evaluate it on the held-out prompts and write its JSON."""
        path = self.result_path(family, arm, seed)
        settings = {**self.family_settings(family), "arm": arm, "overrides": ARMS[arm], "seed": seed}
        if self._finished(path, settings):
            return
        cfg = self.run_config(family, arm, seed)
        train = self._train(cfg, self.seed_dir(family, arm, seed))
        base_result = json.loads(self.result_path(family, BASE_ARM).read_text(encoding="utf-8"))
        base_of = {(row["prompt_index"], row["k"]): row for row in base_result["samples"]}
        policy = trained_run(cfg.output_dir)
        evaluated = self._evaluate(family, policy, self.seed_dir(family, arm, seed) / "eval")
        # π_ref's held-out samples: the base image of each evaluated (prompt, seed)
        base_images = [(base_of[(row["prompt_index"], row["k"])], self.base_eval_dir(family) / row["image"])
                       for row, _ in evaluated]
        drifts = policy_drift(load_sampler(self.base_source(family)), load_sampler(policy),
                              [_open_rgb(image) for _, image in base_images],
                              [row["prompt"] for row, _ in base_images], [row["seed"] for row, _ in base_images],
                              batch_size=self.sample_batch_size)
        samples = []
        for (row, image), (base_row, _), drift in zip(evaluated, base_images, drifts):
            samples.append({key: row[key] for key in ("prompt_index", "k", "seed", "prompt")} |
                           {"reward": row["score"], "base_reward": base_row["reward"],
                            "attributes": attribute_matches(_open_rgb(image), row["prompt"]), "drift": drift})
        _write_json(path, {"settings": settings, "family": family, "arm": arm, "seed": seed,
                           "run_config": {key: value for key, value in cfg.to_dict().items()
                                          if key not in ("output_dir", "cache_dir", "data")},
                           "train": train, "samples": samples, "metrics": sample_metrics(samples)})

    def _train(self, cfg, seed_dir: Path) -> dict:
        """Train (or reuse a finished training of the same run config, ``trained.json``): the validation-reward
        curve and the last step's training statistics."""
        import shutil

        from tgo_fast.trainer import Trainer
        from tgo_fast.trainer.tracking import read_metrics

        marker, run_config = seed_dir / "trained.json", json.loads(json.dumps(cfg.to_dict()))
        if marker.is_file():
            finished = json.loads(marker.read_text(encoding="utf-8"))
            if finished.pop("run_config", None) == run_config:
                return finished
        shutil.rmtree(cfg.output_dir, ignore_errors=True)  # an interrupted run starts over (about a minute)
        trainer = Trainer(cfg, _single_process_ds_config(self.config_dir))
        trainer.train()
        del trainer
        gc.collect()
        rows = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
        last = rows[-1]
        train = {"curve": [{"step": row["step"], "validation_reward": row["validation_reward"]}
                           for row in rows if "validation_reward" in row],
                 "last_step": {key: last[key] for key in ("step", "loss", "accuracy", "positive_fraction", "tau",
                                                          "implicit_score_mean") if key in last}}
        _write_json(marker, {**train, "run_config": run_config})
        return train

    # ------------------------------------------------------------------------------ report
    def write_report(self) -> dict:
        """``summary.json``, ``summary.md`` and the figures from every result JSON under ``out_dir``."""
        summary = {"families": {}}
        finished = sorted(path.parent.name for path in self.out_dir.glob("*/base.json"))
        for family in finished:
            root = self.out_dir / family
            base = json.loads((root / "base.json").read_text(encoding="utf-8"))
            thresholds = json.loads((root / "thresholds.json").read_text(encoding="utf-8"))
            arms = {}
            for arm in ARMS:
                results = [json.loads(path.read_text(encoding="utf-8"))
                           for path in sorted((root / arm).glob("seed_*.json"))]
                if results:
                    arms[arm] = pooled_metrics(results)
            summary["families"][family] = {"drift_unit": FAMILIES[family].drift_unit, "base": base["metrics"],
                                           "threshold_spread": {key: thresholds[key] for key in thresholds
                                                                if key not in ("prompts", "settings")},
                                           "arms": arms}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.out_dir / "summary.json", summary)
        write_atomically(self.out_dir / "summary.md", (summary_markdown(summary) + "\n").encode("utf-8"))
        if summary["families"]:
            plot_reward_vs_step(summary, self.out_dir / "reward_vs_step.png")
            plot_win_rates(summary, self.out_dir / "win_rate.png")
            plot_tau_vs_baseline({family: json.loads((self.out_dir / family / "thresholds.json").read_text())
                                  for family in summary["families"]}, self.out_dir / "tau_vs_baseline.png")
        return summary


def summary_markdown(summary: dict) -> str:
    """The threshold spread per family, then one table: a row per family × arm (pooled over seeds)."""
    lines = ["Alignment study: every arm trains on the same π_ref samples with the same steps, batch and lr; metrics on "
             "held-out prompts at the base's seeds, pooled over training seeds (± = std over seeds). Win rate over "
             "the base: mean over prompts, ties ½, 95 % bootstrap CI over prompts. Accuracy: attributes read back "
             "from the images. Drift, on the base's held-out samples: "
             + "; ".join(f"{family}: {entry['drift_unit']}" for family, entry in summary["families"].items()) + ".",
             ""]
    for family, entry in summary["families"].items():
        spread = entry["threshold_spread"]
        gap, share = spread["spread"]["tau_minus_b_hat"], spread["spread"]
        lines += [f"**{family}**: global τ = {spread['tau']:.4f} (p = {spread['percentile']:g}) vs b̂(x) (β_r = "
                  f"{spread['log_partition_beta']:g}, K = {'/'.join(map(str, spread['images_per_prompt']))}) over {spread['num_prompts']} "
                  f"prompts: τ − b̂(x) mean {gap['mean']:.4f}, std {gap['std']:.4f}, 5–95 % [{gap['q05']:.4f}, "
                  f"{gap['q95']:.4f}]; labels that differ: {share['label_disagreement_b_hat']:.1%} (vs b̂(x)), "
                  f"{share['label_disagreement_tau_prompt']:.1%} (vs the prompt's median); mean bootstrap SE of b̂(x) "
                  f"{share['b_hat_se_mean']:.4f}; between-prompt share of the score variance "
                  f"{share['between_prompt_variance_share']:.1%}.", ""]
    lines += ["| family | arm | seeds | reward mean | median | win rate [95 % CI] | " + " | ".join(ATTRIBUTES)
              + " | drift |", "|---|---|---|---|---|---|" + "---|" * len(ATTRIBUTES) + "---|"]
    for family, entry in summary["families"].items():
        base = entry["base"]
        lines.append(f"| {family} | base | – | {base['reward_mean']:.4f} | {base['reward_median']:.4f} | – | "
                     + " | ".join(f"{base['attribute_accuracy'][name]:.3f}" for name in ATTRIBUTES) + " | 0 |")
        for arm, metrics in entry["arms"].items():
            interval = metrics["win_rate_ci95"]
            shown = "n/a" if interval is None else f"[{interval[0]:.3f}, {interval[1]:.3f}]"
            spread_of = metrics["seed_std"]
            lines.append(f"| {family} | {arm} | {len(metrics['seeds'])} | {metrics['reward_mean']:.4f} ± "
                         f"{spread_of['reward_mean']:.4f} | {metrics['reward_median']:.4f} | "
                         f"{metrics['win_rate']:.3f} {shown} | "
                         + " | ".join(f"{metrics['attribute_accuracy'][name]:.3f}" for name in ATTRIBUTES)
                         + f" | {metrics['drift_mean']:.3g} ± {spread_of['drift_mean']:.2g} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# figures (one panel per family)
# ----------------------------------------------------------------------------------------------
def _panels(count: int, width: float, height: float):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * count, height), layout="constrained")
    return figure, figure.subplots(1, count, squeeze=False)[0]


def plot_reward_vs_step(summary: dict, path: Path) -> None:
    """Validation reward (mean over seeds) against the training step, a line per arm."""
    from matplotlib import colormaps

    families = summary["families"]
    figure, axes = _panels(len(families), 7, 4.5)
    colours = colormaps["tab20"]
    for axis, (family, entry) in zip(axes, families.items()):
        for index, (arm, metrics) in enumerate(entry["arms"].items()):
            curve = metrics["curve"]
            axis.plot([row["step"] for row in curve], [row["validation_reward"] for row in curve], marker="o",
                      markersize=3, color=colours(index % 20), label=arm)
        axis.set(xlabel="optimizer step", ylabel="validation reward (mean over seeds)", title=family)
        axis.legend(fontsize=7, ncols=2)
    figure.savefig(path, dpi=110)


def plot_win_rates(summary: dict, path: Path) -> None:
    """Win rate over the base per arm with its 95 % CI; the dashed line is ½ (no change)."""
    families = summary["families"]
    figure, axes = _panels(len(families), 6, 0.5 + 0.35 * len(ARMS))
    for axis, (family, entry) in zip(axes, families.items()):
        names = list(entry["arms"])
        rates = [entry["arms"][arm]["win_rate"] for arm in names]
        intervals = [entry["arms"][arm]["win_rate_ci95"] or [rate, rate] for arm, rate in zip(names, rates)]
        errors = [[rate - low for rate, (low, _) in zip(rates, intervals)],
                  [high - rate for rate, (_, high) in zip(rates, intervals)]]
        axis.errorbar(rates, range(len(names)), xerr=errors, fmt="o", capsize=3, color="tab:blue")
        axis.axvline(0.5, color="grey", linestyle="--")
        axis.set_yticks(range(len(names)), names)
        axis.invert_yaxis()
        axis.set(xlabel="win rate over the base (95 % CI over prompts)", title=family)
    figure.savefig(path, dpi=110)


def plot_tau_vs_baseline(thresholds: dict[str, dict], path: Path) -> None:
    """Per prompt (sorted by b̂(x)): its π_ref scores, b̂(x), its median τ(x), and the global τ."""
    figure, axes = _panels(len(thresholds), 8, 4.5)
    for axis, (family, entry) in zip(axes, thresholds.items()):
        prompts = sorted(entry["prompts"], key=lambda item: item["b_hat"])
        axis.scatter([index for index, item in enumerate(prompts) for _ in item["scores"]],
                     [value for item in prompts for value in item["scores"]], s=4, color="lightgrey", zorder=1,
                     label="π_ref samples' scores")
        positions = range(len(prompts))
        axis.errorbar(positions, [item["b_hat"] for item in prompts], yerr=[item["b_hat_se"] for item in prompts],
                      fmt=".", color="tab:blue", elinewidth=0.6, alpha=0.8,
                      label=rf"$\hat b(x)$, β_r = {entry['log_partition_beta']:g} (± bootstrap SE)")
        axis.scatter(positions, [item["tau_prompt"] for item in prompts], s=8, color="tab:orange", zorder=3,
                     label="τ(x): the prompt's median")
        axis.axhline(entry["tau"], color="tab:red", label=f"global τ = {entry['tau']:.3f}")
        gap = entry["spread"]["tau_minus_b_hat"]
        axis.set(xlabel=r"prompt (sorted by $\hat b(x)$)", ylabel="built-in reward",
                 title=rf"{family}: $\tau - \hat b(x)$ mean {gap['mean']:.3f}, std {gap['std']:.3f}")
        axis.legend(fontsize=7)
    figure.savefig(path, dpi=110)
