# The README's two commands: `make demo` (a short CPU training run) and `make test`.
# Each sets itself up: a virtualenv in .venv with nanodist installed from scratch.
# PYTHON=python3 (any target): that interpreter as it is, e.g. a GPU machine's with its own
# CUDA build of torch and no network: no venv, nothing installed, nanodist run from here.
VENV ?= .venv
ifdef PYTHON
PY := $(PYTHON)
SETUP :=
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
else
PY := $(VENV)/bin/python
SETUP := setup
endif
SHARED_DATA ?= ../shared/data
# Offline copies when present (this lab's machines); otherwise prepare.py downloads.
LOCAL_TEXT := $(wildcard $(SHARED_DATA)/tinyshakespeare/input.txt)
LOCAL_BPE := $(wildcard $(SHARED_DATA)/gpt2/gpt2.tiktoken)
export NANODIST_GPT2_BPE ?= $(LOCAL_BPE)

# The original experiment's 2D layout: FSDP x TP = 2 x 2, hand-written, loss parallelism,
# deferred init, clipping; the tiny preset on GPT-2 BPE Shakespeare, ~2-3 minutes on 2 cores.
ifndef DEMO_DIR
DEMO_DIR := runs/demo-$(shell date +%Y%m%d-%H%M%S)
endif
DEMO_FLAGS ?= --device cpu --model tiny --batch_size 4 --block_size 64 \
	--total_batch_size 2048 --max_steps 80 --warmup_steps 8 --learning_rate 2e-3 \
	--eval_interval 40 --eval_iters 5 --tensor_parallel_size 2 --data_parallel_size 2 \
	--data_parallel_type fsdp --implementation custom --enable_loss_parallelism \
	--deferred_init --gradient_clipping

.PHONY: setup demo test data gpu-check
setup: $(VENV)/.installed

# torch first and pinned, so pip never resolves a multi-GB CUDA build on a CPU machine.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

data: data/shakespeare/train.bin
data/shakespeare/train.bin: | $(SETUP)
	$(PY) data/shakespeare/prepare.py $(if $(LOCAL_TEXT),--input $(LOCAL_TEXT))

demo: setup data
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node=4 \
		train.py $(DEMO_FLAGS) --out_dir $(DEMO_DIR)
	$(PY) sample.py --out_dir $(DEMO_DIR) --start "ROMEO:" --max_new_tokens 80 --num_samples 1

test: $(SETUP)
	$(PY) -m pytest -q

# The first run on GPUs (docs/gpu.md): one GPU or several, PASS / FAIL / SKIP per check;
# the data is prepared from the local copies (GPU_CHECK_FLAGS: e.g. --checks speed memory).
gpu-check: $(SETUP)
	$(PY) bench/gpu_check.py $(if $(LOCAL_TEXT),--text $(LOCAL_TEXT)) $(GPU_CHECK_FLAGS)
