"""npflow.cfm_multiscale: the layout against the model's own squeeze / factor-out (docs/cfm.md
eq. 9.1-9.2), the path's endpoints and continuity between blocks (eq. 9.4), its velocity as
the τ-derivative of the state (eq. 9.5), the loss gradient against central differences (eq.
9.7), the OT coupling of the last part only (eq. 9.9), reproducibility, reload and bad input."""
import itertools
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import npflow
from npflow.cfm import ot_pairing
from npflow.cfm_multiscale import (SCHEDULES, FlowMatchingMultiscaleCNF, multiscale_layout,
                                   path_schedule, path_state, path_velocity)
from npflow.images import factor_out, squeeze


def tiny(**kw):
    base = dict(image_shape=(1, 4, 4), hidden=(3,), scales=2, blocks=1, T=0.7,
                dtype="float64", seed=1)
    base.update(kw)
    return FlowMatchingMultiscaleCNF(**base)


def images(rng, B, shape=(1, 4, 4)):
    return rng.integers(0, 256, (B,) + tuple(shape))


def structural_inputs(plan, a):
    """Push a (B, C, H, W) through the plan's squeezes and factor-outs, no ODE: the input of
    every block and the factored-out parts, then the last state (the reference of eq. 9.1)."""
    ins, parts = [], []
    for op, _ in plan:
        if op == "block":
            ins.append(a)
        elif op == "squeeze":
            a = squeeze(a)
        else:
            a, out = factor_out(a)
            parts.append(out)
    return ins, parts + [a]


def block_arrays(layout, y, z, k):
    """x_k, z_k, λ_k, Δ_k of block k (eq. 9.2, 9.4)."""
    return (y[:, layout.block_index[k]], z[:, layout.block_final[k]], layout.block_start[k],
            layout.block_rate[k])


SHAPES = [((1, 4, 4), 2, 1), ((1, 4, 4), 2, 2), ((2, 8, 8), 3, 1), ((1, 8, 8), 1, 2),
          ((3, 4, 4), 2, 2)]


@pytest.mark.parametrize("shape,scales,blocks", SHAPES)
def test_layout_gathers_what_the_model_squeeze_and_factor_out_give(shape, scales, blocks):
    m = FlowMatchingMultiscaleCNF(shape, hidden=(2,), scales=scales, blocks=blocks)
    lay = m.layout
    B, D = 3, int(np.prod(shape))
    y = np.random.default_rng(0).standard_normal((B, D))
    ins, parts = structural_inputs(m.plan, y.reshape((B,) + shape))
    assert len(ins) == len(m.nets) == len(lay.block_index)
    for k, a in enumerate(ins):                       # block k's input = y gathered (eq. 9.1)
        np.testing.assert_array_equal(y[:, lay.block_index[k]], a)
    final = np.concatenate([p.reshape(B, -1) for p in parts], axis=1)
    np.testing.assert_array_equal(y[:, lay.final_index], final)
    assert lay.part_sizes == [p[0].size for p in parts]
    assert lay.part_exit[-1] == len(m.nets) and lay.part_exit == sorted(lay.part_exit)
    assert [p[0].shape for p in parts] == [tuple(s) for s in m.part_shapes()]


@pytest.mark.parametrize("shape,scales,blocks", SHAPES)
def test_noise_equal_to_the_rearranged_data_makes_every_block_state_the_rearranged_data(
        shape, scales, blocks):
    """With z = P y (eq. 9.1) the path stands still: at every block and time the state is the
    data pushed through the model's squeezes and factor-outs, so the noise is read in the same
    arrangement as the data (block_final = P⁻¹ ∘ block_index, eq. 9.3)."""
    m = FlowMatchingMultiscaleCNF(shape, hidden=(2,), scales=scales, blocks=blocks)
    B, D = 2, int(np.prod(shape))
    y = np.random.default_rng(3).standard_normal((B, D))
    z = y[:, m.layout.final_index]
    ins, _ = structural_inputs(m.plan, y.reshape((B,) + shape))
    for k, a in enumerate(ins):
        xk, zk, lam, delta = block_arrays(m.layout, y, z, k)
        for s in (0.0, 0.3, 1.0):
            np.testing.assert_array_equal(path_state(xk, zk, lam, delta, s), a)


@pytest.mark.parametrize("rule", SCHEDULES)
@pytest.mark.parametrize("shape,scales,blocks", SHAPES)
def test_path_starts_at_data_ends_at_noise_and_is_continuous_between_blocks(shape, scales,
                                                                            blocks, rule):
    m = FlowMatchingMultiscaleCNF(shape, hidden=(2,), scales=scales, blocks=blocks,
                                  schedule=rule)
    lay = m.layout
    B, D = 4, int(np.prod(shape))
    rng = np.random.default_rng(1)
    y, z = rng.standard_normal((B, D)), rng.standard_normal((B, D))
    N = len(m.nets)
    x0, z0, lam0, delta0 = block_arrays(lay, y, z, 0)
    # data end: block 1 at s = 0 is the data in the model's arrangement
    np.testing.assert_array_equal(path_state(x0, z0, lam0, delta0, 0.0),
                                  y.reshape((B,) + shape))
    # walk the plan with the path's end states: each block's end state, pushed through the
    # structural ops, is the next block's start state; every factored-out part and the last
    # state are the noise of their final coordinates
    k, parts, state = 0, [], None
    for op, _ in m.plan:
        if op == "block":
            xk, zk, lam, delta = block_arrays(lay, y, z, k)
            if state is not None:                       # continuity (eq. 9.5 at s = 0 and 1)
                np.testing.assert_allclose(path_state(xk, zk, lam, delta, 0.0), state,
                                           rtol=0, atol=1e-12)
            state = path_state(xk, zk, lam, delta, 1.0)
            k += 1
        elif op == "squeeze":
            state = squeeze(state)
        else:
            state, out = factor_out(state)
            parts.append(out)
    parts.append(state)
    final = np.concatenate([p.reshape(B, -1) for p in parts], axis=1)
    np.testing.assert_allclose(final, z, rtol=0, atol=1e-12)
    assert k == N


@pytest.mark.parametrize("shape,scales,blocks", SHAPES)
def test_channel_schedule_is_constant_over_each_channel_of_every_block(shape, scales, blocks):
    lay = path_schedule(FlowMatchingMultiscaleCNF(shape, hidden=(2,), scales=scales,
                                                  blocks=blocks).layout, "channel")
    for lam, delta in zip(lay.block_start, lay.block_rate):          # eq. 9.4a
        for a in (lam, delta):
            np.testing.assert_array_equal(a, np.broadcast_to(a[:, :1, :1], a.shape))
        assert np.all(delta >= 0) and np.all(lam + delta <= 1 + 1e-12)


def test_constant_speed_schedule_needs_parity_dependent_speeds_on_one_channel_images():
    """eq. 9.4b on (1, 8, 8): the first block's single channel holds pixels leaving at
    different blocks, so its speed 1/e varies with the pixel's row and column parity (what a
    convolution cannot represent); the channel schedule is uniform there."""
    base = FlowMatchingMultiscaleCNF((1, 8, 8), hidden=(2,), scales=3, blocks=1).layout
    e0 = base.block_exit[0][0]
    assert np.all(e0[1::2] == 2) and np.all(e0[0::2, 0::2] == 5) and np.all(e0[0::2, 1::2] == 4)
    const = path_schedule(base, "constant")
    np.testing.assert_allclose(const.block_rate[0], 1.0 / base.block_exit[0])
    chan = path_schedule(base, "channel")
    np.testing.assert_allclose(chan.block_rate[0], 0.5)      # the earliest exit is block 2


@pytest.mark.parametrize("shape,scales", [((2, 4, 4), 2), ((4, 8, 8), 2), ((1, 8, 8), 1)])
def test_schedules_coincide_when_every_channel_leaves_at_one_block(shape, scales):
    """With two scales and an even channel count (or one scale) the one factor-out splits
    whole channels of the first blocks, so e is constant over each channel of every block and
    eq. 9.4a = eq. 9.4b (Δ = 1/e)."""
    base = FlowMatchingMultiscaleCNF(shape, hidden=(2,), scales=scales, blocks=2).layout
    a, b = path_schedule(base, "channel"), path_schedule(base, "constant")
    for k in range(len(base.block_index)):
        np.testing.assert_allclose(a.block_rate[k], 1.0 / base.block_exit[k], rtol=1e-14)
        np.testing.assert_allclose(a.block_start[k], b.block_start[k], rtol=1e-14, atol=1e-15)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), k=st.integers(0, 2), s=st.floats(0.01, 0.99),
       T=st.floats(0.2, 2.0))
def test_target_velocity_is_the_time_derivative_of_the_path_state(seed, k, s, T):
    lay = tiny().layout
    rng = np.random.default_rng(seed)
    y, z = rng.standard_normal((3, 16)), rng.standard_normal((3, 16))
    xk, zk, lam, delta = block_arrays(lay, y, z, k)
    h = 1e-6                                   # τ = s T: d/dτ = (1/T) d/ds
    fd = (path_state(xk, zk, lam, delta, s + h) - path_state(xk, zk, lam, delta, s - h)) \
        / (2 * h * T)
    np.testing.assert_allclose(path_velocity(xk, zk, delta, T), fd, rtol=1e-7, atol=1e-8)


def check_gradient(m, x, seed, rtol=1e-6):
    loss, grads, stats = m.loss_and_grad(x, np.random.default_rng(seed))
    assert set(grads) == set(m.params)
    rng = np.random.default_rng(seed + 7)
    d = {k: rng.standard_normal(v.shape) for k, v in m.params.items()}
    h = 1e-6

    def L(a):
        p = {k: m.params[k] + a * d[k] for k in m.params}
        return m.loss_and_grad(x, np.random.default_rng(seed), params=p)[0]

    fd = (L(h) - L(-h)) / (2 * h)
    an = sum(float(np.sum(grads[k] * d[k])) for k in grads)
    assert abs(fd - an) <= rtol * (1 + abs(fd)), (fd, an)
    return loss, grads, stats


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), B=st.integers(1, 5), groups=st.integers(1, 4),
       blocks=st.integers(1, 2), ot=st.booleans(), T=st.floats(0.3, 1.5),
       layer=st.sampled_from(["concat", "concatsquash"]), rule=st.sampled_from(SCHEDULES))
def test_multiscale_cfm_gradient_matches_central_differences(seed, B, groups, blocks, ot, T,
                                                             layer, rule):
    m = tiny(blocks=blocks, T=T, layer=layer, time_groups=groups, seed=seed % 1000,
             coupling="ot" if ot else "independent", schedule=rule)
    check_gradient(m, images(np.random.default_rng(seed), B), seed)


def test_loss_is_the_block_mean_of_per_row_regressions_on_the_path():
    """eq. 9.6 recomputed row by row from the documented pieces."""
    m = tiny(blocks=2, time_groups=2, coupling="ot")
    x = images(np.random.default_rng(3), 4)
    loss, _, _ = m.loss_and_grad(x, np.random.default_rng(9))
    rng = np.random.default_rng(9)
    yimg, _ = m.preprocess(x, rng)
    y = yimg.reshape(4, -1)
    z, s, _ = m.draw(yimg, rng)
    N, ref = len(m.nets), 0.0
    for k in range(N):
        xk, zk, lam, delta = block_arrays(m.layout, y, z, k)
        for j, (lo, hi) in enumerate([(0, 2), (2, 4)]):
            st_ = path_state(xk[lo:hi], zk[lo:hi], lam, delta, s[k, j])
            f, _, _ = m.nets[k].forward(m.block_params(k), st_, None, s[k, j] * 0.7)
            u = path_velocity(xk[lo:hi], zk[lo:hi], delta, 0.7)
            ref += ((f - u) ** 2).sum() / (N * 2 * 2 * xk[0].size)
    assert abs(loss - ref) <= 1e-12 * abs(ref)


def test_ot_pairs_only_the_last_part_and_leaves_factored_out_noise_as_drawn():
    m = tiny(coupling="ot")
    n_last = m.layout.part_sizes[-1]
    B = 6
    rng = np.random.default_rng(4)
    y = rng.standard_normal((B, 1, 4, 4))
    z, s, _ = m.draw(y, np.random.default_rng(11))
    z_ind, s_ind = tiny(coupling="independent").draw(y, np.random.default_rng(11))[:2]
    np.testing.assert_array_equal(s, s_ind)
    # the factored-out parts: exactly the independent draw, whatever the data
    np.testing.assert_array_equal(z[:, :-n_last], z_ind[:, :-n_last])
    # the last part: a reordering of the same rows, of least total squared distance to the
    # data's last-part coordinates among all B! reorderings
    x_last = y.reshape(B, -1)[:, m.layout.final_index[-n_last:]]
    zl = z_ind[:, -n_last:]
    perm = ot_pairing(x_last, zl)
    np.testing.assert_array_equal(z[:, -n_last:], zl[perm])
    best = min(((x_last - zl[list(p)]) ** 2).sum() for p in itertools.permutations(range(B)))
    assert np.isclose(((x_last - z[:, -n_last:]) ** 2).sum(), best)
    assert not np.array_equal(perm, np.arange(B))      # the test data does get reordered


def test_one_scale_ot_is_plain_ot_cfm_pairing_of_the_whole_vector():
    m = FlowMatchingMultiscaleCNF((1, 4, 4), hidden=(2,), scales=1, blocks=2, coupling="ot",
                                  dtype="float64")
    assert m.layout.part_sizes == [16] and m.layout.part_exit == [2]
    y = np.random.default_rng(5).standard_normal((5, 1, 4, 4))
    z = m.draw(y, np.random.default_rng(2))[0]
    z0 = np.random.default_rng(2).standard_normal((5, 16))
    np.testing.assert_array_equal(z, z0[ot_pairing(y.reshape(5, 16), z0)])


def test_parts_of_any_row_split_add_up_to_the_whole_batch():
    m = tiny(blocks=2, time_groups=3, coupling="ot")
    x = images(np.random.default_rng(6), 5)
    whole = m.loss_and_grad_part(x, np.random.default_rng(8))
    a = m.loss_and_grad_part(x, np.random.default_rng(8), rows=(0, 2))
    b = m.loss_and_grad_part(x, np.random.default_rng(8), rows=(2, 5))
    for key in whole.sums:
        np.testing.assert_allclose(a.sums[key] + b.sums[key], whole.sums[key], rtol=1e-12)
    for key in whole.grads:
        np.testing.assert_allclose(a.grads[key] + b.grads[key], whole.grads[key], rtol=1e-10,
                                   atol=1e-14)


def test_same_seed_gives_same_loss_and_other_seed_another():
    m = tiny()
    x = images(np.random.default_rng(0), 3)
    l1 = m.loss_and_grad(x, np.random.default_rng(1))[0]
    l2 = m.loss_and_grad(x, np.random.default_rng(1))[0]
    l3 = m.loss_and_grad(x, np.random.default_rng(2))[0]
    assert l1 == l2 and l1 != l3


def test_trained_model_is_a_multiscale_cnf_with_bits_per_dim_and_reloads(tmp_path):
    m = tiny(solver="dopri5")
    x = images(np.random.default_rng(0), 4)
    for i in range(3):                         # a few plain gradient steps
        _, g, stats = m.loss_and_grad(x, np.random.default_rng(i))
        m.params = {k: v - 0.05 * g[k] for k, v in m.params.items()}
    assert stats["nfe_forward"] == len(m.nets) == 3
    assert stats["T"] == [0.7, 0.7, 0.7]                 # one end time per block, a list
    bpd, nfe = m.bits_per_dim(x, np.random.default_rng(3), return_nfe=True)
    assert bpd.shape == (4,) and np.all(np.isfinite(bpd)) and nfe > 0
    path = str(tmp_path / "m.h5")
    m.save(path)
    m2 = npflow.load(path)
    assert type(m2) is FlowMatchingMultiscaleCNF and m2.config == m.config
    np.testing.assert_array_equal(m2.bits_per_dim(x, np.random.default_rng(3)), bpd)
    assert m2.loss_and_grad(x, np.random.default_rng(5))[0] == \
        m.loss_and_grad(x, np.random.default_rng(5))[0]


def test_float32_model_returns_float32_gradients():
    m = tiny(dtype="float32")
    _, g, _ = m.loss_and_grad(images(np.random.default_rng(0), 2), np.random.default_rng(1))
    assert all(v.dtype == np.float32 for v in g.values())


@pytest.mark.parametrize("kw,match", [
    (dict(coupling="sinkhorn"), "unknown coupling"),
    (dict(time_groups=0), "time_groups"),
    (dict(train_T=True), "train_T"),
    (dict(kinetic=0.1), "kinetic"),
    (dict(schedule="linear"), "unknown path schedule"),
])
def test_bad_arguments_raise_one_line_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_bad_images_and_end_time_override_raise():
    m = tiny()
    with pytest.raises(ValueError, match="images must have shape"):
        m.loss_and_grad(np.zeros((2, 1, 8, 8)), np.random.default_rng(0))
    with pytest.raises(ValueError, match="no end-time override"):
        m.loss_and_grad(images(np.random.default_rng(0), 2), np.random.default_rng(0), T=0.5)


def test_layout_of_plan_is_a_permutation_with_exit_blocks_in_order():
    from npflow.multiscale import multiscale_plan
    lay = multiscale_layout(multiscale_plan((1, 28, 28), None, 2), (1, 28, 28))
    assert lay.part_sizes == [392, 196, 196] and lay.part_exit == [4, 8, 10]
    assert sorted(lay.final_index.tolist()) == list(range(784))


@pytest.mark.parametrize("method", ["cfm", "otcfm"])
def test_train_mnist_flow_matching_trains_and_reports_test_bpd_and_nfe(tmp_path, method):
    import json
    from example_files import load_example, write_idx
    write_idx(str(tmp_path / "data" / "mnist"), 12, 6)
    mod = load_example("train_mnist")
    save, log = str(tmp_path / "run"), str(tmp_path / "log.jsonl")
    rc = mod.main(["--dims", "4", "--num-blocks", "1", "--scales", "2", "--batch-size", "4",
                   "--log-every", "1", "--warmup", "0", "--test-batch", "6", "--niters", "3",
                   "--data-dir", str(tmp_path / "data"), "--save", save, "--method", method,
                   "--log-json", log, "--no-figures", "--time-groups", "2"])
    assert rc == 0
    lines = [json.loads(v) for v in open(log)]
    assert [r["iteration"] for r in lines[:-1]] == [1, 2, 3]
    final = lines[-1]
    assert final["method"] == method and np.isfinite(final["test_bpd"])
    assert final["test_nfe"] > 0 and final["mean_nfe_forward"] == 3
    m = npflow.load(os.path.join(save, "checkpoint.h5"))
    assert type(m) is FlowMatchingMultiscaleCNF and m.config["solver"] == "dopri5"
    assert m.config["coupling"] == ("ot" if method == "otcfm" else "independent")
