"""Run configuration of the TGO trainer: a dataclass read from YAML, overridden from the command line.

    cfg = load_config("configs/sd15.yaml", overrides={"max_steps": 100})
    cfg = parse_args(["--config", "configs/tiny.yaml", "--ref_mode", "lora"])[0]

``transformers.HfArgumentParser`` turns the dataclass into the command line (one ``--<key>`` per field, typed,
``Literal`` fields as choices, booleans as ``--key true|false``); the YAML file's values become the parser's
defaults, so the command line wins over the file and the file over the dataclass (docs/training.md).
The run config owns the training hyper-parameters (batch sizes, learning rate, precision, clipping);
the DeepSpeed JSON owns the engine (ZeRO stage, offload, communication). Keys of the DeepSpeed JSON
that the run config owns may be ``"auto"`` (filled from the run config) or must agree with it
(:func:`merge_deepspeed_config`). Every unknown key and every invalid value is a ``ValueError`` that
names the key (an unknown command-line flag: a usage error).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser

__all__ = [
    "TrainConfig",
    "load_config",
    "build_arg_parser",
    "parse_args",
    "merge_deepspeed_config",
    "batch_layout",
    "DEFAULT_VALIDATION_PROMPTS",
]

# The choices of the run config's enumerated keys: argparse choices on the command line, checked in validate().
Model = Literal["sd15", "sdxl", "flux", "sd3", "wan", "amused", "meissonic"]
Loss = Literal["tgo", "sft", "kto", "dpo"]
ThresholdMode = Literal["global", "per_prompt", "log_partition"]  # tgo_fast.threshold
RefMode = Literal["separate", "lora", "precomputed"]
RefUpdate = Literal["none", "epoch"]
ThresholdUpdate = Literal["none", "proxy"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
LrScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine"]
Impl = Literal["auto", "torch", "triton"]
MODELS = typing.get_args(Model)
PREDICTION_TYPES = ("epsilon", "v_prediction")  # tgo_fast.models.sd
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode")  # tgo_fast.models.flux, tgo_fast.models.wan
SD3_WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")  # tgo_fast.models.sd3
DEFAULT_WEIGHTING_SCHEME = {"flux": "none", "sd3": "logit_normal", "wan": "none"}  # the adapters' defaults
# Family options: run-config key → the families whose adapter takes it (as a keyword of the same name).
MODEL_OPTIONS = {
    "revision": MODELS,
    "variant": MODELS,
    "prediction_type": ("sd15", "sdxl"),
    "guidance_scale": ("flux",),
    "weighting_scheme": ("flux", "sd3", "wan"),
    "logit_mean": ("flux", "sd3", "wan"),
    "logit_std": ("flux", "sd3", "wan"),
    "mode_scale": ("flux", "sd3", "wan"),
    "max_sequence_length": ("flux", "sd3", "wan"),
    "num_frames": ("wan",),
    "fps": ("wan",),
    "flow_shift": ("wan",),
}

DEFAULT_VALIDATION_PROMPTS = (  # the synthetic world's full caption form, so the built-in reward can score them
    "a large red circle at the center on a blue background",
    "a small green square at the left on a yellow background",
)


@dataclasses.dataclass
class TrainConfig:
    """Every key of a run YAML (defaults = ``configs/tiny.yaml``, the embedded default run)."""

    # --- model
    model: Model = "sd15"  # family: sd15 | sdxl | flux | sd3 | wan | amused | meissonic
    pretrained: str | None = None  # hub id or local dir; "builtin" = the shipped tiny pretrained base; None = tiny random-init
    resolution: int | None = 32  # pixel side; None = the adapter's default
    # family options (MODEL_OPTIONS; None = the family's default, see docs/models.md)
    revision: str | None = None  # hub revision of `pretrained`
    variant: str | None = None  # weight file variant of `pretrained`, e.g. fp16
    prediction_type: str | None = None  # sd15/sdxl: epsilon | v_prediction; None = the scheduler's
    guidance_scale: float | None = None  # flux: training guidance embedding (guidance-distilled checkpoints), 3.5
    weighting_scheme: str | None = None  # flux/wan: none | logit_normal | mode (None = none); sd3: also cosmap | sigma_sqrt (None = logit_normal)
    logit_mean: float | None = None  # flux/sd3/wan, logit_normal: 0.0
    logit_std: float | None = None  # flux/sd3/wan, logit_normal: 1.0
    mode_scale: float | None = None  # flux/sd3/wan, mode: 1.29
    max_sequence_length: int | None = None  # flux/sd3/wan: T5 tokens; None = min(the tokenizer's length, 512 / 256 / 512)
    num_frames: int | None = None  # wan: clip length 1 + 4k of generation and video data; None = 81 (tiny model: 5)
    fps: int | None = None  # wan: frame rate of video data and written clips; None = 16
    flow_shift: float | None = None  # wan: σ shift of training timesteps and sampler; None = the scheduler's (3.0)
    # --- data
    data: str | None = None  # jsonl/csv/parquet file, glob or saved HF dataset; None/"builtin" = synthetic
    builtin_num_samples: int = 64  # size of the built-in synthetic set
    streaming: bool = False  # stream `data` (large sets): one pass fills the encoding cache, training reads the cache
    cache_encodings: bool = True  # pre-pass: VAE latents / VQ tokens + text embeddings in safetensors
    cache_dir: str | None = None  # default ~/.cache/tgo_fast/encodings
    dataloader_num_workers: int = 0
    # --- run
    output_dir: str = "runs/tiny"
    seed: int = 0
    max_steps: int = 12  # optimizer steps
    train_batch_size: int = 8  # global batch: micro_batch_size × world size × accumulation steps
    micro_batch_size: int | None = None  # per rank and forward; None = train_batch_size / world size
    resume_from: str | None = None  # "latest" or a checkpoint directory
    # --- optimisation
    learning_rate: float = dataclasses.field(default=1e-5, metadata={"aliases": ["--lr"]})  # the paper's
    lr_scheduler: LrScheduler = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    ema_decay: float | None = None  # EMA of the policy weights for validation and export (diffusers' --use_ema); None = off
    precision: Precision = "auto"  # auto (from the DeepSpeed JSON) | fp32 | bf16 | fp16
    gradient_checkpointing: bool = False
    # --- objective
    loss: Loss = "tgo"  # tgo | sft (pseudo-positives only) | kto (Diffusion-KTO) | dpo (Diffusion-DPO on score pairs)
    beta: float = 1.0
    temperature: float = 1e-3  # diffusion families only
    c: float = 5.0
    percentile: float = 50.0
    threshold_file: str | None = None  # JSON with "tau" (e.g. a previous run's threshold.json)
    threshold_mode: ThresholdMode = "global"  # global (one τ) | per_prompt (percentile per prompt) | log_partition (b̂(x))
    log_partition_beta: float = 1.0  # β_r of log_partition: b̂(x) = β_r·log mean_k exp(s_k/β_r)
    dpo_min_gap: float = 0.0  # dpo: pair two samples of a prompt when their scores differ by > 0 and ≥ this
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    impl: Impl = "auto"  # loss implementation: auto | torch | triton
    # --- reference policy
    ref_mode: RefMode = "separate"  # separate | lora | precomputed
    ref_update: RefUpdate = "none"  # none | epoch (π_ref ← π_θ after each epoch; separate/precomputed)
    threshold_update: ThresholdUpdate = "none"  # none | proxy (re-estimate τ on a fresh proxy set after each π_ref ← π_θ)
    reward: str | None = None  # scorer of proxy sets and validation images: "builtin" or "package.module:function"
    val_reward: str | None = None  # validation images' scorer instead of `reward`: NAME[=PRETRAINED][,KEY=VALUE] (docs/pipeline.md)
    proxy_size: int = 64  # images generated from π_ref (training prompts) per re-estimation
    proxy_inference_steps: int = 4
    resample_noise_each_epoch: bool = True  # fresh noise/timestep/mask seeds per epoch (not precomputed)
    lora: bool = False  # train peft LoRA adapters instead of every weight (implied by ref_mode=lora)
    lora_rank: int = 4
    lora_alpha: float = 4.0
    # --- logging, evaluation, checkpoints
    log_interval: int = 1
    eval_interval: int = 0  # validation grid every N steps (0 = only at the end)
    validation_prompts: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_VALIDATION_PROMPTS))
    validation_inference_steps: int = 4
    validation_images_per_prompt: int = 1  # grid rows; with `reward` set, every image is scored (validation_reward)
    validation_guidance_scale: float | None = None  # None = the family's default
    save_interval: int = 0  # DeepSpeed checkpoint every N steps (0 = only the final export)
    checkpoints_total_limit: int = 2  # keep the newest N checkpoints (0 = keep all)
    export: bool = True  # final diffusers-format export (LoRA weights when training LoRA)
    tensorboard: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------ validation
    def validate(self) -> "TrainConfig":
        for name, hint in typing.get_type_hints(type(self)).items():
            setattr(self, name, _checked(name, getattr(self, name), hint))
        for name in ("max_steps", "train_batch_size", "builtin_num_samples", "lora_rank", "log_interval",
                     "validation_inference_steps", "validation_images_per_prompt", "proxy_size",
                     "proxy_inference_steps"):
            _at_least(name, getattr(self, name), 1)
        for name in ("lr_warmup_steps", "dataloader_num_workers", "eval_interval", "save_interval",
                     "checkpoints_total_limit", "seed"):
            _at_least(name, getattr(self, name), 0)
        if self.resolution is not None:
            _at_least("resolution", self.resolution, 8)
        self._validate_model_options()
        if self.micro_batch_size is not None:
            _at_least("micro_batch_size", self.micro_batch_size, 1)
        for name in ("learning_rate", "beta", "temperature", "adam_epsilon", "lora_alpha", "log_partition_beta"):
            _positive(name, getattr(self, name))
        if self.validation_guidance_scale is not None:
            _nonnegative("validation_guidance_scale", self.validation_guidance_scale)
        for name in ("c", "weight_decay", "max_grad_norm", "kto_desirable_weight", "kto_undesirable_weight",
                     "dpo_min_gap"):
            _nonnegative(name, getattr(self, name))
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) (e.g. 0.99) or null (no EMA), got {self.ema_decay}")
        if not 0.0 <= self.percentile <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {self.percentile}")
        if not self.validation_prompts or not all(p.strip() for p in self.validation_prompts):
            raise ValueError("validation_prompts must be a non-empty list of non-empty strings")
        if self.ref_mode == "lora" and self.ref_update == "epoch":
            raise ValueError(
                "ref_update='epoch' needs a reference with its own weights: use ref_mode 'separate' or "
                "'precomputed' (with ref_mode='lora' the reference is the frozen base model)"
            )
        if self.threshold_update == "proxy":
            if self.ref_update != "epoch":
                raise ValueError("threshold_update='proxy' re-estimates τ after each π_ref ← π_θ: set ref_update: epoch")
            if self.reward is None or not self.reward.strip():
                raise ValueError("threshold_update='proxy' needs reward: 'builtin' (the embedded synthetic set's "
                                 "programmatic score) or 'package.module:function' (your reward model)")
        if self.threshold_mode != "global":
            for name, value, why in (("threshold_update", self.threshold_update != "none",
                                      "a proxy set re-estimates one global τ"),
                                     ("threshold_file", self.threshold_file is not None, "the file fixes one global τ"),
                                     ("loss", self.loss == "dpo", "DPO pairs samples and uses no threshold")):
                if value:
                    raise ValueError(f"threshold_mode={self.threshold_mode!r} does not combine with {name}="
                                     f"{getattr(self, name)!r} ({why}): use threshold_mode: global or change {name}")
        if self.lora and self.ref_mode == "separate" and self.loss != "sft":
            raise ValueError(
                "lora=true with ref_mode='separate' would keep a second copy of the frozen base weights: use "
                "ref_mode 'lora' (reference = adapters disabled) or 'precomputed' (reference errors from a pre-pass)"
            )
        if self.streaming and not self.cache_encodings:
            raise ValueError("streaming=true needs cache_encodings=true: a stream has no random access, so the trainer "
                             "reads its samples from the encoding cache that one pass over the stream fills")
        if self.threshold_file is not None and not Path(self.threshold_file).is_file():
            raise ValueError(f"threshold_file: no such file {self.threshold_file!r}")
        if self.val_reward is not None and not self.val_reward.strip():
            raise ValueError("val_reward must be a reward spec (e.g. builtin, pickscore=PATH) or null, got an empty string")
        if self.data is not None and self.data.strip() == "":
            raise ValueError("data must be a path/glob or 'builtin', got an empty string")
        if self.resume_from is not None and self.resume_from != "latest" and not Path(self.resume_from).is_dir():
            raise ValueError(f"resume_from must be 'latest' or a checkpoint directory, got {self.resume_from!r}")
        return self

    def _validate_model_options(self) -> None:
        for name, families in MODEL_OPTIONS.items():
            if getattr(self, name) is not None and self.model not in families:
                raise ValueError(f"{name} is an option of model {' | '.join(families)}, not of model={self.model!r}: "
                                 "remove it or change model")
        if self.prediction_type is not None:
            _choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.weighting_scheme is not None:
            _choice("weighting_scheme", self.weighting_scheme,
                    SD3_WEIGHTING_SCHEMES if self.model == "sd3" else WEIGHTING_SCHEMES)
        scheme_in_use = self.weighting_scheme or DEFAULT_WEIGHTING_SCHEME.get(self.model)
        for name, scheme in (("logit_mean", "logit_normal"), ("logit_std", "logit_normal"), ("mode_scale", "mode")):
            if getattr(self, name) is not None and scheme_in_use != scheme:
                raise ValueError(f"{name} shapes the {scheme!r} timestep density: set weighting_scheme: {scheme} "
                                 f"(got {scheme_in_use!r}) or remove {name}")
        if self.guidance_scale is not None:
            _nonnegative("guidance_scale", self.guidance_scale)
        if self.logit_std is not None:
            _positive("logit_std", self.logit_std)
        if self.max_sequence_length is not None:
            _at_least("max_sequence_length", self.max_sequence_length, 1)
        for name in ("num_frames", "fps"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        if self.num_frames is not None and (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames must be 1 + 4·k (Wan's VAE compresses time 4×), e.g. 1, 5, 17, 81; "
                             f"got {self.num_frames}")
        if self.flow_shift is not None:
            _positive("flow_shift", self.flow_shift)

    def model_options(self) -> dict[str, Any]:
        """The family options that are set: keyword arguments of the model's adapter (``build_adapter``)."""
        return {name: getattr(self, name) for name in MODEL_OPTIONS if getattr(self, name) is not None}

    @property
    def trains_lora(self) -> bool:
        """Only LoRA adapters are trained: ``lora=true``, or ``ref_mode='lora'`` (whose reference is the base)."""
        return self.lora or self.ref_mode == "lora"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def is_builtin_data(self) -> bool:
        return self.data is None or self.data == "builtin"


# ------------------------------------------------------------------------------ value checks
_TYPE_WORDS = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}


def _optional_member(hint) -> Any:
    """``X`` of an ``X | None`` hint, else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return None


def _checked(name: str, value: Any, hint) -> Any:
    """``value`` if it has the field's type (an int for a float, a whole float for an int, one string for a list
    of strings are accepted and converted); else a ValueError that names the key. Text is parsed by the parser."""
    if _optional_member(hint) is not None:
        if value is None:
            return None
        hint = _optional_member(hint)
    elif value is None:
        raise ValueError(f"{name} must not be null")
    if typing.get_origin(hint) is Literal:
        _choice(name, value, typing.get_args(hint))
        return value
    if typing.get_origin(hint) is list:
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} must be a list of strings, got {value!r}")
        return list(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        raise ValueError(f"{name} must be {_TYPE_WORDS[hint]}, got {value!r}")
    if hint is float and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _nonnegative(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name} must be ≥ 0, got {value}")


# ------------------------------------------------------------------------------------ parsing
FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))
NULL_WORDS = ("none", "null", "~")  # spellings of None for a key that may be null (YAML's and Python's)
NONE_IS_A_VALUE = {"weighting_scheme"}  # keys where "none" is a choice of its own (no timestep weighting): only null / ~ are None


def _check_keys(keys, where: str) -> None:
    for key in keys:
        if key not in FIELD_NAMES:
            close = difflib.get_close_matches(str(key), FIELD_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown config key {key!r} in {where}{hint} (valid keys: {', '.join(FIELD_NAMES)})")


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ValueError(f"config: no such file {os.fspath(path)!r}")
    loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config: {os.fspath(path)!r} must hold a mapping of keys to values, got {type(loaded).__name__}")
    _check_keys(loaded, os.fspath(path))
    return loaded


def _or_null(parse, null_words=NULL_WORDS):
    """``parse`` for a key that may be null: ``null_words`` ("null", "none" and "~" by default; any case) are None."""
    @functools.wraps(parse)  # keeps the name argparse's "invalid <type> value" message shows
    def parse_or_null(text: str):
        return None if text.lower() in null_words else parse(text)

    return parse_or_null


def build_arg_parser() -> HfArgumentParser:
    """``--ds_config``, ``--config`` and one typed ``--<key>`` option per run-config key (HfArgumentParser)."""
    parser = HfArgumentParser(
        TrainConfig, exit_on_error=False,  # a bad value raises, so that _parse names its key in a ValueError
        description="Threshold-Guided Optimization (TGO) of a text-to-image model with DeepSpeed. Every run-config "
                    "key is an option; precedence: command line > --config YAML > these defaults.",
    )
    hints = typing.get_type_hints(TrainConfig)
    for action in parser._actions:  # HfArgumentParser parses X | None as X: let "null" stand for None too
        if action.dest in hints and action.type is not None and _optional_member(hints[action.dest]) is not None:
            action.type = _or_null(action.type, ("null", "~") if action.dest in NONE_IS_A_VALUE else NULL_WORDS)
    parser.add_argument("--ds_config", default=None,
                        help="DeepSpeed JSON (default: configs/zero3_gpu_bf16.json with CUDA, configs/zero3_cpu.json otherwise)")
    parser.add_argument("--config", default=None, help="run YAML (default: the embedded tiny run)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return parser


def _parse(parser: HfArgumentParser, argv: list[str] | None, values: dict[str, Any]) -> tuple[TrainConfig, argparse.Namespace]:
    """The run config from ``values`` (YAML / overrides; text is parsed as the key's type) under ``argv``."""
    parser.set_defaults(**values)  # TRL's TrlParser pattern: the file fills the defaults, the flags override them
    try:
        cfg, extra, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True,
                                                                 look_for_args_file=False)
    except argparse.ArgumentError as error:  # a value that does not parse as its key's type or choices
        key = (error.argument_name or "").split("/")[0].lstrip("-")  # HfArgumentParser's first flag is --<key>
        raise ValueError(f"{key}: {error.message}") from None
    if unknown:
        flag = next((arg.split("=")[0] for arg in unknown if arg.startswith("-")), unknown[0])
        close = difflib.get_close_matches(flag, list(parser._option_string_actions), n=1)
        parser.error(f"unrecognized arguments: {' '.join(unknown)}" + (f"; did you mean {close[0]}?" if close else ""))
    return cfg, extra


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The run config from a YAML file (or the defaults when ``path`` is None) with ``overrides`` on top."""
    values = _read_yaml(path) if path is not None else {}
    if overrides:
        _check_keys(overrides, "overrides")
        values.update(overrides)
    return _parse(build_arg_parser(), [], values)[0]


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, str | None]:
    """(run config, DeepSpeed JSON path) from the command line: ``--config FILE`` then ``--<key> VALUE`` overrides."""
    config_flag = argparse.ArgumentParser(add_help=False)
    config_flag.add_argument("--config", default=None)
    config_path = config_flag.parse_known_args(argv)[0].config
    cfg, extra = _parse(build_arg_parser(), argv, _read_yaml(config_path) if config_path is not None else {})
    return cfg, extra.ds_config


# -------------------------------------------------------------------------- DeepSpeed config
def batch_layout(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) with micro × world × accumulation = train_batch_size."""
    micro = cfg.micro_batch_size
    if micro is None:
        if cfg.train_batch_size % world_size:
            raise ValueError(
                f"train_batch_size={cfg.train_batch_size} does not divide over {world_size} ranks: "
                f"use a multiple of {world_size} or set micro_batch_size"
            )
        micro = cfg.train_batch_size // world_size
    per_step = micro * world_size
    if cfg.train_batch_size % per_step:
        raise ValueError(
            f"train_batch_size={cfg.train_batch_size} is not a multiple of micro_batch_size × world size = "
            f"{micro} × {world_size} = {per_step}"
        )
    return micro, cfg.train_batch_size // per_step


def _owned(ds: dict, key: str, value, where: str, run_key: str) -> None:
    """Fill an "auto"/absent DeepSpeed key from the run config, or check that it agrees."""
    current = ds.get(key, "auto")
    if current != "auto" and current != value:
        raise ValueError(
            f"{where}: {key}={current!r} disagrees with the run config's {run_key} (→ {value!r}); "
            f'set it to "auto" in the DeepSpeed JSON or change {run_key}'
        )
    ds[key] = value


def merge_deepspeed_config(ds_config: dict | str | os.PathLike, cfg: TrainConfig, world_size: int,
                           *, cpu: bool) -> dict:
    """The DeepSpeed config of the policy engine: the JSON with the run config's training keys filled in."""
    where = "ds_config"
    if not isinstance(ds_config, dict):
        where = str(ds_config)
        if not Path(ds_config).is_file():
            raise ValueError(f"ds_config: no such file {where!r}")
        with open(ds_config) as f:
            try:
                ds_config = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"ds_config: {where!r} is not valid JSON: {error}") from None
    ds = json.loads(json.dumps(ds_config))  # deep copy
    micro, accumulation = batch_layout(cfg, world_size)
    _owned(ds, "train_batch_size", cfg.train_batch_size, where, "train_batch_size")
    _owned(ds, "train_micro_batch_size_per_gpu", micro, where, "micro_batch_size")
    _owned(ds, "gradient_accumulation_steps", accumulation, where, "train_batch_size / (micro_batch_size × world size)")
    _owned(ds, "gradient_clipping", cfg.max_grad_norm, where, "max_grad_norm")

    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(optimizer.get("type", "")).lower() not in ("adam", "adamw"):
        raise ValueError(f"{where}: optimizer.type must be Adam or AdamW, got {optimizer.get('type')!r}")
    params = optimizer.setdefault("params", {})
    _owned(params, "lr", cfg.learning_rate, f"{where} optimizer.params", "learning_rate")
    _owned(params, "betas", [cfg.adam_beta1, cfg.adam_beta2], f"{where} optimizer.params", "adam_beta1/adam_beta2")
    _owned(params, "eps", cfg.adam_epsilon, f"{where} optimizer.params", "adam_epsilon")
    _owned(params, "weight_decay", cfg.weight_decay, f"{where} optimizer.params", "weight_decay")
    if cpu:
        params.setdefault("torch_adam", True)  # DeepSpeed's fused CPU Adam needs a C++ build; torch's does not
    if "scheduler" in ds:
        raise ValueError(f"{where}: remove the 'scheduler' section: the run config's lr_scheduler and "
                         "lr_warmup_steps drive the learning rate")

    json_precision = "bf16" if ds.get("bf16", {}).get("enabled") is True else (
        "fp16" if ds.get("fp16", {}).get("enabled") is True else "fp32")
    precision = json_precision if cfg.precision == "auto" else cfg.precision
    if cfg.precision != "auto" and json_precision not in ("fp32", precision):
        raise ValueError(f"{where}: {json_precision} is enabled but the run config asks for precision={precision!r}")
    if cpu and precision == "fp16":
        raise ValueError(
            "precision='fp16' is not supported on CPU (no fp16 loss scaling there): use fp32 or bf16, "
            "or run on GPUs"
        )
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
    for section in ("bf16", "fp16"):
        ds[section] = {k: v for k, v in ds[section].items() if v != "auto"}
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if zero.get("stage", 0) == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs; keep DeepSpeed's own step prints quiet
    return ds


def deepspeed_precision(ds: dict) -> str:
    return "bf16" if ds["bf16"]["enabled"] else ("fp16" if ds["fp16"]["enabled"] else "fp32")


def reference_deepspeed_config(ds: dict) -> dict:
    """DeepSpeed config of a frozen reference engine (no optimizer): the policy's ZeRO-3 sharding or none."""
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    ref = {
        "train_micro_batch_size_per_gpu": ds["train_micro_batch_size_per_gpu"],
        "train_batch_size": ds["train_batch_size"],
        "gradient_accumulation_steps": ds["gradient_accumulation_steps"],
        "bf16": {"enabled": ds["bf16"]["enabled"]},
        "fp16": {"enabled": ds["fp16"]["enabled"]},
        "steps_per_print": ds.get("steps_per_print", 10**9),
    }
    if stage == 3:
        zero = {k: v for k, v in ds["zero_optimization"].items() if k.startswith("stage3_param") or k in (
            "stage", "offload_param", "stage3_prefetch_bucket_size", "stage3_max_live_parameters",
            "stage3_max_reuse_distance", "reduce_bucket_size")}
        zero.pop("offload_optimizer", None)
        ref["zero_optimization"] = zero
    else:
        ref["zero_optimization"] = {"stage": 0}
    return ref
