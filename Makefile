# dsgpt: the first two commands on a fresh machine are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The torch to install when the venv has none. PyPI's default (a CUDA build on Linux x86_64);
# CPU-only machines can pass e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch
DEMO_RUN ?= demo
DEMO_STEPS ?= 300
DEMO_CHAT_STEPS ?= 600
# Ranks for the demo: every GPU, or 2 CPU ranks on a machine without one.
NUM_GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
DEMO_RANKS := $(if $(filter-out 0,$(NUM_GPUS)),$(NUM_GPUS),2)

.PHONY: setup setup-dev demo test bench clean help

help:
	@echo "make demo   - venv, install, prepare the built-in corpus, train a tiny GPT, eval, sample;"
	@echo "              then fine-tune it on a built-in instruction set and chat with it"
	@echo "make test   - install the test extras and run the whole suite"
	@echo "make bench  - tokens/s and MFU for configs/tiny.yaml, appended to bench/RESULTS.md"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Keep a torch the venv already has (a GPU user's CUDA build stays as it is).
$(VENV)/.torch: | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	@touch $@

$(VENV)/.installed: pyproject.toml setup.py $(VENV)/.torch
	$(PIP) install --quiet -e .
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -e ".[dev,eval,sweep]"
	@touch $@

setup: $(VENV)/.installed

setup-dev: $(VENV)/.installed-dev

demo: setup
	$(VENV)/bin/deepspeed --num_gpus $(DEMO_RANKS) launch/train.py --config configs/tiny.yaml \
		run.name=$(DEMO_RUN) train.max_steps=$(DEMO_STEPS)
	$(PY) launch/eval.py --run runs/$(DEMO_RUN)
	$(PY) launch/generate.py --run runs/$(DEMO_RUN) --prompt "def " --max-new-tokens 120
	@echo
	@echo "== act 2: fine-tune runs/$(DEMO_RUN) on the built-in instruction set, then chat with it =="
	$(VENV)/bin/dsgpt prepare --chat --input builtin --tokenizer runs/$(DEMO_RUN) --block-size 128 \
		--out data/$(DEMO_RUN)-chat --overwrite --quiet
	$(VENV)/bin/deepspeed --num_gpus $(DEMO_RANKS) launch/train.py --config configs/sft-tiny.yaml \
		run.name=$(DEMO_RUN)-chat data.path=data/$(DEMO_RUN)-chat train.init_from=runs/$(DEMO_RUN) \
		train.max_steps=$(DEMO_CHAT_STEPS)
	@# Prompts from data/$(DEMO_RUN)-chat/held_out.jsonl: word lists the fine-tune never saw.
	printf 'last: cup tea tree sky\nfirst: queen owl wolf green\n/reset\nreverse: dog bird\n' | \
		$(VENV)/bin/dsgpt chat --run runs/$(DEMO_RUN)-chat --echo
	@echo
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir runs"

test: setup-dev
	$(PY) -m pytest tests -q

bench: setup
	$(PY) bench/throughput.py --config configs/tiny.yaml

clean:
	rm -rf runs .pytest_cache
