"""The alignment study (issue 12): global τ vs per-prompt baselines, TGO vs SFT / KTO / DPO, on both tiny bases.

    nice -n 19 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/alignment_study.py
    .venv/bin/python benchmarks/alignment_study.py --family sd15 --arms tgo_p50_c5 dpo --seeds 0   # a piece
    .venv/bin/python benchmarks/alignment_study.py --report_only                                    # tables + plots
    .venv/bin/python benchmarks/alignment_study.py --quick                                          # ≤ 3 min check

On the shipped tiny diffusion base (sd15) and masked base (amused), each family samples one π_ref proxy set and
every arm trains on it, from the base, with the family's run config (configs/tiny.yaml: β 0.02, lr 5e-5;
configs/tiny_masked.yaml: β 1, lr 5e-5) and the same steps and batch, 3 seeds each:
TGO with a global τ at p ∈ {25, 50, 75} × c ∈ {0, 5}; TGO with per_prompt and log_partition thresholds; SFT,
KTO, DPO; and the base. Arms, metrics and files: tgo_fast/study.py and docs/alignment-study.md.

Sizing of the full study (the ≤ 2 h budget on the 2-core development machine, one thread, beside other jobs):

    proxy set     sd15 256 training prompts × K = 8 (2 048 samples), amused 128 × 8 (1 024; its pipeline samples
                  about 3× slower); guidance 1, 20 (sd15) / 12 (amused) sampling steps as the run configs validate
    training      120 optimizer steps of 32 (DPO: 32 pairs) per arm × seed, one rank in this process, ZeRO stage 0;
                  validation reward on 16 held-out prompts at steps 0, 40, 80, 120
    evaluation    128 held-out prompts × 2 images (sd15) / × 1 (amused) at the base's seeds
    measured      (2026-12-03, one thread, beside other jobs: load 2–5 on the 2 cores) a training step of 32
                  takes 0.3–0.4 s (sd15) / 0.35–0.6 s (amused), building a trainer 2–4 s; the pipelines sample
                  10–18 (sd15) and 3.5–6 (amused) images/s. Pieces at 150 steps: sd15 proxy set + tgo_p50_c5 +
                  dpo (seed 0) 9½ min wall; amused proxy set + tgo_p50_c5 8½ min wall, of which 5 min the
                  proxy set and 2¼ min the arm (training with 7 validations 1m38s, evaluation 34 s).
    estimate      per arm × seed at 120 steps with 4 validations: 60–90 s (sd15), 80–130 s (amused); 11 arms ×
                  3 seeds per family + the proxy sets: 85 minutes on a quiet machine, about 2 h beside other jobs
    full run      2026-12-03, both families side by side (one thread each, a third job on and off): 43 min wall

``--quick`` (one seed, 2 steps of 4, 4 prompts × 4 proxy images, 3 held-out prompts, 2 sampling steps) writes by
default under runs/alignment_study_quick/ (never into benchmarks/results/); benchmarks/test_alignment_study.py
runs it. Every arm × seed resumes: rerun the same command after an interruption.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    from tgo_fast.study import ARMS, FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, 2 steps, tiny sets (the benchmark check)")
    parser.add_argument("--family", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results (default benchmarks/results/alignment; --quick: runs/alignment_study_quick/results)")
    parser.add_argument("--work_dir", type=Path, default=None,
                        help="images, runs, caches (default runs/alignment_study; --quick: runs/alignment_study_quick)")
    parser.add_argument("--report_only", action="store_true", help="only rewrite summary.json / summary.md / plots")
    return parser


def main(argv: list[str] | None = None) -> dict:
    from tgo_fast.study import FULL_SIZE, QUICK_SIZE, AlignmentStudy

    args = build_parser().parse_args(argv)
    work_dir = args.work_dir or REPO / "runs" / ("alignment_study_quick" if args.quick else "alignment_study")
    out_dir = args.out or (work_dir / "results" if args.quick else REPO / "benchmarks" / "results" / "alignment")
    study = AlignmentStudy(QUICK_SIZE if args.quick else FULL_SIZE, out_dir=out_dir, work_dir=work_dir,
                           config_dir=REPO / "configs", families=args.family, arms=args.arms, seeds=args.seeds)
    if args.report_only:
        return study.write_report()
    # DeepSpeed's info lines and torch's notices for the collectives it calls, once per trainer: noise here
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(logging.WARNING)
    summary = study.run()
    print(f"[alignment study] results in {out_dir} (summary.md, summary.json, *.png)", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
