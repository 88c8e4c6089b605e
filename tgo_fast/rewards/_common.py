"""What the reward models share: checkpoint files, key checks, the official image pipelines, batching.

Image pipelines (each reproduces one official ``torchvision`` transform with PIL/torch, since torchvision does not
import beside the pinned CPU torch):

- :func:`clip_pil_pixels` — OpenAI CLIP's ``_transform(n_px)`` (also ImageReward's and the aesthetic predictor's):
  ``Resize(n_px, BICUBIC)`` on the PIL image (shorter side → n_px, longer side ``int(n_px·long/short)``),
  ``CenterCrop(n_px)`` (offset ``round((side − n_px)/2)``), RGB, ``ToTensor`` (/255), ``Normalize(mean, std)``.
- :func:`open_clip_tensor_pixels` — open_clip's validation transform as HPSv2 builds it: RGB, ``ToTensor``, then
  ``Resize`` on the float tensor (bicubic, antialiased, unclamped), ``CenterCrop``, ``Normalize``.
"""
from __future__ import annotations

import abc

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------
# checkpoint files
# ----------------------------------------------------------------------------------------------
def resolve_file(pretrained: str | os.PathLike, filename: str, what: str) -> Path:
    """``pretrained`` as a file: the file itself, ``filename`` inside a folder, or ``filename`` of a hub repo id
    (downloaded only then, through huggingface_hub; offline it must be in the cache)."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / filename).is_file():
            raise FileNotFoundError(f"{what}: no {filename} in the folder {path}; pass the file itself or a folder "
                                    f"holding {filename}")
        return path / filename
    text = str(pretrained)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{what}: checkpoint file {text} does not exist (expected a local {filename}, a "
                                f"folder holding it, or a hub repo id such as 'owner/name')")
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(text, filename))
    except Exception as error:  # offline, unknown repo, missing file: one clear message
        raise FileNotFoundError(f"{what}: {text} is neither a local file/folder nor a reachable hub repo holding "
                                f"{filename} ({type(error).__name__}: {error})") from error


def load_state_dict_file(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from ``.safetensors`` or a torch pickle read with ``weights_only=True`` (mapped to
    the CPU: released files may hold CUDA tensors)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{what}: cannot read {path} as a weights-only torch checkpoint "
                         f"({type(error).__name__}: {error})") from error
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {path} holds a {type(state).__name__}, expected a state dict")
    return state


def check_keys(state: dict, expected: Iterable[str], path: Path, what: str, optional: Iterable[str] = ()) -> None:
    """ValueError naming ``path`` and the keys when ``state`` lacks one of ``expected`` or has a key outside
    ``expected`` ∪ ``optional`` (keys the official loader tolerates and the score does not use)."""
    expected = set(expected)
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected - set(optional))
    for keys, kind in ((missing, "missing"), (unexpected, "unexpected")):
        if keys:
            shown = ", ".join(repr(key) for key in keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            raise ValueError(f"{what}: checkpoint {path} has {len(keys)} {kind} key(s): {shown}; is it the right file "
                             f"(and the right model config)?")


def check_shapes(tensors: dict[str, torch.Tensor], module: torch.nn.Module, names: dict[str, str], path: Path,
                 what: str, transposed: Iterable[str] = ()) -> None:
    """ValueError naming the checkpoint key whose shape differs from ``module``'s parameter (``names``: module key →
    checkpoint key; ``transposed``: module keys stored transposed in the checkpoint, reported as stored)."""
    own, transposed = module.state_dict(), set(transposed)
    for key, tensor in tensors.items():
        if own[key].shape != tensor.shape:
            stored, wanted = tuple(tensor.shape), tuple(own[key].shape)
            if key in transposed:
                stored, wanted = stored[::-1], wanted[::-1]
            raise ValueError(f"{what}: checkpoint {path} key {names.get(key, key)!r} has shape {stored}, "
                             f"the model config expects {wanted}")


# ----------------------------------------------------------------------------------------------
# image pipelines
# ----------------------------------------------------------------------------------------------
def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(int)``: the shorter side becomes ``size``, the longer ``int(size · long / short)``."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _crop_box(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision ``CenterCrop``: (left, top) = round((side − size) / 2)."""
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def _normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def clip_pil_pixels(image: PILImage.Image, size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                    std: Sequence[float] = OPENAI_CLIP_STD) -> torch.Tensor:
    """(3, size, size) float32: OpenAI CLIP's preprocessing (resize and crop on the PIL image, then RGB)."""
    width, height = image.size
    new_width, new_height = _resized_size(width, height, size)
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), PILImage.Resampling.BICUBIC)
    left, top = _crop_box(new_width, new_height, size)
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    pixels = torch.from_numpy(np.array(image, np.uint8)).permute(2, 0, 1).float().div(255)
    return _normalize(pixels, mean, std)


def open_clip_tensor_pixels(image: PILImage.Image, size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                            std: Sequence[float] = OPENAI_CLIP_STD) -> torch.Tensor:
    """(3, size, size) float32: open_clip's validation transform as HPSv2 runs it (resize on the float tensor)."""
    # HPSv2 keeps RGBA as four channels and normalises the first three: the colour channels are the RGBA's own
    rgb = image if image.mode in ("RGB", "RGBA") else image.convert("RGB")
    pixels = torch.from_numpy(np.array(rgb, np.uint8)[..., :3]).permute(2, 0, 1).float().div(255)
    height, width = pixels.shape[1:]
    new_width, new_height = _resized_size(width, height, size)
    if (new_width, new_height) != (width, height):
        pixels = F.interpolate(pixels[None], size=(new_height, new_width), mode="bicubic", align_corners=False,
                               antialias=True)[0]
    left, top = _crop_box(new_width, new_height, size)
    return _normalize(pixels[:, top:top + size, left:left + size], mean, std)


# ----------------------------------------------------------------------------------------------
# the batched callable
# ----------------------------------------------------------------------------------------------
class ModelReward(abc.ABC):
    """``reward(images, prompts) -> (N,) float32 CPU tensor``, scored ``batch_size`` pairs at a time.

    Subclasses set ``name`` and implement ``_score_batch(images, prompts) -> (n,) tensor`` for one batch; the
    module(s) live on ``device`` in ``dtype`` and run in eval mode under ``torch.inference_mode``.
    """

    name = "reward"

    def __init__(self, *, device: str | torch.device, dtype: torch.dtype, batch_size: int):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be a positive int, got {batch_size!r}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"{self.name}: dtype must be a floating torch.dtype (torch.float32, torch.float16, "
                             f"torch.bfloat16), got {dtype!r}")
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size

    def _place(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device, self.dtype).eval().requires_grad_(False)

    @abc.abstractmethod
    def _score_batch(self, images: list[PILImage.Image], prompts: list[str]) -> torch.Tensor:
        """(n,) scores of one batch of at most ``batch_size`` pairs."""

    def __call__(self, images: Sequence[PILImage.Image], prompts: Sequence[str]) -> torch.Tensor:
        images, prompts = list(images), list(prompts)
        if not images:
            raise ValueError(f"{self.name}: empty batch (no images); pass at least one image and its prompt")
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: got {len(images)} images and {len(prompts)} prompts; pass one prompt "
                             f"per image")
        for index, (image, prompt) in enumerate(zip(images, prompts)):
            if not isinstance(image, PILImage.Image):
                raise TypeError(f"{self.name}: image {index} is a {type(image).__name__}, expected a PIL.Image")
            if not isinstance(prompt, str):
                raise TypeError(f"{self.name}: prompt {index} is a {type(prompt).__name__}, expected a str")
        scores = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                end = start + self.batch_size
                scores.append(self._score_batch(images[start:end], prompts[start:end]).float().cpu())
        return torch.cat(scores)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, dtype={self.dtype}, batch_size={self.batch_size})"


# ----------------------------------------------------------------------------------------------
# the five-layer head of ImageReward and the LAION aesthetic predictor
# ----------------------------------------------------------------------------------------------
MLP_HEAD_LINEAR = (0, 2, 4, 6, 7)  # nn.Sequential indices of the Linear layers; 1, 3, 5 are Dropout (no ReLU)


def mlp_head(state: dict[str, torch.Tensor], path: Path, what: str, prefix: str = "layers.") -> torch.nn.Sequential:
    """The official ``MLP.layers``: Linear(d,1024) Dropout Linear(1024,128) Dropout Linear(128,64) Dropout
    Linear(64,16) Linear(16,1), all affine (the ReLUs are commented out upstream), so the head is one affine map
    written as five. Sizes come from the weights; ``state`` holds exactly the ``{prefix}{i}.weight/bias`` keys."""
    check_keys(state, [f"{prefix}{i}.{kind}" for i in MLP_HEAD_LINEAR for kind in ("weight", "bias")], path, what)
    modules: list[torch.nn.Module] = []
    for index in MLP_HEAD_LINEAR:
        weight = state[f"{prefix}{index}.weight"]
        if weight.ndim != 2 or (modules and weight.shape[1] != modules[-1].out_features):
            raise ValueError(f"{what}: checkpoint {path} key '{prefix}{index}.weight' has shape {tuple(weight.shape)}, "
                             f"which does not chain onto the layer before it")
        while len(modules) < index:
            modules.append(torch.nn.Dropout(0.0))  # the official Dropout slots, identity at inference
        modules.append(torch.nn.Linear(weight.shape[1], weight.shape[0]))
    if modules[-1].out_features != 1:
        raise ValueError(f"{what}: checkpoint {path} key '{prefix}7.weight' maps to {modules[-1].out_features} outputs, "
                         f"expected 1 (a scalar score)")
    head = torch.nn.Sequential(*modules)
    head.load_state_dict({key[len(prefix):]: value.float() for key, value in state.items()})
    return head
