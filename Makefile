# The README's two commands: `make demo` (a short CPU training run) and `make test`.
# Each sets itself up: a virtualenv in .venv with nanodist installed from scratch.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_DATA ?= ../shared/data
# Offline copies when present (this lab's machines); otherwise prepare.py downloads.
LOCAL_TEXT := $(wildcard $(SHARED_DATA)/tinyshakespeare/input.txt)
LOCAL_BPE := $(wildcard $(SHARED_DATA)/gpt2/gpt2.tiktoken)
export NANODIST_GPT2_BPE ?= $(LOCAL_BPE)

NPROC ?= 4
DEMO_FLAGS ?= --device cpu --model tiny --batch_size 8 --block_size 128 \
	--total_batch_size 8192 --max_steps 60 --warmup_steps 10 --learning_rate 1e-3 \
	--eval_interval 20 --eval_iters 10

.PHONY: setup demo test data
setup: $(VENV)/.installed

# torch first and pinned, so pip never resolves a multi-GB CUDA build on a CPU machine.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

data: data/shakespeare/train.bin
data/shakespeare/train.bin: | setup
	$(PY) data/shakespeare/prepare.py $(if $(LOCAL_TEXT),--input $(LOCAL_TEXT))

demo: setup data
	$(PY) train.py $(DEMO_FLAGS)

test: setup
	$(PY) -m pytest -q
