"""What the user sees: metrics.jsonl, TensorBoard scalars, PNG plots and validation image grids (rank 0)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

__all__ = ["MetricsWriter", "read_metrics", "plot_training_curves", "plot_score_histogram",
           "peak_memory_mib"]


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:  # only the last line can be cut short by a killed run
                raise
    return rows


class MetricsWriter:
    """One JSON line per optimizer step in ``metrics.jsonl`` and TensorBoard scalars under ``tensorboard/``.

    On resume from step ``k`` the lines after ``k`` (written by the interrupted run) are dropped, so the file
    reads as one uninterrupted run.
    """

    def __init__(self, run_dir: Path, *, resume_step: int, tensorboard: bool, log_interval: int):
        self.path = run_dir / "metrics.jsonl"
        # a fresh run (resume_step 0) starts an empty file; a resumed one keeps the rows up to its step
        self.history = [row for row in read_metrics(self.path) if row["step"] <= resume_step] if resume_step else []
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in self.history)
        os.replace(tmp, self.path)
        self.log_interval = log_interval
        self.tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None and (row["step"] % self.log_interval == 0):
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                    section = "validation" if key.startswith("validation_") else "train"
                    self.tensorboard.add_scalar(f"{section}/{key.removeprefix('validation_')}", value, row["step"])

    def add_image(self, tag: str, image: PIL.Image.Image, step: int) -> None:
        if self.tensorboard is not None:
            import numpy as np

            self.tensorboard.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPUs, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss, accuracy (where the objective defines ŝ) and the validation reward (when scored) against the step."""
    plt = _pyplot()
    panels = [("loss", "loss", "training loss", "tab:blue")]
    if any("accuracy" in row for row in history):
        panels.append(("accuracy", "accuracy", "sign(ŝ) agrees with the pseudo-label", "tab:green"))
    if any("validation_reward" in row for row in history):
        panels.append(("validation_reward", "mean reward", "reward of the validation images", "tab:purple"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (key, ylabel, title, colour) in zip(axes.flat, panels):
        points = [(row["step"], row[key]) for row in history if key in row]
        ax.plot([s for s, _ in points], [v for _, v in points], marker=".", color=colour)
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        if key == "accuracy":
            ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_score_histogram(scores: torch.Tensor, tau: float, path: Path) -> None:
    """Histogram of the training scores split at τ into pseudo-negatives and pseudo-positives."""
    plt = _pyplot()
    values = scores.double().numpy()
    bins = min(50, max(10, int(math.sqrt(len(values)))))
    low, high = float(values.min()), float(values.max()) + 1e-12
    # equal-width bins on each side of τ, so that no bin straddles the split
    below = max(1, round(bins * (tau - low) / (high - low))) if high > low else 1
    edges = np.unique(np.concatenate([np.linspace(low, tau, below + 1), np.linspace(tau, high, max(1, bins - below) + 1)]))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    positive = values >= tau
    ax.hist(values[~positive], bins=edges, color="tab:red", alpha=0.7, label=f"pseudo-negative ({(~positive).sum()})")
    ax.hist(values[positive], bins=edges, color="tab:blue", alpha=0.7, label=f"pseudo-positive ({positive.sum()})")
    ax.axvline(tau, color="black", linestyle="--", label=f"τ = {tau:.4g}")
    ax.set(xlabel="score", ylabel="samples", title="training scores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
