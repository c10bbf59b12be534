# Each target creates .venv and installs what it needs, so it works from a clean clone.
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned first: this exact version is the CPU build on our machines; without a pin,
# pip resolves torch to a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test

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
