# make demo: set up, then the offline demo.   make test: set up, then the whole test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup test demo fashion-mnist

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

demo: setup
	$(PY) scattering_net.py --n-blocks 2 --L 8 --in-spatial 32
