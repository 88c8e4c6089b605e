"""Pretrain a tiny base of the synthetic world (``python scripts/pretrain_base.py --family sd15|amused``).

The recipe, per family, deterministic from ``seed`` on one CPU process:

1. **Data**: ``num_images`` synthetic renders (:func:`tgo_fast.data.synthetic_renders`, 64 px) with their
   *noisy* captions: 60 % of the captions name one to three wrong attributes, the way web alt-texts
   describe their images only in part. A base that learns p(image | caption) from them draws the named
   attributes only about 80 % of the time each, which leaves room for alignment; the built-in reward
   (:func:`tgo_fast.rewards.synthetic_reward`) scores exactly that agreement.
2. **Autoencoder** trained on the renders: an ``AutoencoderKL`` (×8, 4 latent channels; L2 + a small KL
   term, then ``scaling_factor`` = 1 / std of the latents, as SD's) or a ``VQModel`` (×4; L2 + the
   commitment loss, dead codes re-seeded from encoder outputs).
3. **Backbone** on the frozen autoencoder's latents / tokens and a frozen random-init tiny CLIP text
   encoder, with ``empty_prompt_fraction`` of the captions replaced by "" so classifier-free guidance
   works: the UNet with the v-prediction loss of the family's DDPM schedule (zero terminal SNR), the UVit2D with the
   cosine mask schedule of SPEC §2 and cross-entropy on the masked tokens. AdamW, warm-up + cosine
   decay, an EMA of the weights (diffusers' ``EMAModel``) is what ships.
4. **Evaluation** on held-out prompts (never seen by TGO training): one sample per prompt, its built-in
   reward and per-attribute accuracy, written into ``model_card.json`` beside the weights.

The folder is written to a temporary sibling and renamed into place, so a kill leaves the old base.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import BASE_FAMILIES, MODEL_CARD

__all__ = ["PretrainConfig", "build_untrained_base", "evaluate_base", "pretrain_base"]

RESOLUTION = 64


# The budget per family (~30 min on the 2-core machine): the VQModel has one more level than the AutoencoderKL,
# both backbones see 8×8 latents / tokens.
FAMILY_DEFAULTS = {
    "sd15": {"autoencoder_steps": 1000, "backbone_steps": 4000, "backbone_batch_size": 64, "eval_inference_steps": 20},
    "amused": {"autoencoder_steps": 1500, "backbone_steps": 4000, "backbone_batch_size": 64,
               "eval_inference_steps": 12},
}


@dataclasses.dataclass
class PretrainConfig:
    """Every knob of :func:`pretrain_base`; the defaults are the shipped bases' recipe."""

    family: str = dataclasses.field(metadata={"choices": list(BASE_FAMILIES), "help": "model family of the base"})
    output_dir: str | None = None          # default: the package's own base folder
    seed: int = 0
    num_images: int = 16384
    max_noise: float = 0.25                 # pixel noise std ~ U(0, max_noise)·255, as the built-in set
    autoencoder_steps: int | None = None    # None: the family's (FAMILY_DEFAULTS)
    autoencoder_batch_size: int = 32
    autoencoder_learning_rate: float = 1e-3
    kl_weight: float = 1e-6                 # AutoencoderKL only
    backbone_steps: int | None = None       # None: the family's (FAMILY_DEFAULTS)
    backbone_batch_size: int | None = None
    backbone_learning_rate: float = 5e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    empty_prompt_fraction: float = 0.1
    eval_prompts: int = 128
    eval_inference_steps: int | None = None

    def __post_init__(self) -> None:
        if self.family not in BASE_FAMILIES:
            raise ValueError(f"family: expected one of {list(BASE_FAMILIES)}, got {self.family!r}")
        for name, value in FAMILY_DEFAULTS[self.family].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("num_images", "autoencoder_steps", "autoencoder_batch_size", "backbone_steps",
                     "backbone_batch_size", "eval_prompts", "eval_inference_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not 0.0 <= self.empty_prompt_fraction < 1.0:
            raise ValueError(f"empty_prompt_fraction: expected a value in [0, 1), got {self.empty_prompt_fraction!r}")


# ----------------------------------------------------------------------------------------------
# architectures
# ----------------------------------------------------------------------------------------------
def build_untrained_base(family: str, seed: int):
    """The family's diffusers pipeline with random-init components sized for CPU pretraining."""
    from ..models.text import seeded_init, tiny_clip_text

    if family == "sd15":
        from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

        tokenizer, text_encoder = tiny_clip_text(seed + 1, 64, 64, with_projection=False, max_length=20)
        vae = seeded_init(seed + 2, lambda: AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
            latent_channels=4, norm_num_groups=8, sample_size=RESOLUTION, scaling_factor=1.0))
        unet = seeded_init(seed, lambda: UNet2DConditionModel(
            sample_size=RESOLUTION // 8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
            layers_per_block=1, norm_num_groups=16, cross_attention_dim=64, attention_head_dim=4,
            addition_embed_type="text", addition_embed_type_num_heads=4))  # + pooled text in the time embedding
        # Stable Diffusion's betas rescaled to zero terminal SNR, with v-prediction and trailing timesteps (Lin et
        # al. 2024; SD 2.1's fix): with SD's own schedule ᾱ_T = 0.0047 leaks the image's mean colour into x_T, and
        # on 8×8 latents the noise's spatial mean (std 1/8) outweighs it, so the *seed* picks the background.
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False, rescale_betas_zero_snr=True,
                                  prediction_type="v_prediction", timestep_spacing="trailing")
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel

    codebook_size = 512
    vocab_size = codebook_size + 8  # + the mask token, rounded up to a multiple of 8 as aMUSEd's 8256
    tokenizer, text_encoder = tiny_clip_text(seed + 1, 64, 64, with_projection=True, max_length=20)
    vqvae = seeded_init(seed + 2, lambda: VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 64), layers_per_block=1,
        latent_channels=16, num_vq_embeddings=codebook_size, norm_num_groups=8, sample_size=RESOLUTION,
        mid_block_add_attention=False, lookup_from_codebook=True, force_upcast=True))
    micro_cond_encode_dim = 8
    transformer = seeded_init(seed, lambda: UVit2DModel(
        hidden_size=128, use_bias=False, cond_embed_dim=64, micro_cond_encode_dim=micro_cond_encode_dim,
        micro_cond_embed_dim=5 * micro_cond_encode_dim, encoder_hidden_size=64, vocab_size=vocab_size,
        codebook_size=codebook_size, in_channels=64, block_out_channels=64, num_res_blocks=1, downsample=False,
        upsample=False, block_num_heads=4, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256,
        sample_size=RESOLUTION // 8))
    scheduler = AmusedScheduler(mask_token_id=vocab_size - 1, masking_schedule="cosine")
    return AmusedPipeline(vqvae=vqvae, tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                          scheduler=scheduler)


# ----------------------------------------------------------------------------------------------
# training pieces
# ----------------------------------------------------------------------------------------------
def _optimizer(params, lr: float, steps: int, warmup: int):
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=min(warmup, steps // 10),
                                    num_training_steps=steps)


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=2.0)


def _train_loop(module: nn.Module, loss_fn, *, steps: int, lr: float, warmup: int, desc: str,
                ema_decay: float | None = None, on_step=None) -> dict:
    """AdamW + warm-up/cosine over ``loss_fn(step) -> loss``; optional EMA copied in at the end."""
    from diffusers.training_utils import EMAModel

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer, lr_scheduler = _optimizer(params, lr, steps, warmup)
    ema = EMAModel(params, decay=ema_decay) if ema_decay else None
    module.train()
    losses, started = [], time.perf_counter()
    with _progress(steps, desc) as bar:
        for step in range(steps):
            loss = loss_fn(step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(params)
            if on_step is not None:
                on_step(step)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
            bar.update(1)
    if ema is not None:
        ema.copy_to(params)
    module.eval()
    tail = max(1, min(100, steps // 10))
    return {"steps": steps, "learning_rate": lr, "final_loss": float(np.mean(losses[-tail:])),
            "first_loss": losses[0], "wall_time_s": round(time.perf_counter() - started, 1),
            "ema_decay": ema_decay}


def _batches(num: int, batch_size: int, generator: torch.Generator) -> Tensor:
    return torch.randint(0, num, (batch_size,), generator=generator)


def _train_autoencoder_kl(vae, pixels: Tensor, cfg: PretrainConfig, generator: torch.Generator) -> dict:
    vae.requires_grad_(True)

    def loss_fn(step):
        x = pixels[_batches(len(pixels), cfg.autoencoder_batch_size, generator)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        return F.mse_loss(reconstruction, x) + cfg.kl_weight * posterior.kl().mean()

    log = _train_loop(vae, loss_fn, steps=cfg.autoencoder_steps, lr=cfg.autoencoder_learning_rate,
                      warmup=cfg.warmup_steps, desc="AutoencoderKL")
    vae.requires_grad_(False)
    with torch.no_grad():  # SD's convention: unit-variance latents after scaling
        latents = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mode() for i in range(0, min(2048, len(pixels)), 256)])
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    return {**log, "kind": "AutoencoderKL", "kl_weight": cfg.kl_weight, "scaling_factor": scaling_factor}


def _train_vq(vqvae, pixels: Tensor, cfg: PretrainConfig, generator: torch.Generator) -> dict:
    """VQModel on [0, 1] pixels (the aMUSEd convention): L2 + commitment; unused codes re-seeded every 100 steps."""
    vqvae.requires_grad_(True)
    codebook = vqvae.quantize.embedding.weight
    usage = torch.zeros(codebook.shape[0])
    last_latents: list[Tensor] = []

    def loss_fn(step):
        x = (pixels[_batches(len(pixels), cfg.autoencoder_batch_size, generator)] + 1) / 2
        latents = vqvae.encode(x).latents
        quantized, commit_loss, (_, _, indices) = vqvae.quantize(latents)
        usage.add_(torch.bincount(indices.flatten().cpu(), minlength=codebook.shape[0]).float())
        last_latents[:] = [latents.detach().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])]
        # decode the straight-through quantized latents (``decode(force_not_quantize=True)`` would read them as
        # code ids: the shipped config has ``lookup_from_codebook`` for aMUSEd's token decoding)
        reconstruction = vqvae.decoder(vqvae.post_quant_conv(quantized))
        return F.mse_loss(reconstruction, x) + commit_loss

    def reseed_dead_codes(step):
        if (step + 1) % 100 or step + 1 > cfg.autoencoder_steps * 3 // 4:
            return
        dead = (usage == 0).nonzero().flatten()
        if dead.numel():
            picks = torch.randint(0, len(last_latents[0]), (dead.numel(),), generator=generator)
            with torch.no_grad():
                codebook[dead] = last_latents[0][picks]
        usage.zero_()

    log = _train_loop(vqvae, loss_fn, steps=cfg.autoencoder_steps, lr=cfg.autoencoder_learning_rate,
                      warmup=cfg.warmup_steps, desc="VQModel", on_step=reseed_dead_codes)
    vqvae.requires_grad_(False)
    with torch.no_grad():
        indices = torch.cat([vqvae.quantize(vqvae.encode((pixels[i:i + 256] + 1) / 2).latents)[2][2]
                             for i in range(0, min(2048, len(pixels)), 256)])
    used = int(torch.unique(indices).numel())
    return {**log, "kind": "VQModel", "codebook_size": int(codebook.shape[0]), "codes_used": used}


def _encode_corpus(adapter, pixels: Tensor, captions: list[str], batch_size: int = 256) -> dict[str, Tensor]:
    parts = [adapter.encode(pixels[i:i + batch_size], captions[i:i + batch_size])
             for i in range(0, len(pixels), batch_size)]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _text_keys(adapter) -> tuple[str, ...]:
    return ("prompt_embeds",) if adapter.kind == "diffusion" else ("encoder_hidden_states", "pooled_text_emb")


def _train_backbone(adapter, encoded: dict[str, Tensor], empty: dict[str, Tensor], cfg: PretrainConfig,
                    generator: torch.Generator) -> dict:
    backbone = adapter.backbone
    backbone.requires_grad_(True)
    num = len(next(iter(encoded.values())))
    text_keys = _text_keys(adapter)

    def loss_fn(step):
        index = _batches(num, cfg.backbone_batch_size, generator)
        batch = {key: value[index] for key, value in encoded.items()}
        drop = torch.rand(len(index), generator=generator) < cfg.empty_prompt_fraction
        for key in text_keys:  # classifier-free guidance: the empty prompt's embedding for a tenth of the batch
            batch[key] = torch.where(drop.view(-1, *[1] * (batch[key].ndim - 1)), empty[key], batch[key])
        seeds = torch.randint(0, 2**62, (len(index),), generator=generator)
        inputs = adapter.sample_inputs(batch, seeds)
        output = adapter.forward(backbone, batch, inputs)
        if adapter.kind == "diffusion":
            return F.mse_loss(output.float(), inputs["target"])
        weight, bias = adapter.output_head(backbone)
        logits = F.linear(output.float(), weight.float(), None if bias is None else bias.float())
        return F.cross_entropy(logits.flatten(0, 1), inputs["labels"].flatten(), ignore_index=-100)

    log = _train_loop(backbone, loss_fn, steps=cfg.backbone_steps, lr=cfg.backbone_learning_rate,
                      warmup=cfg.warmup_steps, desc=type(backbone).__name__, ema_decay=cfg.ema_decay)
    backbone.requires_grad_(False)
    loss = (f"{adapter.noise_scheduler.config.prediction_type} MSE" if adapter.kind == "diffusion"
            else "masked-token cross-entropy (cosine schedule)")
    return {**log, "kind": type(backbone).__name__, "batch_size": cfg.backbone_batch_size, "loss": loss,
            "empty_prompt_fraction": cfg.empty_prompt_fraction,
            "parameters": sum(p.numel() for p in backbone.parameters())}


# ----------------------------------------------------------------------------------------------
# evaluation and the whole recipe
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_base(adapter, prompts: list[str], *, seed: int, num_inference_steps: int,
                  guidance_scale: float | None = None, batch_size: int = 64) -> dict:
    """One sample per prompt: the built-in reward's mean and the fraction of samples showing each attribute."""
    from ..rewards import measure_synthetic_attributes, parse_synthetic_prompt, synthetic_reward

    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        images += adapter.generate(adapter.backbone, chunk, seeds=[seed + start + i for i in range(len(chunk))],
                                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    rewards = synthetic_reward(images, prompts)
    hits = []
    for image, prompt in zip(images, prompts):
        asked, seen = parse_synthetic_prompt(prompt), measure_synthetic_attributes(image)
        hits.append({key: seen.get(key) == value for key, value in asked.items()})
    accuracy = {key: float(np.mean([h[key] for h in hits])) for key in hits[0]}
    return {"n": len(prompts), "seed": seed, "num_inference_steps": num_inference_steps,
            "guidance_scale": adapter.validation_guidance_scale if guidance_scale is None else guidance_scale,
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "attribute_accuracy": accuracy,
            "all_five_fraction": float(np.mean([all(h.values()) for h in hits])),
            "mean_attributes_matched": float(np.mean([sum(h.values()) for h in hits]))}, images


def _export_pipeline(adapter):
    """The trained adapter's components as the family's diffusers pipeline (training scheduler, plain
    diffusers backbone class), ready for ``save_pretrained``."""
    pipeline = adapter.build_pipeline()
    if adapter.kind == "diffusion":
        pipeline.register_modules(scheduler=adapter.noise_scheduler)
    else:
        exported = adapter.export_class.from_config(adapter.backbone.config)
        exported.load_state_dict(adapter.backbone.state_dict())
        pipeline.register_modules(transformer=exported)
    return pipeline


def pretrain_base(cfg: PretrainConfig) -> Path:
    """Run the recipe of the module docstring; returns the written base folder."""
    from ..data import synthetic_renders
    from ..models import build_adapter
    from ..pipeline.prompts import load_prompts

    output_dir = Path(cfg.output_dir) if cfg.output_dir else Path(__file__).resolve().parent / cfg.family
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="tgo_fast-base-") as scratch:
        build_untrained_base(cfg.family, cfg.seed).save_pretrained(scratch)
        adapter = build_adapter(cfg.family, scratch, resolution=RESOLUTION)

    renders, captions, _ = synthetic_renders(cfg.num_images, RESOLUTION, seed=10_000 + cfg.seed,
                                             max_noise=cfg.max_noise)
    pixels = torch.from_numpy(renders).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if adapter.kind == "diffusion":
        autoencoder = _train_autoencoder_kl(adapter.vae, pixels, cfg, generator)
    else:
        autoencoder = _train_vq(adapter.vqvae, pixels, cfg, generator)
    encoded = _encode_corpus(adapter, pixels, captions)
    empty = {key: value[:1] for key, value in adapter.encode(pixels[:1], [""]).items()}
    backbone = _train_backbone(adapter, encoded, empty, cfg, generator)

    prompts = load_prompts("builtin:heldout", num_prompts=cfg.eval_prompts)
    evaluation, images = evaluate_base(adapter, prompts, seed=cfg.seed, num_inference_steps=cfg.eval_inference_steps)
    card = {
        "family": cfg.family,
        "layout": type(adapter.build_pipeline()).__name__,
        "resolution": RESOLUTION,
        "seed": cfg.seed,
        "data": {"source": "tgo_fast.data.synthetic_renders", "num_images": cfg.num_images,
                 "render_seed": 10_000 + cfg.seed, "max_noise": cfg.max_noise,
                 "captions": "noisy: 40 % exact, 30 / 20 / 10 % with 1 / 2 / 3 attributes swapped for wrong ones "
                             "(the built-in scored set's caption noise, like web alt-texts); "
                             f"{cfg.empty_prompt_fraction:.0%} replaced by the empty prompt for CFG",
                 "why": "a base that learns p(image | noisy caption) draws each named attribute only ~80 % of "
                        "the time: recognisable, imperfect, room to align"},
        "text_encoder": "tiny CLIP text encoder (hidden 64, 2 layers), random-init from the seed and frozen",
        "autoencoder": autoencoder,
        "backbone": backbone,
        "evaluation": {"prompts": f"builtin:heldout (first {cfg.eval_prompts})", "reward": "builtin", **evaluation},
        "wall_time_s": round(time.perf_counter() - started, 1),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "command": f"python scripts/pretrain_base.py --family {cfg.family}",
        "config": dataclasses.asdict(cfg) | {"output_dir": None},
    }
    _write_folder(_export_pipeline(adapter), card, images, output_dir)
    return output_dir


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def _write_folder(pipeline, card: dict, images, output_dir: Path) -> None:
    from diffusers.utils import make_image_grid

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging)
    sizes = {p.name: p.stat().st_size for p in staging.rglob("*.safetensors")}
    card["size_mb"] = round(sum(sizes.values()) / 2**20, 2)
    (staging / MODEL_CARD).write_text(json.dumps(card, indent=2) + "\n")
    grid = images[:32] if len(images) < 8 else images[:min(32, len(images) // 8 * 8)]
    make_image_grid(grid, rows=math.ceil(len(grid) / 8), cols=min(8, len(grid))).save(staging / "samples.png")
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.replace(staging, output_dir)
