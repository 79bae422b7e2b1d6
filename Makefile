# Two commands from a fresh clone: `make demo` and `make test`. Both set up .venv first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lrpkit-installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --doctest-modules lrpkit tests

demo: $(STAMP)
	$(BIN)/lrpkit demo

bench: $(STAMP)
	$(BIN)/lrpkit bench rules --device cpu
	$(BIN)/lrpkit bench models --device cpu

clean:
	rm -rf $(VENV) build *.egg-info
