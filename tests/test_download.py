"""Downloads with SHA-256 checks against a loopback HTTP server (docs/data.md, section 4)."""
import hashlib
import http.server
import io
import os
import pickle
import socket
import tarfile
import warnings

import pytest

from npflow.data import DataError
from npflow.data.download import download, ensure_files, extract_tar, safe_unpickle
from loopback import serve  # tests/loopback.py


def _free_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"  # nothing listens there any more


def _sha(b):
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def served(tmp_path):
    src = tmp_path / "server"
    src.mkdir()
    payload = os.urandom(3000)
    (src / "good.bin").write_bytes(payload)
    with serve(src) as url:
        yield url, payload, tmp_path / "dest"


def test_good_file_verifies_and_lands(served):
    url, payload, dest = served
    out = download(url + "good.bin", str(dest / "good.bin"), _sha(payload), timeout=5)
    assert open(out, "rb").read() == payload
    assert os.listdir(dest) == ["good.bin"]  # no .part left


def test_bad_checksum_is_deleted_and_reported(served):
    url, payload, dest = served
    wrong = "0" * 64
    with pytest.raises(DataError) as err:
        download(url + "good.bin", str(dest / "good.bin"), wrong, timeout=5)
    msg = str(err.value)
    assert f"expected SHA-256 {wrong}" in msg and f"got {_sha(payload)}" in msg
    assert os.listdir(dest) == []  # neither the file nor its .part


def test_unreachable_server_names_files_and_folder(tmp_path):
    dest = tmp_path / "mnist"
    with pytest.raises(DataError) as err:
        download(_free_port_url() + "train-images-idx3-ubyte.gz",
                 str(dest / "train-images-idx3-ubyte.gz"), "0" * 64, timeout=5)
    msg = str(err.value)
    assert "could not be reached" in msg
    assert "train-images-idx3-ubyte.gz" in msg and str(dest) in msg
    assert os.listdir(dest) == []


def test_http_error_is_reported_with_its_status(served):
    url, _, dest = served
    with pytest.raises(DataError, match="HTTP 404"):
        download(url + "absent.bin", str(dest / "absent.bin"), "0" * 64, timeout=5)
    assert os.listdir(dest) == []


class _TruncatingHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 400)  # then the connection closes
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_truncated_transfer_is_deleted_and_reported(tmp_path):
    with serve(tmp_path, handler=_TruncatingHandler) as url:
        with pytest.raises(DataError, match="broke off|truncated"):
            download(url + "f.bin", str(tmp_path / "out" / "f.bin"), "0" * 64, timeout=5)
    assert os.listdir(tmp_path / "out") == []


def test_missing_checksum_warns_with_the_computed_hash(served):
    url, payload, dest = served
    with pytest.warns(UserWarning, match=_sha(payload)):
        download(url + "good.bin", str(dest / "good.bin"), None, timeout=5)
    assert (dest / "good.bin").read_bytes() == payload


def test_ensure_files_uses_present_files_without_checking_them(tmp_path):
    (tmp_path / "a.gz").write_bytes(b"re-encoded local copy")
    paths = ensure_files(str(tmp_path), [("a.gz", _free_port_url() + "a.gz", "0" * 64)])
    assert paths == [str(tmp_path / "a.gz")]


def test_ensure_files_offline_lists_every_missing_file(tmp_path):
    files = [("a.gz", "http://x/a.gz", "0" * 64), ("b.gz", "http://x/b.gz", "0" * 64)]
    with pytest.raises(DataError) as err:
        ensure_files(str(tmp_path), files, download=False)
    assert "a.gz, b.gz" in str(err.value) and str(tmp_path) in str(err.value)


def test_ensure_files_tries_mirrors_in_turn(served):
    url, payload, dest = served
    files = [("good.bin", [url + "missing/good.bin", url + "good.bin"], _sha(payload))]
    (path,) = ensure_files(str(dest), files, timeout=5)
    assert open(path, "rb").read() == payload


def test_ensure_files_unreachable_names_all_missing_files(tmp_path):
    base = _free_port_url()
    files = [(n, base + n, "0" * 64) for n in ("a.gz", "b.gz")]
    with pytest.raises(DataError) as err:
        ensure_files(str(tmp_path / "d"), files, timeout=5)
    msg = str(err.value)
    assert "could not be reached" in msg and "a.gz, b.gz" in msg


def _tar_bytes(entries, mode="w:gz"):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_extract_tar_writes_chosen_members(tmp_path):
    arc = tmp_path / "a.tar.gz"
    arc.write_bytes(_tar_bytes({"top/x.bin": b"xx", "top/y.bin": b"yy"}))
    out = extract_tar(str(arc), str(tmp_path / "o"), {"top/x.bin": "x/x.bin"})
    assert out == [str(tmp_path / "o" / "x" / "x.bin")]
    assert (tmp_path / "o" / "x" / "x.bin").read_bytes() == b"xx"
    assert not (tmp_path / "o" / "y.bin").exists()


def test_extract_tar_refuses_truncated_archive_and_missing_members(tmp_path):
    data = _tar_bytes({"big.bin": os.urandom(200000)})
    arc = tmp_path / "t.tar.gz"
    arc.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        extract_tar(str(arc), str(tmp_path / "o"), {"big.bin": "big.bin"})
    assert not any(p.name.endswith(".part") for p in (tmp_path / "o").rglob("*"))
    arc.write_bytes(data)
    with pytest.raises(DataError, match="lacks the expected member"):
        extract_tar(str(arc), str(tmp_path / "o"), {"other.bin": "other.bin"})


def test_extract_tar_refuses_paths_outside_the_folder(tmp_path):
    arc = tmp_path / "a.tar"
    arc.write_bytes(_tar_bytes({"x.bin": b"x"}, mode="w"))
    with pytest.raises(DataError, match="outside"):
        extract_tar(str(arc), str(tmp_path / "o"), {"x.bin": "../escape.bin"})
    assert not (tmp_path / "escape.bin").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_safe_unpickle_refuses_code_and_keeps_arrays():
    import numpy as np
    good = pickle.dumps({b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [1, 2]},
                        protocol=2)
    out = safe_unpickle(good)
    np.testing.assert_array_equal(out[b"data"], np.arange(6).reshape(2, 3))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        safe_unpickle(pickle.dumps(_Evil()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = safe_unpickle(pickle.dumps(np.float64(2.5)))
    assert out == 2.5
