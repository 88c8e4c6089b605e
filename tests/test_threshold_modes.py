"""Per-prompt thresholds: the percentile within each prompt and the log-partition estimate b̂(x), by hand."""
import itertools
import json
import math

import numpy as np
import pytest
import torch

from tgo_fast.threshold import (ThresholdEstimate, estimate_threshold, group_thresholds, sample_thresholds,
                                with_group_thresholds)

GROUPS = ["a", "b", "a", "a", "b", "a"]
SCORES = [0.2, 1.0, 0.5, 0.5, 3.0, 0.9]  # a: 0.2, 0.5, 0.5, 0.9 (a tie at its median); b: 1.0, 3.0


def test_per_prompt_percentiles_by_hand():
    thresholds, sizes = group_thresholds(SCORES, GROUPS, "per_prompt", p=50)
    # a sorted: 0.2 0.5 0.5 0.9, position 0.5·3 = 1.5 → 0.5; b: halfway between 1 and 3
    assert thresholds == {"a": 0.5, "b": 2.0} and sizes == {"a": 4, "b": 2}
    thresholds, _ = group_thresholds(SCORES, GROUPS, "per_prompt", p=25)
    # a: position 0.75 → 0.2 + 0.75·0.3; b: position 0.25 → 1 + 0.25·2
    assert thresholds["a"] == pytest.approx(0.425) and thresholds["b"] == pytest.approx(1.5)


def test_each_sample_gets_its_groups_threshold_and_ties_are_positive():
    estimate = with_group_thresholds(estimate_threshold(SCORES, 50), SCORES, GROUPS, "per_prompt")
    own = sample_thresholds(estimate.group_thresholds, GROUPS)
    torch.testing.assert_close(own, torch.tensor([0.5, 2.0, 0.5, 0.5, 2.0, 0.5], dtype=torch.float64))
    # labels against the own threshold: 0.2 < 0.5; 1 < 2; the two 0.5 ties are positive; 3 ≥ 2; 0.9 ≥ 0.5
    assert estimate.positive_fraction == pytest.approx(4 / 6)
    assert estimate.mode == "per_prompt" and estimate.tau == pytest.approx(np.percentile(SCORES, 50))


def test_log_partition_by_hand():
    # β_r = 1, scores 0 and ln 3: b̂ = log((e⁰ + e^{ln 3}) / 2) = log 2
    thresholds, _ = group_thresholds([0.0, math.log(3.0)], ["x", "x"], "log_partition", log_partition_beta=1.0)
    assert thresholds["x"] == pytest.approx(math.log(2.0), rel=1e-14)
    scores, beta = [0.1, 0.3, 0.8], 0.5
    thresholds, _ = group_thresholds(scores, ["y"] * 3, "log_partition", log_partition_beta=beta)
    by_hand = beta * math.log((math.exp(0.1 / beta) + math.exp(0.3 / beta) + math.exp(0.8 / beta)) / 3)
    assert thresholds["y"] == pytest.approx(by_hand, rel=1e-14)
    assert np.mean(scores) <= thresholds["y"] <= max(scores)  # between the mean (β_r → ∞) and the max (β_r → 0)


def test_log_partition_is_stable_and_exact_on_ties():
    # exp(1001/0.01) overflows float64; the shifted form does not
    thresholds, _ = group_thresholds([1000.0, 1001.0], ["g", "g"], "log_partition", log_partition_beta=0.01)
    assert thresholds["g"] == pytest.approx(1001.0 + 0.01 * math.log((math.exp(-100.0) + 1.0) / 2), rel=1e-15)
    # a prompt whose K samples all score the same: b̂ is that score exactly, so every sample is a (tied) positive
    estimate = with_group_thresholds(estimate_threshold([0.4] * 3, 50), [0.4] * 3, ["t"] * 3, "log_partition",
                                     log_partition_beta=0.3)
    assert estimate.group_thresholds == {"t": 0.4} and estimate.positive_fraction == 1.0


def test_log_partition_underestimates_the_baseline_in_expectation():
    """Jensen: over every equally likely draw of K rewards from {0, 1} (fair coin), E[b̂] < β·log E exp(r/β),
    and the gap shrinks as K grows."""
    beta = 0.5
    truth = beta * math.log((1.0 + math.exp(1.0 / beta)) / 2)
    gaps = []
    for k in (2, 4):
        draws = list(itertools.product([0.0, 1.0], repeat=k))
        expected = np.mean([group_thresholds(list(d), ["x"] * k, "log_partition", log_partition_beta=beta)[0]["x"]
                            for d in draws])
        gaps.append(truth - expected)
    assert gaps[0] > gaps[1] > 0


@pytest.mark.parametrize("mode", ["per_prompt", "log_partition"])
def test_a_prompt_with_one_sample_is_a_clear_error(mode):
    with pytest.raises(ValueError, match=r"1 of 2 prompt groups have a single sample \(e\.g\. 'lonely'\).*K ≥ 2"):
        group_thresholds([0.1, 0.2, 0.3], ["pair", "pair", "lonely"], mode)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mode must be one of per_prompt, log_partition"):
        group_thresholds([0.1, 0.2], ["a", "a"], "global")
    with pytest.raises(ValueError, match="groups has 1 entries but scores has 2"):
        group_thresholds([0.1, 0.2], ["a"], "per_prompt")
    with pytest.raises(ValueError, match="log_partition_beta must be > 0"):
        group_thresholds([0.1, 0.2], ["a", "a"], "log_partition", log_partition_beta=0.0)
    with pytest.raises(ValueError, match=r"no threshold for prompt group\(s\) \['c'\]"):
        sample_thresholds({"a": 0.1}, ["a", "c"])


def test_threshold_file_records_the_mode_and_group_thresholds(tmp_path):
    estimate = with_group_thresholds(estimate_threshold(SCORES, 50), SCORES, GROUPS, "log_partition",
                                     log_partition_beta=0.25)
    path = tmp_path / "threshold.json"
    estimate.save(path)
    loaded = ThresholdEstimate.load(path)
    assert loaded == estimate and loaded.mode == "log_partition" and loaded.log_partition_beta == 0.25
    assert loaded.group_sizes == {"a": 4, "b": 2}
    # a file written before threshold modes existed reads as the global mode
    old = {k: v for k, v in estimate_threshold(SCORES, 50).to_dict().items()
           if k not in ("mode", "log_partition_beta", "group_thresholds", "group_sizes")}
    path.write_text(json.dumps(old))
    assert ThresholdEstimate.load(path).mode == "global"


def test_config_refuses_per_prompt_thresholds_with_a_global_tau_source(tmp_path):
    from tgo_fast.trainer import TrainConfig

    with pytest.raises(ValueError, match="threshold_mode='log_partition' does not combine with threshold_update"):
        TrainConfig(threshold_mode="log_partition", ref_update="epoch", threshold_update="proxy", reward="builtin")
    path = tmp_path / "tau.json"
    path.write_text('{"tau": 0.5}')
    with pytest.raises(ValueError, match="does not combine with threshold_file"):
        TrainConfig(threshold_mode="per_prompt", threshold_file=str(path))
    with pytest.raises(ValueError, match="threshold_mode must be one of global, per_prompt, log_partition"):
        TrainConfig(threshold_mode="per_sample")
    with pytest.raises(ValueError, match="log_partition_beta must be > 0"):
        TrainConfig(log_partition_beta=0)


# ------------------------------------------------------------------------------------------ in the trainer
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    from tgo_fast.trainer.distributed import world_of_one_session

    with world_of_one_session():
        yield tmp_path_factory.mktemp("encodings")


def grouped_by_column(directory, groups=4, per_group=3):
    """A scored jsonl whose prompts all differ but whose `group` column puts ``per_group`` rows together."""
    from PIL import Image

    rows = []
    generator = torch.Generator().manual_seed(1)
    for g in range(groups):
        for k in range(per_group):
            colour = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=generator))
            Image.new("RGB", (40, 40), colour).save(directory / f"{g}-{k}.png")
            rows.append({"prompt": f"a plain square {g} take {k}", "image": f"{g}-{k}.png", "group": g,
                         "score": round(float(torch.rand((), generator=generator)), 3)})
    (directory / "scored.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["per_prompt", "log_partition"])
def test_trainer_labels_each_sample_against_its_group_and_resumes(mode, tmp_path, cache_dir):
    """threshold.json holds the mode and each group's threshold (computed here from the file by hand); the
    objectives label and weight each sample against its own group's threshold; a run resumed from step 1
    reproduces step 2's loss exactly, and a resume with another threshold_mode is refused."""
    import dataclasses

    from tgo_fast.trainer import TrainConfig, Trainer

    rows = grouped_by_column(tmp_path)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), cache_dir=str(cache_dir), data=str(tmp_path / "scored.jsonl"),
                      threshold_mode=mode, percentile=40.0, log_partition_beta=0.2, c=3.0, train_batch_size=4,
                      max_steps=2, save_interval=1, checkpoints_total_limit=0, learning_rate=1e-3,
                      validation_prompts=["a plain square"], validation_inference_steps=1, tensorboard=False,
                      plots=False, export=False, seed=2)
    trainer = Trainer(cfg, "configs/zero3_cpu.json")
    by_group = {}
    for row in rows:
        by_group.setdefault(str(row["group"]), []).append(row["score"])
    if mode == "per_prompt":
        expected = {g: float(np.percentile(s, 40.0)) for g, s in by_group.items()}
    else:
        expected = {g: 0.2 * math.log(np.mean(np.exp(np.array(s) / 0.2))) for g, s in by_group.items()}
    written = json.loads((tmp_path / "run" / "threshold.json").read_text())
    assert written["mode"] == mode and written["group_sizes"] == {g: 3 for g in by_group}
    assert written["group_thresholds"] == pytest.approx(expected, rel=1e-12)

    indices = trainer.schedule.global_batch(0)[0, 0]
    _, stats = trainer.compute_loss(trainer.collate([trainer.train_dataset[int(i)] for i in indices]), epoch=0,
                                    backward=False)
    scores = torch.tensor([rows[i]["score"] for i in indices], dtype=torch.float64)
    own = torch.tensor([expected[str(rows[i]["group"])] for i in indices], dtype=torch.float64)
    torch.testing.assert_close(stats["labels"].double(), (scores >= own).double())
    torch.testing.assert_close(stats["weights"].double(), 1 + 3.0 * (scores - own).abs(), rtol=1e-6, atol=1e-6)

    logged = trainer.train()
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000001"
    resumed = Trainer(dataclasses.replace(cfg, resume_from=str(checkpoint)), "configs/zero3_cpu.json")
    assert resumed.start_step == 1 and resumed.threshold == trainer.threshold
    assert resumed.train()[0]["loss"] == logged[1]["loss"]
    with pytest.raises(ValueError, match="thresholds \\(threshold_mode='" + mode + "'\\) differ"):
        Trainer(dataclasses.replace(cfg, threshold_mode="global", resume_from=str(checkpoint)), "configs/zero3_cpu.json")
