# Flotilla: `make demo` sets everything up and runs the main job; `make test` runs the tests.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
# Where torch comes from.  Empty (default): plain `pip install torch==2.13.0`, which gets the CPU
# wheel on the development machine only because its pip configuration adds a local wheel folder
# holding torch-2.13.0+cpu; on another Linux machine plain pip fetches the multi-GB CUDA build.
# For the CPU-only wheel elsewhere: make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install-system-deps
	./scripts/install-system-deps
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned (see TORCH_INDEX above for the CPU-only wheel)
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/flotilla run examples/shakespeare.yaml

test: setup lint
	$(VENV)/bin/pytest -q

# ruff (configured in pyproject.toml): lint, and the formatting every file must already have
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs
