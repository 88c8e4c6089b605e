"""ema_decay: an exponential moving average of the policy (diffusers' --use_ema schedule), swapped in for validation
and export, carried by checkpoints; under ZeRO-3 each rank averages its own partitions."""
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tgo_fast.trainer import TrainConfig
from tgo_fast.trainer.distributed import world_of_one_session
from tgo_fast.trainer.ema import PolicyEMA

DS_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "zero3_cpu.json")


def independent_ema(states: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """θ_ema after len(states) − 1 steps: d_t = min(decay, (1 + t)/(10 + t)), θ_ema ← d_t·θ_ema + (1 − d_t)·θ_{t+1}."""
    average = {k: v.double() for k, v in states[0].items()}
    for t, state in enumerate(states[1:]):
        d = min(decay, (1 + t) / (10 + t))
        average = {k: d * average[k] + (1 - d) * state[k].double() for k in average}
    return average


def test_average_follows_the_schedule_and_swaps_back():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    module[1].bias.requires_grad_(False)  # frozen parameters are not averaged
    ema = PolicyEMA(module, decay=0.5)
    states = [{k: v.clone() for k, v in module.state_dict().items()}]
    for _ in range(4):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        states.append({k: v.clone() for k, v in module.state_dict().items()})
    expected = independent_ema(states, 0.5)
    with ema.swapped_in():
        inside = {k: v.clone() for k, v in module.state_dict().items()}
    for name, value in inside.items():
        if name == "1.bias":
            torch.testing.assert_close(value, states[-1][name], rtol=0, atol=0)
        else:
            torch.testing.assert_close(value.double(), expected[name], rtol=1e-6, atol=1e-6)
    for name, value in module.state_dict().items():  # θ is back, bit for bit
        torch.testing.assert_close(value, states[-1][name], rtol=0, atol=0)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_decay_outside_the_open_interval_is_a_clear_error(decay):
    with pytest.raises(ValueError, match="ema_decay must be in"):
        PolicyEMA(nn.Linear(2, 2), decay)
    with pytest.raises(ValueError, match="ema_decay must be in"):
        TrainConfig(ema_decay=decay)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    with world_of_one_session():
        yield tmp_path_factory.mktemp("encodings")


def make_trainer(tmp_path, cache_dir, **overrides):
    from tgo_fast.trainer import Trainer

    values = dict(output_dir=str(tmp_path / "run"), cache_dir=str(cache_dir), builtin_num_samples=16,
                  train_batch_size=4, max_steps=3, resolution=32, ema_decay=0.6, lr_warmup_steps=0,
                  learning_rate=1e-3, validation_prompts=["a large red circle at the center on a blue background"],
                  validation_inference_steps=1, tensorboard=False, plots=False, seed=3)
    values.update(overrides)
    return Trainer(TrainConfig(**values), DS_CONFIG)


@pytest.mark.slow
def test_zero3_run_exports_the_average_and_trains_on_the_raw_weights(tmp_path, cache_dir, monkeypatch):
    trainer = make_trainer(tmp_path, cache_dir)
    states = [trainer._state_dict()]
    update = PolicyEMA.update

    def recording_update(self):
        update(self)
        states.append(trainer._state_dict())

    monkeypatch.setattr(PolicyEMA, "update", recording_update)
    trainer.train()
    assert len(states) == 4
    assert any(not torch.equal(states[0][k], states[-1][k]) for k in states[0])  # the weights did move
    expected = independent_ema(states, 0.6)
    exported = load_file(tmp_path / "run" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    for name, value in exported.items():
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-6, atol=1e-7)
    assert any(not torch.allclose(exported[k], states[-1][k]) for k in exported)  # not simply θ
    after = trainer._state_dict()  # the engine still holds θ after validation and export swapped θ_ema in
    for name, value in after.items():
        torch.testing.assert_close(value, states[-1][name], rtol=0, atol=0)


@pytest.mark.slow
def test_resumed_run_continues_the_same_average(tmp_path, cache_dir):
    straight = make_trainer(tmp_path / "a", cache_dir, max_steps=4)
    straight.train()
    first = make_trainer(tmp_path / "b", cache_dir, max_steps=2, save_interval=2)
    first.train()
    resumed = make_trainer(tmp_path / "b", cache_dir, max_steps=4, resume_from="latest")
    assert resumed.start_step == 2 and resumed.ema.steps == 2
    resumed.train()
    for a, b in zip(straight.ema.average, resumed.ema.average):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_resume_without_the_average_is_a_clear_error(tmp_path, cache_dir):
    make_trainer(tmp_path, cache_dir, max_steps=1, save_interval=1, ema_decay=None).train()
    with pytest.raises(ValueError, match="ema_rank0.safetensors"):
        make_trainer(tmp_path, cache_dir, max_steps=2, resume_from="latest")
