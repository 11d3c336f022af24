# The two commands of the README: `make demo` and `make test`.
# VENV=path uses another virtual environment (e.g. one you made with your CUDA torch);
# PYTHON=python3.X picks the interpreter that creates it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.distillkit-installed
# The CPU build that lies on this machine's disk; a GPU user installs their own torch first.
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=
# test files run in parallel, one file per worker process (pytest-xdist; its module fixtures are built
# once); at most 4 workers, since each holds torch and starts CLI subprocesses
TEST_WORKERS ?= auto
PYTEST_PARALLEL := -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile

.PHONY: install demo test test-all bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_CPU)
	$(PY) -m pip install -e ".[dev]"
	@touch $(STAMP)

demo: install
	$(PY) scripts/demo.py

test: install
	$(PY) -m pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest $(PYTEST_PARALLEL) -m "slow or not slow" $(PYTEST_ARGS)

bench: install
	$(PY) scripts/bench_kd_digits.py --seeds 3
	$(PY) scripts/bench_teacher_digits.py
	$(PY) scripts/bench_step_distill_digits.py --seeds 3 --from-scratch

clean:
	rm -rf runs outputs multirun .pytest_cache
