"""Where the Hydra configs are (docs/getting_started.md): ``configs/`` at the repository
root, the one copy of the YAML files.

A checkout (``PYTHONPATH=. python train.py``, the editable install) reads that folder,
beside the package; a wheel carries it inside the package as ``msn/configs`` (pyproject.toml
maps the folder there), which an installed ``msn`` reads from any directory. ``config.yaml``
composes pre-training, ``eval_lowshot.yaml`` the low-shot evaluation; the keys, their
defaults and their documentation live in :mod:`msn.config` and :mod:`msn.eval.config`.
"""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
#: The copy a wheel installs inside the package; a checkout has none.
_INSTALLED = _PACKAGE / "configs"
#: The checkout's folder at the repository root, beside the package.
_CHECKOUT = _PACKAGE.parent / "configs"

#: The folder of the configs, absolute: Hydra's ``config_path`` (``@hydra.main``) and
#: ``config_dir`` (``initialize_config_dir``: :mod:`msn.api`, the tests). The installed copy
#: is looked for first, so that no other ``configs/`` folder beside an installed package
#: (a site-packages entry of another distribution) is ever read.
CONFIG_DIR = _INSTALLED if (_INSTALLED / "config.yaml").is_file() else _CHECKOUT
