"""Reward specs, scoring with several rewards (columns, score_column, resume, one batch of images in memory),
the evaluation report over models × prompt sets × rewards (recomputed by hand from samples.jsonl), its command
line, and the trainer's val_reward; tiny random-init sd15 runs at 32 px, 2 sampling steps."""
import gc
import json
import os
import re
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tgo_fast.data import load_scored_dataset
from tgo_fast.models import build_adapter
from tgo_fast.pipeline import (evaluate_report, generate, load_prompt_set, load_reward_spec, parse_reward_spec,
                               prompt_win_rate, run_base, score, summarize_report, trained_run)
from tgo_fast.pipeline.cli import evaluate_main, score_main
from tgo_fast.pipeline.reward_specs import parse_reward_specs
from tgo_fast.pipeline.shards import read_jsonl
from tgo_fast.rewards import synthetic_reward

STEPS = 2
BRIGHTNESS, REDNESS = f"{__name__}:brightness", f"{__name__}:redness"
LIVE_IMAGES: list[weakref.ref] = []  # every image a reward of this module was handed


def brightness(images, prompts):
    """Mean pixel value / 255; records the images it sees, to check that earlier batches were released."""
    gc.collect()
    assert not any(ref() is not None for ref in LIVE_IMAGES), "an earlier batch of images is still in memory"
    LIVE_IMAGES.extend(weakref.ref(image) for image in images)
    return [float(np.asarray(image, np.float64).mean() / 255.0) for image in images]


def redness(images, prompts):
    return [float(np.asarray(image, np.float64)[..., 0].mean() / 255.0) for image in images]


def greenness(images, prompts):
    return [float(np.asarray(image, np.float64)[..., 1].mean() / 255.0) for image in images]


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    LIVE_IMAGES.clear()
    yield
    torch.set_num_threads(threads)


def write_manifest(root: Path, count: int) -> list[tuple[int, int, int]]:
    colours = [(20 * i, 200 - 15 * i, (37 * i) % 256) for i in range(count)]
    rows = []
    for i, colour in enumerate(colours):
        Image.new("RGB", (8, 8), colour).save(root / f"{i}.png")
        rows.append({"prompt": f"prompt {i}", "image": f"{i}.png", "k": 0})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return colours


# ---------------------------------------------------------------------------------------------- reward specs
def test_reward_specs_parse_and_load():
    spec = parse_reward_spec("aesthetic=/ckpt/mlp.pth,clip=openai/clip-vit-large-patch14")
    assert (spec.name, spec.pretrained, spec.options) == ("aesthetic", "/ckpt/mlp.pth",
                                                          (("clip", "openai/clip-vit-large-patch14"),))
    assert parse_reward_spec("pickscore").pretrained is None and parse_reward_spec(BRIGHTNESS).column == \
        "score_" + BRIGHTNESS.replace(".", "_").replace(":", "_")
    assert load_reward_spec("builtin") is synthetic_reward and load_reward_spec(BRIGHTNESS) is brightness
    for bad, match in [("pickscore=", "NAME or NAME=PRETRAINED"), ("clip=x,y", "option 'y' is not KEY=VALUE"),
                       ("", "expected NAME")]:
        with pytest.raises(ValueError, match=match):
            parse_reward_spec(bad)
    with pytest.raises(ValueError, match="share the name"):
        parse_reward_specs(["pickscore=a", "pickscore=b"])


# ---------------------------------------------------------------------------------------------- score
def test_score_with_several_rewards_writes_a_column_each_and_resumes_per_reward(tmp_path):
    colours = write_manifest(tmp_path, 5)
    out = tmp_path / "out" / "scored.jsonl"
    rows = score(tmp_path / "manifest.jsonl", [BRIGHTNESS, REDNESS], out, score_column=REDNESS, chunk_size=2,
                 batch_size=2)
    bright_column, red_column = parse_reward_spec(BRIGHTNESS).column, parse_reward_spec(REDNESS).column
    for row, colour in zip(rows, colours):
        assert row[bright_column] == pytest.approx(np.mean(colour) / 255)
        assert row["score"] == row[red_column] == pytest.approx(colour[0] / 255)
        assert (out.parent / row["image"]).resolve() == (tmp_path / f"{row['id']}.png").resolve()
    dataset = load_scored_dataset(out)  # τ can come from any reward: score = the chosen column
    assert dataset["score"] == pytest.approx([c[0] / 255 for c in colours])
    # adding a reward scores only that one: the finished rewards' chunks are kept
    chunks = sorted((out.parent / "scored.rewards").rglob("chunk_*.jsonl"))
    before = {p: p.stat().st_mtime_ns for p in chunks}
    greens = f"{__name__}:greenness"
    again = score(tmp_path / "manifest.jsonl", [BRIGHTNESS, REDNESS, greens], out, score_column=REDNESS,
                  chunk_size=2, batch_size=2)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert [row[parse_reward_spec(greens).column] for row in again] == pytest.approx([c[1] / 255 for c in colours])
    with pytest.raises(ValueError, match="score_column 'clip' is none of the rewards' names"):
        score(tmp_path / "manifest.jsonl", [BRIGHTNESS, REDNESS], out, score_column="clip")


def test_score_streams_one_batch_of_images_at_a_time(tmp_path):
    """A set of any size: images are opened per batch and released before the next (the reward checks it)."""
    write_manifest(tmp_path, 7)
    rows = score(tmp_path / "manifest.jsonl", BRIGHTNESS, tmp_path / "scored.jsonl", batch_size=2, chunk_size=3)
    assert len(rows) == 7 and len(LIVE_IMAGES) == 7
    assert sorted(p.name for p in (tmp_path / "scored.shards").glob("chunk_*")) == [f"chunk_00000{c}.jsonl" for c in range(3)]


def test_score_command_line_takes_several_rewards(tmp_path, capsys):
    write_manifest(tmp_path, 2)
    score_main(["--manifest", str(tmp_path / "manifest.jsonl"), "--reward", BRIGHTNESS, "--reward", REDNESS,
                "--score_column", REDNESS, "--out", str(tmp_path / "s.jsonl")])
    assert "2 scored images" in capsys.readouterr().out
    row = read_jsonl(tmp_path / "s.jsonl")[0]
    assert row["score"] == row[parse_reward_spec(REDNESS).column]


# ---------------------------------------------------------------------------------------------- report
def make_run(run_dir: Path, perturbation: float, seed: int) -> None:
    """A trained-run directory holding a perturbed tiny sd15 backbone, as the trainer exports it."""
    adapter = build_adapter("sd15", None, resolution=32, tiny_seed=0)
    generator = torch.Generator().manual_seed(seed)
    state = {key: value + perturbation * torch.randn(value.shape, generator=generator)
             for key, value in adapter.backbone.state_dict().items()}
    adapter.save_pretrained(state, run_dir / "final")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": "sd15", "pretrained": None, "resolution": 32,
                                                         "seed": 0, "lora": False}))


def test_prompt_win_rate_by_hand():
    # prompt p0: a win and a tie (0.75), p1: two losses (0), p2: a win (1); mean over prompts 0.5833
    rate, interval = prompt_win_rate([2, 1, 0, 0, 3], [1, 1, 1, 1, 0], ["p0", "p0", "p1", "p1", "p2"])
    assert rate == pytest.approx((0.75 + 0 + 1) / 3)
    assert 0.0 <= interval[0] <= rate <= interval[1] <= 1.0
    assert prompt_win_rate([2, 1, 0, 0, 3], [1, 1, 1, 1, 0], ["p0", "p0", "p1", "p1", "p2"]) == (rate, interval)
    assert prompt_win_rate([1.0, 2.0], [0.0, 5.0], ["p", "p"]) == (0.5, None)  # one prompt: no interval


def test_evaluate_report_over_models_prompt_sets_and_rewards(tmp_path):
    make_run(tmp_path / "tgo", 0.05, seed=0)
    make_run(tmp_path / "other", 0.2, seed=1)
    models = {"base": run_base(tmp_path / "tgo"), "tgo": trained_run(tmp_path / "tgo"),
              "other": trained_run(tmp_path / "other")}
    (tmp_path / "more.txt").write_text("a small red circle at the left on a blue background\n"
                                       "a large green square at the top on a white background\n")
    sets = [load_prompt_set("builtin:heldout", 2), load_prompt_set(f"text:{tmp_path / 'more.txt'}")]
    out = tmp_path / "report"
    report = evaluate_report(models, sets, out, rewards=["builtin", BRIGHTNESS], images_per_prompt=2, seed=3,
                             num_inference_steps=STEPS)
    assert json.loads((out / "report.json").read_text()) == report == summarize_report(out / "samples.jsonl", base="base")
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 2 * 3 * 2 * 2 and report["models"] == ["base", "tgo", "other"]
    assert report["prompt_sets"] == {"builtin-heldout": {"prompts": 2, "images_per_prompt": 2},
                                     "more": {"prompts": 2, "images_per_prompt": 2}}
    for set_name in ("builtin-heldout", "more"):
        for reward in ("builtin", BRIGHTNESS):
            cell = {m: {(s["prompt_index"], s["seed"]): s["rewards"][reward] for s in samples
                        if s["prompt_set"] == set_name and s["model"] == m} for m in models}
            assert set(cell["tgo"]) == set(cell["base"])  # identical prompts and seeds
            keys = sorted(cell["base"])
            for name in models:
                scores = [cell[name][key] for key in keys]
                entry = report["results"][set_name][reward][name]
                assert entry["mean"] == pytest.approx(np.mean(scores)) and entry["median"] == pytest.approx(np.median(scores))
                if name != "base":
                    outcomes = {}
                    for key in keys:
                        outcomes.setdefault(key[0], []).append(np.sign(cell[name][key] - cell["base"][key]) / 2 + 0.5)
                    assert entry["win_rate"] == pytest.approx(np.mean([np.mean(v) for v in outcomes.values()]))
    for sample in samples:
        assert (out / sample["image"]).is_file() and sample["image"].startswith(f"{sample['prompt_set']}/{sample['model']}/")
    markdown = (out / "report.md").read_text()
    assert "| more | 2 × 2 | builtin | tgo |" in markdown and "(base)" in markdown
    for reward in ("builtin", BRIGHTNESS.replace(":", "-")):
        assert Image.open(out / f"score_distribution_{reward}.png").size[0] > 0
    # the base samples are the base model's: what generate gives for that source at that seed
    again = generate(models["base"], sets[1].prompts[:1], tmp_path / "again", images_per_prompt=1, seed=3,
                     num_inference_steps=STEPS)
    first = next(s for s in samples if s["prompt_set"] == "more" and s["model"] == "base")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / again[0]["image"])),
                          np.asarray(Image.open(out / first["image"])))


def test_evaluate_command_line_report_mode_and_errors(tmp_path, capsys):
    make_run(tmp_path / "tgo", 0.05, seed=0)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a small red circle at the left on a blue background\n")
    common = ["--prompts", f"text:{prompts}", "--images_per_prompt", "1", "--num_inference_steps", str(STEPS),
              "--num_prompts", "1"]
    evaluate_main(["--model", f"tgo={tmp_path / 'tgo'}", *common, "--out", str(tmp_path / "report")])
    assert "| p | 1 × 1 | builtin | tgo |" in capsys.readouterr().out
    assert json.loads((tmp_path / "report" / "report.json").read_text())["models"] == ["base", "tgo"]
    for argv, match in [(["--model", f"tgo={tmp_path / 'tgo'}", *common], "--out: name the report's output"),
                        (["--model", "tgo=sd15", "--out", "x"], "expected a trained run directory .* or FAMILY:PRETRAINED"),
                        (["--model", f"tgo={tmp_path / 'tgo'}", "--base_model", "sd15", "--out", "x"],
                         "--base_model / --base_pretrained go with --run"),
                        (["--run", str(tmp_path / "tgo"), "--prompts", "builtin:heldout", "--prompts", "builtin:train"],
                         "--run evaluates one prompt set")]:
        with pytest.raises(SystemExit):
            evaluate_main(argv)
        assert re.search(match, capsys.readouterr().err), match


# ---------------------------------------------------------------------------------------------- trainer
@pytest.mark.slow
def test_trainer_scores_validation_images_with_val_reward(tmp_path):
    """val_reward replaces reward for the validation images only; validation_reward is their mean under it."""
    from tgo_fast.trainer import TrainConfig, Trainer
    from tgo_fast.trainer.distributed import world_of_one_session

    config = os.path.join(os.path.dirname(__file__), "..", "configs", "zero3_cpu.json")
    with world_of_one_session():
        cfg = TrainConfig(output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), builtin_num_samples=8,
                          train_batch_size=4, max_steps=1, resolution=32, validation_inference_steps=1,
                          validation_prompts=["a photo of a cat"], tensorboard=False, plots=False, export=False,
                          val_reward=BRIGHTNESS)
        trainer = Trainer(cfg, config)
        assert trainer.validation_reward is brightness and trainer.reward is None
        rows = trainer.train()
    grid = Image.open(tmp_path / "run" / "samples" / "step_000001.png")
    assert rows[-1]["validation_reward"] == pytest.approx(np.asarray(grid, np.float64).mean() / 255, abs=1e-6)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and "validation_reward" in first
    with pytest.raises(ValueError, match="val_reward must be a reward spec"):
        TrainConfig(val_reward=" ")
