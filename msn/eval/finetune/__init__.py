"""Fine-tuning an MSN backbone end to end through one of its exports, against the linear probe
of the same frozen backbone (docs/finetune.md; the command line is ``scripts/finetune.py``).

:mod:`~msn.eval.finetune.data` (the recipe's options and the labelled Fashion-MNIST subset),
:mod:`~msn.eval.finetune.routes` (the transformers and timm routes: each library's own loader and
preprocessing), :mod:`~msn.eval.finetune.training` (probe, training loop, scoring),
:mod:`~msn.eval.finetune.report` (``finetune.json`` / ``finetune.md``) and
:mod:`~msn.eval.finetune.cli` (the command line).
"""
