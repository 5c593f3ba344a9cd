"""The sections of ``benchmarks/bench_train.py``, one module each (:mod:`train_harness.step`,
:mod:`~train_harness.levers`, :mod:`~train_harness.data`, :mod:`~train_harness.e2e`,
:mod:`~train_harness.profile`), on what they share: :mod:`train_harness.runner` (the configs
and the step objects timed) and :mod:`train_harness.timing`. Imported as ``train_harness``
with ``benchmarks/`` on the path (the folder of the running script; ``pythonpath`` for pytest).
"""
