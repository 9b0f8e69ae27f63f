"""Data for npflow: toy 2-D densities, MAF tabular sets, MNIST / Fashion-MNIST / CIFAR-10.

docs/data.md derives and documents each set. Everything here is host-side numpy; models move
batches to their device.
"""
from .download import DataError
from .images import load_cifar10, load_mnist
from .tabular import TABULAR_NAMES, load_tabular
from .toy import TOY_NAMES, toy, toy_log_density
from .validate import validate_data

__all__ = ["toy", "TOY_NAMES", "toy_log_density", "validate_data", "load_mnist",
           "load_cifar10", "load_tabular", "TABULAR_NAMES", "DataError"]
# npflow.data.download (the module) holds download(url, dest, sha256, timeout) and
# ensure_files(folder, files, download); it is not re-exported so that the module name stays
# the module.
