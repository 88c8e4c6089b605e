"""Algorithm 1's other verbs: generate images, score them, evaluate a trained policy against its base.

    from tgo_fast.pipeline import load_prompts, trained_run, generate, score, evaluate, summarize
    prompts = load_prompts("builtin:heldout", num_prompts=128)
    generate(trained_run("runs/tiny"), prompts, "runs/tiny/samples", images_per_prompt=2)
    score("runs/tiny/samples/manifest.jsonl", "builtin", "runs/tiny/samples/scored.jsonl")  # → trainer --data
    evaluate(trained_run("runs/tiny"), prompts, "runs/tiny/eval", rewards=["builtin"])

Every verb splits its work into fixed chunks over the ranks of a torchrun / deepspeed launch and resumes
after a kill (tgo_fast.pipeline.shards); see docs/pipeline.md for the formats.
"""
from .evaluate import evaluate, summarize, summary_markdown, win_rate
from .generate import ModelSource, Sampler, generate, image_seed, load_sampler, run_base, trained_run
from .prompts import builtin_prompts, load_prompts
from .score import score

__all__ = ["ModelSource", "Sampler", "builtin_prompts", "evaluate", "generate", "image_seed", "load_prompts",
           "load_sampler", "run_base", "score", "summarize", "summary_markdown", "trained_run", "win_rate"]
