# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create or refresh the local virtual environment first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATASET ?= beauty
RUN    ?= runs/$(DATASET)
PRESET ?= cpu
PYTEST_ARGS ?=

.PHONY: venv demo test test-all bench clean

venv: $(VENV)/.installed

# Re-install whenever pyproject.toml changes. torch goes first, pinned, so pip takes the
# CPU build from local disk instead of resolving a CUDA build for sentence-transformers.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[cpu,dev]"
	touch $@

demo: venv
	$(VENV)/bin/tiger pipeline --dataset $(DATASET) --run $(RUN) --preset $(PRESET)

# `make test` (CI, the README's command) leaves out tests marked slow; `make test-all` runs them too.
test: venv
	$(PY) -m tiger_ray.testing.run_pytest -m "not slow" $(PYTEST_ARGS)

test-all: venv
	$(PY) -m tiger_ray.testing.run_pytest $(PYTEST_ARGS)

bench: venv
	$(PY) benchmarks/run_all.py --run $(RUN)

clean:
	rm -rf $(VENV) runs
