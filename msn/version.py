"""The package's version: its one home (``msn.__version__`` and ``pyproject.toml`` read it)."""

__version__ = "0.1.0"
