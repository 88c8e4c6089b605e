#!/usr/bin/env python
"""Pretrain a tiny base of the synthetic world and write it (weights, configs, model card) into the package:
``python scripts/pretrain_base.py --family sd15|amused [--output_dir DIR] [--<PretrainConfig field> VALUE]``
(recipe: tgo_fast/bases/pretrain.py; ``--help`` lists every field)."""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import HfArgumentParser

from tgo_fast.bases.pretrain import PretrainConfig, pretrain_base

if __name__ == "__main__":
    (config,) = HfArgumentParser(PretrainConfig).parse_args_into_dataclasses()
    print(f"[tgo_fast] base written to {pretrain_base(config)}")
