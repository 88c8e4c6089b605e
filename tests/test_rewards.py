"""Reward functions: load_reward specs, score_images validation, synthetic_reward vs the stored synthetic truth."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from tgo_fast.data import _ATTRIBUTE_VALUES, _COLOURS, synthetic_scored_dataset
from tgo_fast.rewards import (check_reward_prompts, load_reward, measure_synthetic_attributes, score_images,
                              synthetic_reward)

ATTRIBUTES = ("shape", "colour", "size", "position", "background")
CHOICES = _ATTRIBUTE_VALUES  # caption attribute -> its values, in caption order


def _caption(attributes: dict) -> str:
    return (f"a {attributes['size']} {attributes['colour']} {attributes['shape']} at the {attributes['position']} "
            f"on a {attributes['background']} background")


@pytest.fixture
def synthetic(tmp_path):
    seed = random.randrange(2**31)
    return seed, synthetic_scored_dataset(num_samples=64, resolution=64, seed=seed, root=tmp_path / f"synthetic-{seed}")


def _ranks(values: np.ndarray) -> np.ndarray:
    return values.argsort().argsort().astype(np.float64)


# ---------------------------------------------------------------------------------------------
# synthetic_reward against the stored truth
# ---------------------------------------------------------------------------------------------
def test_recovers_attributes_and_tracks_stored_score(synthetic):
    seed, ds = synthetic
    images = ds["image"]
    measured = [measure_synthetic_attributes(image) for image in images]
    for key in ATTRIBUTES:
        accuracy = np.mean([m.get(key) == truth for m, truth in zip(measured, ds[key])])
        assert accuracy >= 0.9, f"seed {seed}: {key} recovered for {accuracy:.1%} of images"
    # the stored aesthetics = contrast · (1 − 2 noise) · centring gives the true noise back
    contrast = np.array([np.linalg.norm(np.subtract(_COLOURS[c], _COLOURS[b])) / (255 * np.sqrt(3))
                         for c, b in zip(ds["colour"], ds["background"])])
    centring = np.where(np.array(ds["position"]) == "center", 1.0, 0.85)
    true_noise = (1 - np.array(ds["aesthetics"]) / (contrast * centring)) / 2
    noise_error = np.abs(np.array([m["noise"] for m in measured]) - true_noise).mean()
    assert noise_error <= 0.01, f"seed {seed}: noise level off by {noise_error:.4f} on average"

    scores = synthetic_reward(images, ds["prompt"])
    assert scores.dtype == torch.float64 and scores.shape == (len(ds),)
    stored = np.array(ds["score"])
    predicted = scores.numpy()
    pearson = np.corrcoef(predicted, stored)[0, 1]
    spearman = np.corrcoef(_ranks(predicted), _ranks(stored))[0, 1]
    mae = np.abs(predicted - stored).mean()
    assert pearson >= 0.9 and spearman >= 0.9, f"seed {seed}: pearson {pearson:.3f}, spearman {spearman:.3f}"
    assert mae <= 0.02, f"seed {seed}: mean abs error {mae:.4f}"


def test_swapped_caption_attributes_lower_score_by_0_6_k_over_5(synthetic):
    seed, ds = synthetic
    rng = random.Random(seed)
    rows = [ds[index] for index in rng.sample(range(len(ds)), 12)]
    images = [row["image"] for row in rows]
    truths = [{key: row[key] for key in ATTRIBUTES} for row in rows]
    base = synthetic_reward(images, [_caption(t) for t in truths])
    for k in range(1, 6):
        swapped = []
        for truth in truths:
            caption = dict(truth)
            for key in rng.sample(ATTRIBUTES, k):
                caption[key] = rng.choice([v for v in CHOICES[key] if v != truth[key]])
            swapped.append(_caption(caption))
        drop = (base - synthetic_reward(images, swapped)).numpy()
        assert np.median(drop) == pytest.approx(0.6 * k / 5, abs=1e-9), f"seed {seed}, k={k}: drops {drop}"
        assert np.abs(drop - 0.6 * k / 5).mean() <= 0.05, f"seed {seed}, k={k}: drops {drop}"


def test_other_resolutions_and_modes_are_measured(tmp_path):
    seed = random.randrange(2**31)
    ds = synthetic_scored_dataset(num_samples=16, resolution=96, seed=seed, root=tmp_path / "r96")
    images = [image.convert("RGBA") for image in ds["image"]]
    scores = synthetic_reward(images, ds["prompt"]).numpy()
    assert np.abs(scores - np.array(ds["score"])).mean() <= 0.05, f"seed {seed}: {scores} vs {ds['score']}"


def test_garbage_images_get_finite_scores_in_unit_interval():
    rng = np.random.default_rng()
    side = int(rng.integers(8, 80))
    flat = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(0, 256, 3)))
    noise = Image.fromarray(rng.integers(0, 256, (side, side + 3, 3), dtype=np.uint8))
    blob = Image.fromarray(np.clip(rng.normal(128, 90, (32, 32)), 0, 255).astype(np.uint8), "L")
    black = Image.new("RGB", (64, 64))
    dot = np.full((64, 64, 3), 128, np.uint8)
    dot[30:32, 30:32] = 255  # far below the minimum foreground size
    images = [flat, noise, blob, black, Image.fromarray(dot)]
    prompts = [_caption({key: rng.choice(values) for key, values in CHOICES.items()}) for _ in images]
    scores = synthetic_reward(images, prompts)
    assert torch.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all(), scores
    # no foreground in a flat image: only the background can agree, contrast counts as 0
    assert measure_synthetic_attributes(flat).keys() == {"background", "noise"}
    flat_background = measure_synthetic_attributes(flat)["background"]
    flat_caption = dict(zip(CHOICES, ["small", "red", "circle", "left", flat_background]))
    assert synthetic_reward([flat], [_caption(flat_caption)]).item() == pytest.approx(0.6 / 5)


@pytest.mark.parametrize("prompt", ["a cat on a sofa", "a huge red circle at the left on a blue background",
                                    "a small red circle at the left on a blue", ""])
def test_unparseable_prompt_is_value_error(prompt):
    with pytest.raises(ValueError, match="does not parse.*expected 'a \\{size\\}"):
        synthetic_reward([Image.new("RGB", (16, 16))], [prompt])


def test_synthetic_reward_length_mismatch():
    with pytest.raises(ValueError, match="2 images and 1 prompts"):
        synthetic_reward([Image.new("RGB", (16, 16))] * 2, [_caption({k: v[0] for k, v in CHOICES.items()})])


# ---------------------------------------------------------------------------------------------
# load_reward
# ---------------------------------------------------------------------------------------------
def test_load_reward_builtin_and_dotted_path_are_the_same_function():
    assert load_reward("builtin") is synthetic_reward
    assert load_reward("tgo_fast.rewards:synthetic_reward") is synthetic_reward
    assert load_reward("numpy:mean") is np.mean


@pytest.mark.parametrize("spec, message", [
    ("", "expected 'builtin', one of hpsv2, pickscore, imagereward, clip, aesthetic or 'package.module:function'"),
    ("tgo_fast.rewards", "'tgo_fast.rewards': expected 'builtin', one of .* or 'package.module:function'"),
    ("tgo_fast.rewards:", "expected 'builtin', one of .* or 'package.module:function'"),
    ("HPSv2", "'HPSv2': expected 'builtin', one of hpsv2, .* or 'package.module:function'"),
    ("tgo_fast_no_such_module_x:score", "cannot import module 'tgo_fast_no_such_module_x': No module named"),
    ("tgo_fast.rewards:no_such_reward", "module 'tgo_fast.rewards' has no attribute 'no_such_reward'"),
    ("math:pi", "math.pi is a float, not callable"),
])
def test_load_reward_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        load_reward(spec)


# ---------------------------------------------------------------------------------------------
# score_images
# ---------------------------------------------------------------------------------------------
def _inputs(n):
    rng = np.random.default_rng()
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]
    return images, [f"prompt {i}" for i in range(n)]


@pytest.mark.parametrize("kind", ["list", "numpy", "torch-float32"])
def test_score_images_returns_float64_cpu_vector(kind):
    images, prompts = _inputs(5)
    values = np.random.default_rng().normal(size=5)
    output = {"list": values.tolist(), "numpy": values,
              "torch-float32": torch.tensor(values, dtype=torch.float32)}[kind]
    scores = score_images(lambda imgs, prs: output, images, prompts)
    assert scores.dtype == torch.float64 and scores.device.type == "cpu" and scores.shape == (5,)
    torch.testing.assert_close(scores, torch.as_tensor(values), atol=1e-6 if kind == "torch-float32" else 0, rtol=1e-6)


def test_score_images_bad_outputs():
    images, prompts = _inputs(4)
    values = np.random.default_rng().uniform(size=4)
    with pytest.raises(ValueError, match="expected 4 scores \\(one per image\\), got 3"):
        score_images(lambda i, p: values[:3], images, prompts)
    with_nan = values.copy()
    with_nan[2] = np.nan
    with pytest.raises(ValueError, match="non-finite score nan at position 2 \\(prompt 'prompt 2'\\)"):
        score_images(lambda i, p: with_nan, images, prompts)
    with pytest.raises(ValueError, match="non-finite score inf at position 1"):
        score_images(lambda i, p: [0.0, float("inf"), 0.0, 0.0], images, prompts)
    with pytest.raises(ValueError, match="1-D sequence of numbers, got shape \\(4, 1\\)"):
        score_images(lambda i, p: values[:, None], images, prompts)
    with pytest.raises(ValueError, match="1-D sequence of numbers, got list"):
        score_images(lambda i, p: ["good", "bad", "ugly", "x"], images, prompts)
    with pytest.raises(ValueError, match="got 4 images and 3 prompts"):
        score_images(lambda i, p: values, images, prompts[:3])


def test_score_images_with_builtin_reward(synthetic):
    _, ds = synthetic
    scores = score_images(load_reward("builtin"), ds["image"][:8], ds["prompt"][:8])
    torch.testing.assert_close(scores, synthetic_reward(ds["image"][:8], ds["prompt"][:8]))


def test_check_reward_prompts_refuses_captions_the_builtin_reward_cannot_read():
    captions = [f"a small {c} circle at the center on a {b} background" for c, b in (("red", "blue"), ("green", "black"))]
    check_reward_prompts(synthetic_reward, captions)
    with pytest.raises(ValueError, match="prompt 'a photo of a dog' does not parse"):
        check_reward_prompts(synthetic_reward, [*captions, "a photo of a dog", "another"])
    check_reward_prompts(lambda images, prompts: [0.0] * len(images), ["a photo of a dog"])  # other rewards: trusted
