"""The flow-matching training draw shared by the rectified-flow families (flux, sd3, wan).

Per sample i, from a CPU generator seeded with ``seeds[i]``, noise first, then the timestep (the recipe of
diffusers' ``train_dreambooth_flux.py`` / ``train_dreambooth_sd3.py``):

    ε ~ N(0, I)                                            (the latents' shape, any number of dims)
    u ~ density(weighting_scheme) on [0, 1)                (``compute_density_for_timestep_sampling``)
    k = min(⌊u · T_train⌋, T_train − 1),  t = timesteps[k],  σ = sigmas[k]   (the scheduler's training tables)
    x_σ = (1 − σ) · x0 + σ · ε
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling
from torch import Tensor

from .base import randn_per_sample, sample_generators

__all__ = ["DENSITY_SCHEMES", "FlowDraw", "FlowMatching", "timestep_density"]

# compute_density_for_timestep_sampling's densities: "none" (and any other name) draws u uniformly.
DENSITY_SCHEMES = ("none", "logit_normal", "mode")


def timestep_density(
    weighting_scheme: str,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    schemes: tuple[str, ...] = DENSITY_SCHEMES,
) -> dict:
    """The keyword arguments of ``compute_density_for_timestep_sampling``, ``weighting_scheme`` checked
    against the family's ``schemes`` (before any weight is loaded)."""
    if weighting_scheme not in schemes:
        raise ValueError(f"weighting_scheme must be one of {schemes}, got {weighting_scheme!r}")
    return dict(weighting_scheme=weighting_scheme, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)


class FlowDraw(NamedTuple):
    """One batch's draw: ``noise`` and ``noisy_latents`` shaped like the latents, ``timesteps`` and ``sigmas`` (B,),
    all fp32 on the latents' device."""

    noise: Tensor
    timesteps: Tensor
    sigmas: Tensor
    noisy_latents: Tensor


class FlowMatching:
    """Per-sample flow-matching draws on ``noise_scheduler``'s training tables with the ``density`` of
    :func:`timestep_density`.

    The tables are copied at construction, so a pipeline's ``set_timesteps`` on the scheduler never changes them.
    """

    def __init__(self, noise_scheduler: FlowMatchEulerDiscreteScheduler, density: dict) -> None:
        self.density = density
        self.num_train_timesteps = noise_scheduler.config.num_train_timesteps
        self.timesteps = noise_scheduler.timesteps.clone().float()
        self.sigmas = noise_scheduler.sigmas.clone().float()

    def draw(self, latents: Tensor, seeds: Tensor) -> FlowDraw:
        """``latents`` x0 (B, ...) fp32 and ``seeds`` (B,) int → ε, t, σ and x_σ (see the module docstring)."""
        batch_size = latents.shape[0]
        generators = sample_generators(seeds, batch_size)
        noise = randn_per_sample(generators, tuple(latents.shape[1:]), device=latents.device)
        u = torch.cat(
            [compute_density_for_timestep_sampling(batch_size=1, generator=g, **self.density) for g in generators]
        )
        indices = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        timesteps = self.timesteps[indices].to(latents.device)
        sigmas = self.sigmas[indices].to(latents.device)
        sigma = sigmas.view(batch_size, *[1] * (latents.ndim - 1))
        return FlowDraw(noise, timesteps, sigmas, (1.0 - sigma) * latents + sigma * noise)
