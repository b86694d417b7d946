# `make test` and `make demo` build .venv from scratch on a fresh machine and reuse it after.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.phalanx-installed
# The CPU wheel of torch lies on the project's machines' disk; an unpinned torch would pull a CUDA build.
# --no-compile: Python compiles what is imported on first use, not every file of every wheel at install.
TORCH_PIN ?= torch==2.13.0
# Python writes each module's bytecode on its first import. Where the environment forbids that
# (PYTHONDONTWRITEBYTECODE=1, as on the project's machines and CI), every process the suite starts compiled
# torch's sources anew: 13 s instead of 4 s to import a rank's modules, and twice the suite's time.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: venv test demo bench clean

venv: $(STAMP)

# The package and its extras go in with uv when it installs (14 s where pip took 110 s: pip resolved and unpacked
# about 150 wheels at 90 s of CPU), on the indexes, find-links and constraints of this machine's pip config
# (.ci/uv_args.py); with pip if uv cannot.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	$(PY) -m pip install -q --no-compile $(TORCH_PIN)
	$(VENV)/bin/uv pip install -q --python $(PY) $$($(PY) .ci/uv_args.py) -e '.[dev]' || \
		$(PY) -m pip install -q --no-compile -e '.[dev]'
	touch $(STAMP)

# Two pytest workers (pytest-xdist): most of a test's time is process start and waiting on other processes, so
# two run side by side on two cores in far less time than one. The tests that time failures (marked serial: Ray
# clusters, a SIGKILL at a drawn step) run after them, alone: beside a second worker a hang was named 34 s late.
# Tests that share reference runs (tests/parallel/test_loss_curves.shared) run on one worker: each trains them once,
# and the serial session finds the runs the first one trained (tests/conftest.reference_run).
test: $(STAMP)
	refs=$$(mktemp -d) && export PHALANX_TEST_REFERENCES=$$refs && \
	$(PY) -m pytest -q -ra -n 2 --dist loadgroup -m "not serial" --durations=10 tests && \
	$(PY) -m pytest -q -ra -m serial --durations=5 tests; status=$$?; rm -rf $$refs; exit $$status

demo: $(STAMP)
	$(VENV)/bin/phalanx train configs/tiny.yaml
	$(VENV)/bin/phalanx report runs/tiny

bench: $(STAMP)
	$(PY) benchmarks/trainer_overhead.py

clean:
	rm -rf $(VENV) runs
