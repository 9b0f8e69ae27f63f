"""One-command GPU check of npflow: install, test on CuPy, compare with NumPy, time against
PyTorch, write a JSON and a Markdown summary (docs/backend.md section 4).

    python bench/gpu_check.py            # full check, well under 8 minutes
    python bench/gpu_check.py --quick    # about 2 minutes

On a machine with an NVIDIA GPU (CUDA 12 driver) this
  1. installs the ``gpu`` and ``bench`` extras (``pip install -e .[gpu,bench]``: cupy-cuda12x,
     torch, torchdiffeq). PyPI's Linux torch wheels are CUDA builds; if the torch found is a
     CPU build the PyTorch timings are skipped and the summary says how to get a CUDA build;
  2. runs the device tests (tests/test_strict_models.py, test_strict_layers.py,
     test_strict_examples.py) with ``--device-backend cupy``: every model and method, the
     layer gradient checks and the example scripts with --device gpu, on the GPU;
  3. compares one float64 training step (loss_and_grad) of every case in tests/strict_cases.py
     on CuPy with the NumPy one: loss and every gradient to 1e-10;
  4. times the toy training step (CNF 2-64-64-64-2, exact trace, rk38 8 steps; batch 100,
     1000, 10000) and the default MNIST step (multiscale CNF 64-64-64, 2 blocks per scale,
     rk38 4 steps, batch 200; random images) on the GPU, against PyTorch + torchdiffeq
     (bench/torch_cnf.py, bench/torch_mnist.py) on the same GPU in the same run, with peak GPU
     memory (CuPy's pool high-water mark; torch.cuda.max_memory_allocated);
  5. writes summary.json and summary.md to --out (a fresh folder; default
     runs/gpu_check/<UTC time>).
After the install (whose time depends on the network: torch's CUDA wheels are large), steps
2-5 share a time budget (--budget, default 420 s; --quick 110 s); a step that no longer fits
is skipped, with a note. Without a GPU it says so and exits 2;
exit 1 when a check fails; 0 otherwise.

The steps are functions of the device name (``device="gpu"``) so the test suite runs them
with the strict CPU stand-in for CuPy (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402

EXIT_NO_GPU = 2
TOY_BATCHES = (100, 1000, 10000)
DEVICE_TESTS = ["tests/test_strict_models.py", "tests/test_strict_layers.py",
                "tests/test_strict_examples.py"]


# ----------------------------------------------------------------------------- environment

def find_gpu():
    """(found, description): CuPy's device count if CuPy imports, else ``nvidia-smi -L``."""
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
        if n > 0:
            name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            return True, f"{n} GPU(s) seen by CuPy {cupy.__version__}; device 0: {name}"
        return False, "CuPy sees no GPU (device count 0)"
    except ImportError:
        pass
    except Exception as exc:  # CuPy present, CUDA driver missing or broken
        return False, f"CuPy is installed but CUDA is not usable ({type(exc).__name__}: {exc})"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False, "no nvidia-smi and no CuPy: no NVIDIA GPU driver on this machine"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"nvidia-smi failed: {exc}"
    gpus = [ln for ln in out.stdout.splitlines() if ln.startswith("GPU ")]
    if out.returncode != 0 or not gpus:
        return False, f"nvidia-smi lists no GPU ({(out.stderr or out.stdout).strip()[:200]})"
    return True, "; ".join(gpus)


def install_extras(extras="gpu,bench", timeout=240):
    """pip install -e ROOT[extras]; returns a record of what happened."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "-e", f"{ROOT}[{extras}]"]
    t = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        ok, tail = out.returncode == 0, (out.stderr or out.stdout).strip()[-600:]
    except subprocess.TimeoutExpired:
        ok, tail = False, f"timed out after {timeout} s"
    importlib.invalidate_caches()
    return {"command": " ".join(cmd), "ok": ok, "seconds": round(time.perf_counter() - t, 1),
            "output_tail": tail}


def environment():
    env = {"python": platform.python_version(), "numpy": np.__version__,
           "machine": platform.machine(), "system": platform.system()}
    try:
        import cupy
        env["cupy"] = cupy.__version__
        env["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        env["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
    except Exception as exc:
        env["cupy"] = f"unavailable ({type(exc).__name__})"
    try:
        import torch
        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["torch_cuda_available"] = bool(torch.cuda.is_available())
    except Exception as exc:
        env["torch"] = f"unavailable ({type(exc).__name__})"
    return env


class Budget:
    """Seconds left of the whole run; ``allow(need)`` says whether a step still fits."""

    def __init__(self, seconds):
        self.end = time.perf_counter() + float(seconds)

    def left(self):
        return self.end - time.perf_counter()

    def allow(self, need):
        return self.left() >= need


# ----------------------------------------------------------------------------- device helpers

def device_module(device):
    from npflow.backend import array_module
    return array_module(device)


def synchronize(xp):
    """Wait for the device (CuPy); nothing to wait for on NumPy or the strict stand-in."""
    cuda = getattr(xp, "cuda", None) if xp.__name__ == "cupy" else None
    if cuda is not None:
        cuda.runtime.deviceSynchronize()


def reset_peak_memory(xp):
    if xp.__name__ == "cupy":
        synchronize(xp)
        xp.get_default_memory_pool().free_all_blocks()


def peak_memory(xp):
    """Bytes CuPy's memory pool holds (it keeps freed blocks: the high-water mark since the
    last reset_peak_memory); None off the GPU."""
    if xp.__name__ == "cupy":
        return int(xp.get_default_memory_pool().total_bytes())
    return None


def _median_time(step, sync, iters, warmup):
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), times


# ----------------------------------------------------------------------------- step 2: tests

def parse_pytest_output(text):
    """(summary line, {"passed": n, "failed": n, ...}, FAILED/ERROR lines) of pytest -q."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if " in " in ln and any(
        w in ln for w in ("passed", "failed", "error", "deselected", "no tests ran"))),
        lines[-1] if lines else "")
    counts = {}
    toks = summary.strip("= ").replace(",", " ").split()
    for i, tok in enumerate(toks[1:], 1):
        if tok in ("passed", "failed", "skipped", "error", "errors", "deselected"):
            try:
                counts[tok] = int(toks[i - 1])
            except ValueError:
                pass
    failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:20]
    return summary, counts, failures


def run_device_tests(backend="cupy", quick=False, timeout=300, extra=()):
    """pytest on the device tests with --device-backend ``backend``; returns counts and the
    summary line."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           f"--device-backend={backend}", *DEVICE_TESTS, *extra]
    if quick:
        cmd += ["-k", "keeps_params or equals_the_numpy or affine or odenet or train_mnist"]
    t = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                             env=env)
        text, rc = out.stdout + out.stderr, out.returncode
    except subprocess.TimeoutExpired as exc:
        text, rc = (exc.stdout or b"").decode(errors="replace"), "timeout"
    summary, counts, failures = parse_pytest_output(text)
    return {"command": " ".join(cmd), "returncode": rc, "summary": summary, "counts": counts,
            "failures": failures, "seconds": round(time.perf_counter() - t, 1),
            "ok": rc == 0}


# ----------------------------------------------------------------------------- step 3: float64

def compare_float64_step(device="gpu", names=None, tol=1e-10):
    """One float64 loss_and_grad per case on ``device`` and on the CPU: relative differences
    of the loss and of every gradient (max over entries, scaled by the gradient's max)."""
    from npflow.backend import to_host
    from strict_cases import CASES
    rows = []
    for name in names or sorted(CASES):
        case = CASES[name]
        out = []
        for dev in ("cpu", device):
            model = case.build(dev, "float64")
            x = case.batch(np.random.default_rng(1))
            kw = {}
            for h in case.hooks(model):
                kw.update(h.loss_kwargs(model, np.random.default_rng(2), 0))
            loss, grads, _ = model.loss_and_grad(x, np.random.default_rng(3), **kw)
            out.append((loss, {k: to_host(g) for k, g in grads.items()}))
        (l0, g0), (l1, g1) = out
        loss_rel = abs(l1 - l0) / max(1.0, abs(l0))
        grad_rel = max((float(np.max(np.abs(g1[k] - g0[k]))) / max(1.0, float(np.max(
            np.abs(g0[k])))) for k in g0), default=0.0)
        rows.append({"case": name, "loss_cpu": l0, "loss_device": l1, "loss_rel_diff": loss_rel,
                     "grad_max_rel_diff": grad_rel,
                     "ok": loss_rel <= tol and grad_rel <= tol and g0.keys() == g1.keys()})
    return rows


# ----------------------------------------------------------------------------- step 4: timing

def _toy_data(batch, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.array([(np.cos(a), np.sin(a)) for a in np.arange(8) * np.pi / 4]) * 2.0
    x = centers[rng.integers(0, 8, batch)] + 0.5 * rng.standard_normal((batch, 2))
    return x / 1.414


def time_npflow_toy(batch, iters=10, warmup=2, device="gpu"):
    """Median seconds of one npflow toy training step (loss_and_grad + Adam) on ``device``."""
    import npflow
    from npflow.backend import to_device
    from npflow.optim import Adam
    xp = device_module(device)
    reset_peak_memory(xp)
    m = npflow.CNF(2, hidden=(64, 64, 64), layer="concatsquash", activation="tanh", T=0.5,
                   solver="rk38", steps=8, trace="exact", dtype="float32", device=device)
    opt = Adam(m.params, lr=1e-3)
    x = to_device(_toy_data(batch), xp, np.float32)
    rng = np.random.default_rng(0)
    losses = []

    def step():
        loss, g, _ = m.loss_and_grad(x, rng)
        m.params = opt.step(m.params, g)
        losses.append(loss)
    med, _ = _median_time(step, lambda: synchronize(xp), iters, warmup)
    return {"median_s": med, "iters": iters, "peak_bytes": peak_memory(xp),
            "loss_first": losses[0], "loss_last": losses[-1]}


def _torch_device(device):
    """The torch device for ``device`` ("gpu" -> cuda), or raise RuntimeError saying why not."""
    import torch
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"torch {torch.__version__} has no usable CUDA (build CUDA {torch.version.cuda}); "
            "install a CUDA build, e.g. pip install torch --index-url "
            "https://download.pytorch.org/whl/cu121")
    return torch.device("cuda")


def _torch_sync(dev):
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_torch_toy(batch, iters=10, warmup=2, device="gpu"):
    """Median seconds of the same toy step in PyTorch + torchdiffeq (bench/torch_cnf.py)."""
    import torch
    from torch_cnf import TorchCNF, make_optimizer, train_step
    dev = _torch_device(device)
    with torch.device(dev):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        m = TorchCNF(2, hidden=(64, 64, 64), T=0.5, solver="rk38", steps=8,
                     dtype=torch.float32)
        opt = make_optimizer(m, lr=1e-3, weight_decay=0.0, kind="adamw")
        x = torch.as_tensor(_toy_data(batch), dtype=torch.float32, device=dev)
        losses = []
        med, _ = _median_time(lambda: losses.append(train_step(m, opt, x)),
                              lambda: _torch_sync(dev), iters, warmup)
        peak = int(torch.cuda.max_memory_allocated()) if dev.type == "cuda" else None
    return {"median_s": med, "iters": iters, "peak_bytes": peak,
            "loss_first": losses[0], "loss_last": losses[-1]}


MNIST = dict(image_shape=(1, 28, 28), hidden=(64, 64, 64), blocks=2, steps=4, batch=200)


def _images(batch, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch,) + tuple(shape)).astype(
        np.uint8)


def time_npflow_mnist(iters=3, warmup=1, device="gpu", config=None):
    """Median seconds of one default-MNIST training step (multiscale CNF, batch 200)."""
    from npflow.multiscale import MultiscaleCNF
    from npflow.optim import Adam
    c = dict(MNIST, **(config or {}))
    xp = device_module(device)
    reset_peak_memory(xp)
    m = MultiscaleCNF(c["image_shape"], hidden=c["hidden"], layer="concat", blocks=c["blocks"],
                      T=1.0, solver="rk38", steps=c["steps"], trace="rademacher",
                      dtype="float32", device=device)
    opt = Adam(m.params, lr=1e-3)
    x = _images(c["batch"], c["image_shape"])
    rng = np.random.default_rng(0)
    losses = []

    def step():
        loss, g, _ = m.loss_and_grad(x, rng)
        m.params = opt.step(m.params, g)
        losses.append(loss)
    med, _ = _median_time(step, lambda: synchronize(xp), iters, warmup)
    return {"median_s": med, "iters": iters, "peak_bytes": peak_memory(xp),
            "bpd_first": losses[0], "bpd_last": losses[-1]}


def time_torch_mnist(iters=3, warmup=1, device="gpu", config=None):
    """The same MNIST step in PyTorch + torchdiffeq (bench/torch_mnist.py)."""
    import torch
    from npflow.multiscale import default_scales
    from torch_mnist import TorchMultiscaleCNF, preprocess
    c = dict(MNIST, **(config or {}))
    dev = _torch_device(device)
    with torch.device(dev):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        _, H, W = c["image_shape"]
        m = TorchMultiscaleCNF(c["image_shape"], hidden=c["hidden"],
                               scales=default_scales(H, W), blocks=c["blocks"], steps=c["steps"])
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.as_tensor(_images(c["batch"], c["image_shape"]), device=dev)
        losses = []

        def step():
            y, logdet = preprocess(x, g)
            loss = m.bits_per_dim(y, logdet, g).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        med, _ = _median_time(step, lambda: _torch_sync(dev), iters, warmup)
        peak = int(torch.cuda.max_memory_allocated()) if dev.type == "cuda" else None
    return {"median_s": med, "iters": iters, "peak_bytes": peak,
            "bpd_first": losses[0], "bpd_last": losses[-1]}


def _guarded(fn, *args, **kwargs):
    """fn(...) or {"error": ...}: one failing timing does not end the check."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # reported in the summary
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def run_timings(device="gpu", quick=False, budget=None, torch_too=True):
    """The toy and MNIST timings, npflow and torch side by side; skips what the budget
    cannot fit."""
    budget = budget or Budget(math.inf)
    batches = TOY_BATCHES[:2] if quick else TOY_BATCHES
    iters = 5 if quick else 20
    rows = []
    for b in batches:
        if not budget.allow(15):
            rows.append({"what": f"toy batch {b}", "skipped": "time budget"})
            continue
        row = {"what": f"toy batch {b}", "npflow": _guarded(time_npflow_toy, b, iters,
                                                             device=device)}
        if torch_too:
            row["torch"] = _guarded(time_torch_toy, b, iters, device=device)
        rows.append(row)
    mnist_iters = 2 if quick else 6
    if budget.allow(40 if quick else 90):
        row = {"what": f"MNIST default, batch {MNIST['batch']}",
               "npflow": _guarded(time_npflow_mnist, mnist_iters, device=device)}
        if torch_too and budget.allow(20):
            row["torch"] = _guarded(time_torch_mnist, mnist_iters, device=device)
        rows.append(row)
    else:
        rows.append({"what": "MNIST default", "skipped": "time budget"})
    for row in rows:
        n, t = row.get("npflow", {}), row.get("torch", {})
        if "median_s" in n and "median_s" in t and n["median_s"] > 0:
            row["torch_over_npflow"] = t["median_s"] / n["median_s"]
    return rows


# ----------------------------------------------------------------------------- step 5: summaries

def _fmt_bytes(b):
    return "n/a" if b is None else f"{b / 2**20:.1f} MiB"


def _fmt_side(d):
    if not d:
        return "not run", ""
    if "error" in d:
        return f"error: {d['error'][:80]}", ""
    return f"{d['median_s'] * 1e3:.1f} ms", _fmt_bytes(d.get("peak_bytes"))


def markdown(result):
    lines = [f"# npflow GPU check ({result['mode']}, {result['started_utc']})", "",
             f"Verdict: **{'PASS' if result['ok'] else 'FAIL'}**; {result['gpu']}", ""]
    env = result.get("environment", {})
    lines += ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    inst = result.get("install")
    if inst:
        lines += [f"Install: `{inst['command']}`: {'ok' if inst['ok'] else 'FAILED'} "
                  f"({inst['seconds']} s)", ""]
    tests = result.get("tests")
    if tests:
        lines += ["## Device tests on CuPy", "", f"`{tests['command']}`", "",
                  f"{tests['summary']} ({tests['seconds']} s)", ""]
        lines += [f"- {f}" for f in tests["failures"]] + ([""] if tests["failures"] else [])
    cmp_ = result.get("float64_step")
    if cmp_:
        lines += ["## float64 training step: device against NumPy (tolerance 1e-10)", "",
                  "| case | loss (NumPy) | loss rel. diff | max grad rel. diff | ok |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['loss_cpu']:.12g} | {r['loss_rel_diff']:.1e} | "
                  f"{r['grad_max_rel_diff']:.1e} | {'yes' if r['ok'] else 'NO'} |"
                  for r in cmp_ if "error" not in r]
        lines += [f"| {r['case']} | error: {r['error']} | | | NO |" for r in cmp_ if "error" in r]
        lines.append("")
    timing = result.get("timings")
    if timing:
        lines += ["## Training step on the GPU: npflow (CuPy) against PyTorch + torchdiffeq",
                  "", "Medians of one step (forward solve, backward, Adam), same GPU, same run.",
                  "", "| step | npflow | npflow peak | torch | torch peak | torch / npflow |",
                  "|---|---|---|---|---|---|"]
        for r in timing:
            if "skipped" in r:
                lines.append(f"| {r['what']} | skipped: {r['skipped']} | | | | |")
                continue
            nt, nm = _fmt_side(r.get("npflow"))
            tt, tm = _fmt_side(r.get("torch"))
            ratio = r.get("torch_over_npflow")
            lines.append(f"| {r['what']} | {nt} | {nm} | {tt} | {tm} | "
                         f"{'' if ratio is None else f'{ratio:.2f}'} |")
        lines.append("")
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    lines.append(f"\nTotal {result['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def write_summaries(result, out_dir):
    """summary.json and summary.md in ``out_dir`` (created; refused if it holds files)."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} is not empty: give a fresh --out folder")
    os.makedirs(out_dir, exist_ok=True)
    jp, mp = os.path.join(out_dir, "summary.json"), os.path.join(out_dir, "summary.md")
    with open(jp, "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    with open(mp, "w") as fh:
        fh.write(markdown(result))
    return jp, mp


# ----------------------------------------------------------------------------- main

def run_check(device="gpu", quick=False, budget=None, tests_backend="cupy", install=None,
              gpu="", torch_too=True):
    """Steps 2-4 on ``device``; returns the result dict (summaries not written)."""
    budget = budget or Budget(math.inf)
    t0 = time.perf_counter()
    result = {"mode": "quick" if quick else "full",
              "started_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "gpu": gpu, "environment": environment(), "install": install, "notes": []}
    share = budget.left() * (0.45 if quick else 0.4)
    result["tests"] = run_device_tests(tests_backend, quick=quick,
                                       timeout=max(30, min(share, 600)))
    try:
        result["float64_step"] = compare_float64_step(device)
    except Exception as exc:
        result["float64_step"] = [{"case": "all", "error": f"{type(exc).__name__}: {exc}",
                                   "ok": False}]
    result["timings"] = run_timings(device, quick=quick, budget=budget, torch_too=torch_too)
    errors = [f"{r['what']} {side}: {r[side]['error']}" for r in result["timings"]
              for side in ("npflow", "torch") if "error" in r.get(side, {})]
    result["notes"] += errors
    result["ok"] = bool(result["tests"]["ok"] and all(r["ok"] for r in result["float64_step"])
                        and not any("npflow" in e.split(":")[0] for e in errors))
    result["seconds"] = time.perf_counter() - t0
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="about 2 minutes instead of 8")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole check (default 420, --quick 110)")
    ap.add_argument("--no-install", action="store_true",
                    help="skip pip install -e .[gpu,bench] (already installed)")
    ap.add_argument("--out", default=None,
                    help="fresh folder for summary.json / summary.md "
                         "(default runs/gpu_check/<UTC time>)")
    args = ap.parse_args(argv)
    found, gpu = find_gpu()
    if not found:
        print(f"gpu_check: no usable NVIDIA GPU here ({gpu}); nothing was checked. Run this "
              "on a machine with an NVIDIA GPU and a CUDA 12 driver.", file=sys.stderr)
        return EXIT_NO_GPU
    print(f"gpu_check: {gpu}", flush=True)
    install = None
    if not args.no_install:
        print("gpu_check: installing the gpu and bench extras ...", flush=True)
        install = install_extras(timeout=1200)
        if not install["ok"]:
            print(f"gpu_check: pip install failed: {install['output_tail']}", file=sys.stderr)
        found, gpu = find_gpu()       # CuPy may be new: ask it now
        if not found:
            print(f"gpu_check: after installing, CuPy sees no usable GPU ({gpu})",
                  file=sys.stderr)
            return EXIT_NO_GPU
    budget = Budget(args.budget or (110 if args.quick else 420))     # from here: the checks
    out = args.out or os.path.join(ROOT, "runs", "gpu_check",
                                   time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    result = run_check("gpu", quick=args.quick, budget=budget, install=install, gpu=gpu)
    try:
        import torch
        if not torch.cuda.is_available():
            result["notes"].append(
                f"torch {torch.__version__} is a CPU build: PyTorch timings failed; install "
                "a CUDA build (pip install torch --index-url "
                "https://download.pytorch.org/whl/cu121) and rerun")
    except ImportError:
        result["notes"].append("torch is not installed: PyTorch timings failed")
    jp, mp = write_summaries(result, out)
    print(markdown(result))
    print(f"gpu_check: wrote {jp} and {mp}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
