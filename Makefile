# One-command set-up and run on a fresh CPU machine (Python 3.11, PyPI reachable).
# torch is pinned here, and only here, to the CPU build this machine carries; pyproject takes a range.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tgo_fast-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test train train-masked bench clean

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q triton==3.7.1
	$(PY) -m pip install -q -e '.[train,test,bench,video]'
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

setup: $(STAMP)

# The test command of the README (CI runs exactly this): set-up, tests, benchmark suites in check mode.
test: $(STAMP)
	$(VENV)/bin/pytest tests -q
	$(VENV)/bin/pytest benchmarks -q --benchmark-disable

# The main job: Algorithm 1 on the shipped tiny pretrained diffusion base (tgo_fast/bases/sd15), 2 CPU ranks:
# π_ref samples for the training prompts → built-in reward → τ + TGO under ZeRO-3 → base vs policy on held-out
# prompts. Every step resumes when rerun; the sampling settings below are those of the run config's validation:
# guidance 1 = samples of π_ref itself (no classifier-free guidance), see the README's main-job section.
SAMPLING_sd15   := --guidance_scale 1 --num_inference_steps 20
SAMPLING_amused := --guidance_scale 1 --num_inference_steps 12
# π_ref samples: training prompts × 4; evaluation: held-out prompts × 2. AmusedPipeline samples about half as fast
# as the SD pipeline here (4.7 vs 10 images/s), so the masked job samples half as many to stay within ~10 minutes.
PROXY_PROMPTS_sd15   := 512
PROXY_PROMPTS_amused := 256
EVAL_PROMPTS_sd15    := 256
EVAL_PROMPTS_amused  := 128
define ALGORITHM_1  # $(1) family, $(2) run config, $(3) run directory
	$(PY) scripts/generate.py --model $(1) --pretrained builtin --prompts builtin:train --num_prompts $(PROXY_PROMPTS_$(1)) \
	    --images_per_prompt 4 $(SAMPLING_$(1)) --batch_size 64 --out $(3)/proxy
	$(PY) scripts/score.py --manifest $(3)/proxy/manifest.jsonl --reward builtin --out $(3)/proxy/scored.jsonl
	$(VENV)/bin/deepspeed --num_gpus 2 scripts/train.py --ds_config configs/zero3_cpu.json --config $(2)
	$(PY) scripts/evaluate.py --run $(3) --prompts builtin:heldout --num_prompts $(EVAL_PROMPTS_$(1)) --images_per_prompt 2 \
	    --reward builtin $(SAMPLING_$(1)) --batch_size 64 --out $(3)/eval
endef

train: $(STAMP)
	$(call ALGORITHM_1,sd15,configs/tiny.yaml,runs/tiny)

train-masked: $(STAMP)
	$(call ALGORITHM_1,amused,configs/tiny_masked.yaml,runs/tiny_masked)

# Benchmarks with timings (CPU rows here; the kernel rows need a GPU).
bench: $(STAMP)
	$(VENV)/bin/pytest benchmarks -q

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
