# The two commands a newcomer runs: `make demo` and `make test`.
# Each sets up .venv on first use (torch CPU wheel first, then detpact), idempotently.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.detpact-installed
TORCH_PIN := torch==2.13.0
RUN_ID ?= demo_$(shell date +%Y%m%d_%H%M%S)

.PHONY: setup demo test bench clean-venv

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch goes in first and pinned: the CPU wheel. An unpinned torch (or one pulled in
# as a dependency) would fetch a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/detpact train configs/quickstart.yaml --run-id $(RUN_ID)
	$(VENV)/bin/detpact eval runs/$(RUN_ID)
	$(VENV)/bin/detpact runs verify runs/$(RUN_ID)
	@echo "run directory: runs/$(RUN_ID)"
	@echo "next: $(VENV)/bin/detpact predict runs/$(RUN_ID) <images...> --out preds.json --save-images preds/"

# Two pytest workers, each taking whole test files (module fixtures such as a reference
# run are built once): the end-to-end tests spend much of their time starting processes.
# pytest exits 5 when it collected no tests; say so plainly (it still fails the target).
test: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	@$(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS) || { status=$$?; \
	  if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$status; }

bench: $(STAMP)
	$(PY) bench/overhead.py
	$(PY) bench/checkpoint.py

# docs/training.md's table of train.* keys, rewritten from the config schema's docstrings.
.PHONY: docs
docs: $(STAMP)
	$(PY) -m detpact.config.reference docs/training.md

clean-venv:
	rm -rf $(VENV)
