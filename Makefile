# The two commands of the README:
#   make setup demo   set everything up, then pre-train MSN on Fashion-MNIST and show its low-shot table (CPU, 5 min)
#   make test         run the test suite
#   make results      the Fashion-MNIST showcase: pre-train, export, evaluate, ablations, report
#                     (docs/results/fashion_mnist.md; about 4 hours on 2 CPU cores)
#   make gpu-wheels   download into .whl/ the wheels a bare GPU machine lacks (hydra-core, omegaconf, antlr4)
#   make gpu-check    the prepared GPU check (CUDA tests + GPU benchmark page); on a CPU it rehearses
#   make rehearsal    ImageNet-1k's shape on local disk at two scales, the README's commands on it
#                     (docs/results/imagenet_rehearsal.md; needs the split files in ../shared)
PYTHON := .venv/bin/python

#: the float-sensitive tests (parity, benchmark equivalence, resume), run again by CI under
#: another thread count: their claims must not depend on how the kernels split the work
FLOAT_SENSITIVE := tests/test_losses.py tests/test_models.py tests/test_benchmarks.py tests/test_train_step.py tests/test_trainer.py \
                   tests/test_distributed.py tests/test_export_hf.py tests/test_export_timm.py tests/test_train_schedules.py

.PHONY: setup demo test test-threads results gpu-wheels gpu-check rehearsal
setup:
	bash scripts/setup.sh

demo:
	$(PYTHON) scripts/demo.py

test:
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest -q

test-threads:
	OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest -q $(FLOAT_SENSITIVE)

results:
	$(PYTHON) scripts/fashion_mnist_results.py

gpu-wheels:
	PYTHON=$(PYTHON) bash scripts/gpu_wheels.sh

gpu-check:
	PYTHON=$(if $(wildcard $(PYTHON)),$(PYTHON),python3) bash scripts/gpu_check.sh

rehearsal:
	$(PYTHON) scripts/imagenet_rehearsal.py --scale 26000 --scale 104000 --val-per-class 10 --steps 6 --lambd 0.075
