# Two commands on a fresh machine: `make train` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default; users with a CUDA torch already installed in the venv keep theirs
# (torch is only installed when it cannot be imported).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup train test bench device-check device-wheels clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# The default pipeline: synthetic world -> tiny GPT-2 base model -> MEND meta-training -> evaluation.
# Tiny models gain nothing from a second intra-op thread, and spinning OpenMP threads slow a busy
# 2-core machine by an order of magnitude: one thread unless the caller says otherwise.
train: export OMP_NUM_THREADS ?= 1
train: setup
	$(PY) train.py --config configs/base_zsre_gpt2_tiny.yaml
	$(PY) train.py --config configs/mend_zsre_gpt2_tiny.yaml
	$(PY) eval.py --config configs/mend_zsre_gpt2_tiny.yaml --editor_path runs/default/editor.safetensors --mode all --run_dir runs/default

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run.py

# GPU figures on a lent device, which has torch, lightning, transformers, torchmetrics, safetensors and
# tensorboard but no package registry: `make device-wheels` here, carry wheels/ along, and there run
# `pip install --no-index --no-deps wheels/*.whl && make device-check` (docs/real_models.md).
device-check:
	$(PYTHON) benchmarks/device_check.py --out benchmarks/device

device-wheels: setup
	$(PY) -m pip download -q --no-deps -d wheels jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0

clean:
	rm -rf runs lightning_logs
