"""Data files: download with SHA-256 checks, archives, restricted unpickling (docs/data.md, s. 4).

Policy (docs/data.md, section 4):

- Files already present in the data folder are read as they are, with no checksum: copies made
  by other means (e.g. an offline mirror that re-encodes MNIST) differ byte-wise from the
  official downloads and are still valid. The loaders check their format instead.
- A download streams to ``dest + ".part"`` while hashing, compares the SHA-256 with the
  published one, and only then renames the part file to ``dest`` (``os.replace``, atomic on one
  file system). A mismatch, a truncated transfer or a network failure deletes the part file and
  raises DataError; a corrupt file is never left under the final name.
- Offline, DataError says which URL could not be reached and names the exact files and the
  folder to put them in by hand.

``safe_unpickle`` reads python pickles (CIFAR-10 batches, the MAF GAS table) with an unpickler
that only builds plain containers and numpy arrays, so a data file cannot run code.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import os
import pickle
import shutil
import socket
import tarfile
import urllib.error
import urllib.request
import warnings
import zlib

__all__ = ["DataError", "download", "ensure_files", "sha256_file", "extract_tar",
           "safe_unpickle"]

_CHUNK = 1 << 20


class DataError(RuntimeError):
    """A data file is missing, unreachable, corrupt, or fails its checksum.

    ``reason`` is a short form of the message (used when several attempts are summarised).
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _by_hand(folder: str, filenames, urls=()) -> str:
    names = ", ".join(filenames)
    where = f" (from {', '.join(urls)})" if urls else ""
    return (f"Put these files by hand into the folder {os.path.abspath(folder)}/: {names}"
            f"{where}")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def download(url: str, dest: str, sha256, timeout: float = 60.0) -> str:
    """Download ``url`` to ``dest`` via ``dest + ".part"``, verified, then renamed atomically.

    Args:
        url: http(s) or file URL.
        dest: final path; its folder is created if needed.
        sha256: expected hex SHA-256 of the file, or None when no published SHA-256 is known
            (a warning is issued and the computed hash is reported in it).
        timeout: seconds for connecting and for each read.

    Returns:
        ``dest``.

    Raises:
        DataError: the URL could not be reached (message names the file and folder to fill by
            hand), the transfer was truncated, or the SHA-256 differs (expected vs actual).
            The part file is deleted in every failure.
    """
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    part = dest + ".part"
    h = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length") if hasattr(resp, "headers") else None
            with open(part, "wb") as f:
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    h.update(chunk)
                    f.write(chunk)
                    received += len(chunk)
    except urllib.error.HTTPError as exc:
        _remove(part)
        raise DataError(
            f"could not download {url}: the server answered HTTP {exc.code} ({exc.reason}). "
            + _by_hand(folder, [os.path.basename(dest)], [url]),
            reason=f"HTTP {exc.code} ({exc.reason})") from exc
    except http.client.HTTPException as exc:  # e.g. IncompleteRead: the transfer broke off
        _remove(part)
        raise DataError(
            f"download of {url} broke off ({type(exc).__name__}: {exc}); the partial file was "
            "deleted. Try again. " + _by_hand(folder, [os.path.basename(dest)], [url]),
            reason=f"the transfer broke off ({type(exc).__name__})") from exc
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
        _remove(part)
        reason = getattr(exc, "reason", exc)
        raise DataError(
            f"could not download {url}: {reason}. The URL could not be reached (offline?). "
            + _by_hand(folder, [os.path.basename(dest)], [url]),
            reason=f"the URL could not be reached ({reason})") from exc
    except OSError as exc:  # e.g. the part file could not be written
        _remove(part)
        raise DataError(f"download of {url} to {part} failed: {exc}. "
                        + _by_hand(folder, [os.path.basename(dest)], [url]),
                        reason=f"writing {part} failed ({exc})") from exc
    except BaseException:
        _remove(part)
        raise
    if length is not None and length.isdigit() and received != int(length):
        _remove(part)
        raise DataError(
            f"download of {url} was truncated: got {received} of {length} bytes; the partial "
            f"file was deleted. Try again. " + _by_hand(folder, [os.path.basename(dest)]),
            reason=f"truncated ({received} of {length} bytes)")
    actual = h.hexdigest()
    if sha256 is None:
        warnings.warn(
            f"{os.path.basename(dest)} from {url} has no published SHA-256 to check against; "
            f"its SHA-256 is {actual} (compare it with a trusted copy)", stacklevel=2)
    elif actual != sha256.lower():
        _remove(part)
        raise DataError(
            f"checksum mismatch for {url}: expected SHA-256 {sha256.lower()}, got {actual}; "
            "the corrupt download was deleted. Try again (a proxy or a changed mirror may be "
            "at fault). " + _by_hand(folder, [os.path.basename(dest)]),
            reason=f"checksum mismatch (expected SHA-256 {sha256.lower()}, got {actual})")
    os.replace(part, dest)
    return dest


_download = download  # ensure_files has an argument named "download"


def ensure_files(folder: str, files, download: bool = True, timeout: float = 60.0,
                 hint: str = "") -> list:
    """Make sure every file of ``files`` exists in ``folder``; download the missing ones.

    Args:
        folder: the data folder (created when downloading).
        files: list of (filename, url, sha256) or (filename, [url, mirror, ...], sha256);
            sha256 may be None when none is published (see ``download``).
        download: if False, missing files raise DataError at once (offline use).
        timeout: seconds, passed to ``download``.
        hint: a sentence appended to the error (e.g. another way to obtain the files).

    Returns:
        the list of paths, in the order of ``files``. Present files are not re-checked.
    """
    paths = [os.path.join(folder, name) for name, _, _ in files]
    missing = [(p, name, url, sha) for p, (name, url, sha) in zip(paths, files)
               if not os.path.isfile(p)]
    if not missing:
        return paths
    names = [name for _, name, _, _ in missing]
    if not download:
        raise DataError(
            f"missing data file(s) in {os.path.abspath(folder)}/: {', '.join(names)}; "
            "downloading is switched off. " + _by_hand(folder, names) + hint)
    for path, name, urls, sha in missing:
        urls = [urls] if isinstance(urls, str) else list(urls)
        errors = []
        for url in urls:
            try:
                _download(url, path, sha, timeout=timeout)
                break
            except DataError as exc:
                errors.append(f"{url}: {exc.reason}")
        else:
            still = [n for p, n, _, _ in missing if not os.path.isfile(p)]
            raise DataError(
                f"could not download {name} ({'; '.join(errors)}). Missing: "
                + ", ".join(still) + ". " + _by_hand(folder, still) + hint,
                reason="; ".join(errors))
    return paths


def extract_tar(archive: str, dest_dir: str, members) -> list:
    """Extract chosen regular files from a tar archive, safely.

    Args:
        archive: path of a .tar / .tar.gz file.
        dest_dir: folder the outputs go to.
        members: dict archive-member-name -> output path relative to ``dest_dir`` (every key
            must be found), or a callable name -> relative output path or None (skip).

    Returns:
        list of written paths. Each file is written to ``path + ".part"`` and renamed; a
        truncated or corrupt archive raises DataError and leaves no partial output. Paths that
        would land outside ``dest_dir`` are refused.
    """
    select = members.get if isinstance(members, dict) else members
    written, found = [], set()
    root = os.path.abspath(dest_dir)
    current = None
    try:
        with tarfile.open(archive, "r:*") as tar:
            for info in tar:
                rel = select(info.name) if info.isfile() else None
                if rel is None:
                    continue
                out = os.path.abspath(os.path.join(root, rel))
                if not out.startswith(root + os.sep):
                    raise DataError(f"refusing to extract {info.name!r} outside {root}")
                os.makedirs(os.path.dirname(out), exist_ok=True)
                current = out + ".part"
                with tar.extractfile(info) as src, open(current, "wb") as f:
                    shutil.copyfileobj(src, f, _CHUNK)
                os.replace(current, out)
                current = None
                written.append(out)
                found.add(info.name)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        if current is not None:
            _remove(current)
        raise DataError(f"archive {archive} is corrupt or truncated ({exc}); delete it and "
                        "download it again") from exc
    if isinstance(members, dict):
        absent = [m for m in members if m not in found]
        if absent:
            raise DataError(f"archive {archive} lacks the expected member(s): "
                            f"{', '.join(absent)}")
    return written


class _Stub:
    """Stand-in for a class of a foreign library (e.g. pandas) inside a pickle: records the
    constructor arguments and the state, runs nothing."""

    stub_name = "?"
    args: tuple = ()
    kwargs: dict = {}
    state = None

    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs
        self.state = None

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<stub {self.stub_name}>"


_NUMPY_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}
_BUILTINS_ALLOWED = {"slice", "list", "dict", "tuple", "set", "frozenset", "bytearray",
                     "complex", "object"}
_COPYREG_ALLOWED = {("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
                    ("copyreg", "__newobj__"), ("__builtin__", "object"),
                    ("builtins", "object"),
                    ("_codecs", "encode")}  # protocol-2 pickles of bytes written by Python 3


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, stub_modules, **kw):
        super().__init__(f, **kw)
        self._stub_modules = tuple(stub_modules)
        self._stubs = {}

    def find_class(self, module, name):
        if (module, name) in _NUMPY_ALLOWED:
            return super().find_class(module, name)
        if module in ("builtins", "__builtin__") and name in _BUILTINS_ALLOWED:
            return super().find_class("builtins", name)
        if (module, name) in _COPYREG_ALLOWED:
            return super().find_class(module, name)
        if module.split(".")[0] in self._stub_modules:
            key = f"{module}.{name}"
            if key not in self._stubs:
                self._stubs[key] = type(name, (_Stub,), {"stub_name": key})
            return self._stubs[key]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def safe_unpickle(data: bytes, stub_modules=(), encoding: str = "bytes"):
    """Unpickle ``data`` allowing only plain containers and numpy arrays.

    Classes from the top-level packages in ``stub_modules`` (e.g. ("pandas",)) become inert
    ``_Stub`` objects that keep their constructor arguments (``.args``) and state (``.state``),
    so the arrays inside can be recovered without importing or running that package.
    """
    return _RestrictedUnpickler(io.BytesIO(data), stub_modules, encoding=encoding).load()
