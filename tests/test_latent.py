"""npflow.latent (docs/latent.md): checks of the latent model that cannot be faked.

- eq. 4.2/4.4: the interpolation at λ = 1 and λ = 0 returns D(B(x1)) and D(B(x2)) up to the
  error of f⁻¹∘f, and that error is the solver's: O(h⁵) for RK4 there and back (eq. 4.5);
- eq. 2.4: the density of raw 2-D codes, including the standardization's Jacobian, integrates
  to one (quadrature on a grid), for OT-Flow and for an FFJORD CNF;
- eq. 6.2-6.3: the digit referee's gradient against central differences.
"""
import numpy as np
import pytest

from example_files import load_example, write_idx

import npflow
from npflow.autoencoder import Autoencoder
from npflow.latent import LatentFlow, SoftmaxRegression


def _small_model(steps=16, z_dim=3, seed=0):
    rng = np.random.default_rng(seed)
    ae = Autoencoder(12, z_dim, hidden=(10,), dtype="float64", seed=seed)
    x = rng.uniform(0, 1, (64, 12))
    ae.fit_standardization(x)
    flow = npflow.OTFlow(z_dim, width=8, depth=2, alpha=(1.0, 80.0, 500.0), steps=8,
                         dtype="float64", seed=seed)
    # make the flow far from the identity: a stronger potential
    flow.params = {k: (2.0 * v if k.startswith("K") else v) for k, v in flow.params.items()}
    return LatentFlow(ae, flow, steps=steps), x


def test_interpolation_endpoints_are_the_reconstructions_up_to_the_roundtrip_error():
    lf, x = _small_model(steps=32)
    x1, x2 = x[:5], x[5:10]
    y = lf.interpolate(x1, x2, [0.0, 0.5, 1.0])
    assert y.shape == (5, 3, 12)
    rec1 = lf.ae.decode(lf.ae.encode(x1))
    rec2 = lf.ae.decode(lf.ae.encode(x2))
    err = lf.roundtrip_error(np.concatenate([x1, x2]))
    e1, e0 = np.abs(y[:, 2] - rec1).max(), np.abs(y[:, 0] - rec2).max()
    assert max(e1, e0) <= err["image_max_abs"] * (1 + 1e-6) + 1e-15
    assert err["code_max_abs"] < 1e-3 and err["image_max_abs"] < 1e-5, err
    # the midpoint is a different image (the check above is not satisfied by copying ends)
    assert np.abs(y[:, 1] - rec1).max() > 1e3 * err["image_max_abs"]
    assert np.abs(y[:, 1] - rec2).max() > 1e3 * err["image_max_abs"]


def test_roundtrip_error_of_f_inverse_after_f_is_fifth_order_in_the_rk4_step():
    """‖f⁻¹(f(c)) − c‖ = O(h⁵) (eq. 4.5): RK4 backwards on the same grid undoes each forward
    step up to O(h⁶), one order better than RK4's global O(h⁴); doubling the steps divides the
    error by ≈ 32."""
    errs = []
    for steps in (4, 8, 16):
        lf, x = _small_model(steps=steps)
        errs.append(lf.roundtrip_error(x)["code_max_abs"])
    orders = np.log2([errs[0] / errs[1], errs[1] / errs[2]])
    assert np.all((orders > 4.4) & (orders < 5.6)), (errs, orders)
    assert errs[0] > 1e-6, errs        # the flow is far enough from the identity to measure


def _integral_over_codes(lf, mu, s, n=241, half_width=9.0, **kw):
    """∫ p_b(b) db by the trapezoid rule on a grid over μ ± half_width·s (eq. 2.4)."""
    g0 = mu[0] + s[0] * np.linspace(-half_width, half_width, n)
    g1 = mu[1] + s[1] * np.linspace(-half_width, half_width, n)
    B0, B1 = np.meshgrid(g0, g1, indexing="ij")
    b = np.stack([B0.ravel(), B1.ravel()], axis=1)
    p = np.exp(np.asarray(lf.log_prob_code_space(b, **kw))).reshape(n, n)
    return np.trapezoid(np.trapezoid(p, g1, axis=1), g0)


@pytest.mark.parametrize("kind", ["otflow", "ffjord"])
def test_latent_density_of_2d_codes_integrates_to_one(kind):
    """eq. 2.4 on a 2-dimensional code: ∫ p_b = 1 with the standardization's Jacobian
    −Σ log(s + ε) included (without it the integral would be Π (s + ε) = 0.75)."""
    ae = Autoencoder(5, 2, dtype="float64", seed=1)
    mu, s = np.array([0.4, -1.0]), np.array([0.3, 2.5])
    ae.params = {**ae.params, "code_mean": mu, "code_std": s}
    if kind == "otflow":
        # OT-Flow's initial potential already spreads N(0, I) over |c| < ~12: wide grid
        flow = npflow.OTFlow(2, width=8, depth=2, dtype="float64", seed=3)
        lf, kw, half_width, n = LatentFlow(ae, flow, steps=32), {}, 25.0, 301
    else:
        flow = npflow.CNF(2, hidden=(8, 8), activation="tanh", T=0.5, dtype="float64", seed=3)
        lf, kw = LatentFlow(ae, flow, rtol=1e-7, atol=1e-7), {"trace": "exact"}
        half_width, n = 9.0, 241
    # the flow is not the identity: the standardized codes' density is not N(0, I)
    c = np.array([[0.5, -0.7], [1.5, 0.2]])
    gauss = -0.5 * (c ** 2).sum(axis=1) - np.log(2 * np.pi)
    assert np.abs(np.asarray(lf.log_prob_codes(c, **kw)) - gauss).max() > 0.05
    total = _integral_over_codes(lf, mu, s, n=n, half_width=half_width, **kw)
    assert abs(total - 1.0) < 2e-3, total


def test_generated_images_have_the_data_shape_and_come_from_the_seed():
    lf, _ = _small_model()
    a = lf.generate(4, np.random.default_rng(5))
    b = lf.generate(4, np.random.default_rng(5))
    assert a.shape == (4, 12) and np.array_equal(a, b) and 0 < a.min() and a.max() < 1


def test_latent_nll_per_dimension_and_code_space_shift():
    """eq. 5.1-5.2: nll_b = nll_c + Σ log(s + ε), and the per-dimension values divide by d."""
    lf, x = _small_model()
    r = lf.latent_nll(x)
    shift = float(np.log(lf.ae.params["code_std"] + lf.ae.eps).sum())
    assert abs(r["nll_b"] - (r["nll_c"] + shift)) < 1e-9
    assert abs(r["nll_c_per_dim"] * 3 - r["nll_c"]) < 1e-12 and r["n"] == 64


def test_softmax_regression_gradient_equals_central_differences():
    rng = np.random.default_rng(6)
    clf = SoftmaxRegression(x_dim=5, n_classes=3, l2=0.1)
    clf.W, clf.beta = rng.standard_normal((3, 5)), rng.standard_normal(3)
    x, y = rng.standard_normal((7, 5)), rng.integers(0, 3, 7)
    _, gW, gb = clf.loss_and_grad(x, y)
    for arr, g in ((clf.W, gW), (clf.beta, gb)):
        v = rng.standard_normal(arr.shape)
        base = arr.copy()

        def f(s):
            arr[...] = base + s * v
            out = clf.loss_and_grad(x, y)[0]
            arr[...] = base
            return out
        fd = (-f(2e-5) + 8 * f(1e-5) - 8 * f(-1e-5) + f(-2e-5)) / 12e-5
        assert abs(np.vdot(g, v) - fd) < 1e-7 * max(1, abs(fd))


def test_gaussian_fit_baseline_has_the_codes_mean_and_covariance_even_when_singular():
    mod = _load_example()
    rng = np.random.default_rng(0)
    A = rng.standard_normal((3, 3))
    c = np.concatenate([rng.standard_normal((4000, 3)) @ A.T + [1.0, -2.0, 0.5],
                        np.zeros((4000, 1))], axis=1)            # a dead 4th dimension
    g = mod.gaussian_fit_codes(c, 200000, np.random.default_rng(1))
    assert g.shape == (200000, 4)
    np.testing.assert_allclose(g.mean(0), c.mean(0), atol=0.03)
    np.testing.assert_allclose(np.cov(g, rowvar=False), np.cov(c, rowvar=False), atol=0.05)
    assert np.all(g[:, 3] == 0.0)


def test_mismatched_dimensions_are_refused():
    ae = Autoencoder(5, 2)
    with pytest.raises(ValueError, match="differs from the autoencoder's code dimension"):
        LatentFlow(ae, npflow.OTFlow(3))


# ----------------------------------------------------------------------------- the example

def _load_example():
    return load_example("train_latent")


def _write_idx(folder, n_train=60, n_test=20):
    write_idx(folder, n_train, n_test, labels="cycle")


TINY = ["--dim", "4", "--width", "8", "--ae-epochs", "2", "--ae-batch", "10", "--niters", "4",
        "--batch-size", "8", "--val-every", "2", "--val-n", "5", "--test-n", "10",
        "--log-every", "2", "--ffjord-hidden", "8,8"]


@pytest.mark.parametrize("model", ["otflow", "ffjord"])
def test_example_writes_figures_and_test_nll_last(tmp_path, model, capsys):
    import json
    import os
    _write_idx(str(tmp_path / "data" / "mnist"))
    mod = _load_example()
    save, log = str(tmp_path / "run"), str(tmp_path / "log.jsonl")
    rc = mod.main(TINY + ["--model", model, "--data-dir", str(tmp_path / "data"), "--save",
                          save, "--log-json", log])
    assert rc == 0
    for f in ("samples.png", "interpolation.png", "curves.png", "autoencoder.h5", "best.h5",
              "result.json"):
        assert os.path.exists(os.path.join(save, f)), f
    recs = [json.loads(line) for line in open(log)]
    assert "test_nll" in recs[-1] and np.isfinite(recs[-1]["test_nll"])
    assert sum(recs[-1]["generated_label_histogram"]) == 1000
    assert sum(recs[-1]["gaussian_fit_label_histogram"]) == 1000
    assert any(r.get("stage") == "autoencoder" for r in recs)
    assert "latent test NLL" in capsys.readouterr().out
    # a second run into the same folder is refused; --resume reuses the autoencoder
    with pytest.raises(SystemExit):
        mod.main(TINY + ["--data-dir", str(tmp_path / "data"), "--save", save])
    assert "already holds a run" in capsys.readouterr().err


def test_example_bad_flags_are_one_line_errors(tmp_path, capsys):
    mod = _load_example()
    for bad, msg in ((["--alpha", "1,2"], "--alpha needs three values"),
                     (["--conditional", "12"], "--conditional must be"),
                     (["--hidden", "a,b"], "--hidden must be comma-separated"),
                     (["--batch-size", "0"], "--batch-size must be >= 1")):
        with pytest.raises(SystemExit):
            mod.main(bad + ["--save", str(tmp_path / "r")])
        assert msg in capsys.readouterr().err


def test_example_conditional_trains_on_one_class_only(tmp_path, capsys):
    """--conditional K: the autoencoder and the flow see the images of class K only (the tiny
    data set has 5 training images of class 3); here in float32."""
    import json
    _write_idx(str(tmp_path / "data" / "mnist"))
    mod = _load_example()
    rc = mod.main(TINY + ["--conditional", "3", "--no-classifier", "--dtype", "float32",
                          "--data-dir", str(tmp_path / "data"), "--save",
                          str(tmp_path / "run")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "(5 train, 1 validation, 2 test;" in out
    assert json.load(open(tmp_path / "run" / "result.json"))["conditional"] == 3


def test_example_resume_reuses_the_autoencoder_and_continues_the_flow(tmp_path, capsys):
    import json
    _write_idx(str(tmp_path / "data" / "mnist"))
    mod = _load_example()
    base = TINY + ["--no-classifier", "--data-dir", str(tmp_path / "data"), "--save",
                   str(tmp_path / "run")]
    assert mod.main(base) == 0
    capsys.readouterr()
    assert mod.main(base + ["--resume", "--niters", "6"]) == 0
    out = capsys.readouterr().out
    assert "autoencoder loaded from" in out and "resumed from" in out
    assert json.load(open(tmp_path / "run" / "result.json"))["status"] == "done"
    # a model setting may not change on resume
    with pytest.raises(SystemExit):
        mod.main(base + ["--resume", "--width", "16"])
    assert "model settings differ" in capsys.readouterr().err


def test_pytorch_otflow_of_the_benchmark_computes_npflows_loss_and_gradient():
    """bench/torch_otflow.py (autograd through OT-Flow's published formulas) and npflow's
    hand-written OT-Flow give the same loss and parameter gradient (docs/latent.md, section 7)."""
    pytest.importorskip("torch")
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
    from torch_otflow import TorchOTFlow
    rng = np.random.default_rng(0)
    for depth in (2, 3):
        flow = npflow.OTFlow(5, width=8, depth=depth, alpha=(1.0, 80.0, 500.0), steps=3,
                             dtype="float64", seed=1)
        x = rng.standard_normal((6, 5))
        loss, grads, _ = flow.loss_and_grad(x)
        t_loss, t_grads = TorchOTFlow(flow.params, 5, alpha=(1.0, 80.0, 500.0),
                                      nt=3).loss_and_grad(x)
        assert abs(loss - t_loss) <= 1e-12 * abs(loss)
        for k in grads:
            np.testing.assert_allclose(grads[k], t_grads[k], rtol=1e-9,
                                       atol=1e-12 * np.abs(t_grads[k]).max())
