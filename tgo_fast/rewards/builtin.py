"""The built-in reward: the embedded synthetic set's programmatic score measured back from pixels.

:func:`synthetic_reward` reproduces :func:`tgo_fast.data.synthetic_scored_dataset`'s stored score from an
image and its caption, so the synthetic world needs no download. ``load_reward("builtin")`` returns it.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch
from PIL import Image as PILImage
from scipy import ndimage, special

from tgo_fast.data import _ATTRIBUTE_VALUES, _COLOURS, _POSITIONS, _SHAPES, _SIZES

__all__ = ["measure_synthetic_attributes", "parse_synthetic_prompt", "synthetic_reward"]


# ----------------------------------------------------------------------------------------------
# synthetic_reward: the embedded default's score, measured from pixels
# ----------------------------------------------------------------------------------------------
_ANALYSIS_RESOLUTION = 64   # the synthetic set's default; NEAREST resampling keeps the per-pixel noise level
_BORDER = 2                 # border rows/ring (pixels) that sample the background
_DETECTION_STD = 2.5        # foreground: smoothed distance from the background beyond this many noise std
_DETECTION_FLOOR = 24.0     # ... and beyond this many levels (slack for a background that is not exactly linear)
_MIN_FOREGROUND = 0.01      # a foreground smaller than this fraction of the image counts as absent
_PALETTE_NAMES = list(_COLOURS)
_PALETTE = np.asarray([_COLOURS[name] for name in _PALETTE_NAMES], np.float64)  # (P, 3)
_POSITION_NAMES = list(_POSITIONS)
_WINDOW = np.ones((3, 3), bool)  # 8-connectivity / the 3×3 neighbourhood
_POSITION_XY = np.asarray([_POSITIONS[name] for name in _POSITION_NAMES], np.float64)  # (Q, 2) as (x, y)
# shape from the mask in its bounding box: an apex-up triangle holds 1/4 of its area in the top half
# (circle, square: 1/2); a square fills its four corner cells (side _CORNER of the box), a circle about
# 0.3 of them. Measured on 768 noisy 64 px renders: top half ≤ 0.35 (triangles) vs ≥ 0.42 (others),
# corner fill ≥ 0.59 (squares) vs ≤ 0.45 (circles)
_TRIANGLE_TOP = 0.385
_SQUARE_CORNERS = 0.52
_CORNER = 0.25
_SIZE_SPLIT = sum(_SIZES.values()) / len(_SIZES)  # half-extent between "small" and "large"
_PROMPT = re.compile(
    rf"^a (?P<size>{'|'.join(_SIZES)}) (?P<colour>{'|'.join(_COLOURS)}) (?P<shape>{'|'.join(_SHAPES)}) "
    rf"at the (?P<position>{'|'.join(_POSITIONS)}) on a (?P<background>{'|'.join(_COLOURS)}) background$")
_PROMPT_FORM = ("'a {size} {colour} {shape} at the {position} on a {background} background' with "
                + "; ".join(f"{key} in {'/'.join(values)}" for key, values in _ATTRIBUTE_VALUES.items()))


def parse_synthetic_prompt(prompt: str) -> dict[str, str]:
    """The five attributes a synthetic-set caption names; ValueError for any other prompt."""
    match = _PROMPT.match(prompt.strip().lower()) if isinstance(prompt, str) else None
    if match is None:
        raise ValueError(f"synthetic_reward: prompt {prompt!r} does not parse; expected {_PROMPT_FORM}")
    return match.groupdict()


def _clipped_mean(mean: np.ndarray, std: float) -> np.ndarray:
    """E[clip(X, 0, 255)] for X ~ N(mean, std²): mean − E[(X − 255)⁺] + E[(−X)⁺]."""
    if std <= 0:
        return np.clip(mean, 0.0, 255.0)
    def excess(gap):  # E[(Y − gap)⁺] for Y ~ N(0, std²)
        z = gap / std
        return std * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) - gap * special.ndtr(-z)
    return mean - excess(255.0 - mean) + excess(mean)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a (H, W) bool mask (the mask itself when it is empty)."""
    labels, count = ndimage.label(mask, structure=_WINDOW)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def _nearest_colour(rgb: np.ndarray, exclude: int | None = None) -> int:
    distances = np.linalg.norm(_PALETTE - rgb, axis=1)
    if exclude is not None:
        distances[exclude] = np.inf
    return int(distances.argmin())


def _contrast(a: int, b: int) -> float:
    return float(np.linalg.norm(_PALETTE[a] - _PALETTE[b]) / (255.0 * math.sqrt(3)))


def _measure(image: PILImage.Image) -> dict:
    """The synthetic attributes read from one image (the foreground ones absent when none is found).

    background: per channel, a line in y through the medians of the border ring's upper and lower halves (the
      synthetic gradient is linear, a flat image has slope 0); its value at the top edge → nearest palette colour.
    noise: per-pixel std / 255 from the background pixels' deviation from the fitted gradient, measured on
      the side away from the nearer clipping bound (0 or 255): median one-sided deviation / 0.6745.
    foreground: 3×3-smoothed pixels farther than 2.5 smoothed-noise std (and 24 levels) from the background,
      3×3 majority vote, 3×3 opening, largest 8-connected component;
      colour = median foreground pixel → nearest palette colour other than the background; position =
      bounding-box centre → nearest named position; size = half the bounding box's larger side vs the mean of the
      named half-extents; shape = triangle if under 0.385 of the mask lies in the box's top half, else
      square if the box's four corner cells are over 52 % filled, else circle.
    """
    rgb = image.convert("RGB")
    if rgb.size != (_ANALYSIS_RESOLUTION, _ANALYSIS_RESOLUTION):
        rgb = rgb.resize((_ANALYSIS_RESOLUTION, _ANALYSIS_RESOLUTION), PILImage.Resampling.NEAREST)
    pixels = np.asarray(rgb, np.float64)  # (R, R, 3)
    side = pixels.shape[0]
    centres = (np.arange(side) + 0.5) / side
    # background: per channel, the line in y through (median y, median value) of the border ring's upper
    # and lower halves (the synthetic gradient is linear in y; a flat image fits with slope 0)
    border = np.zeros((side, side), bool)
    border[:_BORDER], border[-_BORDER:], border[:, :_BORDER], border[:, -_BORDER:] = True, True, True, True
    ring_y = np.broadcast_to(centres[:, None], border.shape)[border]
    ring = pixels[border]  # (B, 3)
    upper = ring_y < 0.5
    (y0, y1), (v0, v1) = ((np.median(ring_y[half]) for half in (upper, ~upper)),
                          (np.median(ring[half], 0) for half in (upper, ~upper)))
    slope = (v1 - v0) / (y1 - y0)
    expected = v0 + slope * (centres - y0)[:, None, None]  # (R, 1, 3) background per row
    background = _nearest_colour(v0 - slope * y0)  # the colour at the top edge, y = 0

    # one-sided noise estimate on the border: the side away from the nearer clipping bound is unclipped
    deviation = (pixels - expected)[border]
    one_sided = np.where(np.broadcast_to(expected, pixels.shape)[border] < 127.5, deviation, -deviation)
    sample = one_sided[one_sided > 0]
    sigma = float(np.median(sample) / 0.6745) if sample.size else 0.0
    noise = min(sigma / 255.0, 0.5)

    # compare with the mean of the clipped noisy background, E[clip(μ + σZ, 0, 255)], not μ itself
    smoothed = ndimage.uniform_filter(pixels, size=(3, 3, 1), mode="nearest")
    distance = np.linalg.norm(smoothed - _clipped_mean(expected, sigma), axis=-1)  # (R, R)

    # 3×3 smoothing divides the noise std by 3; a 3×3 majority vote then removes isolated noise hits
    hits = (distance > max(_DETECTION_STD * sigma / 3.0, _DETECTION_FLOOR)).astype(np.float64)
    mask = ndimage.uniform_filter(hits, size=3, mode="nearest") > 0.5
    # a 3×3 opening cuts thin bridges to noise clusters before keeping the largest component (edges replicated:
    # outside the image counts as inside for the erosion, as outside for the dilation)
    eroded = ndimage.binary_erosion(mask, structure=_WINDOW, border_value=1)
    mask = _largest_component(ndimage.binary_dilation(eroded, structure=_WINDOW))
    measured = {"background": background, "noise": noise}
    if mask.mean() < _MIN_FOREGROUND:
        return measured
    ys, xs = np.nonzero(mask)
    colour = _nearest_colour(np.median(pixels[mask], axis=0), exclude=background)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    centre = np.array([xs.min() + width / 2, ys.min() + height / 2]) / side  # a triangle's centroid is off-centre
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    ch, cw = max(1, round(height * _CORNER)), max(1, round(width * _CORNER))
    corners = np.mean([box[:ch, :cw].mean(), box[:ch, -cw:].mean(), box[-ch:, :cw].mean(), box[-ch:, -cw:].mean()])
    top = box[: height // 2].sum() / box.sum()
    half_extent = max(height, width) / (2.0 * side)
    measured.update(
        colour=colour,
        position=_POSITION_NAMES[int(np.linalg.norm(_POSITION_XY - centre, axis=1).argmin())],
        size="small" if half_extent < _SIZE_SPLIT else "large",
        shape=("triangle" if top < _TRIANGLE_TOP else "square" if corners > _SQUARE_CORNERS else "circle"),
    )
    return measured


def _score(measured: dict, caption: dict[str, str]) -> float:
    """0.6 · agreement + 0.4 · aesthetics, as the synthetic set's stored score.

    Without a measurable foreground, shape/colour/size/position count as mismatches and the contrast
    is 0, so the score is 0.6 · [background matches] / 5.
    """
    truth = {"background": _PALETTE_NAMES[measured["background"]]}
    aesthetics = 0.0
    if "colour" in measured:
        truth.update(colour=_PALETTE_NAMES[measured["colour"]], shape=measured["shape"],
                     size=measured["size"], position=measured["position"])
        aesthetics = (_contrast(measured["colour"], measured["background"]) * (1.0 - 2.0 * measured["noise"])
                      * (1.0 if measured["position"] == "center" else 0.85))
    agreement = sum(truth.get(key) == caption[key] for key in _ATTRIBUTE_VALUES) / len(_ATTRIBUTE_VALUES)
    return 0.6 * agreement + 0.4 * aesthetics


def synthetic_reward(images: list[PILImage.Image], prompts: list[str]) -> torch.Tensor:
    """The embedded synthetic set's score (``tgo_fast.data.synthetic_scored_dataset``) measured from pixels.

    Each prompt must read ``"a {size} {colour} {shape} at the {position} on a {background} background"``
    (ValueError quoting it otherwise). The image's attributes are estimated (see ``_measure``) and combined
    as the stored score: 0.6 · (fraction of the five caption attributes the image matches) + 0.4 ·
    contrast(shape colour, background) · (1 − 2·noise) · (1 if centred else 0.85). An image without a
    discernible foreground scores 0.6 · [background matches] / 5. Returns float64 (N,) scores in [0, 1].
    """
    if len(images) != len(prompts):
        raise ValueError(f"synthetic_reward: got {len(images)} images and {len(prompts)} prompts")
    captions = [parse_synthetic_prompt(prompt) for prompt in prompts]
    scores = [_score(_measure(image), caption) for image, caption in zip(images, captions)]
    return torch.tensor(scores, dtype=torch.float64).clamp_(0.0, 1.0)


def measure_synthetic_attributes(image: PILImage.Image) -> dict[str, object]:
    """The attributes :func:`synthetic_reward` reads from ``image``: background, noise and (when a
    foreground is found) colour, shape, size, position, with colours as palette names."""
    measured = _measure(image)
    for key in ("background", "colour"):
        if key in measured:
            measured[key] = _PALETTE_NAMES[measured[key]]
    return measured
