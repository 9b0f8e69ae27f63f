"""The MAF tabular density-estimation sets: POWER, GAS, HEPMASS, MINIBOONE, BSDS300.

docs/data.md, section 2. Papamakarios et al. (2017) published the files these loaders read
(Zenodo record 1161203, data.tar.gz) and the preprocessing that turns them into the standard
train/validation/test splits used by MAF, FFJORD and OT-Flow. The steps below are written from
that description (eqs. 2.1-2.6); the quirks of the reference code that shape the published
splits are kept on purpose so that test NLLs are comparable with the literature:

- POWER draws its noise and its shuffle from ``numpy.random.RandomState(42)`` in the reference
  order (shuffle; voltage, gap and sub-metering noise), so the split is the published one.
- HEPMASS drops a feature when its *smallest* value occurs more than 5 times (the reference
  counts the occurrences of the first key of the sorted value counts), and uses the sample
  standard deviation (ddof = 1), as pandas does; POWER and MINIBOONE use ddof = 0 (numpy).
- GAS standardises with the mean and std of all rows (before the split), with ddof = 1.

Files (under DATA_DIR, default "data"): power/data.npy, gas/ethylene_CO.pickle,
hepmass/1000_train.csv and 1000_test.csv, miniboone/data.npy, BSDS300/BSDS300.hdf5.
Present files are read as they are; missing files come from the MAF archive (downloaded,
extracted, deleted). No SHA-256 of that archive is published (Zenodo lists an MD5), so the
download is reported with its computed SHA-256 and checked by its gzip CRCs and contents.
"""
from __future__ import annotations

import os

import numpy as np

from .download import DataError, extract_tar, safe_unpickle
from .download import download as _download_file

__all__ = ["TABULAR_NAMES", "TABULAR_FILES", "load_tabular", "MAF_URL", "MAF_SHA256",
           "preprocess_power", "preprocess_gas", "preprocess_hepmass", "preprocess_miniboone"]

TABULAR_NAMES = ("power", "gas", "hepmass", "miniboone", "bsds300")

# data set -> files relative to DATA_DIR
TABULAR_FILES = {
    "power": ("power/data.npy",),
    "gas": ("gas/ethylene_CO.pickle",),
    "hepmass": ("hepmass/1000_train.csv", "hepmass/1000_test.csv"),
    "miniboone": ("miniboone/data.npy",),
    "bsds300": ("BSDS300/BSDS300.hdf5",),
}

MAF_URL = "https://zenodo.org/record/1161203/files/data.tar.gz"
# No published SHA-256 was found for data.tar.gz (Zenodo shows an MD5 only); None makes the
# download warn with the SHA-256 it computed instead of checking one. Do not invent a value.
MAF_SHA256 = None
_ARCHIVE_NAME = "maf-data.tar.gz"

_VAL_FRACTION = 0.1
_TEST_FRACTION = 0.1


def _split_tail(data, fraction, what):
    """(head, tail) with the tail the last int(fraction·N) rows (eq. 2.1)."""
    n_tail = int(fraction * data.shape[0])
    if n_tail < 1:
        raise DataError(f"{what}: only {data.shape[0]} rows, too few for a {fraction:.0%} split")
    return data[:-n_tail], data[-n_tail:]


def _standardise(ref, arrays, ddof):
    """Eq. 2.2: (x − mean(ref)) / std(ref) column-wise, for each array."""
    bad = ~np.isfinite(ref)
    if bad.any():  # before the statistics, which would spread one NaN to every row
        rows = np.flatnonzero(bad.any(axis=1))
        raise DataError(f"the raw data holds {int(bad.sum())} NaN/Inf value(s) in "
                        f"{rows.size} row(s) (first: row {int(rows[0])}) before "
                        "standardisation: the file is damaged or not the expected one; "
                        "delete it and fetch it again")
    mu = ref.mean(axis=0)
    s = ref.std(axis=0, ddof=ddof)
    if np.any(s == 0):
        raise DataError(f"constant feature(s) {np.flatnonzero(s == 0).tolist()}: cannot "
                        "standardise")
    return [(a - mu) / s for a in arrays]


def _train_val_test(data, what):
    """Eq. 2.1: test = last 10 %, validation = last 10 % of the rest, train = the remainder."""
    rest, test = _split_tail(data, _TEST_FRACTION, what)
    train, val = _split_tail(rest, _VAL_FRACTION, what)
    return train, val, test


def preprocess_power(data):
    """POWER (eq. 2.3): shuffle, drop columns 3 and 1, add uniform noise, split, standardise.

    Args:
        data: array (N, 8) of power/data.npy.

    Returns:
        (train, val, test), each (·, 6) float64.
    """
    data = np.array(data, dtype=np.float64)  # own copy: shuffled in place
    if data.ndim != 2 or data.shape[1] != 8:
        raise DataError(f"power/data.npy must have shape (N, 8), got {data.shape}")
    rng = np.random.RandomState(42)  # the reference generator, for the published split
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(data, [1, 3], axis=1)  # global reactive power, global intensity
    voltage = 0.01 * rng.rand(n, 1)
    gap = 0.001 * rng.rand(n, 1)
    sub_metering = rng.rand(n, 3)
    noise = np.hstack((gap, voltage, sub_metering, np.zeros((n, 1))))
    train, val, test = _train_val_test(data + noise, "power")
    return tuple(_standardise(np.vstack((train, val)), (train, val, test), ddof=0))


def preprocess_miniboone(data):
    """MINIBOONE (eq. 2.4): split (already cleaned in data.npy), standardise with train + val.

    Args:
        data: array (N, 43) of miniboone/data.npy.

    Returns:
        (train, val, test) float64.
    """
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2:
        raise DataError(f"miniboone/data.npy must be 2-D, got shape {data.shape}")
    train, val, test = _train_val_test(data, "miniboone")
    return tuple(_standardise(np.vstack((train, val)), (train, val, test), ddof=0))


def preprocess_gas(columns, values):
    """GAS (eq. 2.5): drop Meth, Eth, Time; drop highly correlated columns; standardise; split.

    While some column has a Pearson correlation > 0.98 with another column, the first such
    column is removed (the correlations are recomputed after each removal).

    Args:
        columns: list of N_c column names of the ethylene_CO table.
        values: array (N, N_c).

    Returns:
        (train, val, test) float64 (8 columns for the published file).
    """
    columns = [str(c) for c in columns]
    values = np.asarray(values, dtype=np.float64)
    drop = [columns.index(c) for c in ("Meth", "Eth", "Time") if c in columns]
    if len(drop) != 3:
        raise DataError(f"gas table must have columns Meth, Eth and Time, has {columns}")
    keep = [i for i in range(len(columns)) if i not in drop]
    data = values[:, keep]
    while True:
        corr = np.corrcoef(data, rowvar=False)
        counts = (corr > 0.98).sum(axis=1)
        over = np.flatnonzero(counts > 1)
        if over.size == 0:
            break
        data = np.delete(data, over[0], axis=1)
    (data,) = _standardise(data, (data,), ddof=1)
    return _train_val_test(data, "gas")


def preprocess_hepmass(train_table, test_table):
    """HEPMASS (eq. 2.6): positive class, standardise with train, drop repetitive features,
    split validation from train.

    Args:
        train_table: array (N, 1 + F) of 1000_train.csv (label first).
        test_table: array (M, 2 + F) of 1000_test.csv (label first, one extra last column,
            which the reference drops).

    Returns:
        (train, val, test) float64 (21 columns for the published files).
    """
    tr = np.asarray(train_table, dtype=np.float64)
    te = np.asarray(test_table, dtype=np.float64)
    tr = tr[tr[:, 0] == 1][:, 1:]
    te = te[te[:, 0] == 1][:, 1:-1]
    if tr.shape[1] != te.shape[1]:
        raise DataError(
            f"hepmass: 1000_train.csv gives {tr.shape[1]} features but 1000_test.csv gives "
            f"{te.shape[1]} after dropping its last column; these are not the MAF files")
    tr, te = _standardise(tr, (tr, te), ddof=1)
    repeats = np.array([np.count_nonzero(col == col.min()) for col in tr.T])
    keep = repeats <= 5
    tr, te = tr[:, keep], te[:, keep]
    train, val = _split_tail(tr, _VAL_FRACTION, "hepmass")
    return train, val, te


def _read_csv(path, cache=True):
    """A numeric CSV table (an optional header line is skipped) as float64 (N, C).

    Parsing HEPMASS's CSV files takes seconds, so the table is cached next to the file as
    ``path + ".npy"`` (written atomically) and reused while it is newer than the CSV.
    """
    cached = path + ".npy"
    if cache and os.path.isfile(cached) and os.path.getmtime(cached) >= os.path.getmtime(path):
        try:
            return np.load(cached)
        except (OSError, ValueError):
            pass  # unreadable cache: parse the CSV again
    with open(path) as f:
        first = f.readline()
    try:
        [float(v) for v in first.split(",")]
        header = 0
    except ValueError:
        header = 1
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=header, comments=None, ndmin=2,
                           dtype=np.float64)
    except ValueError as exc:
        raise DataError(f"{path} is not a numeric CSV table ({exc})") from exc
    if cache:
        try:
            with open(cached + ".part", "wb") as f:
                np.save(f, table)
            os.replace(cached + ".part", cached)
        except OSError:  # a read-only data folder: no cache
            if os.path.exists(cached + ".part"):
                os.remove(cached + ".part")
    return table


def _str_keys(d):
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _index_values(index):
    """Values of a pickled pandas Index (a stub made by safe_unpickle), or an array."""
    if isinstance(index, np.ndarray):
        return index
    args = getattr(index, "args", ())
    d = args[1] if len(args) > 1 and isinstance(args[1], dict) else None
    if d is None:
        raise DataError("unrecognised pandas Index in the gas pickle")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" in d:
        return np.asarray(d["data"])
    if "start" in d:
        return np.arange(d["start"], d["stop"], d.get("step", 1))
    raise DataError(f"unrecognised pandas Index fields {sorted(d)} in the gas pickle")


def _frame_from_stub(obj, path):
    """(columns, values) of a pickled pandas DataFrame without pandas (docs/data.md, 2.5)."""
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
        raise DataError(f"{path} does not hold a pandas DataFrame")
    state = _str_keys(state)
    mgr = state.get("_data", state.get("_mgr"))
    mstate, margs = getattr(mgr, "state", None), getattr(mgr, "args", ())
    blocks = None
    if isinstance(mstate, tuple) and len(mstate) == 4:
        # pandas 0.15 ... 1.x: __getstate__ -> (axes, block values, block items, extra state)
        axes, block_values, block_items, extra = mstate
        if isinstance(extra, dict):
            extra = _str_keys(extra)
            if "0.14.1" in extra:
                e = _str_keys(extra["0.14.1"])
                axes = e["axes"]
                blocks = [(b["values"], b["mgr_locs"]) for b in map(_str_keys, e["blocks"])]
    elif mstate is None and len(margs) == 2:
        # pandas 2.x / 3.x: __reduce__ -> BlockManager((_unpickle_block(values, locs, ndim),
        # ...), axes)
        block_stubs, axes = margs
        blocks = [tuple(b.args[:2]) for b in block_stubs]
    else:
        raise DataError(f"{path}: unrecognised pandas block layout; install pandas to read it")
    columns = [c.decode() if isinstance(c, bytes) else str(c) for c in _index_values(axes[0])]
    n_rows = len(_index_values(axes[1]))
    if blocks is None:  # match block items to columns by name
        blocks = [(v, [columns.index(c.decode() if isinstance(c, bytes) else str(c))
                       for c in _index_values(items)])
                  for v, items in zip(block_values, block_items)]
    out = np.empty((n_rows, len(columns)))
    filled = np.zeros(len(columns), dtype=bool)
    for values, locs in blocks:
        values = np.asarray(values)
        if getattr(locs, "args", ()):  # a pickled BlockPlacement(slice or indexer)
            locs = locs.args[0]
        if isinstance(locs, slice):
            locs = np.arange(len(columns))[locs]
        locs = np.asarray(locs, dtype=np.int64)
        out[:, locs] = values.reshape(len(locs), n_rows).T
        filled[locs] = True
    if not filled.all():
        raise DataError(f"{path}: columns {np.flatnonzero(~filled).tolist()} have no data")
    return columns, out


def read_gas_pickle(path):
    """(columns, values) of gas/ethylene_CO.pickle: with pandas when it is installed, else
    by reading the pandas pickle's blocks with the restricted unpickler (no code runs)."""
    try:
        import pandas as pd
    except ImportError:
        pd = None
    if pd is not None:
        df = pd.read_pickle(path)
        return [str(c) for c in df.columns], df.to_numpy(dtype=np.float64)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        obj = safe_unpickle(raw, stub_modules=("pandas",), encoding="latin1")
    except Exception as exc:
        raise DataError(f"{path} is not a readable pickle ({exc})") from exc
    return _frame_from_stub(obj, path)


def _maf_member(name):
    """Archive member name -> path relative to DATA_DIR for the tabular files, else None."""
    for files in TABULAR_FILES.values():
        for rel in files:
            if name == rel or name.endswith("/" + rel):
                return rel
    return None


def _fetch_maf(data_dir, missing, timeout):
    archive = os.path.join(data_dir, _ARCHIVE_NAME)
    if not os.path.isfile(archive):
        try:
            _download_file(MAF_URL, archive, MAF_SHA256, timeout=timeout)
        except DataError as exc:
            raise DataError(
                f"could not download the MAF archive {MAF_URL}: {exc.reason}. "
                "The MAF tabular files are missing: "
                + ", ".join(os.path.abspath(os.path.join(data_dir, m)) for m in missing)
                + f"; put them there by hand (from data.tar.gz of {MAF_URL}, whose data/ "
                f"folder has this layout), or put data.tar.gz as "
                f"{os.path.abspath(archive)}") from exc
    extract_tar(archive, data_dir, _maf_member)
    os.remove(archive)


def load_tabular(name: str, data_dir: str = "data", download: bool = True,
                 dtype=np.float64, timeout: float = 60.0) -> dict:
    """A MAF tabular set, preprocessed and split (docs/data.md, section 2).

    Args:
        name: one of TABULAR_NAMES: "power", "gas", "hepmass", "miniboone", "bsds300".
        data_dir: the DATA_DIR folder.
        download: fetch the MAF archive when files are missing.
        dtype: float dtype of the returned arrays.
        timeout: seconds per network operation.

    Returns:
        dict with "train", "val", "test": arrays (N_split, D), D = 6, 8, 21, 43, 63.
    """
    if name not in TABULAR_NAMES:
        raise ValueError(f"unknown tabular data set {name!r}; valid: {', '.join(TABULAR_NAMES)}")
    paths = [os.path.join(data_dir, rel) for rel in TABULAR_FILES[name]]
    missing = [rel for rel, p in zip(TABULAR_FILES[name], paths) if not os.path.isfile(p)]
    if missing:
        if not download:
            raise DataError(
                f"missing {name} file(s): "
                + ", ".join(os.path.abspath(os.path.join(data_dir, m)) for m in missing)
                + f"; downloading is switched off. Put them there by hand (they are in the "
                f"data/ folder of the MAF archive {MAF_URL})")
        _fetch_maf(data_dir, missing, timeout)
        still = [rel for rel, p in zip(TABULAR_FILES[name], paths) if not os.path.isfile(p)]
        if still:
            raise DataError(f"the MAF archive did not provide {', '.join(still)}")
    if name == "power":
        splits = preprocess_power(np.load(paths[0]))
    elif name == "gas":
        splits = preprocess_gas(*read_gas_pickle(paths[0]))
    elif name == "hepmass":
        splits = preprocess_hepmass(_read_csv(paths[0]), _read_csv(paths[1]))
    elif name == "miniboone":
        splits = preprocess_miniboone(np.load(paths[0]))
    else:
        import h5py
        try:
            with h5py.File(paths[0], "r") as f:
                splits = tuple(np.asarray(f[k]) for k in ("train", "validation", "test"))
        except (OSError, KeyError) as exc:
            raise DataError(f"{paths[0]} is not the BSDS300 HDF5 file with datasets train, "
                            f"validation, test ({exc})") from exc
    return {k: np.ascontiguousarray(v, dtype=dtype)
            for k, v in zip(("train", "val", "test"), splits)}
