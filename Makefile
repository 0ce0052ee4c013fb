# perrep — set-up, pipeline and tests. `make repro` and `make test` work on a fresh clone (see README).
SHELL := /bin/bash
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export PYTHONHASHSEED := 0

.PHONY: setup data repro test lab export clean-venv

## setup: create .venv (torch first), install the pinned set, register the `perrep` kernel, fill data/
setup: $(VENV)/.installed data

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.txt -c constraints.txt
	$(BIN)/pip install --quiet --no-deps open_clip_torch==3.3.0  # only for its CLIP BPE vocabulary file (importing it needs torchvision)
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name perrep --display-name "perrep (.venv)"
	touch $@

## data: the real inputs of the mini-world, copied byte-for-byte from pinned packages, then tracked by DVC
data: $(VENV)/.installed
	$(BIN)/python -c "from perrep.world import copy_background_sources; copy_background_sources('data/backgrounds')"
	$(BIN)/dvc add --quiet data

## repro: set up, then run the whole pipeline (`mini` profile by default)
repro: setup
	$(BIN)/dvc repro

## test: set up, then run the whole test suite
test: setup
	$(BIN)/python -m pytest

## lab: open the notebooks in the project's environment
lab: setup
	$(BIN)/jupyter lab nbs

## export: regenerate perrep/ from the notebooks and clean them (run before committing)
export:
	$(BIN)/nbdev_clean && $(BIN)/nbdev_export

clean-venv:
	rm -rf $(VENV)
