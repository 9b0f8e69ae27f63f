"""Worker processes for data-parallel training steps (docs/cnf.md section 10, eq. 10.1).

A worker is a fresh interpreter (``python -m npflow.workers``), not a fork and not
``multiprocessing``'s spawn: it never imports the caller's ``__main__``, so a plain script with
no ``if __name__ == "__main__"`` guard can use it, and no thread state of the parent (BLAS thread
pools, locks) is copied. Parent and worker talk through the worker's stdin and stdout with
pickled messages:

    parent -> worker   (module, factory, args)     once: handler = module.factory(*args)
    parent -> worker   payload                     per call
    worker -> parent   ("ok", handler(payload)) or ("error", formatted traceback)

Each message is its pickle preceded by its length (8 bytes, little-endian), so a payload the
worker cannot unpickle is reported back like any other error and the stream stays in step.

The worker starts with one BLAS thread (the environment says so before numpy loads) and
``backend.tune_malloc()``; it writes anything printed to stderr, so stdout carries only the
protocol. It exits when its stdin closes (``close()``, or the parent's exit).
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import weakref

__all__ = ["WorkerError", "WorkerPool"]

_ONE_THREAD = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class WorkerError(RuntimeError):
    """A worker process failed: it raised (the message carries its traceback) or it died."""


def _write(f, obj):
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(len(data).to_bytes(8, "little"))
    f.write(data)
    f.flush()


def _read_bytes(f):
    """The next message's bytes; EOFError when the stream ends (cleanly or mid-message)."""
    head = f.read(8)
    if len(head) < 8:
        raise EOFError("stream closed")
    n = int.from_bytes(head, "little")
    data = f.read(n)
    if len(data) < n:
        raise EOFError("stream closed mid-message")
    return data


def _close_all(procs):
    for p in procs:
        try:
            p.stdin.close()
        except OSError:
            pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        try:
            p.stdout.close()
        except OSError:
            pass


class WorkerPool:
    """n worker processes, each holding ``handler = module.factory(*args)``.

    ``submit(payloads)`` sends payload i to worker i (at most n payloads) and returns at once;
    ``collect()`` then returns the handlers' results in the same order. Between the two the
    caller does its own share of the work."""

    def __init__(self, n, module, factory, args=()):
        env = dict(os.environ, **{k: "1" for k in _ONE_THREAD})
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                    else "")
        self._procs = []
        self._pending = []
        self._finalizer = weakref.finalize(self, _close_all, self._procs)
        try:
            for _ in range(int(n)):
                p = subprocess.Popen([sys.executable, "-m", "npflow.workers"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                self._procs.append(p)
            for p in self._procs:
                self._send(p, (module, factory, tuple(args)))
            for p in self._procs:
                self._receive(p)                      # "ok" once the handler is built
        except BaseException:
            self.close()
            raise

    def __len__(self):
        return len(self._procs)

    def _send(self, p, obj):
        try:
            _write(p.stdin, obj)
        except (BrokenPipeError, OSError) as exc:
            raise WorkerError(f"npflow worker process {p.pid} is gone (exit code "
                              f"{p.poll()}): it was killed or ran out of memory") from exc

    def _receive(self, p):
        try:
            status, value = pickle.loads(_read_bytes(p.stdout))
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            raise WorkerError(f"npflow worker process {p.pid} died (exit code {p.wait()}): "
                              "killed, out of memory, or crashed; its stderr is above") from exc
        if status != "ok":
            raise WorkerError(f"npflow worker process {p.pid} raised:\n{value}")
        return value

    def submit(self, payloads):
        if self._pending:
            raise RuntimeError("WorkerPool.submit: collect() the previous results first")
        if len(payloads) > len(self._procs):
            raise ValueError(f"{len(payloads)} payloads for {len(self._procs)} workers")
        for p, payload in zip(self._procs, payloads):
            self._send(p, payload)
            self._pending.append(p)

    def collect(self):
        pending, self._pending = self._pending, []
        results, error = [], None
        for p in pending:                 # read every reply, so no worker is left mid-message
            try:
                results.append(self._receive(p))
            except WorkerError as exc:
                error = error or exc
        if error is not None:
            raise error
        return results

    def close(self):
        """Close the workers' stdin (they exit) and wait for them."""
        self._pending = []
        self._finalizer()


def _serve():
    """The worker's loop (``python -m npflow.workers``)."""
    import importlib
    import signal
    import traceback

    # Ctrl-C reaches the whole process group: the parent handles it (it still reads every
    # reply, then raises KeyboardInterrupt and closes the pool); the worker carries on
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    out = os.fdopen(os.dup(1), "wb")       # the protocol's channel
    os.dup2(2, 1)                           # prints go to stderr
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
    from npflow.backend import set_blas_threads, tune_malloc

    set_blas_threads(1)
    tune_malloc()

    def reply(status, value):
        try:
            _write(out, (status, value))
        except Exception:  # noqa: BLE001 - e.g. a result that cannot be pickled
            _write(out, ("error", traceback.format_exc()))

    try:
        first = _read_bytes(inp)
    except EOFError:
        return
    try:
        module, factory, args = pickle.loads(first)
        handler = getattr(importlib.import_module(module), factory)(*args)
        reply("ok", None)
    except Exception:  # noqa: BLE001 - every failure goes back to the parent
        reply("error", traceback.format_exc())
        return
    while True:
        try:
            data = _read_bytes(inp)
        except EOFError:
            return
        try:
            reply("ok", handler(pickle.loads(data)))
        except Exception:  # noqa: BLE001
            reply("error", traceback.format_exc())


if __name__ == "__main__":
    _serve()
