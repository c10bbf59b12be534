# Each target creates .venv and installs what it needs, so it works from a clean clone.
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned first: this exact version is the CPU build on our machines; without a pin,
# pip resolves torch to a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test lint dist

$(BIN)/samba-hf: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(BIN)/samba-hf
	$(BIN)/samba-hf demo $(ARGS)

test: $(BIN)/samba-hf
	$(BIN)/python -m pytest -q $(ARGS)

RUFF := ruff==0.17.6
lint: $(BIN)/samba-hf
	$(BIN)/python -m pip install --quiet $(RUFF)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

# The release check: an sdist and a wheel that twine accepts, the wheel installed with its
# dependencies in a fresh environment (torch pinned as above; pip's cache serves the rest; no
# bytecode compilation, which would cost more than the smoke test saves) and smoke-tested from
# outside the repository.
SMOKE := build/smoke-venv
dist: $(BIN)/samba-hf
	$(BIN)/python -m pip install --quiet build twine
	rm -rf dist $(SMOKE)
	$(BIN)/python -m build --outdir dist .
	$(BIN)/python -m twine check --strict dist/*
	python3 -m venv --without-pip $(SMOKE)
	$(BIN)/python -m pip --python $(SMOKE)/bin/python install --quiet --no-compile $(TORCH) dist/*.whl
	cd $(SMOKE) && bin/python $(CURDIR)/.ci/smoke_install.py
