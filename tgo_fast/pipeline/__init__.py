"""Algorithm 1's other verbs: generate images, score them, evaluate a trained policy against its base.

    from tgo_fast.pipeline import load_prompts, trained_run, generate, score, evaluate, summarize
    prompts = load_prompts("builtin:heldout", num_prompts=128)
    generate(trained_run("runs/tiny"), prompts, "runs/tiny/samples", images_per_prompt=2)
    score("runs/tiny/samples/manifest.jsonl", "builtin", "runs/tiny/samples/scored.jsonl")  # → trainer --data
    evaluate(trained_run("runs/tiny"), prompts, "runs/tiny/eval", rewards=["builtin"])
    evaluate_report({"base": run_base("runs/tiny"), "tgo": trained_run("runs/tiny")},
                    [load_prompt_set("builtin:heldout", 64)], "runs/tiny/report", rewards=["builtin"])
    pickapic_to_scored("/data/pickapic_v2", "/data/pickapic_scored")   # human preference pairs → scored format

Every verb splits its work into fixed chunks over the ranks of a torchrun / deepspeed launch and resumes
after a kill (tgo_fast.pipeline.shards); see docs/pipeline.md for the formats.
"""
from .evaluate import evaluate, summarize, summary_markdown, win_rate
from .generate import ModelSource, Sampler, generate, image_seed, load_sampler, run_base, trained_run
from .pickapic import image_win_fractions, pickapic_to_scored
from .prompts import PromptSet, builtin_prompts, load_prompt_set, load_prompts
from .report import evaluate_report, prompt_win_rate, report_markdown, summarize_report
from .reward_specs import RewardSpec, load_reward_spec, parse_reward_spec
from .score import score

__all__ = ["ModelSource", "PromptSet", "RewardSpec", "Sampler", "builtin_prompts", "evaluate", "evaluate_report",
           "generate", "image_seed", "image_win_fractions", "load_prompt_set", "load_prompts", "load_reward_spec",
           "load_sampler", "parse_reward_spec", "pickapic_to_scored", "prompt_win_rate", "report_markdown", "run_base",
           "score", "summarize", "summarize_report", "summary_markdown", "trained_run", "win_rate"]
