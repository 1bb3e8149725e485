# make test  - create .venv when missing, install the project with its test extra, run every test
# make demo  - the pipeline on the embedded defaults (today: build the QM9 shards and show their summary)
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch; on a GPU machine install the CUDA build first, e.g. `make TORCH=torch`.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

demo: $(STAMP)
	$(PY) -m datasets build qm9 --out data/qm9
	$(PY) -m datasets inspect data/qm9

bench: $(STAMP)
	$(PY) -m datasets bench data/qm9
	$(PY) -m trainer.bench

clean:
	rm -rf runs wandb .pytest_cache
