"""The Hydra configs, shipped inside the package so that ``msn-train`` and
``msn-eval-lowshot`` work from any directory after ``pip install``.

``config.yaml`` composes pre-training (groups ``model/``, ``data/``, ``experiment/``,
``hydra/launcher/``), ``eval_lowshot.yaml`` the low-shot evaluation. The keys, their defaults
and their documentation live in the dataclasses of :mod:`msn.config` and
:mod:`msn.eval.config`; these files only compose.
"""

from pathlib import Path

#: The folder of the configs (for ``hydra.initialize_config_dir``: tests, :mod:`msn.api`).
CONFIG_DIR = Path(__file__).resolve().parent
#: The same folder as a Hydra search path (``@hydra.main(config_path=...)``): a package,
#: found wherever ``msn`` is installed.
CONFIG_PATH = "pkg://msn.configs"
#: Where the Debian package ``dataset-fashion-mnist`` installs the data, ``data/fashion_mnist.yaml``'s
#: root: when it is missing, the data set is fetched into the cache instead (msn.data.datasets).
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
