# make test  - create .venv when missing, install the project with its test and gpu extras, run every test
# make demo  - the whole pipeline on the embedded defaults: QM9 shards, DeepSpeed training (2 CPU ranks),
#              sampling over a local Ray, metrics and report
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch; on a GPU machine install the CUDA build first, e.g. `make TORCH=torch`.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo bench gpu-check install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,gpu]'
	# MOSES SMILES (build smiles --input moses): only molsets' data files are used; --no-deps keeps out
	# its declared dependencies (pomegranate==0.12.0, fcd-torch, pandas, seaborn), which nothing here needs
	$(PY) -m pip install --quiet --no-deps molsets==0.3.1
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not slow"

DEMO_RUN := runs/cpu_demo
demo: $(STAMP)
	$(PY) -m datasets build qm9 --out data/qm9
	DS_ACCELERATOR=cpu WANDB_SILENT=true $(VENV)/bin/deepspeed --num_accelerators 2 \
	    trainer/main.py --config cluster/cpu_demo.json --run-dir $(DEMO_RUN) --resume auto
	WANDB_SILENT=true $(PY) evals/generate.py --checkpoint $(DEMO_RUN) --n-samples 200 --batch 100 --steps 200,50 \
	    --property --out $(DEMO_RUN)/eval
	$(PY) -m trainer.export $(DEMO_RUN) --out $(DEMO_RUN)/model.safetensors
	printf 'CCO ethanol\nc1ccccc1 benzene\nCC(=O)O acetic-acid\nC1CC not-a-molecule\n' > $(DEMO_RUN)/mine.smi
	$(PY) evals/predict.py --checkpoint $(DEMO_RUN)/model.safetensors --input $(DEMO_RUN)/mine.smi \
	    --out $(DEMO_RUN)/predictions.csv
	@echo
	@echo "dataset:     data/qm9 (python -m datasets inspect data/qm9)"
	@echo "training:    $(DEMO_RUN)/metrics.jsonl, checkpoints $(DEMO_RUN)/step*, W&B offline run in $(DEMO_RUN)/wandb"
	@echo "evaluation:  $(DEMO_RUN)/eval/report.html (with quality at 200 and 50 steps), metrics.json, samples.sdf, *.png"
	@echo "your own:    $(DEMO_RUN)/model.safetensors (+ .json card), LUMO of $(DEMO_RUN)/mine.smi in $(DEMO_RUN)/predictions.csv"

bench: $(STAMP)
	$(PY) -m datasets bench data/qm9
	$(PY) -m trainer.bench

# make gpu-check - the numbers that matter on one GPU in one short run (an H200 run with 3 training paths took 323 s,
#   BENCHMARKS.md; the default now trains 5; install the CUDA build first:
#   make gpu-check TORCH=torch): trainer.bench per kernel path in bf16 and fp32, compiled, fused and whole-step
#   graphs against eager on the GPU, 30 s of real training per path from its first logged step (molecules/s from
#   metrics.jsonl), then 10,000 molecules sampled with 20 steps and the time scaled to 1000 steps
#   (trainer/gpu_check.py; results in runs/gpu_check/gpu_check.json).
gpu-check: $(STAMP)
	test -f data/qm9/manifest.json || $(PY) -m datasets build qm9 --out data/qm9
	$(PY) -m trainer.gpu_check --data data/qm9 --out runs/gpu_check

clean:
	rm -rf runs wandb .pytest_cache
