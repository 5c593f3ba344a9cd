"""The names ``baseline=...`` accepts (docs/method.md Sec. 8), at the bottom floor of
:mod:`msn.eval` (imports nothing) so that the torch-free options check
(:mod:`msn.eval.config`) and the table :data:`msn.eval.baselines.BASELINES` share one spelling.
"""

PIXELS = "pixels"
RANDOM = "random"
SUPERVISED = "supervised"

#: Every accepted value, ``None`` (evaluate the backbone itself) first.
BASELINE_NAMES: tuple[str | None, ...] = (None, PIXELS, RANDOM, SUPERVISED)
