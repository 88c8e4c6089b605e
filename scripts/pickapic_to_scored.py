#!/usr/bin/env python
"""``scripts/pickapic_to_scored.py --source DIR --out DIR [--split train]``: Pick-a-Pic v2 pairs → the scored
format (per-image win fractions); see ``--help`` and docs/data.md."""
from tgo_fast.pipeline.cli import pickapic_main

if __name__ == "__main__":
    pickapic_main()
