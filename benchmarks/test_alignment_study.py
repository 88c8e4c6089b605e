"""The alignment study's check mode: ``benchmarks/alignment_study.py --quick`` into a temporary directory, then every
file it writes against numbers recomputed from the manifests and images (never which arm wins); resume and pieces.
Plus its metrics on hand-made rows."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from tgo_fast.pipeline.shards import read_jsonl
from tgo_fast.rewards import measure_synthetic_attributes, parse_synthetic_prompt, synthetic_reward
from tgo_fast.study import ARMS, ATTRIBUTES, FAMILIES, QUICK_SIZE, sample_metrics, threshold_spread

PROMPT_A = "a large red square at the bottom on a black background"
PROMPT_B = "a small orange triangle at the top on a black background"


# ------------------------------------------------------------------------------------ hand-made rows
def test_threshold_spread_against_hand_values():
    """Two prompts, K = 3 and 2: τ = the median of all five, b̂(x) = β·log mean exp(s/β), τ(x) = the median
    of the prompt's scores, label disagreements and the between-prompt variance share by hand."""
    rows = [{"prompt": PROMPT_A, "score": s} for s in (0.2, 0.4, 0.9)] + \
           [{"prompt": PROMPT_B, "score": s} for s in (0.5, 0.7)]
    spread = threshold_spread(rows, beta_r=0.5)
    assert spread["tau"] == pytest.approx(0.5)
    b_a = 0.5 * math.log((math.exp(0.4) + math.exp(0.8) + math.exp(1.8)) / 3)
    b_b = 0.5 * math.log((math.exp(1.0) + math.exp(1.4)) / 2)
    by_prompt = {entry["prompt"]: entry for entry in spread["prompts"]}
    assert by_prompt[PROMPT_A]["b_hat"] == pytest.approx(b_a)
    assert by_prompt[PROMPT_B]["b_hat"] == pytest.approx(b_b)
    assert by_prompt[PROMPT_A]["tau_prompt"] == pytest.approx(0.4)
    assert by_prompt[PROMPT_B]["tau_prompt"] == pytest.approx(0.6)
    gap = spread["spread"]["tau_minus_b_hat"]
    assert gap["mean"] == pytest.approx(np.mean([0.5 - b_a, 0.5 - b_b]))
    assert gap["std"] == pytest.approx(np.std([0.5 - b_a, 0.5 - b_b]))
    # b̂_A ≈ 0.590, b̂_B ≈ 0.610: only 0.5 (prompt B) changes its label
    assert spread["spread"]["label_disagreement_b_hat"] == pytest.approx(1 / 5)
    # τ(x): A at 0.4 flips 0.4 to positive; B at 0.6 flips 0.5 to negative
    assert spread["spread"]["label_disagreement_tau_prompt"] == pytest.approx(2 / 5)
    scores = np.array([0.2, 0.4, 0.9, 0.5, 0.7])
    between = (3 * (0.5 - scores.mean()) ** 2 + 2 * (0.6 - scores.mean()) ** 2) / 5
    assert spread["spread"]["between_prompt_variance_share"] == pytest.approx(between / scores.var())
    assert all(entry["b_hat_se"] > 0 for entry in spread["prompts"])
    with pytest.raises(ValueError, match="single sample"):
        threshold_spread(rows + [{"prompt": "a small red circle at the top on a white background", "score": 0.3}],
                         beta_r=0.5)


def test_sample_metrics_win_rate_over_prompts_with_ties():
    """Prompt 0: a win and a tie (0.75); prompt 1: a loss (0): the win rate is their mean, 0.375."""
    def row(index, reward, base, drift):
        return {"prompt_index": index, "reward": reward, "base_reward": base, "drift": drift,
                "attributes": {name: index == 0 for name in ATTRIBUTES}}

    metrics = sample_metrics([row(0, 0.6, 0.5, 0.1), row(0, 0.5, 0.5, 0.2), row(1, 0.1, 0.3, 0.3)])
    assert metrics["win_rate"] == pytest.approx(0.375)
    assert metrics["reward_mean"] == pytest.approx(0.4) and metrics["reward_median"] == pytest.approx(0.5)
    assert metrics["drift_mean"] == pytest.approx(0.2)
    assert metrics["attribute_accuracy"] == {name: pytest.approx(2 / 3) for name in ATTRIBUTES}
    low, high = metrics["win_rate_ci95"]
    assert 0.0 <= low <= 0.375 <= high <= 1.0


# ------------------------------------------------------------------------------------ the --quick run
@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    from alignment_study import main

    root = tmp_path_factory.mktemp("alignment")
    argv = ["--quick", "--work_dir", str(root / "work"), "--out", str(root / "out")]
    main(argv)
    return root, argv


def _load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _rescored(rows, image_dir):
    """The built-in reward and the attribute matches of each row's image, recomputed from the PNG."""
    images = [Image.open(image_dir / row["image"]).convert("RGB") for row in rows]
    rewards = synthetic_reward(images, [row["prompt"] for row in rows]).tolist()
    matches = []
    for image, row in zip(images, rows):
        asked, seen = parse_synthetic_prompt(row["prompt"]), measure_synthetic_attributes(image)
        matches.append({name: seen.get(name) == asked[name] for name in ATTRIBUTES})
    return rewards, matches


def _win_rate(samples):
    outcomes = {}
    for row in samples:
        outcome = 1.0 if row["reward"] > row["base_reward"] else 0.5 if row["reward"] == row["base_reward"] else 0.0
        outcomes.setdefault(row["prompt_index"], []).append(outcome)
    return float(np.mean([np.mean(values) for values in outcomes.values()]))


@pytest.mark.slow
def test_quick_study_files_and_numbers(quick_study):
    root, _ = quick_study
    work, out = root / "work", root / "out"
    for name in ("summary.json", "summary.md", "reward_vs_step.png", "win_rate.png", "tau_vs_baseline.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary, markdown = _load(out / "summary.json"), (out / "summary.md").read_text(encoding="utf-8")
    assert set(summary["families"]) == set(FAMILIES)
    for family in FAMILIES:
        # thresholds from the proxy set's scores
        proxy = read_jsonl(work / family / "proxy" / "scored.jsonl")
        assert len(proxy) == QUICK_SIZE.proxy_prompts[family] * QUICK_SIZE.images_per_prompt
        thresholds = _load(out / family / "thresholds.json")
        beta = thresholds["log_partition_beta"]
        scores = np.array([row["score"] for row in proxy])
        assert thresholds["tau"] == pytest.approx(np.percentile(scores, 50))
        gaps = []
        for entry in thresholds["prompts"]:
            own = np.array([row["score"] for row in proxy if row["prompt"] == entry["prompt"]])
            assert entry["scores"] == pytest.approx(own.tolist())
            assert entry["b_hat"] == pytest.approx(beta * math.log(np.mean(np.exp(own / beta))))
            assert entry["tau_prompt"] == pytest.approx(np.median(own))
            gaps.append(thresholds["tau"] - entry["b_hat"])
        assert thresholds["spread"]["tau_minus_b_hat"]["std"] == pytest.approx(np.std(gaps))

        # the base's evaluation: rewards and attributes from its images
        base = _load(out / family / "base.json")
        base_rows = read_jsonl(work / family / "eval_base" / "scored.jsonl")
        assert len(base["samples"]) == len(base_rows) == QUICK_SIZE.eval_prompts * QUICK_SIZE.eval_images[family]
        rewards, matches = _rescored(base_rows, work / family / "eval_base")
        assert [row["reward"] for row in base["samples"]] == pytest.approx(rewards)
        assert [row["attributes"] for row in base["samples"]] == matches
        base_reward = {(row["prompt_index"], row["k"]): row["reward"] for row in base["samples"]}

        pooled = summary["families"][family]["arms"]
        assert set(pooled) == set(ARMS)
        for arm in ARMS:
            result = _load(out / family / arm / "seed_0.json")
            assert result["run_config"]["loss"] == ARMS[arm]["loss"]
            assert result["run_config"]["max_steps"] == QUICK_SIZE.max_steps
            assert result["settings"]["beta"] == result["run_config"]["beta"]
            samples = result["samples"]
            eval_dir = work / family / arm / "seed_0" / "eval"
            rewards, matches = _rescored(read_jsonl(eval_dir / "scored.jsonl"), eval_dir)
            assert [row["reward"] for row in samples] == pytest.approx(rewards)
            assert [row["attributes"] for row in samples] == matches
            assert [row["base_reward"] for row in samples] == [base_reward[(row["prompt_index"], row["k"])]
                                                               for row in samples]
            assert all(math.isfinite(row["drift"]) for row in samples)
            metrics = result["metrics"]
            assert metrics["reward_mean"] == pytest.approx(np.mean(rewards))
            assert metrics["reward_median"] == pytest.approx(np.median(rewards))
            assert metrics["win_rate"] == pytest.approx(_win_rate(samples))
            low, high = metrics["win_rate_ci95"]
            assert 0.0 <= low <= metrics["win_rate"] <= high <= 1.0
            assert metrics["drift_mean"] == pytest.approx(np.mean([row["drift"] for row in samples]))
            for name in ATTRIBUTES:
                assert metrics["attribute_accuracy"][name] == pytest.approx(np.mean([m[name] for m in matches]))
            curve = result["train"]["curve"]
            assert [row["step"] for row in curve] == [0, QUICK_SIZE.max_steps]
            metrics_rows = read_jsonl(work / family / arm / "seed_0" / "run" / "metrics.jsonl")
            assert curve == [{"step": row["step"], "validation_reward": row["validation_reward"]}
                             for row in metrics_rows if "validation_reward" in row]
            # one seed: the pooled numbers are that seed's, the seed spread is 0
            assert pooled[arm]["win_rate"] == pytest.approx(metrics["win_rate"])
            assert pooled[arm]["reward_mean"] == pytest.approx(metrics["reward_mean"])
            assert pooled[arm]["seed_std"]["reward_mean"] == 0.0
            assert pooled[arm]["curve"] == curve
            assert f"| {family} | {arm} | 1 | {metrics['reward_mean']:.4f}" in markdown


@pytest.mark.slow
def test_quick_study_resumes_and_runs_in_pieces(quick_study):
    """A rerun changes no file and trains nothing; a deleted arm × seed is redone alone with the same numbers;
    a result written with other settings is refused."""
    from alignment_study import main

    root, argv = quick_study
    out, work = root / "out", root / "work"
    results = sorted(out.rglob("*.json"))
    before = {path: path.read_bytes() for path in results}
    trained = {path: path.stat().st_mtime_ns for path in work.rglob("metrics.jsonl")}
    main(argv)
    assert {path: path.read_bytes() for path in results} == before
    assert {path: path.stat().st_mtime_ns for path in work.rglob("metrics.jsonl")} == trained

    piece = out / "sd15" / "dpo" / "seed_0.json"
    piece.unlink()
    main(argv + ["--family", "sd15", "--arms", "dpo"])
    assert _load(piece)["metrics"] == json.loads(before[piece])["metrics"]

    altered = json.loads(before[piece])
    altered["settings"]["beta"] = 123.0
    piece.write_text(json.dumps(altered), encoding="utf-8")
    with pytest.raises(ValueError, match="other settings"):
        main(argv + ["--family", "sd15", "--arms", "dpo"])
