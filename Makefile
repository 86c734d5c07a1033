# make demo: set up, then the offline demo (Fashion-MNIST, ~5 min on 2 CPU cores).
# make test: set up, then the whole test suite (~1 min on 2 CPU cores, after a ~3 min install).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
FASHION_DIR := /usr/share/datasets/fashion-mnist
# Each demo writes to a new folder (nothing earlier is overwritten); runs/demo-latest points at the newest.
DEMO_DIR := runs/demo-$(shell date +%Y%m%d-%H%M%S)
DEMO_SIZES := 0.01 0.05 0.2
DEMO_TRAIN := --dataset fashion-mnist --modulus-type phase_relu --epochs 8 --patience 8 --seed 0 --print-freq 0

.PHONY: setup test demo fashion-mnist docs

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q

# Debian ships the real Fashion-MNIST files as a package: install it when we can (root, apt).
fashion-mnist:
	@if [ ! -d $(FASHION_DIR) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null || echo "note: apt-get could not install dataset-fashion-mnist"; \
	fi

# SPEC.md's typical workflow, scaled down: a quick check, train.py at three training-set sizes, analyze.py.
demo: setup fashion-mnist
	$(PY) quick_check.py --dataset fashion-mnist --epochs 3 --seed 0 --print-freq 0 --save-dir $(DEMO_DIR)/quick_check
	for size in $(DEMO_SIZES); do \
		$(PY) train.py $(DEMO_TRAIN) --train-size $$size --save-dir $(DEMO_DIR)/size_$$size || exit $$?; \
	done
	$(PY) analyze.py --results-dir $(DEMO_DIR) --curves
	$(PY) analyze.py --results-dir $(DEMO_DIR) --filters $(DEMO_DIR)/size_0.2/phase_b/best.pth
	ln -sfn $(notdir $(DEMO_DIR)) runs/demo-latest

# The README's picture, from the latest demo.
docs:
	mkdir -p docs
	cp runs/demo-latest/plots/plot_size_vs_accuracy.png docs/plot_size_vs_accuracy.png
	cp runs/demo-latest/plots/filters_block0.png docs/filters_block0.png
