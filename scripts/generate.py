#!/usr/bin/env python
"""``[torchrun --nproc_per_node N] scripts/generate.py ...``: see ``--help`` and docs/pipeline.md."""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tgo_fast.pipeline.cli import generate_main

if __name__ == "__main__":
    generate_main()
