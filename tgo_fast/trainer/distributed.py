"""Process-group set-up and the few collectives the trainer needs (gloo on CPU, NCCL on GPUs).

``python scripts/train.py`` without a launcher runs as a world of one: the environment variables the
DeepSpeed launcher would set are filled in first.
"""
from __future__ import annotations

import contextlib
import os
import socket

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "share_cpu_threads", "world_of_one_session", "rank", "world_size", "local_rank", "is_main", "barrier", "device",
           "all_reduce_sum", "all_gather_tensor"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed once per process (no-op when already initialised)."""
    import deepspeed

    if dist.is_available() and dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # let DeepSpeed's comm wrap it
        return
    if "RANK" not in os.environ:  # not launched by deepspeed / torchrun: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        share_cpu_threads()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


@contextlib.contextmanager
def world_of_one_session():
    """Trainers run in this Python process (tests, benchmarks, notebooks); on exit the process group is torn
    down and the launcher variables ``init_distributed`` may have filled in are restored."""
    saved = {key: os.environ.get(key) for key in _LAUNCH_ENV}
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        from deepspeed.utils import groups

        groups._WORLD_GROUP = None  # DeepSpeed's cached clone of the destroyed world: the next session clones anew
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def share_cpu_threads() -> None:
    """CPU ranks on one machine split its cores (as torchrun's OMP_NUM_THREADS=1 default does, but keeping all
    cores busy): ranks that each ran ``os.cpu_count()`` threads would oversubscribe the cores and thrash. An
    explicit OMP_NUM_THREADS wins."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)  # torchrun | deepspeed
    if local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


def device() -> torch.device:
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def _comm_device() -> torch.device:
    return device() if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over ranks (float64 on the communication device), returned on the input's device."""
    if not dist.is_initialized() or world_size() == 1:
        return values.detach().clone()
    buffer = values.detach().to(device=_comm_device(), dtype=torch.float64)
    dist.all_reduce(buffer)
    return buffer.to(values.device)


def all_gather_tensor(values: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (rank order) of equally shaped tensors."""
    if not dist.is_initialized() or world_size() == 1:
        return values.detach().clone()
    buffer = values.detach().to(_comm_device())
    parts = [torch.empty_like(buffer) for _ in range(world_size())]
    dist.all_gather(parts, buffer)
    return torch.cat(parts).to(values.device)
