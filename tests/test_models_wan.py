"""The ``wan`` family (Wan 2.1 T2V layout) on its tiny random-init config: video latents and flow matching, the
fused loss on 5-D tensors, clips and frame grids, LoRA and pipeline exports, the from_pretrained path, video rows
in the scored format, and the trainer's reference modes on the built-in image data (images = one-frame clips)."""
import copy
import json
import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

from tgo_fast.data import ScoredImageDataset, collate_scored, load_clip, load_scored_dataset
from tgo_fast.loss import tgo_diffusion_loss
from tgo_fast.models import build_adapter
from tgo_fast.models.wan import frame_grid, save_clip
from tgo_fast.threshold import confidence_weights
from tgo_fast.trainer.config import TrainConfig, load_config
from tgo_fast.trainer.export import LORA_WEIGHT_NAME, merge_lora, save_lora, save_pipeline

from model_helpers import assert_same_state, lora_adapter

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a large red circle at the center on a blue background", "a cat", "a small green square at the left"]


@pytest.fixture(scope="module")
def adapter():
    return build_adapter("wan", None)


def images(batch_size, side=32, seed=0):
    return torch.rand(batch_size, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def clips(batch_size, frames, side=32, seed=0):
    return torch.rand(batch_size, 3, frames, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------------------------- adapter
def test_tiny_build_is_deterministic_frozen_and_keeps_the_vae_fp32(adapter):
    same, other = build_adapter("wan", None, tiny_seed=0), build_adapter("wan", None, tiny_seed=1)
    for name in ("backbone", "text_encoder", "vae"):
        assert_same_state(getattr(adapter, name), getattr(same, name))
    assert any(not torch.equal(a, b) for a, b in zip(adapter.backbone.parameters(), other.backbone.parameters()))
    assert isinstance(adapter.backbone, WanTransformer3DModel) and isinstance(adapter.vae, AutoencoderKLWan)
    assert (adapter.resolution, adapter.num_frames, adapter.fps, adapter.flow_shift) == (32, 5, 16, 3.0)
    for frozen in (adapter.vae, adapter.text_encoder):
        assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    half = build_adapter("wan", None, dtype=torch.bfloat16)
    assert half.vae.dtype == torch.float32  # as diffusers' Wan examples keep it
    assert half.text_encoder.dtype == half.backbone.dtype == torch.bfloat16
    assert half.encode(images(2), PROMPTS[:2])["latents"].dtype == torch.float32


def test_encode_normalises_video_latents_and_zeroes_text_padding(adapter):
    encoded = adapter.encode(images(3), PROMPTS)  # images are one-frame clips
    assert encoded["latents"].shape == (3, 4, 1, 4, 4)
    raw = adapter.vae.encode(images(3).unsqueeze(2)).latent_dist.mode()
    mean = torch.tensor(adapter.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(adapter.vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(encoded["latents"], (raw - mean) / std)
    for key, value in adapter.encode(images(3), PROMPTS).items():  # deterministic: cacheable
        torch.testing.assert_close(value, encoded[key], rtol=0, atol=0)

    # the text embeddings are WanPipeline's own (padding positions zeroed)
    pipeline_embeds, _ = adapter.build_pipeline().encode_prompt(
        PROMPTS, do_classifier_free_guidance=False, max_sequence_length=adapter.max_sequence_length)
    torch.testing.assert_close(encoded["prompt_embeds"], pipeline_embeds)
    tokens = adapter.tokenizer(PROMPTS[1], padding="max_length", max_length=adapter.max_sequence_length).attention_mask
    assert (encoded["prompt_embeds"][1, sum(tokens):] == 0).all() and (encoded["prompt_embeds"][1, 0] != 0).any()

    # a 9-frame clip is cut to num_frames = 5 frames → 1 + 4/4 latent frames
    video = adapter.encode(clips(2, 9), PROMPTS[:2])
    assert video["latents"].shape == (2, 4, 2, 4, 4)
    torch.testing.assert_close(video["latents"], adapter.encode(clips(2, 9)[:, :, :5], PROMPTS[:2])["latents"])


@pytest.mark.parametrize(
    "pixel_values, prompts, error, match",
    [
        (clips(2, 3), PROMPTS[:2], ValueError, r"3 frames does not fit the VAE's 4× time compression"),
        (images(2, side=16), PROMPTS[:2], ValueError, r"pixel_values must have shape \(B, 3, 32, 32\)"),
        (images(2), PROMPTS[:1], ValueError, "1 prompts for 2 clips"),
        ((images(2) * 100).long(), PROMPTS[:2], TypeError, "floating-point"),
    ],
)
def test_encode_rejects_bad_batches(adapter, pixel_values, prompts, error, match):
    with pytest.raises(error, match=match):
        adapter.encode(pixel_values, prompts)


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"num_frames must be 1 \+ 4·k"):
        build_adapter("wan", None, num_frames=4)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_adapter("wan", None, resolution=40)
    with pytest.raises(ValueError, match="weighting_scheme"):
        build_adapter("wan", None, weighting_scheme="cosmap")


def test_flow_matching_target_shift_and_per_sample_draws(adapter):
    encoded = adapter.encode(clips(3, 5), PROMPTS)
    seeds = torch.tensor([11, 12, 13])
    inputs = adapter.sample_inputs(encoded, seeds)
    x0, noise, sigma = encoded["latents"], inputs["noise"], inputs["sigmas"].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(inputs["target"], noise - x0, rtol=0, atol=0)
    torch.testing.assert_close(inputs["noisy_latents"], (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(inputs["sigmas"], inputs["timesteps"] / 1000)
    # flow_shift s maps the unshifted σ to s·σ / (1 + (s − 1)·σ), the same draw u per seed
    unshifted = build_adapter("wan", None, flow_shift=1.0).sample_inputs(encoded, seeds)["sigmas"]
    torch.testing.assert_close(inputs["sigmas"], 3 * unshifted / (1 + 2 * unshifted))
    # sample 1 alone draws what it drew in the batch; the reference sees the policy's inputs
    alone = adapter.sample_inputs({k: v[1:2] for k, v in encoded.items()}, seeds[1:2])
    for key, value in alone.items():
        torch.testing.assert_close(value, inputs[key][1:2], rtol=0, atol=0)
    reference = copy.deepcopy(adapter.backbone).requires_grad_(False)
    prediction = adapter.forward(adapter.backbone, encoded, inputs)
    assert prediction.shape == inputs["target"].shape
    with torch.no_grad():
        torch.testing.assert_close(adapter.forward(reference, encoded, inputs), prediction.detach(), rtol=0, atol=0)
    prediction.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.backbone.parameters())
    adapter.backbone.zero_grad()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_fused_diffusion_loss_on_non_contiguous_5d_video_tensors(impl):
    """(B, C, F, H, W) predictions as a layout permute leaves them (non-contiguous): the same loss, stats and
    gradient as the plain reference on contiguous copies; ŝ = 0 when pred = ref gives ln 2 · mean(w)."""
    generator = torch.Generator().manual_seed(0)
    shape = (4, 3, 2, 6, 8)
    pred = torch.randn(4, 2, 6, 8, 3, generator=generator).permute(0, 4, 1, 2, 3).requires_grad_(True)
    assert pred.shape == shape and not pred.is_contiguous()
    ref = torch.randn(shape, generator=generator).transpose(3, 4).contiguous().transpose(3, 4)
    target = torch.randn(4, 3, 2, 8, 6, generator=generator).transpose(3, 4)
    scores, tau = torch.tensor([0.1, 0.9, 0.4, 0.7]), 0.5
    loss, stats = tgo_diffusion_loss(pred, ref, target, scores, tau, impl=impl, return_stats=True)
    (grad,) = torch.autograd.grad(loss, pred)

    plain = pred.detach().contiguous().requires_grad_(True)
    expected, expected_stats = tgo_diffusion_loss(plain, ref.contiguous(), target.contiguous(), scores, tau,
                                                  impl="torch", return_stats=True)
    (expected_grad,) = torch.autograd.grad(expected, plain)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    for key in ("implicit_score", "policy_error", "reference_error", "weights"):
        torch.testing.assert_close(stats[key], expected_stats[key], msg=key)
    same = tgo_diffusion_loss(pred, pred.detach(), target, scores, tau, impl=impl)
    torch.testing.assert_close(same, math.log(2) * confidence_weights(scores, tau, 5.0).mean())


# ---------------------------------------------------------------------------------------- clips, export
def test_generate_clips_frame_grids_and_written_clips(adapter, tmp_path):
    clip_list = adapter.generate_clips(adapter.backbone, PROMPTS[:2], seeds=[5, 6], num_inference_steps=2)
    assert len(clip_list) == 2 and all(len(frames) == 5 for frames in clip_list)
    assert all(frame.size == (32, 32) for frames in clip_list for frame in frames)
    again = adapter.generate_clips(adapter.backbone, PROMPTS[1:2], seeds=[6], num_inference_steps=2)
    assert [f.tobytes() for f in again[0]] == [f.tobytes() for f in clip_list[1]]  # seed i → clip i, alone too

    grids = adapter.generate(adapter.backbone, PROMPTS[:2], seeds=[5, 6], num_inference_steps=2)
    assert [grid.size for grid in grids] == [(5 * 32, 32)] * 2
    assert np.array_equal(np.asarray(grids[0])[:, 32:64], np.asarray(clip_list[0][1]))
    many = [PIL.Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(20)]
    picked = np.asarray(frame_grid(many))[0, ::4, 0].tolist()
    assert picked == [0, 3, 5, 8, 11, 14, 16, 19]  # 8 evenly spaced frames, first and last included

    gif = save_clip(clip_list[0], tmp_path / "clip.gif", fps=adapter.fps)
    assert load_clip(str(gif), 32).shape == (3, 5, 32, 32)  # written and read back as a clip
    mp4 = save_clip(clip_list[0], tmp_path / "clip.mp4", fps=adapter.fps)
    assert load_clip(str(mp4), 32).shape == (3, 5, 32, 32)
    with pytest.raises(ValueError, match="unsupported clip format '.avi'"):
        save_clip(clip_list[0], tmp_path / "clip.avi", fps=16)


def test_pipeline_generate_writes_each_clip_beside_its_frame_grid(tmp_path):
    from tgo_fast.pipeline.generate import ModelSource, generate

    rows = generate(ModelSource("wan", None, resolution=32), PROMPTS[:2], tmp_path, seed=1, num_inference_steps=1)
    assert [row["video"] for row in rows] == ["videos/0_0.gif", "videos/1_0.gif"]
    for row in rows:
        clip = load_clip(str(tmp_path / row["video"]), 32)
        grid = PIL.Image.open(tmp_path / row["image"])
        assert clip.shape == (3, 5, 32, 32) and grid.size == (5 * 32, 32)


def model_output(adapter, model):
    encoded = adapter.encode(clips(2, 5, seed=1), PROMPTS[:2])
    with torch.no_grad():
        return adapter.forward(model, encoded, adapter.sample_inputs(encoded, torch.tensor([3, 4])))


def test_lora_reloads_in_wan_pipeline_at_the_trained_scaling(tmp_path):
    from peft.tuners.lora import LoraLayer

    lora, config = lora_adapter("wan")
    save_lora(lora, lora.backbone, lora.backbone.state_dict(), config, tmp_path)
    fresh = build_adapter("wan", None)
    pipeline = fresh.build_pipeline()
    pipeline.load_lora_weights(str(tmp_path), weight_name=LORA_WEIGHT_NAME)
    scalings = {s for m in pipeline.transformer.modules() if isinstance(m, LoraLayer) for s in m.scaling.values()}
    assert scalings == {4.0}
    torch.testing.assert_close(model_output(fresh, pipeline.transformer), model_output(lora, lora.backbone))


def test_final_folder_is_a_wan_pipeline_that_loads_and_runs(tmp_path):
    lora, config = lora_adapter("wan")
    save_lora(lora, lora.backbone, lora.backbone.state_dict(), config, tmp_path / "lora")
    save_pipeline(lora, merge_lora(lora.backbone.state_dict(), config), tmp_path)
    pipeline = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(pipeline) is WanPipeline and isinstance(pipeline.scheduler, UniPCMultistepScheduler)
    torch.testing.assert_close(model_output(lora, pipeline.transformer), model_output(lora, lora.backbone))
    pipeline.set_progress_bar_config(disable=True)
    frames = pipeline(PROMPTS[:1], height=32, width=32, num_inference_steps=2, output_type="pil",
                      guidance_scale=lora.validation_guidance_scale, **lora.pipeline_call_kwargs(PROMPTS[:1], [0])).frames[0]
    ours = lora.generate_clips(lora.backbone, PROMPTS[:1], seed=0, num_inference_steps=2)[0]
    assert len(frames) == len(ours) == 5
    for theirs, mine in zip(frames, ours):  # merged vs LoRA rounding
        assert np.abs(np.asarray(theirs, dtype=int) - np.asarray(mine, dtype=int)).max() <= 2


def test_from_pretrained_loads_a_saved_pipeline(adapter, tmp_path):
    adapter.build_pipeline().save_pretrained(tmp_path)
    loaded = build_adapter("wan", str(tmp_path))
    assert (loaded.num_frames, loaded.resolution, loaded.flow_shift) == (81, 480, 3.0)  # Wan 2.1's defaults
    loaded = build_adapter("wan", str(tmp_path), resolution=32, num_frames=5, flow_shift=5.0, dtype=torch.bfloat16)
    assert loaded.vae.dtype == torch.float32 and loaded.backbone.dtype == torch.bfloat16
    assert loaded.sampling_scheduler.config.flow_shift == 5.0 and loaded.noise_scheduler.config.shift == 5.0
    loaded = build_adapter("wan", str(tmp_path), resolution=32, num_frames=5)
    assert_same_state(loaded.backbone, adapter.backbone)
    encoded = adapter.encode(clips(2, 5), PROMPTS[:2])
    for key, value in loaded.encode(clips(2, 5), PROMPTS[:2]).items():
        torch.testing.assert_close(value, encoded[key], msg=key)
    seeds = torch.tensor([7, 8])
    for key, value in adapter.sample_inputs(encoded, seeds).items():
        torch.testing.assert_close(loaded.sample_inputs(encoded, seeds)[key], value, rtol=0, atol=0, msg=key)
    with pytest.raises(ValueError, match="cannot load .* from pretrained="):
        build_adapter("wan", str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------- video data
def _frames(count, side=24):
    """Frames whose red channel counts 0, 10, 20, …: a clip's frame order stays readable after resizing."""
    return [PIL.Image.new("RGB", (side, side), (10 * i, 100, 50)) for i in range(count)]


def _red_levels(clip):
    return ((clip[0, :, 0, 0] + 1) * 127.5).round().int().tolist()


@pytest.fixture
def video_rows(tmp_path):
    """A scored jsonl: an mp4 (24 fps), a frames directory, an animated GIF (8 fps) and a still image."""
    save_clip(_frames(15, side=32), tmp_path / "clip.mp4", fps=24)
    (tmp_path / "frames").mkdir()
    for i, frame in enumerate(_frames(9)):
        frame.save(tmp_path / "frames" / f"{i:03d}.png")
    save_clip(_frames(6), tmp_path / "clip.gif", fps=8)
    _frames(1)[0].save(tmp_path / "still.png")
    rows = [{"prompt": p, "image": image, "score": s} for p, image, s in
            [("a", "clip.mp4", 0.2), ("b", "frames", 0.4), ("c", "clip.gif", 0.6), ("d", "still.png", 0.8)]]
    (tmp_path / "scored.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tmp_path / "scored.jsonl"


def test_video_and_frames_directory_rows_load_as_clips(video_rows, tmp_path):
    dataset = load_scored_dataset(str(video_rows), cache_dir=tmp_path / "cache")
    every = ScoredImageDataset(dataset, resolution=16)
    assert every[0]["pixel_values"].shape == (3, 15, 16, 16)  # all frames when num_frames is None
    assert every[3]["pixel_values"].shape == (3, 16, 16)  # a still image stays an image
    clips_at_8fps = ScoredImageDataset(dataset, resolution=16, num_frames=5, fps=8)
    mp4, directory, gif = (clips_at_8fps[i]["pixel_values"] for i in range(3))
    assert mp4.shape == directory.shape == gif.shape == (3, 5, 16, 16)
    assert _red_levels(directory) == [0, 10, 20, 30, 40]  # no frame rate recorded: consecutive frames
    assert _red_levels(gif) == [0, 10, 20, 30, 40]  # recorded 8 fps = the asked rate
    assert np.allclose(np.array(_red_levels(mp4)) / 30, [0, 1, 2, 3, 4], atol=0.2)  # 24 fps → every 3rd frame
    batch = collate_scored([clips_at_8fps[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 5, 16, 16)
    with pytest.raises(ValueError, match="mixes images and clips"):
        collate_scored([clips_at_8fps[0], clips_at_8fps[3]])
    with pytest.raises(ValueError, match=r"gives 5 frames at 8 fps \(source 24 fps\), fewer than num_frames=9"):
        ScoredImageDataset(dataset, resolution=16, num_frames=9, fps=8)[0]


def test_unreadable_videos_are_clear_errors(tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="cannot read the video .*broken.mp4"):
        load_clip(str(tmp_path / "broken.mp4"), 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="frames directory .*empty.* holds no frame image"):
        load_clip(str(tmp_path / "empty"), 16)
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "000.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read frame .*000.png"):
        load_clip(str(tmp_path / "frames"), 16)
    (tmp_path / "clip.bin").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read .*clip.bin.* as an image or a clip"):
        load_clip(str(tmp_path / "clip.bin"), 16)
    (tmp_path / "scored.jsonl").write_text(json.dumps({"prompt": "a", "image": "missing.mp4", "score": 1}) + "\n")
    with pytest.raises(ValueError, match="row 0: image file .*missing.mp4.* does not exist"):
        load_scored_dataset(str(tmp_path / "scored.jsonl"), cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------------------------- config
def test_wan_yaml_options_reach_the_adapter():
    """(The rule every family yaml follows is tested in test_trainer_config.py.)"""
    cfg = load_config(ROOT / "configs" / "wan.yaml")
    assert cfg.pretrained == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    options = cfg.model_options()
    assert options == {"weighting_scheme": "none", "max_sequence_length": 512, "num_frames": 81, "fps": 16,
                       "flow_shift": 3.0}  # `none` is a scheme (uniform timesteps), not null
    tiny = build_adapter("wan", None, **{**options, "num_frames": 9, "max_sequence_length": 16})
    assert (tiny.num_frames, tiny.fps, tiny.flow_shift, tiny.max_sequence_length) == (9, 16, 3.0, 16)
    with pytest.raises(ValueError, match=r"num_frames must be 1 \+ 4·k"):
        TrainConfig(model="wan", num_frames=8)
    with pytest.raises(ValueError, match="num_frames is an option of model wan"):
        TrainConfig(model="sd15", num_frames=5)


# ------------------------------------------------------------------------------------------------ trainer
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    from tgo_fast.trainer.distributed import world_of_one_session

    with world_of_one_session():
        yield tmp_path_factory.mktemp("encodings")


def tiny_run_config(tmp_path, cache_dir, **overrides) -> TrainConfig:
    """``--config configs/tiny.yaml --model wan --pretrained null`` on the built-in image data, made short."""
    values = dict(model="wan", pretrained=None, data="builtin", output_dir=str(tmp_path / "run"),
                  cache_dir=str(cache_dir), builtin_num_samples=8, train_batch_size=4, max_steps=2, eval_interval=0,
                  validation_prompts=PROMPTS[:1], validation_images_per_prompt=1, validation_inference_steps=1,
                  tensorboard=False, plots=False)
    values.update(overrides)
    return load_config(ROOT / "configs" / "tiny.yaml", overrides=values)


@pytest.mark.slow
def test_reference_modes_start_at_ln2_mean_weight_then_train_and_export(tmp_path, cache_dir):
    """separate / lora / precomputed: the step-0 loss is ln 2 · mean(w) (ŝ = 0), the same in every mode; two
    steps train; final/ is a WanPipeline folder (plus final/lora when LoRA is trained)."""
    from tgo_fast.trainer import Trainer

    losses = {}
    for ref_mode in ("separate", "lora", "precomputed"):
        cfg = tiny_run_config(tmp_path / ref_mode, cache_dir, ref_mode=ref_mode)
        assert cfg.resolution == 64 and cfg.reward == "builtin"  # tiny.yaml's
        trainer = Trainer(cfg, ROOT / "configs" / "zero3_cpu.json")
        indices = trainer.schedule.global_batch(0)[0, 0].tolist()
        batch = trainer.collate([trainer.train_dataset[i] for i in indices])
        loss, stats = trainer.compute_loss(batch, epoch=0, backward=False)
        assert stats["implicit_score"].abs().max() < 1e-3
        torch.testing.assert_close(loss, math.log(2) * stats["weights"].mean(), rtol=1e-5, atol=1e-6)
        losses[ref_mode] = loss
        before = {k: v.clone() for k, v in trainer._state_dict().items()}
        rows = trainer.train()
        assert [row["step"] for row in rows if "loss" in row] == [1, 2]
        assert all(math.isfinite(row["loss"]) for row in rows if "loss" in row)
        after = trainer._state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed and all(("lora_" in k) == cfg.trains_lora for k in changed)
        final = trainer.run_dir / "final"
        pipeline = DiffusionPipeline.from_pretrained(final)
        assert type(pipeline) is WanPipeline
        if cfg.trains_lora:
            assert (final / "lora" / LORA_WEIGHT_NAME).is_file()
            merged = merge_lora(after, trainer.lora_config)
            for key, value in pipeline.transformer.state_dict().items():
                torch.testing.assert_close(value, merged[key], msg=key)
        else:
            for key, value in pipeline.transformer.state_dict().items():
                assert torch.equal(value, after[key]), key
        grid = PIL.Image.open(sorted((trainer.run_dir / "samples").glob("*.png"))[-1])
        assert grid.size == (5 * 64, 64)  # one validation clip of the tiny model's 5 frames, as a frame grid
    for ref_mode, loss in losses.items():
        torch.testing.assert_close(loss, losses["separate"], rtol=0, atol=1e-4, msg=ref_mode)


@pytest.fixture
def clips_of_three_lengths(tmp_path):
    """A scored jsonl of two GIF clips at the tiny model's 16 fps, 7 and 11 frames long, and a 9-frame directory
    (a clip PIL cannot decode as one image)."""
    for name, count in (("short.gif", 7), ("long.gif", 11)):
        save_clip(_frames(count), tmp_path / name, fps=16)
    (tmp_path / "frames").mkdir()
    for i, frame in enumerate(_frames(9)):
        frame.save(tmp_path / "frames" / f"{i:03d}.png")
    rows = [{"prompt": PROMPTS[0], "image": "short.gif", "score": 0.3},
            {"prompt": PROMPTS[1], "image": "long.gif", "score": 0.8},
            {"prompt": PROMPTS[2], "image": "frames", "score": 0.5}]
    (tmp_path / "scored.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("data_mode", ["cached", "streamed", "uncached"])
def test_clips_of_different_lengths_train_as_num_frames_clips(clips_of_three_lengths, data_mode, tmp_path, cache_dir):
    """The trainer reads each clip row as the adapter's num_frames frames at its fps (map-style, streamed, or
    uncached), so clips of 7, 11 and 9 frames batch together; one step trains."""
    from tgo_fast.trainer import Trainer

    cfg = tiny_run_config(tmp_path, cache_dir, data=str(clips_of_three_lengths / "scored.jsonl"), resolution=32,
                          train_batch_size=3, max_steps=1, streaming=data_mode == "streamed",
                          cache_encodings=data_mode != "uncached")
    trainer = Trainer(cfg, ROOT / "configs" / "zero3_cpu.json")
    expected = torch.stack([load_clip(str(clips_of_three_lengths / name), 32, num_frames=5, fps=16)
                            for name in ("short.gif", "long.gif", "frames")])
    if data_mode == "uncached":
        torch.testing.assert_close(torch.stack([trainer.train_dataset[i]["pixel_values"] for i in range(3)]), expected)
    else:
        latents = torch.stack([trainer.train_dataset[i]["encoded"]["latents"] for i in range(3)])
        torch.testing.assert_close(latents, trainer.adapter.encode(expected, PROMPTS)["latents"])
        assert latents.shape[2] == 2  # 5 frames → 1 + 4/4 latent frames
    rows = [row for row in trainer.train() if "loss" in row]
    assert [row["step"] for row in rows] == [1] and math.isfinite(rows[0]["loss"])
