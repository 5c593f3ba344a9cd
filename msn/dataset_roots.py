"""Default locations of data sets on disk (docs/getting_started.md)."""

#: Where the Debian package ``dataset-fashion-mnist`` installs Fashion-MNIST: the ``root`` of
#: ``configs/data/fashion_mnist.yaml``. When it is missing, the data set is fetched into the
#: cache instead (:mod:`msn.data.fashion_mnist`).
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
