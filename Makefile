# Two entry points for a fresh machine: `make demo` and `make test`.
# Everything lives in .venv; torch comes from the local CPU wheel when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
# The lowest versions pyproject.toml declares; `make test-lowest` runs the unit tier on them.
LOWEST := .venv-lowest
LOWEST_PINS := torch==$(TORCH_VERSION) pyro-ppl==1.9.0 numpy==1.26.4 joblib==1.4.0 zuko==1.1.0
EPOCHS ?= 200

.PHONY: setup demo test quick test-lowest lint format docs benchmark gpu-check gpu-wheels clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A plain `pip install torch` would pull a multi-GB CUDA build: take the CPU wheel.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	# sbibm's own metadata pins sbi<0.22; its tasks and metrics work with sbi 0.27.
	$(PY) -m pip install -q --no-deps sbibm==1.1.0
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) examples/vae_digits.py --num-epochs $(EPOCHS) --out outputs/vae_digits

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

docs: setup
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html

# The whole suite, slow statistical runs included (`make quick` leaves them out), then the
# unit tier on the lowest declared versions.
test: lint docs
	$(PY) -m pytest -q --durations=15
	$(MAKE) test-lowest

quick: setup
	$(PY) -m pytest -q -m "not slow"

$(LOWEST)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q --upgrade pip
	$(LOWEST)/bin/python -m pip install -q $(LOWEST_PINS) "pytest>=7" "hypothesis>=6"
	$(LOWEST)/bin/python -m pip install -q --no-deps -e .
	touch $@

test-lowest: $(LOWEST)/.installed
	$(LOWEST)/bin/python -c "import pyro, torch, numpy, joblib, zuko; print('lowest versions: pyro-ppl', pyro.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__, 'joblib', joblib.__version__, 'zuko', zuko.__version__)"
	$(LOWEST)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider tests

benchmark: setup
	$(PY) examples/benchmark_elbo.py
	$(PY) examples/benchmark_forward_kl.py
	$(PY) examples/benchmark_sbi.py

# On a machine with a CUDA GPU: the device-parametrized tests on cuda, then the CPU-vs-GPU
# table (examples/benchmark_devices.py). GPU_PY is an interpreter with torch and pyro-ppl:
# this venv's by default; on a bare GPU machine with torch, `make gpu-wheels` here first,
# carry .whl there, and run `make gpu-check GPU_PY=python3` (it installs them).
GPU_PY ?= $(PY)
WHEELS := .whl
gpu-check:
	@$(GPU_PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch sees no CUDA device')"
	@if [ -d $(WHEELS) ] && ! $(GPU_PY) -c "import pyro" 2>/dev/null; then \
		$(GPU_PY) -m pip install -q --no-index --no-deps --target /tmp/pyro_jc_site $(WHEELS)/*.whl; fi
	PYTHONPATH=$$PYTHONPATH:/tmp/pyro_jc_site:. $(GPU_PY) -m pytest -q -p no:cacheprovider \
		-m "not slow" --device cuda --device-tests-only tests
	PYTHONPATH=$$PYTHONPATH:/tmp/pyro_jc_site:. $(GPU_PY) examples/benchmark_devices.py

# Pure-Python wheels a GPU machine with torch lacks (its image has numpy, pytest,
# hypothesis, joblib, tqdm and opt-einsum).
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: -d $(WHEELS) \
		pyro-ppl==1.9.1 pyro-api==0.1.2 zuko==1.6.0

clean:
	rm -rf $(VENV) $(LOWEST) docs/_build outputs .pytest_cache .ruff_cache .hypothesis $(WHEELS)
