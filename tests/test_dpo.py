"""Diffusion-DPO: the loss against diffusers' formula, pair construction, and two training steps per paradigm."""
import json

import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from tgo_fast.trainer import TrainConfig
from tgo_fast.trainer.batches import PreferencePairDataset, collate_pairs, preference_pairs
from tgo_fast.trainer.objectives import diffusion_objective, masked_objective

DS_CONFIG = "configs/zero3_cpu.json"


# ------------------------------------------------------------------------------------------------- the loss
def test_diffusion_dpo_is_diffusers_formula_with_beta_dpo_2beta_over_t():
    """diffusers' train_diffusion_dpo.py: −log σ(−½·β_dpo·((e_θ,w − e_ref,w) − (e_θ,l − e_ref,l))), β_dpo = 2β/T."""
    pairs, beta, temperature = 3, 0.7, 0.05
    pred = torch.randn(2 * pairs, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2 * pairs, 4, 2, 2, dtype=torch.float64)
    target = torch.randn(2 * pairs, 4, 2, 2, dtype=torch.float64)
    cfg = TrainConfig(loss="dpo", beta=beta, temperature=temperature)
    loss, stats = diffusion_objective(cfg, pred, target, torch.rand(2 * pairs, dtype=torch.float64), 0.5,
                                      ref_pred=ref)
    model_losses = (pred - target).pow(2).mean(dim=[1, 2, 3])
    ref_losses = (ref - target).pow(2).mean(dim=[1, 2, 3])
    model_w, model_l = model_losses.chunk(2)
    ref_w, ref_l = ref_losses.chunk(2)
    inside = -0.5 * (2 * beta / temperature) * ((model_w - model_l) - (ref_w - ref_l))
    expected = -torch.log(torch.sigmoid(inside)).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats["implicit_score"], inside.detach())
    torch.testing.assert_close(stats["accuracy"], (inside > 0).double())
    torch.testing.assert_close(stats["policy_error"], ((model_w + model_l) / 2).float().detach())
    # the same with the precomputed e_ref
    stored, _ = diffusion_objective(cfg, pred, target, torch.rand(2 * pairs), 0.5, ref_error=ref_losses)
    torch.testing.assert_close(stored, expected)
    gradient, = torch.autograd.grad(loss, pred)
    expected_gradient, = torch.autograd.grad(expected, pred)
    torch.testing.assert_close(gradient, expected_gradient)


def test_masked_dpo_uses_log_prob_ratios():
    pairs, length, hidden_size, vocab = 2, 5, 8, 11
    head = torch.nn.Linear(hidden_size, vocab)
    hidden = torch.randn(2 * pairs, length, hidden_size)
    labels = torch.randint(0, vocab, (2 * pairs, length))
    labels[:, 1::2] = -100  # the pair shares its mask
    ref_logp = -torch.rand(2 * pairs) * 3
    loss, stats = masked_objective(TrainConfig(loss="dpo", beta=0.4), head, hidden, labels,
                                   torch.rand(2 * pairs), 0.5, ref_logp)
    logp_tokens = torch.log_softmax(head(hidden).double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    mask = labels != -100
    logp = (logp_tokens * mask).sum(1) / mask.sum(1)
    s = 0.4 * (logp - ref_logp.double())
    margin = s[:pairs] - s[pairs:]
    torch.testing.assert_close(loss.double(), -F.logsigmoid(margin).mean().detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["implicit_score"].double(), margin.detach(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- pairs
def test_pairs_within_a_prompt_by_hand():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.7, 0.2], dtype=torch.float64)
    groups = ["a", "a", "a", "b", "b", "c"]
    # a: (0,1) → 1 beats 0; (0,2) tie → none; (1,2) → 1 beats 2. b: (3,4) → 4 beats 3. c alone → none.
    assert preference_pairs(scores, groups).tolist() == [[1, 0], [1, 2], [4, 3]]
    # a gap of at least 0.45: 0.9 − 0.5 = 0.4 no longer pairs, 0.7 − 0.1 = 0.6 does
    assert preference_pairs(scores, groups, min_gap=0.45).tolist() == [[4, 3]]
    with pytest.raises(ValueError, match="no preference pair.*dpo_min_gap=1.0"):
        preference_pairs(scores, groups, min_gap=1.0)
    with pytest.raises(ValueError, match="no preference pair"):
        preference_pairs(torch.tensor([0.3, 0.3, 0.8]), ["x", "x", "y"])  # a tie and a lone sample


def test_pair_batches_put_winners_first():
    samples = [{"index": i, "score": float(i)} for i in range(4)]
    dataset = PreferencePairDataset(samples, torch.tensor([[3, 0], [2, 1]]))

    def stack(rows):
        return {"index": torch.tensor([r["index"] for r in rows]), "score": torch.tensor([r["score"] for r in rows])}

    batch = collate_pairs(stack, [dataset[1], dataset[0]])
    assert batch["index"].tolist() == [1, 0]  # pair indices: the pair's seed
    assert batch["sample_index"].tolist() == [2, 3, 1, 0]  # winners of pairs 1 and 0, then their losers
    assert batch["score"].tolist() == [2.0, 3.0, 1.0, 0.0]


def test_config_refuses_dpo_with_per_prompt_thresholds():
    with pytest.raises(ValueError, match="threshold_mode='per_prompt' does not combine with loss='dpo'"):
        TrainConfig(loss="dpo", threshold_mode="per_prompt")
    with pytest.raises(ValueError, match="dpo_min_gap must be ≥ 0"):
        TrainConfig(loss="dpo", dpo_min_gap=-0.1)


# ------------------------------------------------------------------------------------------ in the trainer
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    from tgo_fast.trainer.distributed import world_of_one_session

    with world_of_one_session():
        yield tmp_path_factory.mktemp("encodings")


def grouped_data(directory, prompts=4, per_prompt=3):
    """A scored jsonl with ``per_prompt`` images of each of ``prompts`` prompts (distinct scores)."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    for p in range(prompts):
        for k in range(per_prompt):
            colour = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=generator))
            PIL.Image.new("RGB", (40, 40), colour).save(directory / f"{p}-{k}.png")
            rows.append({"prompt": f"a plain square number {p}", "image": f"{p}-{k}.png",
                         "score": round(float(torch.rand((), generator=generator)), 4)})
    path = directory / "scored.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def dpo_config(tmp_path, cache_dir, run="run", **overrides):
    data = tmp_path / "scored.jsonl"
    values = dict(output_dir=str(tmp_path / run), cache_dir=str(cache_dir),
                  data=str(data if data.is_file() else grouped_data(tmp_path)),
                  loss="dpo", train_batch_size=2, max_steps=2, resolution=32, validation_prompts=["a plain square"],
                  validation_inference_steps=1, tensorboard=False, plots=False, export=False, seed=5)
    values.update(overrides)
    return TrainConfig(**values)


def first_batch(trainer):
    return trainer.collate([trainer.train_dataset[i] for i in trainer.schedule.global_batch(0)[0, 0].tolist()])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["sd15", "amused"])
def test_dpo_trains_two_steps_and_the_precomputed_table_keeps_pairs(model, tmp_path, cache_dir):
    """4 prompts × 3 distinct scores → 12 pairs. Both images of a pair see the same noise and timestep (mask);
    at step 0 π_θ = π_ref, so every margin is 0 and the loss log 2; the precomputed table gives the live reference's
    values for both rows of each pair; two optimizer steps change the weights."""
    from tgo_fast.trainer import Trainer

    resolution = 32 if model == "sd15" else None
    results = {}
    for ref_mode in ("separate", "precomputed"):
        cfg = dpo_config(tmp_path, cache_dir, run=ref_mode, model=model, ref_mode=ref_mode, resolution=resolution)
        trainer = Trainer(cfg, DS_CONFIG)
        assert trainer.num_items == len(trainer.pairs) == 12
        batch = first_batch(trainer)
        winners, losers = batch["sample_index"].chunk(2)
        assert (trainer.scores[winners] > trainer.scores[losers]).all()
        assert [trainer.groups[i] for i in winners] == [trainer.groups[i] for i in losers]
        encoded, inputs, _ = trainer._prepare(batch, epoch=0)
        if model == "sd15":
            shared = [inputs["noise"], inputs["timesteps"]]
        else:
            shared = [inputs["labels"] != -100, inputs["mask_ratio"]]
        for value in shared:
            torch.testing.assert_close(value[:2], value[2:])
        results[ref_mode] = trainer.reference.values(batch["index"], encoded, inputs)
        loss, stats = trainer.compute_loss(batch, epoch=0, backward=False)
        assert stats["implicit_score"].shape == (2,) and stats["implicit_score"].abs().max() < 1e-3
        torch.testing.assert_close(loss.double(), torch.log(torch.tensor(2.0, dtype=torch.float64)), rtol=0, atol=1e-3)
        before = {k: v.clone() for k, v in trainer._state_dict().items()}
        rows = trainer.train()
        assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
        assert "positive_fraction" not in rows[0] and 0.0 <= rows[0]["accuracy"] <= 1.0
        after = trainer._state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)
    live, stored = results["separate"], results["precomputed"]
    if model == "sd15":  # e_ref of the live prediction
        target = inputs["target"].float().reshape(4, -1)
        live_value = (live.prediction.float().reshape(4, -1) - target).square().mean(dim=1)
    else:
        live_value = live.value
    torch.testing.assert_close(stored.value.float(), live_value.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_dpo_with_too_few_pairs_names_the_unit(tmp_path, cache_dir):
    from tgo_fast.trainer import Trainer

    cfg = dpo_config(tmp_path, cache_dir, train_batch_size=16)
    with pytest.raises(ValueError, match="12 preference pairs \\(loss: dpo\\), fewer than train_batch_size=16"):
        Trainer(cfg, DS_CONFIG)


@pytest.mark.slow
def test_dpo_resumes_with_its_pair_table(tmp_path, cache_dir):
    """A DPO run with the precomputed reference (its table keeps both rows of each pair) resumed from step 1
    reproduces step 2's loss exactly."""
    import dataclasses

    from tgo_fast.trainer import Trainer

    cfg = dpo_config(tmp_path, cache_dir, ref_mode="precomputed", lora=True, save_interval=1,
                     checkpoints_total_limit=0, learning_rate=1e-3)
    trainer = Trainer(cfg, DS_CONFIG)
    logged = trainer.train()
    resumed = Trainer(dataclasses.replace(cfg, resume_from=str(tmp_path / "run" / "checkpoints" / "step_000001")),
                      DS_CONFIG)
    assert resumed.start_step == 1 and torch.equal(resumed.reference.table, trainer.reference.table)
    assert resumed.train()[0]["loss"] == logged[1]["loss"]
