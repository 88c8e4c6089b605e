"""Helpers the model-family tests share (test_models_diffusion / _sd3 / _wan, test_export)."""
import torch

from tgo_fast.models import build_adapter


def assert_same_state(model_a, model_b):
    """Bit-identical state dicts (same keys, same values)."""
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=0, msg=key)


def random_seeds(batch_size):
    return torch.randint(0, 2**62, (batch_size,), dtype=torch.int64)


def lora_adapter(family: str, rank: int = 4, alpha: float = 16.0, **adapter_options):
    """The tiny ``family`` adapter with LoRA (rank, alpha) injected on its target modules and non-zero B factors
    (so the LoRA branch changes the output), and its ``LoraConfig``."""
    from peft import LoraConfig, inject_adapter_in_model

    adapter = build_adapter(family, None, tiny_seed=0, **adapter_options)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(adapter.lora_target_modules))
    inject_adapter_in_model(config, adapter.backbone)
    with torch.no_grad():
        for name, param in adapter.backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return adapter, config
