# Each target installs what it needs first, so both work on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
BENCH_ARGS ?=  # e.g. BENCH_ARGS=--quick for a smoke run (speed benchmark)
TRAINING_BENCH_ARGS ?= $(filter --quick,$(BENCH_ARGS))  # the training, distillation and MViTv2 benchmarks take --quick

.PHONY: install test lint demo docs bench bench-training bench-accuracy bench-detection bench-segmentation bench-castle \
	bench-distill bench-distill-towers bench-mvitv2 bench-towers

install:
	# torch first and pinned: it is the CPU build these machines carry, and it keeps pip from pulling CUDA wheels.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	# timm's MViTv2 is the reference of Castling-MViTv2's tests and benchmarks; without its torchvision (see setup.py).
	$(PIP) install --quiet --no-deps timm==1.0.31

test: install
	$(PYTHON) -m pytest -q tests

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

demo: install
	$(PYTHON) examples/demo.py

# The manual, from docs/ into site/; --strict fails on a broken link, anchor or API reference (make test runs it too).
docs: install
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict

bench: install
	$(PYTHON) benchmarks/speed.py $(BENCH_ARGS)
	$(PYTHON) benchmarks/training.py $(TRAINING_BENCH_ARGS)
	$(PYTHON) benchmarks/distillation.py $(TRAINING_BENCH_ARGS)
	$(PYTHON) benchmarks/mvitv2.py $(TRAINING_BENCH_ARGS)
	$(PYTHON) benchmarks/towers.py $(TRAINING_BENCH_ARGS)
	$(PYTHON) benchmarks/distillation_towers.py $(TRAINING_BENCH_ARGS)

bench-training: install
	$(PYTHON) benchmarks/training.py $(TRAINING_BENCH_ARGS)

bench-accuracy: install
	$(PYTHON) benchmarks/accuracy.py $(BENCH_ARGS)

bench-detection: install
	$(PYTHON) benchmarks/detection.py $(BENCH_ARGS)

bench-segmentation: install
	$(PYTHON) benchmarks/segmentation.py $(BENCH_ARGS)

bench-castle: install
	$(PYTHON) benchmarks/castle.py $(BENCH_ARGS)

bench-distill: install
	$(PYTHON) benchmarks/distillation.py $(BENCH_ARGS)

bench-distill-towers: install
	$(PYTHON) benchmarks/distillation_towers.py $(BENCH_ARGS)

bench-mvitv2: install
	$(PYTHON) benchmarks/mvitv2.py $(BENCH_ARGS)

bench-towers: install
	$(PYTHON) benchmarks/towers.py $(BENCH_ARGS)
