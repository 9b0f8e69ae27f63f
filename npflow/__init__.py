"""npflow: continuous normalizing flows on NumPy (CPU) and CuPy (GPU), with hand-written
tangents, adjoints and discrete-adjoint ODE solvers. See docs/ for the derivations.

The public names are re-exported here, flat; each lives in a small module of its own.
"""
from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it (imported on first use, so that `import npflow` is cheap
# and a module's import error surfaces with its own name)
_EXPORTS = {
    "odeint": "npflow.solvers",
    "terminal_time_gradient": "npflow.solvers",
    "SolverError": "npflow.solvers",
    "initial_time_gradient": "npflow.solvers",
    "Solution": "npflow.solvers",
    "Grads": "npflow.solvers",
    "DataError": "npflow.data.download",
    "CNF": "npflow.cnf",
    "OTFlow": "npflow.otflow",
    "MultiscaleCNF": "npflow.multiscale",
    "FlowMatchingCNF": "npflow.cfm",
    "FlowMatchingMultiscaleCNF": "npflow.cfm_multiscale",
    "Autoencoder": "npflow.autoencoder",
    "LatentFlow": "npflow.latent",
    "MLP": "npflow.nets",
    "make_flows": "npflow.flows",
    "load": "npflow.checkpoint",
    "CheckpointError": "npflow.checkpoint",
    "Adam": "npflow.optim",
    "clip_grad_norm": "npflow.optim",
    "FlowModel": "npflow.model",
    "register_model": "npflow.model",
    "train": "npflow.training",
    "DeviceError": "npflow.backend",
    "ODENet": "npflow.odenet",
    "get_activation": "npflow.layers",
    "get_array_module": "npflow.backend",
    "tune_malloc": "npflow.backend",
    "VAE": "npflow.vae",
}
_SUBMODULES = {"cfm", "backend", "layers", "data", "trace", "tableau", "solvers", "cnf", "otflow",
               "cfm_multiscale", "optim", "checkpoint", "conv", "plotting", "training",
               "multiscale", "odenet", "model", "images", "otflow_net", "parallel", "nets",
               "autoencoder", "latent", "vae", "likelihoods", "amortized_cnf"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return import_module(f"npflow.{name}")
    raise AttributeError(f"module 'npflow' has no attribute {name!r}")
