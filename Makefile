# `make demo` and `make test` set up .venv by themselves (idempotent, quick once done).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions

.PHONY: setup demo test bench lint clean gpu-check

setup: $(STAMP)

# torch first: reuse an importable torch (a cluster's CUDA build) through system
# site-packages, else the pinned CPU/CUDA wheel; a plain `torch` requirement
# resolved by pip alone would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if python3 -c "import torch" 2>/dev/null; then \
	    echo "setup: reusing the installed torch ($$(python3 -c 'import torch; print(torch.__version__)'))"; \
	    python3 -m venv --system-site-packages $(VENV); \
	  else python3 -m venv $(VENV); fi; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m launch.demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/prep.py
	$(PY) bench/wkv.py --threads 1
	$(PY) bench/model.py
	$(PY) bench/model.py --arch rwkv7 --steps 2 --warmup-ctx 32 --budget-s 120
	$(PY) bench/train.py
	$(PY) bench/convert_memory.py --preset 169m
	$(PY) bench/zero_init.py
	$(PY) bench/infctx.py

# The GPU acceptance run: on the machine's own torch from the source tree (no .venv, no network).
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) -m launch.gpu_check $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info runs
