"""HDF5 checkpoints, written atomically (docs/training.md, section 4).

Layout of a checkpoint file (h5py):

    /                       attrs: format = "npflow-checkpoint", version = 1,
                                   npflow_version, model_class, config (JSON),
                                   iteration (-1 if none), rng (JSON of the numpy
                                   Generator's bit_generator.state, "null" if none)
    /params/<i>             one dataset per parameter, attr "name" = its key in model.params
    /optimizer              a tree (see below), absent if no optimizer was given
    /extra                  a tree, absent if none

A tree is a nested dict: sub-dicts become groups, arrays become datasets, everything else
(numbers, strings, lists, None) goes into the group's "json" attribute. Group and dataset
names are positions ("d0", "a1", ...) with the real key in a "key" attribute, so any string
can be a key.

``save`` writes ``path + ".tmp"`` in the same folder, flushes and fsyncs it, then renames it
over ``path`` with ``os.replace`` (atomic on POSIX and Windows): a crash at any moment leaves
either the previous checkpoint or the new one, never a half-written file under ``path``.
"""
from __future__ import annotations

import json
import os

import numpy

from .backend import array_module, to_device, to_host
from .layers import upgrade_param_name
from .model import model_class, params_mismatch

__all__ = ["CheckpointError", "FORMAT", "VERSION", "save", "load", "load_training_state",
           "read_params", "read_header", "rng_from_state"]

FORMAT = "npflow-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read: missing, truncated or corrupt, not an npflow checkpoint,
    written by a newer npflow, or inconsistent with its own config."""


def _h5py():
    import h5py
    return h5py


# --------------------------------------------------------------------------------------------
# trees: nested dicts of arrays and JSON values

def _is_array(v) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype") and not isinstance(v, numpy.generic)


def _json_default(o):
    if isinstance(o, numpy.generic):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"checkpoint: cannot store a value of type {type(o).__name__} "
                    "(use arrays, numbers, strings, lists, dicts or None)")


def _write_tree(group, tree: dict) -> None:
    plain = {}
    for i, (k, v) in enumerate(tree.items()):
        if not isinstance(k, str):
            raise TypeError(f"checkpoint: dict keys must be strings, got {k!r}")
        if isinstance(v, dict):
            sub = group.create_group(f"d{i}")
            sub.attrs["key"] = k
            _write_tree(sub, v)
        elif _is_array(v):
            ds = group.create_dataset(f"a{i}", data=to_host(v))
            ds.attrs["key"] = k
        else:
            plain[k] = v
    group.attrs["json"] = json.dumps(plain, default=_json_default)
    group.attrs["order"] = json.dumps(list(tree))


def _read_tree(group) -> dict:
    h5py = _h5py()
    values = json.loads(group.attrs["json"])
    for name, item in group.items():
        key = item.attrs["key"]
        if isinstance(item, h5py.Group):
            values[key] = _read_tree(item)
        else:
            values[key] = numpy.asarray(item[()])
    order = json.loads(group.attrs["order"])
    return {k: values[k] for k in order}


# --------------------------------------------------------------------------------------------
# random generators

def rng_state(rng) -> dict:
    """The JSON-able state of a numpy.random.Generator (its bit generator's state dict)."""
    if not isinstance(rng, numpy.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng.bit_generator.state


def rng_from_state(state: dict) -> numpy.random.Generator:
    """A new numpy Generator in exactly the saved state."""
    name = state["bit_generator"]
    bit_gen_cls = getattr(numpy.random, name, None)
    if bit_gen_cls is None:
        raise CheckpointError(f"checkpoint RNG uses unknown bit generator {name!r}")
    bg = bit_gen_cls()
    bg.state = state
    return numpy.random.Generator(bg)


# --------------------------------------------------------------------------------------------
# save

def save(path, model, optimizer=None, rng=None, iteration=None, extra=None) -> None:
    """Write ``model`` (class name, config, params) and optional training state to ``path``.

    model: a FlowModel; optimizer: an object with ``state_dict()`` (Adam) or a dict already
    (several optimizers: {"weights": adam.state_dict(), ...}); rng: numpy Generator whose
    state is saved; iteration: int, completed iterations; extra: dict of arrays and JSON values
    (loss history, hook states). Atomic: write ``path.tmp``, fsync, ``os.replace``.
    """
    h5py = _h5py()
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    if optimizer is not None and not isinstance(optimizer, dict):
        optimizer = optimizer.state_dict()
    from . import __version__
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["version"] = VERSION
            f.attrs["npflow_version"] = __version__
            f.attrs["model_class"] = type(model).__name__
            f.attrs["config"] = json.dumps(model.config, default=_json_default)
            f.attrs["iteration"] = -1 if iteration is None else int(iteration)
            f.attrs["rng"] = json.dumps(None if rng is None else rng_state(rng))
            g = f.create_group("params")
            g.attrs["names"] = json.dumps(list(model.params))
            for i, (k, a) in enumerate(model.params.items()):
                ds = g.create_dataset(f"{i:04d}", data=to_host(a))
                ds.attrs["name"] = k
            if optimizer is not None:
                _write_tree(f.create_group("optimizer"), optimizer)
            if extra is not None:
                _write_tree(f.create_group("extra"), extra)
            f.flush()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable (POSIX); not available everywhere
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# load

def _open(path):
    """Open ``path`` for reading and check the header; returns the h5py.File."""
    h5py = _h5py()
    path = os.fspath(path)
    if not os.path.exists(path):
        hint = ""
        if os.path.exists(path + ".tmp"):
            hint = (f" (only {path}.tmp exists: a save was interrupted before completing; it "
                    "is not a valid checkpoint)")
        raise CheckpointError(f"checkpoint {path!r} does not exist{hint}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint {path!r} cannot be opened as HDF5: it is truncated or corrupt "
            f"({os.path.getsize(path)} bytes; h5py said: {exc})") from exc
    try:
        fmt = f.attrs.get("format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode()
        if fmt != FORMAT:
            raise CheckpointError(
                f"{path!r} is an HDF5 file but not an npflow checkpoint (no "
                f"format={FORMAT!r} attribute; found {fmt!r})")
        version = int(f.attrs.get("version", -1))
        if version > VERSION:
            raise CheckpointError(
                f"checkpoint {path!r} has format version {version}, written by a newer npflow "
                f"({f.attrs.get('npflow_version')!r}); this npflow reads versions <= {VERSION}."
                " Upgrade npflow to load it")
        if version < 1:
            raise CheckpointError(f"checkpoint {path!r} has an invalid format version {version}")
    except BaseException:
        f.close()
        raise
    return f


def _guard(path, what):
    """Turn low-level read errors in a checkpoint into a CheckpointError."""
    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, typ, exc, tb):
            if exc is None or isinstance(exc, CheckpointError):
                return False
            if isinstance(exc, (OSError, KeyError, ValueError, TypeError,
                                json.JSONDecodeError)):
                raise CheckpointError(
                    f"checkpoint {os.fspath(path)!r} is damaged: reading {what} failed "
                    f"({type(exc).__name__}: {exc})") from exc
            return False
    return _Ctx()


def read_header(path) -> dict:
    """The header of a checkpoint: model_class, config, iteration, version, npflow_version."""
    with _open(path) as f, _guard(path, "the header"):
        return {
            "model_class": str(f.attrs["model_class"]),
            "config": json.loads(f.attrs["config"]),
            "iteration": None if int(f.attrs["iteration"]) < 0 else int(f.attrs["iteration"]),
            "version": int(f.attrs["version"]),
            "npflow_version": str(f.attrs["npflow_version"]),
        }


def read_params(path) -> dict:
    """The saved parameters as host (numpy) arrays, in their saved order."""
    with _open(path) as f, _guard(path, "the parameters"):
        g = f["params"]
        names = json.loads(g.attrs["names"])
        by_name = {ds.attrs["name"]: numpy.asarray(ds[()]) for ds in g.values()}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise CheckpointError(f"checkpoint {os.fspath(path)!r} is damaged: parameters "
                                  f"{missing} are listed but not stored")
        # older checkpoints: the conv layers' former parameter names (npflow.layers)
        return {upgrade_param_name(n): by_name[n] for n in names}


def _upgrade_names(tree):
    """Older parameter names -> today's (npflow.layers.upgrade_param_name) in a tree's dict keys
    and lists of strings: the optimizer's moments and key list of an older checkpoint."""
    if isinstance(tree, dict):
        return {upgrade_param_name(k): _upgrade_names(v) for k, v in tree.items()}
    if isinstance(tree, list) and all(isinstance(v, str) for v in tree):
        return [upgrade_param_name(v) for v in tree]
    return tree


def load(path, device: str | None = None):
    """Rebuild the model saved in ``path`` (exported as ``npflow.load``).

    device: "cpu" / "gpu" to override the saved config's device (None keeps it).
    Raises CheckpointError for a missing, truncated, corrupt, foreign or too-new file, and when
    the stored params do not match what the stored config builds.
    """
    if device is not None:
        array_module(device)  # a bad or unusable device is the caller's error, said first
    header = read_header(path)
    params = read_params(path)
    try:
        cls = model_class(header["model_class"])
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r}: {exc}") from exc
    try:
        model = cls.from_config(header["config"], device=device)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r}: its config cannot rebuild a "
            f"{header['model_class']} ({type(exc).__name__}: {exc})") from exc
    problems = params_mismatch(model.params, params)
    if problems:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r}: the saved parameters do not match the model its "
            f"config builds ({header['model_class']}): {problems}")
    xp = model.xp
    model.params = {k: to_device(a, xp) for k, a in params.items()}
    return model


def load_training_state(path) -> dict:
    """The training state saved with a model: dict with keys
    optimizer (dict or None), rng (a restored numpy Generator or None), rng_state (dict or
    None), iteration (int or None), extra (dict or None)."""
    with _open(path) as f, _guard(path, "the training state"):
        rng_json = json.loads(f.attrs["rng"])
        it = int(f.attrs["iteration"])
        opt = _upgrade_names(_read_tree(f["optimizer"])) if "optimizer" in f else None
        extra = _read_tree(f["extra"]) if "extra" in f else None
    return {
        "optimizer": opt,
        "rng": None if rng_json is None else rng_from_state(rng_json),
        "rng_state": rng_json,
        "iteration": None if it < 0 else it,
        "extra": extra,
    }
