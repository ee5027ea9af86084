# Two commands do all the set-up on a fresh machine:
#   make reproduce   # installs into .venv, then runs the small reproduction
#   make test        # installs into .venv, then runs the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel. Installed only when no torch is importable in the venv, so a GPU
# user's own CUDA torch (seen through --system-site-packages) is kept.
TORCH_CPU ?= torch==2.13.0
SCALE ?= small
DEVICE ?= auto
THREADS ?= 2

.PHONY: install test reproduce lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PY) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_CPU)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

test: install
	$(BIN)/python -m pytest

reproduce: install
	$(BIN)/minefield --threads $(THREADS) reproduce --scale $(SCALE) --device $(DEVICE)

lint: install
	$(BIN)/ruff check minefield tests benchmarks

# the three core benchmarks; README "Performance" names the others, run by hand
bench: install
	$(BIN)/python benchmarks/bench_engine.py --threads $(THREADS)
	$(BIN)/python benchmarks/bench_search.py --threads $(THREADS)
	$(BIN)/python benchmarks/bench_sam.py --threads $(THREADS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
