#!/usr/bin/env python
"""``[torchrun --nproc_per_node N] scripts/evaluate.py ...``: see ``--help`` and docs/pipeline.md."""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tgo_fast.pipeline.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
