"""npflow.cfm: the flow-matching loss's gradient against central differences (docs/cfm.md
eq. 2.5), its minimisers (eq. 3.1-3.3), the exactness of the OT pairing (eq. 4.2), the
unbiased stratified times (eq. 2.6), reproducibility and bad input."""
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import npflow
from npflow.cfm import (FlowMatchingCNF, cfm_loss_and_grad, draw_noise, group_cuts,
                        ot_pairing)


def small_model(**kw):
    base = dict(dim=2, hidden=(5, 4), T=0.7, dtype="float64", seed=1)
    base.update(kw)
    return FlowMatchingCNF(**base)


def directional_fd(model, x, seed, direction, h=1e-5):
    def loss_at(a):
        p = {k: v + a * direction[k] for k, v in model.params.items()}
        return model.loss_and_grad(x, np.random.default_rng(seed), params=p)[0]
    return (loss_at(h) - loss_at(-h)) / (2 * h)


def check_gradient(model, x, seed=0, rtol=1e-6):
    loss, grads, stats = model.loss_and_grad(x, np.random.default_rng(seed))
    assert set(grads) == set(model.params)
    rng = np.random.default_rng(123)
    for name in model.params:         # one random direction per parameter array
        d = {k: np.zeros_like(v) for k, v in model.params.items()}
        d[name] = rng.standard_normal(model.params[name].shape)
        fd = directional_fd(model, x, seed, d)
        an = float(np.sum(grads[name] * d[name]))
        assert abs(an - fd) <= rtol * max(1.0, abs(fd)) + 1e-9, (name, an, fd)
    return loss, grads, stats


VARIANTS = {
    "cfm": dict(coupling="independent"),
    "cfm_sigma": dict(coupling="independent", sigma=0.3),
    "otcfm": dict(coupling="ot"),
    "otcfm_sigma_concat_softplus": dict(coupling="ot", sigma=0.1, layer="concat",
                                        activation="softplus"),
    "cfm_three_blocks": dict(blocks=3, time_groups=5),
    # one time per row, one network call (eq. 2.8; layers' per-row t, layers.md eq. 1.22-1.25)
    "cfm_per_row": dict(coupling="independent", time_groups=0),
    "otcfm_per_row_sigma": dict(coupling="ot", sigma=0.2, time_groups=0),
    "cfm_per_row_concat_swish": dict(time_groups=0, layer="concat", activation="swish"),
    "cfm_per_row_three_blocks": dict(blocks=3, time_groups=0, sigma=0.1),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cfm_gradient_matches_central_differences(variant):
    model = small_model(**VARIANTS[variant])
    x = np.random.default_rng(5).standard_normal((7, 2))
    check_gradient(model, x)


@settings(max_examples=10)
@given(seed=st.integers(0, 10**6), dim=st.integers(1, 4), batch=st.integers(1, 9),
       groups=st.integers(0, 12), blocks=st.integers(1, 3), sigma=st.floats(0.0, 0.5),
       ot=st.booleans(), T=st.floats(0.2, 1.5))
def test_cfm_gradient_is_derivative_of_returned_loss(seed, dim, batch, groups, blocks, sigma,
                                                     ot, T):
    model = FlowMatchingCNF(dim, hidden=(3,), T=T, blocks=blocks, sigma=sigma,
                            coupling="ot" if ot else "independent", time_groups=groups,
                            dtype="float64", seed=seed)
    x = np.random.default_rng(seed).standard_normal((batch, dim))
    check_gradient(model, x, seed=seed)


def test_same_seed_gives_same_loss_and_other_seed_another():
    model = small_model(coupling="ot", sigma=0.2)
    x = np.random.default_rng(0).standard_normal((6, 2))
    a = model.loss_and_grad(x, np.random.default_rng(4))[0]
    b = model.loss_and_grad(x, np.random.default_rng(4))[0]
    c = model.loss_and_grad(x, np.random.default_rng(5))[0]
    assert a == b and a != c


def _constant_velocity_params(model, v):
    """Parameters making every block's ODENet output the constant v (D,): the last
    ConcatSquash layer with W = 0, w_b = 0, gate weight 0, gate bias 0 (g = ½), bias 2v."""
    p = dict(model.params)
    last = len(model.nets[0].layers) - 1
    for b in range(len(model.nets)):
        pre = f"b{b}.{last}."
        p[pre + "weight"] = np.zeros_like(p[pre + "weight"])
        p[pre + "hyper_bias.weight"] = np.zeros_like(p[pre + "hyper_bias.weight"])
        p[pre + "gate.weight"] = np.zeros_like(p[pre + "gate.weight"])
        p[pre + "gate.bias"] = np.zeros_like(p[pre + "gate.bias"])
        p[pre + "bias"] = 2.0 * np.asarray(v, dtype=np.float64)
    return p


def test_constant_velocity_minimiser_is_mean_conditional_target():
    # eq. 3.1 on the batch: among constant fields f ≡ c, L is minimised by c = Σ_i w_i u_i, the
    # mean of u = (z − x)/𝒯 (eq. 2.3) under the row weights w_i = 1/(M n_j) (eq. 2.7): the bias
    # gradient vanishes there and not elsewhere
    model = small_model(T=0.4, blocks=2, time_groups=3)
    B, D = 8, 2
    rng = np.random.default_rng(3)
    x = rng.standard_normal((B, D)) + 3.0
    z, s, eps = draw_noise(np.random.default_rng(9), B, D, 3, 0.0)
    horizon = 0.8
    n = np.diff(group_cuts(B, 3))
    w = np.repeat(1.0 / (3 * n), n)
    c = (w[:, None] * (z - x)).sum(axis=0) / horizon
    nets = model.nets
    last = len(nets[0].layers) - 1
    for v, zero in ((c, True), (c + 0.1, False), (-c, False)):
        p = _constant_velocity_params(model, v)
        bp = [model.block_params(b, p) for b in range(2)]
        loss, grads, _ = cfm_loss_and_grad(nets, bp, [0.4, 0.4], x, z, s)
        gb = sum(g[f"{last}.bias"] for g in grads)       # ∂L/∂c = ½ ∂L/∂bias, summed over blocks
        assert np.allclose(gb, 0.0, atol=1e-12) == zero, (v, gb)
        # the exact value of the gradient: ∂L/∂c = 2 (c − mean u) / D, ∂c/∂bias = ½
        np.testing.assert_allclose(gb, (v - c) / D, rtol=1e-12, atol=1e-14)


def test_otcfm_recovers_translation_exactly_so_constant_field_has_zero_loss():
    # data = noise + a (any order): the OT pairing undoes the shuffle (eq. 4.2), every
    # conditional target is −a/𝒯, the constant field −a/𝒯 has loss 0 and gradient 0; with the
    # independent pairing the same field has a positive loss and a nonzero gradient
    B, D = 12, 2
    a = np.array([1.5, -0.5])
    model = small_model(T=1.0)
    z, s, eps = draw_noise(np.random.default_rng(0), B, D, 4, 0.2)
    shuffle = np.random.default_rng(1).permutation(B)
    x = z[shuffle] + a
    perm = ot_pairing(x, z)
    np.testing.assert_array_equal(perm, shuffle)
    p = _constant_velocity_params(model, -a)
    bp = [model.block_params(0, p)]
    loss, grads, _ = cfm_loss_and_grad(model.nets, bp, [1.0], x, z[perm], s, eps, 0.2)
    assert float(loss) < 1e-28
    assert all(np.abs(g).max() < 1e-14 for g in grads[0].values())
    loss_i, grads_i, _ = cfm_loss_and_grad(model.nets, bp, [1.0], x, z, s, eps, 0.2)
    assert float(loss_i) > 0.1 and np.abs(grads_i[0]["2.weight"]).max() > 1e-3


@settings(max_examples=15)
@given(seed=st.integers(0, 10**6), B=st.integers(1, 6), D=st.integers(1, 3))
def test_ot_pairing_is_the_optimal_permutation(seed, B, D):
    rng = np.random.default_rng(seed)
    x, z = rng.standard_normal((B, D)), rng.standard_normal((B, D))
    perm = ot_pairing(x, z)
    assert sorted(perm.tolist()) == list(range(B))
    cost = ((x - z[perm]) ** 2).sum()
    best = min(((x - z[list(q)]) ** 2).sum() for q in itertools.permutations(range(B)))
    assert cost <= best + 1e-12


def test_stratified_group_times_give_every_row_a_uniform_time_under_the_group_weights():
    # eq. 2.6-2.7: s_j = (j + U_j)/M lies in [j/M, (j+1)/M) and the rows of group j carry the
    # weight 1/(M n_j), so the weighted time of the batch is U[0, 1) whatever the group sizes:
    # mean ½, variance 1/12 (checked at 5 standard errors); the groups tile the rows
    B, M = 10, 4
    cuts = group_cuts(B, M)
    n = np.diff(cuts)
    assert cuts[0] == 0 and cuts[-1] == B and set(n) == {2, 3}
    assert group_cuts(3, 16) == [0, 1, 2, 3]
    rng = np.random.default_rng(0)
    N = 20000
    s = np.array([draw_noise(rng, B, 1, M, 0.0)[1] for _ in range(N)])     # (N, M)
    j = np.arange(M)
    assert np.all((s >= j / M) & (s < (j + 1) / M))
    w = np.repeat(1.0 / (M * n), n)                                          # (B,), Σ w = 1
    assert abs(w.sum() - 1.0) < 1e-12
    row_s = np.repeat(s, n, axis=1)                                          # (N, B)
    mean = (row_s * w).sum(axis=1).mean()
    second = (row_s ** 2 * w).sum(axis=1).mean()
    assert abs(mean - 0.5) < 5 * math.sqrt(1 / 12 / N / M)
    assert abs(second - mean ** 2 - 1 / 12) < 0.003
    # unequal groups with equal row weights would be biased: here the mean is off by > 0.02
    assert abs(row_s.mean() - 0.5) > 0.02


def test_per_row_stratified_times_are_uniform_for_every_row_and_tile_the_strata():
    # eq. 2.8: s_i = (π_i + U_i)/B: one time in each stratum [k/B, (k+1)/B) per batch, and
    # every row's time is U[0, 1) (mean ½, variance 1/12 at 5 standard errors), whatever its
    # position in the batch (the permutation), so equal weights 1/B are unbiased
    B, N = 5, 20000
    rng = np.random.default_rng(1)
    s = np.array([draw_noise(rng, B, 1, 0, 0.0)[1] for _ in range(N)])     # (N, B)
    assert s.shape == (N, B) and np.all((s >= 0) & (s < 1))
    assert np.all(np.sort(np.floor(s * B), axis=1) == np.arange(B))
    assert np.all(np.abs(s.mean(axis=0) - 0.5) < 5 * math.sqrt(1 / 12 / N))
    assert np.all(np.abs(s.var(axis=0) - 1 / 12) < 0.004)
    # without the permutation row i would stay in stratum i: its mean would be (i + ½)/B
    assert np.ptp(s.mean(axis=0)) < 0.02


@pytest.mark.parametrize("blocks", [1, 3])
def test_per_row_call_equals_one_group_per_row_with_the_same_times(blocks):
    # eq. 2.8 against eq. 2.6-2.7 with M = B: the same times row by row give the same loss and
    # gradient whether the rows go through the network one by one (scalar t) or in one call
    # per block (per-row t)
    model = small_model(blocks=blocks, sigma=0.1, T=0.5)
    B, D = 9, 2
    rng = np.random.default_rng(4)
    x, z, eps = (rng.standard_normal((B, D)) for _ in range(3))
    s = rng.uniform(size=B)
    bp = [model.block_params(b) for b in range(blocks)]
    Ts = [0.5] * blocks
    l1, g1, _ = cfm_loss_and_grad(model.nets, bp, Ts, x, z, s, eps, 0.1)
    l2, g2, info = cfm_loss_and_grad(model.nets, bp, Ts, x, z, s, eps, 0.1, per_row=True)
    assert info["groups"] == 0
    assert abs(float(l1) - float(l2)) <= 1e-13 * abs(float(l1))
    for a, b in zip(g1, g2):
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-11, atol=1e-14)


@settings(max_examples=15)
@given(seed=st.integers(0, 10**6), B=st.integers(1, 6), D=st.integers(1, 3))
def test_pot_pairing_is_the_optimal_permutation(seed, B, D):
    # eq. 4.2-4.3 with POT's network simplex: the plan read as a permutation is optimal
    pytest.importorskip("ot")
    rng = np.random.default_rng(seed)
    x, z = rng.standard_normal((B, D)), rng.standard_normal((B, D))
    perm = ot_pairing(x, z, "pot")
    assert sorted(perm) == list(range(B))
    cost = ((x - z[perm]) ** 2).sum()
    best = min(((x - z[list(q)]) ** 2).sum() for q in itertools.permutations(range(B)))
    assert cost <= best + 1e-12


def test_pot_and_scipy_pairings_agree_on_toy_batches_and_models_train_alike():
    pytest.importorskip("ot")
    from npflow.data import toy
    rng = np.random.default_rng(0)
    for name in ("8gaussians", "checkerboard"):
        x, z = toy(name, 64, rng), rng.standard_normal((64, 2))
        np.testing.assert_array_equal(ot_pairing(x, z, "pot"), ot_pairing(x, z, "scipy"))
    x = toy("8gaussians", 16, rng)
    a, b = (small_model(coupling="ot", time_groups=0, ot_solver=o) for o in ("scipy", "pot"))
    assert b.config["ot_solver"] == "pot" and "ot_solver" not in a.config
    la = a.loss_and_grad(x, np.random.default_rng(3))
    lb = b.loss_and_grad(x, np.random.default_rng(3))
    assert la[0] == lb[0]
    with pytest.raises(ValueError, match="OT solver"):
        ot_pairing(x, x, "sinkhorn")


def test_trained_cfm_model_is_a_cnf_with_exact_log_prob_and_reloads(tmp_path):
    model = small_model(coupling="ot", sigma=0.1, time_groups=3)
    x = np.random.default_rng(0).standard_normal((5, 2))
    lp = npflow.backend.to_host(model.log_prob(x, solver="rk4", steps=4))
    path = tmp_path / "m.h5"
    model.save(str(path))
    back = npflow.load(str(path))
    assert type(back) is FlowMatchingCNF and back.config["coupling"] == "ot"
    np.testing.assert_allclose(npflow.backend.to_host(back.log_prob(x, solver="rk4", steps=4)),
                               lp, rtol=1e-12)


def test_float32_model_returns_float32_gradients():
    model = FlowMatchingCNF(2, hidden=(4,), T=1.0, coupling="ot")
    loss, grads, stats = model.loss_and_grad(np.ones((4, 2)), np.random.default_rng(0))
    assert all(g.dtype == np.float32 for g in grads.values())
    assert stats["nfe_forward"] == 1 and "ot_seconds" in stats


@pytest.mark.parametrize("kw, match", [
    (dict(sigma=-0.1), "sigma"),
    (dict(coupling="sinkhorn"), "coupling"),
    (dict(time_groups=-1), "time_groups"),
    (dict(ot_solver="sinkhorn"), "ot_solver"),
    (dict(train_T=True), "train_T"),
    (dict(kinetic=0.1), "kinetic"),
])
def test_bad_arguments_raise_one_line_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        small_model(**kw)


def test_every_registered_method_setting_is_refused_by_both_flow_matching_models():
    from npflow.cfm import check_flow_matching
    from npflow.methods import model_settings
    names = tuple(model_settings({}))
    assert {"kinetic", "jacobian"} <= set(names)
    for name in names:
        with pytest.raises(ValueError, match=f"trains no {name}"):
            check_flow_matching("ot", 4, {name: 0.5})
    check_flow_matching("ot", 4, {name: 0.0 for name in names})      # off values pass


def test_bad_data_and_end_time_override_raise():
    model = small_model()
    with pytest.raises(ValueError, match="shape"):
        model.loss_and_grad(np.ones((3, 3)), np.random.default_rng(0))
    with pytest.raises(ValueError, match="NaN|Inf|finite"):
        model.loss_and_grad(np.full((3, 2), np.nan), np.random.default_rng(0))
    with pytest.raises(ValueError, match="override"):
        model.loss_and_grad(np.ones((3, 2)), np.random.default_rng(0), T=0.3)


def _train_toy():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples", "train_toy.py")
    spec = importlib.util.spec_from_file_location("train_toy_cfm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("method, extra", [("cfm", []), ("otcfm", []),
                                           ("otcfm", ["--time-groups", "0"]),
                                           ("otcfm", ["--time-groups", "0", "--ot-solver", "pot"])])
def test_train_toy_method_trains_and_reports_exact_test_nll(tmp_path, method, extra):
    import json
    if "pot" in extra:
        pytest.importorskip("ot")
    log = tmp_path / "log.jsonl"
    code = _train_toy().main(["--method", method, "--niters", "4", "--dims", "8-8",
                              "--log-every", "2", "--test-n", "200", "--no-figures",
                              "--save", str(tmp_path / "run"), "--log-json", str(log)] + extra)
    assert code == 0
    recs = [json.loads(s) for s in log.read_text().splitlines()]
    assert [r["iteration"] for r in recs[:-1]] == [2, 4]
    final = recs[-1]
    assert np.isfinite(final["test_nll"]) and final["test_nfe"] > 0 and final["method"] == method
    assert final["mean_nfe_forward"] == 1.0 and final["T"] == 1.0     # the method's defaults
    back = npflow.load(str(tmp_path / "run" / "checkpoint.h5"))
    assert back.config["coupling"] == ("ot" if method == "otcfm" else "independent")
    assert back.config["time_groups"] == (0 if extra else 16)
    assert back.config.get("ot_solver", "scipy") == ("pot" if "pot" in extra else "scipy")


def test_flow_matching_methods_do_not_combine():
    from npflow.training import parse_methods
    assert parse_methods("otcfm") == {"otcfm"}
    with pytest.raises(ValueError, match="combine"):
        parse_methods("cfm+rnode")


@pytest.mark.parametrize("coupling, groups", [("independent", 3), ("ot", 3), ("ot", 0)])
def test_parts_of_any_row_split_add_up_to_the_whole_batch(coupling, groups):
    # docs/parallel.md eq. 1.2 for eq. 2.4-2.5: rows cut across the time groups still carry the
    # whole batch's weights (eq. 2.7, 2.8), so the parts' sums and gradients add up exactly
    model = small_model(coupling=coupling, sigma=0.1, time_groups=groups, blocks=2)
    x = np.random.default_rng(2).standard_normal((11, 2))
    loss, grads, stats = model.loss_and_grad(x, np.random.default_rng(7))
    parts = [model.loss_and_grad_part(x, np.random.default_rng(7), rows=r)
             for r in ((0, 2), (2, 7), (7, 11))]
    total = sum(float(p.sums["cfm"]) for p in parts)
    assert abs(total - loss) <= 1e-12 * max(1.0, abs(loss))
    for k in grads:
        np.testing.assert_allclose(sum(p.grads[k] for p in parts), grads[k], rtol=1e-10,
                                   atol=1e-14)
    assert abs(sum(float(p.sums["pair_sq_dist"]) for p in parts) / 11
               - stats["pair_sq_dist"]) < 1e-12


def test_train_toy_ema_resume_is_exact_and_the_average_is_what_is_evaluated(tmp_path):
    # --ema (docs/training.md eq. 1.6): the average is in the checkpoint, so 4 iterations +
    # --resume to 6 give the same saved average and test NLL as 6 uninterrupted iterations;
    # and the reported test NLL is the average's, not the last iterate's
    import json
    base = ["--method", "otcfm", "--dims", "8-8", "--log-every", "2", "--test-n", "200",
            "--no-figures", "--ema", "0.9", "--batch-size", "16"]

    def run(folder, n, *extra):
        log = tmp_path / f"{folder}.jsonl"
        assert _train_toy().main(base + ["--niters", str(n), "--save", str(tmp_path / folder),
                                         "--log-json", str(log), *extra]) == 0
        return [json.loads(s) for s in log.read_text().splitlines()]

    full = run("a", 6)
    run("b", 4)
    part = run("b", 6, "--resume")
    assert full[-1]["test_nll"] == part[-1]["test_nll"] and full[-1]["ema"] == 0.9
    avg_a = npflow.checkpoint.read_params(str(tmp_path / "a" / "model_ema.h5"))
    avg_b = npflow.checkpoint.read_params(str(tmp_path / "b" / "model_ema.h5"))
    last = npflow.checkpoint.read_params(str(tmp_path / "a" / "checkpoint.h5"))
    assert sorted(avg_a) == sorted(avg_b) == sorted(last)
    for k in avg_a:
        np.testing.assert_array_equal(avg_a[k], avg_b[k])
    assert any(not np.array_equal(avg_a[k], last[k]) for k in last)
    from npflow.data import toy
    model = npflow.load(str(tmp_path / "a" / "model_ema.h5"))
    x = toy("8gaussians", 200, np.random.default_rng([0, 2]))
    nll = -float(np.mean(npflow.backend.to_host(model.log_prob(
        x, solver="dopri5", rtol=1e-5, atol=1e-5, trace="exact")).astype(np.float64)))
    assert nll == pytest.approx(full[-1]["test_nll"], rel=1e-6)


@pytest.mark.parametrize("flags, expected", [
    ([], [1.0, 1.0, 0.5, 0.5]),                                   # otcfm's halving (every 2)
    (["--lr-cosine"], [1.0, 0.5, 0.0, 0.0]),                      # eq. 3.5 over --niters 2
])
def test_train_toy_lr_cosine_replaces_the_halving(flags, expected):
    mod = _train_toy()
    args = mod.build_parser().parse_args(["--method", "otcfm", "--niters", "2",
                                          "--lr-halve-every", "2"] + flags)
    s = mod._schedule(args)
    assert [s.factor(i) for i in range(4)] == pytest.approx(expected)
