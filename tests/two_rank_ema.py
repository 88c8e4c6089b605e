"""Run by tests/test_trainer_distributed.py under `deepspeed --num_gpus 2`: with ZeRO-3 really sharding, θ_ema
swapped in must be what the forward sees — also for the small parameters ZeRO-3 keeps gathered between steps
("persistent"), whose full copies do not alias the partitions once there are two ranks. Exits 1 on a mismatch."""
import sys

import torch
import torch.distributed as dist

from tgo_fast.trainer import TrainConfig, Trainer

run_dir, cache_dir = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank
cfg = TrainConfig(output_dir=run_dir, cache_dir=cache_dir, builtin_num_samples=16, train_batch_size=4, max_steps=3,
                  resolution=32, ema_decay=0.6, learning_rate=1e-3, eval_interval=0, export=False, tensorboard=False,
                  plots=False, validation_prompts=["a large red circle at the center on a blue background"])
trainer = Trainer(cfg, "configs/zero3_cpu.json")
trainer.train()
parameters = [p for p in trainer.engine.module.parameters() if p.requires_grad]
persistent = [i for i, p in enumerate(parameters) if p.ds_persist]
assert persistent and len(persistent) < len(parameters), "expected both persistent and partitioned parameters"
with trainer.ema.swapped_in():
    mismatched = []
    for i in persistent:
        parts = [torch.empty_like(trainer.ema.average[i]) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, trainer.ema.average[i])
        average = torch.cat(parts)[: parameters[i].ds_numel].view(parameters[i].ds_shape)
        if not torch.equal(parameters[i].data, average):
            mismatched.append(i)
print(f"rank {dist.get_rank()}: {len(mismatched)} of {len(persistent)} persistent parameters differ from θ_ema")
sys.exit(1 if mismatched else 0)
