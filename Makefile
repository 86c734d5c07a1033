# make demo: set up, then the research question in miniature, offline (Fashion-MNIST, 12 short runs).
# make test: set up, then the whole test suite: 10 min 20 s on a clean clone on 2 idle cores.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
FASHION_DIR := /usr/share/datasets/fashion-mnist
# Each demo writes to a new folder (nothing earlier is overwritten); runs/demo-latest points at the newest.
DEMO_DIR := runs/demo-$(shell date +%Y%m%d-%H%M%S)
# Wavelet init (two-phase) against random init (joint, same epoch budget) at three training-set sizes, two seeds.
DEMO_GRID := --arm wavelet-two-phase,random-joint --train-size 0.01,0.05,0.2 --seed 0,1 --jobs 2
# The cell whose learnt filters the demo draws (analyze.py names the figure after the checkpoint's path).
DEMO_FILTERS := arm=wavelet-two-phase__train-size=0.2__seed=0
DEMO_TRAIN := --dataset fashion-mnist --modulus-type phase_relu --head-epochs 5 --epochs 5 --warmup-epochs 1 --print-freq 0

.PHONY: setup test demo gpu-check fashion-mnist docs

$(STAMP): requirements.txt requirements-optional.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-optional.txt
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q

# The GPU path in one command (gpu_check.py): ~8 min on one H100; on a machine without a GPU its --quick form.
gpu-check: setup fashion-mnist
	$(PY) gpu_check.py

# Debian ships the real Fashion-MNIST files as a package: install it when we can (root, apt).
fashion-mnist:
	@if [ ! -d $(FASHION_DIR) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null || echo "note: apt-get could not install dataset-fashion-mnist"; \
	fi

# The research question in miniature: sweep.py over the grid, then analyze.py's tables, tests and plots.
demo: setup fashion-mnist
	$(PY) sweep.py --out $(DEMO_DIR) $(DEMO_GRID) $(DEMO_TRAIN)
	$(PY) analyze.py --results-dir $(DEMO_DIR)
	$(PY) analyze.py --results-dir $(DEMO_DIR) --filters $(DEMO_DIR)/$(DEMO_FILTERS)/phase_b/best.pth
	ln -sfn $(notdir $(DEMO_DIR)) runs/demo-latest
	@echo "make demo: tables and plots in $(DEMO_DIR)/plots (runs/demo-latest/plots)"

# The README's picture, from the latest demo.
docs:
	mkdir -p docs
	cp runs/demo-latest/plots/plot_data_efficiency.png docs/plot_data_efficiency.png
	cp runs/demo-latest/plots/filters_block0__$(DEMO_FILTERS)__phase_b__best.png docs/filters_block0.png
