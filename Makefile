# The two commands of the README:
#   make setup demo   set everything up, then pre-train MSN on Fashion-MNIST (CPU, minutes)
#   make test         run the test suite
#   make results      the Fashion-MNIST showcase: pre-train, export, evaluate, ablations, report
#                     (docs/results/fashion_mnist.md; about 2 hours on 2 CPU cores)
PYTHON := .venv/bin/python

.PHONY: setup demo test results
setup:
	bash scripts/setup.sh

demo:
	$(PYTHON) train.py experiment=fmnist_demo

test:
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest -q

results:
	$(PYTHON) scripts/fashion_mnist_results.py
