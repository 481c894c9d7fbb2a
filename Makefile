# The README's two commands: `make run` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
STAMP := $(VENV)/.installed

.PHONY: run test lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: the local CPU wheel, never a CUDA download.
$(STAMP)-base: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(STAMP)-dev: $(STAMP)-base
	$(BIN)/pip install -q -e '.[test,lint]'
	touch $@

install: $(STAMP)-base

run: $(STAMP)-base
	$(BIN)/tuneforge migrate
	$(BIN)/tuneforge serve --port $(PORT)

lint: $(STAMP)-dev
	$(BIN)/ruff check tuneforge tests bench migrations
	$(BIN)/ruff format --check tuneforge tests bench migrations
	$(BIN)/mypy

# Two test processes (pytest-xdist), whole files each so module fixtures stay together: most of
# the suite waits on subprocesses (workers starting, leases running out), so two overlap well on
# two cores. `make test PYTEST_JOBS=` runs it in one process. Tests marked `alone` (capacity tests,
# which another test's training would starve) run afterwards, by themselves.
# The parallel part runs with one OpenMP thread per process (unless OMP_NUM_THREADS says otherwise):
# the two test processes and the workers and training processes they start otherwise each take two
# threads on two cores and wait at each other's barriers. Measured with test_cli.py beside
# test_rft.py: 166 s with torch's default threads, 125 s with one.
PYTEST_JOBS ?= -n 2 --dist loadfile

test: $(STAMP)-dev $(STAMP)-gguf
	$(MAKE) lint
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest $(PYTEST_JOBS) -m "not alone" $(PYTEST_ARGS)
	$(BIN)/python -m pytest -m alone $(PYTEST_ARGS) || [ $$? -eq 5 ]  # 5: PYTEST_ARGS selected none

clean:
	rm -rf $(VENV) .tuneforge .pytest_cache .mypy_cache .ruff_cache

# The dashboard's browser tests and screenshots use Debian's chromium (Playwright only drives it).
.PHONY: chromium screenshots
chromium:
	command -v chromium >/dev/null || (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium))

# docs/ui-job.png (a trained job's page and its loss curve) and docs/ui-new-job.png (the form with
# its estimate), taken by the browser tests on a real stack.
screenshots: $(STAMP)-dev chromium
	UI_SCREENSHOT_DIR=docs $(BIN)/python -m pytest tests/ui/test_dashboard.py -q -p no:cacheprovider

# GGUF export (issue 10). llama-cpp-python ships only an sdist whose install compiles llama.cpp
# (about 10 CPU-minutes the first time; pip then reuses the wheel it cached), so it is its own
# extra: `make test` installs it, `make gguf` installs it for `make run`. The flags leave out what
# we do not use (the multimodal library, tools) and CPU-specific code. The converter is taken out
# of the same sdist into the virtualenv (tuneforge/training/gguf.py says why).
.PHONY: gguf
GGUF_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF
$(STAMP)-gguf: $(STAMP)-base
	CMAKE_ARGS="$(GGUF_CMAKE_ARGS)" $(BIN)/pip install -q -e '.[gguf]'
	$(BIN)/python -m tuneforge.training.gguf install-converter
	touch $@

gguf: $(STAMP)-gguf
