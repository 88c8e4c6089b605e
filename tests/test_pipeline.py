"""tgo_fast.pipeline: prompts, generate (seeds, batching, resume, runs incl. LoRA), score, evaluate and its summary
math, on tiny random-init models (sd15 at 32 px, aMUSEd at 64 px) with 2 sampling steps."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tgo_fast.data import load_scored_dataset
from tgo_fast.models import build_adapter
from tgo_fast.pipeline import (ModelSource, evaluate, generate, image_seed, load_prompts, load_sampler, run_base,
                               score, summarize, trained_run, win_rate)
from tgo_fast.pipeline.prompts import builtin_prompts, synthetic_world_prompts
from tgo_fast.pipeline.shards import read_jsonl
from tgo_fast.rewards import parse_synthetic_prompt

ROOT = Path(__file__).resolve().parents[1]
SD15 = ModelSource("sd15", None, resolution=32)
STEPS = 2
PROMPTS = builtin_prompts("heldout")[:2]
MANIFEST_FIELDS = {"id", "prompt", "prompt_index", "k", "seed", "image"}
generate_module = sys.modules["tgo_fast.pipeline.generate"]  # the package's `generate` is the function


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared CPU two threads can be 30× slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pixels(out_dir: Path, row: dict) -> np.ndarray:
    return np.asarray(Image.open(out_dir / row["image"]))


def same_images(dir_a: Path, rows_a: list[dict], dir_b: Path, rows_b: list[dict]) -> bool:
    return [r["id"] for r in rows_a] == [r["id"] for r in rows_b] and all(
        np.array_equal(pixels(dir_a, a), pixels(dir_b, b)) for a, b in zip(rows_a, rows_b))


# ---------------------------------------------------------------------------------------------- prompts
def test_builtin_prompt_splits_are_fixed_disjoint_and_parse():
    world = synthetic_world_prompts()
    train, heldout = builtin_prompts("train"), builtin_prompts("heldout")
    assert len(world) == len(set(world)) == 2 * 8 * 3 * 5 * 7 == 1680
    assert (len(heldout), len(train)) == (512, 1680 - 512)
    assert not set(train) & set(heldout) and set(train) | set(heldout) == set(world)
    assert load_prompts("builtin:heldout", 5) == heldout[:5] == synthetic_world_prompts()[:5]
    for prompt in heldout[:50]:
        attributes = parse_synthetic_prompt(prompt)
        assert attributes["colour"] != attributes["background"]


def test_load_prompts_from_files(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("# a comment\na red circle\n\n  a blue square  \n#another\n")
    assert load_prompts(text) == ["a red circle", "a blue square"]
    table = datasets.Dataset.from_dict({"prompt": ["p0", "p1", "p2"], "other": [1, 2, 3]})
    table.to_json(tmp_path / "prompts.jsonl")
    table.to_csv(tmp_path / "prompts.csv")
    table.to_parquet(tmp_path / "prompts.parquet")
    for suffix in ("jsonl", "csv", "parquet"):
        assert load_prompts(tmp_path / f"prompts.{suffix}") == ["p0", "p1", "p2"]
    assert load_prompts(tmp_path / "prompts.csv", num_prompts=2) == ["p0", "p1"]


def test_load_prompts_errors_say_what_is_wrong(tmp_path):
    datasets.Dataset.from_dict({"caption": ["a"]}).to_json(tmp_path / "captions.jsonl")
    with pytest.raises(ValueError, match="no 'prompt' column.*caption"):
        load_prompts(tmp_path / "captions.jsonl")
    datasets.Dataset.from_dict({"prompt": ["a", ""]}).to_json(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="row 1: expected a non-empty text prompt"):
        load_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "prompts.yaml").write_text("- a\n")
    with pytest.raises(ValueError, match="unknown format '.yaml'"):
        load_prompts(tmp_path / "prompts.yaml")
    with pytest.raises(ValueError, match="is not a file"):
        load_prompts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="builtin:train or builtin:heldout"):
        load_prompts("builtin:test")
    (tmp_path / "comments.txt").write_text("# only a comment\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        load_prompts(tmp_path / "comments.txt")
    with pytest.raises(ValueError, match="holds only 512 prompts"):
        load_prompts("builtin:heldout", 513)


# ---------------------------------------------------------------------------------------------- generate
@pytest.fixture(scope="module")
def sd15_samples(tmp_path_factory):
    """2 prompts × 2 images from the tiny sd15, in chunks of 2 (two chunks), one batch of 4."""
    out = tmp_path_factory.mktemp("sd15") / "samples"
    rows = generate(SD15, PROMPTS, out, images_per_prompt=2, seed=7, num_inference_steps=STEPS, batch_size=4,
                    chunk_size=2)
    return out, rows


def test_generate_writes_images_and_manifest(sd15_samples):
    out, rows = sd15_samples
    assert rows == read_jsonl(out / "manifest.jsonl")
    assert [(r["prompt_index"], r["k"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for row in rows:
        assert set(row) == MANIFEST_FIELDS
        assert row["prompt"] == PROMPTS[row["prompt_index"]] and row["seed"] == image_seed(7, row["prompt_index"], row["k"])
        assert row["image"] == f"images/{row['prompt_index']}_{row['k']}.png" == f"images/{row['id']}.png"
        assert Image.open(out / row["image"]).size == (32, 32)
    assert len({r["seed"] for r in rows}) == 4
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["chunk_000000.jsonl", "chunk_000001.jsonl", "job.json"]


def test_generate_batch_size_changes_diffusion_images_by_rounding_only(sd15_samples, tmp_path):
    """Same seeds, same noise; batched CPU kernels may round differently (bitwise: see the rank test)."""
    out, rows = sd15_samples
    again = generate(SD15, PROMPTS, tmp_path, images_per_prompt=2, seed=7, num_inference_steps=STEPS, batch_size=1,
                     chunk_size=3)
    assert [(r["id"], r["seed"]) for r in again] == [(r["id"], r["seed"]) for r in rows]
    for a, b in zip(rows, again):
        assert np.abs(pixels(out, a).astype(int) - pixels(tmp_path, b)).max() <= 2


def test_generate_amused_manifest_and_batch_independence(tmp_path):
    source = ModelSource("amused", None)
    kwargs = dict(images_per_prompt=1, seed=1, num_inference_steps=STEPS)
    batched = generate(source, PROMPTS, tmp_path / "batched", batch_size=2, **kwargs)
    single = generate(source, PROMPTS, tmp_path / "single", batch_size=1, **kwargs)
    assert len(batched) == 2 and all(set(row) == MANIFEST_FIELDS for row in batched)
    assert Image.open(tmp_path / "batched" / batched[0]["image"]).size == (64, 64)
    assert same_images(tmp_path / "batched", batched, tmp_path / "single", single)


def test_generate_resumes_only_the_missing_chunk(sd15_samples, monkeypatch):
    out, rows = sd15_samples
    mtimes = lambda: {p.name: p.stat().st_mtime_ns for p in [*(out / "shards").glob("chunk_*"), *(out / "images").iterdir()]}
    before = mtimes()
    # everything done: a rerun neither loads a model nor rewrites a file
    monkeypatch.setattr(generate_module, "load_sampler", lambda *a, **k: pytest.fail("a finished job loaded a model"))
    assert generate(SD15, PROMPTS, out, images_per_prompt=2, seed=7, num_inference_steps=STEPS, chunk_size=2) == rows
    assert mtimes() == before
    monkeypatch.undo()

    (out / "shards" / "chunk_000001.jsonl").unlink()  # as if killed before chunk 1 finished
    assert generate(SD15, PROMPTS, out, images_per_prompt=2, seed=7, num_inference_steps=STEPS, chunk_size=2) == rows
    after = mtimes()
    redone = {name for name in after if after[name] != before.get(name)}
    assert redone == {"chunk_000001.jsonl", "1_0.png", "1_1.png"}


def test_generate_refuses_to_mix_two_jobs(sd15_samples):
    out, _ = sd15_samples
    with pytest.raises(ValueError, match="another job.*differs in num_inference_steps.*new output directory"):
        generate(SD15, PROMPTS, out, images_per_prompt=2, seed=7, num_inference_steps=3, chunk_size=2)
    with pytest.raises(ValueError, match="seed: expected a non-negative integer"):
        generate(SD15, PROMPTS, out, seed=-1)


# ---------------------------------------------------------------------------------------------- runs
def make_run(run_dir: Path, perturbation: float = 0.05) -> dict:
    """A trained-run directory holding a perturbed tiny sd15 backbone, as the trainer exports it."""
    adapter = build_adapter("sd15", None, resolution=32, tiny_seed=0)
    generator = torch.Generator().manual_seed(0)
    state = {key: value + perturbation * torch.randn(value.shape, generator=generator)
             for key, value in adapter.backbone.state_dict().items()}
    adapter.save_pretrained(state, run_dir / "final")
    config = {"model": "sd15", "pretrained": None, "resolution": 32, "seed": 0, "lora": False}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return state


def test_load_sampler_reads_a_full_export(tmp_path):
    state = make_run(tmp_path)
    sampler = load_sampler(trained_run(tmp_path))
    assert not sampler.backbone.training
    for key, value in sampler.backbone.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


def test_load_sampler_applies_a_lora_export(tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    from tgo_fast.trainer.export import save_lora

    adapter = build_adapter("sd15", None, resolution=32, tiny_seed=0)
    config = LoraConfig(r=2, lora_alpha=8.0, target_modules=adapter.lora_target_modules)  # alpha ≠ r: scale 4
    inject_adapter_in_model(config, adapter.backbone)
    with torch.no_grad():
        for name, param in adapter.backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    save_lora(adapter, adapter.backbone, adapter.backbone.state_dict(), config, tmp_path / "final" / "lora")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": "sd15", "pretrained": None, "resolution": 32,
                                                         "seed": 0, "lora": True}))
    loaded = load_sampler(trained_run(tmp_path)).backbone
    sample, timestep, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, timestep, text).sample, adapter.backbone(sample, timestep, text).sample)


def test_load_sampler_keeps_the_run_family_options(tmp_path):
    """A run trained with a family option (here prediction_type) is rebuilt with it, base and policy alike."""
    make_run(tmp_path)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**config, "prediction_type": "v_prediction", "variant": None}))
    for source in (trained_run(tmp_path), run_base(tmp_path)):
        assert source.options == {"prediction_type": "v_prediction"}
        adapter = load_sampler(source).adapter
        assert adapter.noise_scheduler.config.prediction_type == "v_prediction"
    assert load_sampler(SD15).adapter.noise_scheduler.config.prediction_type == "epsilon"  # the tiny default


def test_trained_run_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.yaml"):
        trained_run(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": "sd15", "resolution": 32}))
    with pytest.raises(ValueError, match="no exported weights"):
        load_sampler(trained_run(tmp_path))


# ---------------------------------------------------------------------------------------------- score
def test_score_writes_a_scored_dataset_the_trainer_reads(sd15_samples, tmp_path):
    out, rows = sd15_samples
    scored_file = tmp_path / "scored" / "scored.jsonl"
    scored = score(out / "manifest.jsonl", "builtin", scored_file, batch_size=3, chunk_size=3)
    dataset = load_scored_dataset(scored_file)
    assert len(dataset) == len(rows) and dataset["id"] == [r["id"] for r in rows]
    assert dataset["prompt_index"] == [r["prompt_index"] for r in rows] and dataset["seed"] == [r["seed"] for r in rows]
    np.testing.assert_allclose(dataset["score"], [r["score"] for r in scored])
    assert all(0.0 <= s <= 1.0 for s in dataset["score"])
    assert scored[0]["image"] == os.path.relpath(out / rows[0]["image"], scored_file.parent)


def test_score_checks_every_prompt_before_any_work(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"prompt": "a photo of a cat", "image": "x.png"}) + "\n")
    with pytest.raises(ValueError, match="'a photo of a cat' does not parse"):
        score(tmp_path / "manifest.jsonl", "builtin", tmp_path / "scored.jsonl")
    assert not (tmp_path / "scored.shards").exists()


# ---------------------------------------------------------------------------------------------- evaluate
def test_evaluate_end_to_end_and_summary_recomputes(tmp_path):
    make_run(tmp_path / "run")
    out = tmp_path / "eval"
    summary = evaluate(trained_run(tmp_path / "run"), PROMPTS, out, images_per_prompt=2, seed=3,
                       num_inference_steps=STEPS, rewards=["builtin"], num_before_after=2)
    assert json.loads((out / "summary.json").read_text()) == summary == summarize(out / "samples.jsonl")
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 8 and summary["n"] == 4
    by_model = {m: [(s["prompt"], s["seed"]) for s in samples if s["model"] == m] for m in ("base", "policy")}
    assert by_model["base"] == by_model["policy"]  # identical prompts and seeds
    for sample in samples:
        assert set(sample["rewards"]) == {"builtin"} and (out / sample["image"]).is_file()
        assert sample["image"].startswith(f"{sample['model']}/images/")
    entry = summary["rewards"]["builtin"]
    base_scores = [s["rewards"]["builtin"] for s in samples if s["model"] == "base"]
    assert entry["base"]["mean"] == pytest.approx(np.mean(base_scores))
    assert 0.0 <= entry["win_rate_ci95"][0] <= entry["win_rate"] <= entry["win_rate_ci95"][1] <= 1.0
    assert "| builtin |" in (out / "summary.md").read_text()
    assert Image.open(out / "before_after.png").size == (2 * 32, 2 * 32)  # 2 prompts × (base, policy)
    assert Image.open(out / "score_distribution.png").size[0] > 0
    # the base images are the run's base model's (tiny sd15, seed 0): what generate gives for that source
    base_again = generate(ModelSource("sd15", None, resolution=32), PROMPTS[:1], tmp_path / "base_again",
                          images_per_prompt=1, seed=3, num_inference_steps=STEPS)
    assert np.array_equal(pixels(tmp_path / "base_again", base_again[0]), pixels(out, samples[0]))


def write_samples(path: Path, base: list[float], policy: list[float]) -> Path:
    rows = [{"model": model, "prompt": f"p{i}", "seed": i, "image": f"{model}/{i}.png", "rewards": {"r": value}}
            for model, values in (("base", base), ("policy", policy)) for i, value in enumerate(values)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_win_rate_counts_ties_as_half_and_bootstraps_a_fixed_interval(tmp_path):
    summary = summarize(write_samples(tmp_path / "s.jsonl", base=[0.1, 0.5, 0.9, 0.2], policy=[0.3, 0.5, 0.4, 0.8]))
    entry = summary["rewards"]["r"]
    assert summary["n"] == 4 and entry["win_rate"] == (1 + 0.5 + 0 + 1) / 4
    assert entry["base"] == {"mean": pytest.approx(0.425), "median": pytest.approx(0.35),
                             "std": pytest.approx(np.std([0.1, 0.5, 0.9, 0.2]))}
    low, high = entry["win_rate_ci95"]
    assert 0.0 <= low <= 0.625 <= high <= 1.0
    assert win_rate([0.3, 0.5, 0.4, 0.8], [0.1, 0.5, 0.9, 0.2]) == (0.625, [low, high])  # fixed bootstrap seed

    assert win_rate([2.0, 3.0, 4.0], [1.0, 1.0, 1.0]) == (1.0, [1.0, 1.0])
    assert win_rate([1.0, 1.0], [1.0, 1.0]) == (0.5, [0.5, 0.5])
    assert win_rate([0.0], [1.0]) == (0.0, None)


def test_summarize_refuses_unpaired_samples(tmp_path):
    path = write_samples(tmp_path / "s.jsonl", base=[0.1, 0.2], policy=[0.3, 0.4])
    rows = read_jsonl(path)[:-1]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match="one base and one policy sample; 1 of 2 are unpaired"):
        summarize(path)


# ---------------------------------------------------------------------------------------------- ranks
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_ranks_give_the_single_process_images_bitwise(sd15_samples, tmp_path):
    out, rows = sd15_samples
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "scripts/generate.py", "--model", "sd15", "--resolution", "32", "--prompts",
               str(prompts), "--images_per_prompt", "2", "--seed", "7", "--num_inference_steps", str(STEPS),
               "--batch_size", "4", "--chunk_size", "2", "--out", str(tmp_path / "ranks")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    merged = read_jsonl(tmp_path / "ranks" / "manifest.jsonl")
    assert same_images(out, rows, tmp_path / "ranks", merged)
    assert len(list((tmp_path / "ranks" / "shards").glob("chunk_*.jsonl"))) == 2  # one per rank

