# The two commands of the README:
#   make setup demo   set everything up, then pre-train MSN on Fashion-MNIST (CPU, minutes)
#   make test         run the test suite
PYTHON := .venv/bin/python

.PHONY: setup demo test
setup:
	bash scripts/setup.sh

demo:
	$(PYTHON) train.py experiment=fmnist_demo

test:
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest -q
