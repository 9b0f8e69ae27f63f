"""MAF tabular loaders (docs/data.md, section 2) on tiny files of the right formats."""
import io
import os
import pickle
import sys
import tarfile
import types

import h5py
import numpy as np
import pytest

from npflow.data import DataError, load_tabular
from npflow.data import tabular as tab
from loopback import serve  # tests/loopback.py


def _standardised(a, ddof):
    np.testing.assert_allclose(a.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(a.std(axis=0, ddof=ddof), 1.0, rtol=1e-10)


def test_power_steps_and_split_sizes(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((200, 8)) * np.arange(1, 9) + np.arange(8)
    os.makedirs(tmp_path / "power")
    np.save(tmp_path / "power" / "data.npy", raw)
    d = load_tabular("power", str(tmp_path), download=False)
    # test = int(0.1·200) = 20, val = int(0.1·180) = 18, train = 162; columns 1 and 3 dropped
    assert {k: v.shape for k, v in d.items()} == {"train": (162, 6), "val": (18, 6),
                                                  "test": (20, 6)}
    assert all(v.dtype == np.float64 for v in d.values())
    _standardised(np.vstack((d["train"], d["val"])), ddof=0)

    # Independent reconstruction: the RandomState(42) shuffle as a row permutation, then the
    # noise draws in the reference order (voltage, gap, sub-metering).
    rs = np.random.RandomState(42)
    order = np.arange(200)
    rs.shuffle(order)
    x = raw[order][:, [0, 2, 4, 5, 6, 7]]
    voltage, gap, sm = 0.01 * rs.rand(200, 1), 0.001 * rs.rand(200, 1), rs.rand(200, 3)
    x = x + np.hstack((gap, voltage, sm, np.zeros((200, 1))))
    ref = x[:180]
    want_test = (x[180:] - ref.mean(0)) / ref.std(0)
    np.testing.assert_allclose(d["test"], want_test, rtol=1e-12)


def test_power_needs_eight_columns(tmp_path):
    os.makedirs(tmp_path / "power")
    np.save(tmp_path / "power" / "data.npy", np.zeros((50, 7)))
    with pytest.raises(DataError, match=r"shape \(N, 8\)"):
        load_tabular("power", str(tmp_path), download=False)


def test_miniboone_split_and_standardisation(tmp_path):
    raw = np.random.default_rng(1).standard_normal((300, 43)) * 3 + 1
    os.makedirs(tmp_path / "miniboone")
    np.save(tmp_path / "miniboone" / "data.npy", raw)
    d = load_tabular("miniboone", str(tmp_path), download=False, dtype=np.float32)
    assert [d[k].shape for k in ("train", "val", "test")] == [(243, 43), (27, 43), (30, 43)]
    assert d["train"].dtype == np.float32
    mu, s = raw[:270].mean(0), raw[:270].std(0)
    np.testing.assert_allclose(d["test"], (raw[270:] - mu) / s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d["val"], (raw[243:270] - mu) / s, rtol=1e-5, atol=1e-5)


def _hepmass_tables(rng, n_train=400, n_test=200):
    def table(n, extra):
        label = rng.integers(0, 2, size=n)
        feats = rng.standard_normal((n, 4))
        discrete = np.where(rng.random(n) < 0.5, 0.0, rng.standard_normal(n) + 3)  # min repeats
        cols = [label, feats[:, 0], discrete, feats[:, 1], feats[:, 2], feats[:, 3]]
        if extra:
            cols.append(np.full(n, 1000.0))
        return np.stack(cols, axis=1)
    return table(n_train, False), table(n_test, True)


def _write_csv(path, table, header):
    with open(path, "w") as f:
        f.write(header + "\n")
        for row in table:
            f.write(",".join(repr(float(v)) for v in row) + "\n")


def test_hepmass_positive_class_feature_removal_and_split(tmp_path):
    tr, te = _hepmass_tables(np.random.default_rng(2))
    os.makedirs(tmp_path / "hepmass")
    _write_csv(tmp_path / "hepmass" / "1000_train.csv", tr, "# label,f0,f1,f2,f3,f4")
    _write_csv(tmp_path / "hepmass" / "1000_test.csv", te, "# label,f0,f1,f2,f3,f4,mass")
    d = load_tabular("hepmass", str(tmp_path), download=False)
    pos_tr, pos_te = tr[tr[:, 0] == 1][:, 1:], te[te[:, 0] == 1][:, 1:-1]
    keep = [0, 2, 3, 4]  # feature 1 has a repeated smallest value and is removed
    n_val = int(0.1 * pos_tr.shape[0])
    assert d["train"].shape == (pos_tr.shape[0] - n_val, 4) and d["val"].shape == (n_val, 4)
    mu, s = pos_tr.mean(0), pos_tr.std(0, ddof=1)  # ddof = 1 as in pandas
    np.testing.assert_allclose(d["test"], ((pos_te - mu) / s)[:, keep], rtol=1e-12)
    _standardised(np.vstack((d["train"], d["val"])), ddof=1)


def test_hepmass_mismatched_files_are_refused(tmp_path):
    tr, te = _hepmass_tables(np.random.default_rng(3))
    os.makedirs(tmp_path / "hepmass")
    _write_csv(tmp_path / "hepmass" / "1000_train.csv", tr, "# label,f0,f1,f2,f3,f4")
    _write_csv(tmp_path / "hepmass" / "1000_test.csv", te[:, :-1], "# label,f0,f1,f2,f3,f4")
    with pytest.raises(DataError, match="not the MAF files"):
        load_tabular("hepmass", str(tmp_path), download=False)


# A pickle in the layout pandas (0.15 ... 1.x) writes for a DataFrame, made without pandas:
# fake pandas modules are put into sys.modules only while pickling.

def _fake_pandas_modules():
    frame = types.ModuleType("pandas.core.frame")
    internals = types.ModuleType("pandas.core.internals")
    base = types.ModuleType("pandas.core.indexes.base")

    def _new_Index(cls, d):  # noqa: N802 - the pandas name
        raise AssertionError("only used by reference while pickling")

    class Index:
        def __init__(self, data):
            self.data = np.asarray(data)

        def __reduce__(self):
            return (_new_Index, (type(self), {"data": self.data, "name": None}))

    class BlockManager:
        def __init__(self, columns, index, blocks):
            self.axes = [columns, index]
            self.blocks = blocks  # list of (values (k, N), locs)

        def __getstate__(self):
            return (self.axes, [b[0] for b in self.blocks],
                    [Index(np.asarray(self.axes[0].data)[b[1]]) for b in self.blocks],
                    {"0.14.1": {"axes": self.axes,
                                "blocks": [{"values": v, "mgr_locs": l} for v, l in self.blocks]}})

    class DataFrame:
        def __init__(self, mgr):
            self._data = mgr

        def __getstate__(self):
            return {"_data": self._data, "_typ": "dataframe", "_metadata": []}

    for mod, objs in ((frame, [DataFrame]), (internals, [BlockManager]),
                      (base, [Index, _new_Index])):
        for o in objs:
            o.__module__ = mod.__name__
            o.__qualname__ = o.__name__
            setattr(mod, o.__name__, o)
    return frame, internals, base


def _gas_pickle(columns, values, monkeypatch):
    frame, internals, base = _fake_pandas_modules()
    for name in ("pandas", "pandas.core", "pandas.core.indexes"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for mod in (frame, internals, base):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    cols = np.array(columns, dtype=object)
    # two blocks, as pandas would keep them: the first 3 columns, then the rest (a slice)
    blocks = [(values[:, :3].T.copy(), np.array([0, 1, 2])),
              (values[:, 3:].T.copy(), slice(3, len(columns), 1))]
    df = frame.DataFrame(internals.BlockManager(base.Index(cols),
                                                base.Index(np.arange(len(values))), blocks))
    return pickle.dumps(df, protocol=2)


def test_gas_reads_pandas_pickle_drops_correlated_columns(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    n = 300
    s = rng.standard_normal((n, 4))
    twin = s[:, 1] * 2.0 + 0.01 * rng.standard_normal(n)  # corr(s1, twin) > 0.98
    columns = ["Time", "Meth", "Eth", "s0", "s1", "s2", "twin", "s3"]
    values = np.column_stack([np.arange(n), rng.random(n), rng.random(n),
                              s[:, 0], s[:, 1], s[:, 2], twin, s[:, 3]])
    data = _gas_pickle(columns, values, monkeypatch)
    monkeypatch.undo()  # the reader must not need the fake modules
    os.makedirs(tmp_path / "gas")
    (tmp_path / "gas" / "ethylene_CO.pickle").write_bytes(data)
    monkeypatch.setitem(sys.modules, "pandas", None)  # force the pandas-free reader
    d = load_tabular("gas", str(tmp_path), download=False)
    # s1 (the first of the correlated pair) is removed; all rows standardised (ddof = 1)
    kept = np.column_stack([s[:, 0], s[:, 2], twin, s[:, 3]])
    want = (kept - kept.mean(0)) / kept.std(0, ddof=1)
    np.testing.assert_allclose(np.vstack((d["train"], d["val"], d["test"])), want, rtol=1e-12)
    assert [d[k].shape[0] for k in ("train", "val", "test")] == [243, 27, 30]


def test_gas_refuses_a_pickle_that_is_not_a_frame(tmp_path):
    os.makedirs(tmp_path / "gas")
    (tmp_path / "gas" / "ethylene_CO.pickle").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataError, match="does not hold a pandas DataFrame"):
        load_tabular("gas", str(tmp_path), download=False)


def test_bsds300_reads_the_three_datasets(tmp_path):
    os.makedirs(tmp_path / "BSDS300")
    rng = np.random.default_rng(5)
    parts = {k: rng.standard_normal((n, 63)).astype(np.float32)
             for k, n in (("train", 30), ("validation", 10), ("test", 12))}
    with h5py.File(tmp_path / "BSDS300" / "BSDS300.hdf5", "w") as f:
        for k, v in parts.items():
            f[k] = v
    d = load_tabular("bsds300", str(tmp_path), download=False)
    np.testing.assert_array_equal(d["val"], parts["validation"])
    assert d["train"].shape == (30, 63) and d["test"].shape == (12, 63)


def test_missing_files_offline_name_files_and_archive(tmp_path):
    with pytest.raises(DataError) as err:
        load_tabular("hepmass", str(tmp_path), download=False)
    msg = str(err.value)
    assert str(tmp_path / "hepmass" / "1000_train.csv") in msg
    assert str(tmp_path / "hepmass" / "1000_test.csv") in msg and tab.MAF_URL in msg


def test_unknown_name():
    with pytest.raises(ValueError, match="valid: power, gas, hepmass, miniboone, bsds300"):
        load_tabular("higgs")




def test_maf_archive_download_and_extract_from_loopback(tmp_path, monkeypatch):
    raw = np.random.default_rng(6).standard_normal((100, 43))
    buf = io.BytesIO()
    np.save(buf, raw)
    served = tmp_path / "server"
    served.mkdir()
    with tarfile.open(served / "data.tar.gz", "w:gz") as tar:
        for name, payload in (("data/miniboone/data.npy", buf.getvalue()),
                              ("data/mnist/ignored.pkl.gz", b"not needed")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with serve(served) as url:
        monkeypatch.setattr(tab, "MAF_URL", url + "data.tar.gz")
        with pytest.warns(UserWarning, match="no published SHA-256"):
            d = load_tabular("miniboone", str(tmp_path / "data"), timeout=5)
    assert d["test"].shape == (10, 43)
    assert sorted(os.listdir(tmp_path / "data")) == ["miniboone"]  # archive gone, mnist skipped


def test_maf_archive_unreachable_names_files(tmp_path, monkeypatch):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(tab, "MAF_URL", f"http://127.0.0.1:{port}/data.tar.gz")
    with pytest.raises(DataError) as err:
        load_tabular("power", str(tmp_path), timeout=5)
    msg = str(err.value)
    assert "could not be reached" in msg and str(tmp_path / "power" / "data.npy") in msg


# A DataFrame pickled by pandas 3.1.1 itself (protocol 2, zlib + base64 here), made with
#   pd.DataFrame((np.arange(40.0).reshape(8, 5) * 0.5) ** 1.5,
#                columns=pd.Index(["Time", "Meth", "Eth", "s0", "s1"], dtype=object))
# It uses the newer BlockManager pickle layout (BlockManager(blocks, axes)).
_PANDAS3_FRAME = (
    "eNpdVPtzE1UUTtqmtmt5WaClIlYQmqqEFjEtpCWXUlranQZdYIiPuO5ubppMN5uc3ZvBjkQeTh5FWhAGsT6ZER3G"
    "x0xxcHSYojP3/GF6s7ttR/eH3XP2ft93zt79zr3SZBQ1K6050rjGtAlby1MJAv1XIViGpnCyJRAIqPlZG5p9WMQo"
    "2DSSsxi1Lc10InnN0map7UhjZsGYm/EyCVrW4KqZ050NvKSWrGLOmDOpqjcIEoQMq5QvzkdUVzhfMllOs21tXlJt"
    "ahQsh9klg0nQ6sEkIequwjNyoAJthqClqeFI1GoEErQng6JlHaRkq3iaGstZg/BsFToU2FSDzQpsCctBOSS3VWGr"
    "L5lm80XB3JZsEozMMDy3UK9BpwLbw3KzqzYCOxKJxPQ/4nJvcoDBTn0h2578qbHsX334G781ZfHvthC8jY/K/Nr5"
    "9w6QaKwTf9/Lrx8h6+txkiHdfAW/7J4g+Mvbx7Da2zFDLuD9NN6SZxSCi7HLGf4tv4+fx/mVo2MR/Brr28l+/APv"
    "4JMevNG/AYmSbbjKH2J9c/MJsnMXv9nHvy9MEr6MDwY6WvgnCVJ65yP+I690nSVem7gS/2Aohjc7BnsIVvmjTXvw"
    "bvogETW+4Uvvd2J9mLAR/hdWcGl0jODffPFd/KwTF0/7/DcJv8aXz/BlfgcfnN2QwKdxD9BL8E+sHk/p/PaAz4mJ"
    "hnbAJfz08kniF58meCOPD0Mf41WheG/3EC7N8cfnNr6sdb3zfQIqyn3BHx/ilcOEX7+AP8zhr5OjZH13xkkIn0Rx"
    "tcC/kgnew597UrjCK28RvopPcRGXWnjtPIGurHBCtwK7GPTohqrqpZywm6WqkmPmDOGB5+WA8EawBrsVeEFuqsEe"
    "BV6sQG8KXgr/bwDS9EPqRHTNoZJq0YvqVOONBHvXxsnP95XhZW+M0mK+YH+2Nes690BW2LFPgbBrxwr0Zz3/nRmG"
    "Vxr+e1WB19b8dwkO/td/cQYRfSEFhzzlc7k8hQE3nKEsC4PJZhGeEtFhV9MZgNe9YBCOUAZv6C7WErMO0USpCkMK"
    "DGfXO1c0a5b67R8tw7FwNppIhhp0ptkMYnLApTusUIQRuc1PaBFG5aAQO65AnFaBKHDCOz7EeMFYst3fgkzjiIGT"
    "bq7mKdPcfRlPwSm3hsaY7cBEGSbdAVYzpjbrwOkyTCW7GsumWbjoqOlSUfwwjVHV1HRqOjBdd0p65F8hgb3H")


def test_gas_reader_reads_a_real_pandas3_pickle_without_pandas(tmp_path, monkeypatch):
    import base64
    import zlib
    path = tmp_path / "ethylene_CO.pickle"
    path.write_bytes(zlib.decompress(base64.b64decode(_PANDAS3_FRAME)))
    monkeypatch.setitem(sys.modules, "pandas", None)
    columns, values = tab.read_gas_pickle(str(path))
    assert columns == ["Time", "Meth", "Eth", "s0", "s1"]
    np.testing.assert_array_equal(values, (np.arange(40.0).reshape(8, 5) * 0.5) ** 1.5)


def test_hepmass_csv_cache_is_used_and_refreshed(tmp_path):
    tr, te = _hepmass_tables(np.random.default_rng(7))
    os.makedirs(tmp_path / "hepmass")
    train_csv = tmp_path / "hepmass" / "1000_train.csv"
    _write_csv(train_csv, tr, "# label,f0,f1,f2,f3,f4")
    _write_csv(tmp_path / "hepmass" / "1000_test.csv", te, "# label,f0,f1,f2,f3,f4,mass")
    first = load_tabular("hepmass", str(tmp_path), download=False)
    assert (tmp_path / "hepmass" / "1000_train.csv.npy").is_file()
    again = load_tabular("hepmass", str(tmp_path), download=False)
    np.testing.assert_array_equal(first["test"], again["test"])
    # a newer CSV invalidates the cache
    _write_csv(train_csv, tr[:300], "# label,f0,f1,f2,f3,f4")
    os.utime(train_csv, (os.path.getmtime(train_csv) + 10,) * 2)
    fresh = load_tabular("hepmass", str(tmp_path), download=False)
    n_pos = int((tr[:300, 0] == 1).sum())
    assert fresh["train"].shape[0] + fresh["val"].shape[0] == n_pos


def test_nan_in_raw_data_is_reported_before_standardisation():
    from npflow.data.tabular import _standardise
    ref = np.arange(20.0).reshape(10, 2)
    ref[3, 1] = np.nan
    with pytest.raises(DataError, match=r"1 NaN/Inf value\(s\) in 1 row\(s\) \(first: row 3\)"):
        _standardise(ref, (ref,), ddof=0)
