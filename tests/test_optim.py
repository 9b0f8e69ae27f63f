"""Adam, gradient clipping and learning-rate schedules (docs/training.md, sections 1-3)."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from npflow.optim import (Adam, Chain, Cosine, ReduceOnPlateau, StepDecay, Warmup, adam_update,
                          clip_grad_norm, global_norm)


def test_adam_first_step_moves_each_weight_by_lr_times_sign_of_gradient():
    # eq. 1.3: after one step m̂ = g, v̂ = g², so the step is lr·g/(|g| + eps) ≈ lr·sign(g).
    p = {"w": np.array([1.0, -2.0, 3.0])}
    g = {"w": np.array([0.5, -4.0, 1e-3])}
    opt = Adam(p, lr=0.1, eps=1e-8)
    new = opt.step(p, g)
    expect = p["w"] - 0.1 * g["w"] / (np.abs(g["w"]) + 1e-8)
    np.testing.assert_allclose(new["w"], expect, rtol=1e-12)
    assert p["w"][0] == 1.0  # input not mutated


def test_adam_matches_hand_computed_second_step():
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 0.01
    p0 = np.array([0.3, -0.7])
    g1, g2 = np.array([1.0, 2.0]), np.array([-0.5, 0.25])
    opt = Adam({"w": p0}, lr=lr, betas=(b1, b2), eps=eps)
    p1 = opt.step({"w": p0}, {"w": g1})["w"]
    p2 = opt.step({"w": p1}, {"w": g2})["w"]
    # by hand, eq. 1.1-1.4
    m1, v1 = (1 - b1) * g1, (1 - b2) * g1 ** 2
    q1 = p0 - lr * (m1 / (1 - b1)) / (np.sqrt(v1 / (1 - b2)) + eps)
    m2, v2 = b1 * m1 + (1 - b1) * g2, b2 * v1 + (1 - b2) * g2 ** 2
    q2 = q1 - lr * (m2 / (1 - b1 ** 2)) / (np.sqrt(v2 / (1 - b2 ** 2)) + eps)
    np.testing.assert_allclose(p1, q1, rtol=1e-13)
    np.testing.assert_allclose(p2, q2, rtol=1e-13)
    assert opt.t == 2


def test_bias_correction_makes_constant_gradient_steps_equal_lr():
    # With a constant gradient g, m̂_t = g and v̂_t = g² for every t (eq. 1.3), so each step is
    # lr·sign(g) exactly; without the correction the early steps would be far smaller.
    opt = Adam({"w": np.zeros(3)}, lr=0.05, eps=0.0)
    p = {"w": np.zeros(3)}
    g = {"w": np.array([2.0, -3.0, 0.1])}
    for t in range(1, 6):
        p = opt.step(p, g)
        np.testing.assert_allclose(p["w"], -0.05 * t * np.sign(g["w"]), rtol=1e-12)


def test_decoupled_weight_decay_shrinks_weights_by_lr_times_wd():
    # zero gradient: Adam's step is 0 (m = 0), only eq. 1.5 acts: p <- p(1 − lr·wd)
    p = {"w": np.array([1.0, -2.0])}
    opt = Adam(p, lr=0.1, weight_decay=0.01, decoupled=True)
    new = opt.step(p, {"w": np.zeros(2)})
    np.testing.assert_allclose(new["w"], p["w"] * (1 - 0.1 * 0.01), rtol=1e-14)


def test_l2_weight_decay_is_added_to_the_gradient():
    # coupled (torch.optim.Adam): g <- g + wd·p, so with g = 0 the first step is lr·sign(p)
    p = {"w": np.array([1.0, -2.0])}
    opt = Adam(p, lr=0.1, weight_decay=0.01, decoupled=False, eps=0.0)
    new = opt.step(p, {"w": np.zeros(2)})
    np.testing.assert_allclose(new["w"], p["w"] - 0.1 * np.sign(p["w"]), rtol=1e-14)


def test_adam_keeps_dtype_and_passes_unowned_entries_through():
    p = {"w": np.ones((2, 3), np.float32), "T": np.array(0.5)}
    opt = Adam({"w": p["w"]}, lr=1e-3)
    new = opt.step(p, {"w": np.ones((2, 3), np.float32)})
    assert new["w"].dtype == np.float32
    assert new["T"] is p["T"]


def test_adam_minimises_a_quadratic():
    target = np.array([1.0, -2.0, 0.5])
    p = {"w": np.zeros(3)}
    opt = Adam(p, lr=0.05)
    for _ in range(800):
        p = opt.step(p, {"w": 2 * (p["w"] - target)})
    np.testing.assert_allclose(p["w"], target, atol=1e-3)


def test_adam_errors_name_the_problem():
    with pytest.raises(ValueError, match="non-empty dict"):
        Adam({}, lr=1e-3)
    with pytest.raises(ValueError, match="betas"):
        Adam({"w": np.zeros(2)}, betas=(1.0, 0.9))
    opt = Adam({"w": np.zeros(2)})
    with pytest.raises(KeyError, match="'w'"):
        opt.step({"w": np.zeros(2)}, {})
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        opt.step({"w": np.zeros(2)}, {"w": np.zeros(3)})


@given(st.integers(0, 2**31 - 1), st.integers(1, 5))
def test_state_round_trip_continues_exactly(seed, n_before):
    rng = np.random.default_rng(seed)
    p = {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=4)}
    grads = [{k: rng.normal(size=v.shape) for k, v in p.items()} for _ in range(n_before + 3)]
    sched = Chain(Warmup(3), StepDecay(2, 0.5))
    opt = Adam(p, lr=0.01, weight_decay=1e-3, schedule=sched)
    q = p
    for g in grads[:n_before]:
        q = opt.step(q, g)
    state = opt.state_dict()
    opt2 = Adam({k: np.zeros_like(v) for k, v in p.items()}, lr=123.0,
                schedule=Chain(Warmup(3), StepDecay(2, 0.5)))
    opt2.load_state_dict(state)
    q1, q2 = q, q
    for g in grads[n_before:]:
        q1 = opt.step(q1, g)
        q2 = opt2.step(q2, g)
    for k in p:
        np.testing.assert_array_equal(q1[k], q2[k])


def test_load_state_dict_refuses_other_parameters():
    opt = Adam({"w": np.zeros(2)})
    other = Adam({"w": np.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="owns"):
        Adam({"v": np.zeros(2)}).load_state_dict(opt.state_dict())


def test_adam_update_is_pure():
    p, g, m, v = (np.full(3, x) for x in (1.0, 2.0, 0.1, 0.2))
    copies = [a.copy() for a in (p, g, m, v)]
    adam_update(p, g, m, v, 3, 0.1, 0.9, 0.999, 1e-8, 0.01, True)
    for a, c in zip((p, g, m, v), copies):
        np.testing.assert_array_equal(a, c)


# -- clipping ---------------------------------------------------------------------------------

@given(st.integers(0, 2**31 - 1), st.floats(0.01, 100.0))
def test_clip_grad_norm_bounds_the_norm_and_keeps_the_direction(seed, max_norm):
    rng = np.random.default_rng(seed)
    g = {"a": rng.normal(size=(4, 3)) * 10, "b": rng.normal(size=5)}
    clipped, norm = clip_grad_norm(g, max_norm)
    full = np.sqrt(sum((x ** 2).sum() for x in g.values()))
    assert float(norm) == pytest.approx(full, rel=1e-12)                     # eq. 2.1
    new = float(global_norm(clipped))
    assert new <= max_norm * (1 + 1e-9)
    scale = min(1.0, max_norm / (full + 1e-6))                              # eq. 2.2
    for k in g:
        np.testing.assert_allclose(clipped[k], g[k] * scale, rtol=1e-12)


def test_clip_grad_norm_leaves_small_gradients_and_unlisted_keys_alone():
    g = {"a": np.array([0.3, 0.4]), "T": np.array(100.0)}
    clipped, norm = clip_grad_norm(g, 1.0, keys=["a"])
    assert float(norm) == pytest.approx(0.5)
    np.testing.assert_array_equal(clipped["a"], g["a"])
    assert clipped["T"] is g["T"]
    _, norm = clip_grad_norm(g, None)
    assert float(norm) == pytest.approx(math.sqrt(0.25 + 1e4))
    with pytest.raises(ValueError, match="positive"):
        clip_grad_norm(g, 0.0)


def test_clip_grad_norm_propagates_nan_to_the_norm():
    _, norm = clip_grad_norm({"a": np.array([1.0, np.nan])}, 1.0)
    assert not np.isfinite(float(norm))


# -- schedules --------------------------------------------------------------------------------

def test_warmup_is_linear_then_constant():
    s = Warmup(4)
    assert [s.factor(i) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    opt = Adam({"w": np.zeros(1)}, lr=0.1, schedule=s)
    assert opt.current_lr() == pytest.approx(0.025)


def test_step_decay_halves_every_period():
    s = StepDecay(every=100)
    assert [s.factor(i) for i in (0, 99, 100, 199, 200, 450)] == [1, 1, 0.5, 0.5, 0.25, 0.0625]


def test_reduce_on_plateau_drops_after_patience_stale_losses():
    s = ReduceOnPlateau(gamma=0.5, patience=2, threshold=0.0)
    assert not s.update(3.0)
    assert not s.update(2.0)      # improved
    assert not s.update(2.5)      # stale 1
    assert not s.update(2.0)      # stale 2 (not better than 2.0)
    assert s.update(2.1)          # stale 3 > patience: drop
    assert s.factor(0) == 0.5
    assert not s.update(1.0)
    state = s.state_dict()
    s2 = ReduceOnPlateau(gamma=0.5, patience=2, threshold=0.0)
    s2.load_state_dict(state)
    assert (s2.best, s2.stale, s2.scale) == (1.0, 0, 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        s.update(float("nan"))


def test_cosine_falls_from_one_to_its_floor_along_a_half_cosine():
    s = Cosine(total=100, floor=0.1)
    f = [s.factor(i) for i in (0, 50, 100, 150)]
    assert f == pytest.approx([1.0, 0.55, 0.1, 0.1])
    assert s.factor(25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert all(s.factor(i) >= s.factor(i + 1) for i in range(120))
    with pytest.raises(ValueError, match="Cosine needs"):
        Cosine(0)


def test_chain_multiplies_factors():
    s = Chain(Warmup(2), StepDecay(3, 0.1))
    assert [s.factor(i) for i in range(4)] == pytest.approx([0.5, 1.0, 1.0, 0.1])


# --------------------------------------------------------------------------------------------
# moving average of the parameters (docs/training.md eq. 1.6)

def test_ema_is_gamma_weighted_recursion_of_the_updated_parameters():
    # eq. 1.6 by hand: p̄_0 = p_0, p̄_t = γ p̄_{t−1} + (1 − γ) p_t over three Adam steps
    rng = np.random.default_rng(5)
    p = {"w": rng.normal(size=(3, 2)), "T": np.array(0.5)}
    gamma = 0.7
    opt = Adam({"w": p["w"]}, lr=0.1, ema_decay=gamma)
    bar = p["w"].copy()
    q = p
    for _ in range(3):
        q = opt.step(q, {"w": rng.normal(size=(3, 2))})
        bar = gamma * bar + (1 - gamma) * q["w"]
    avg = opt.averaged(q)
    np.testing.assert_allclose(avg["w"], bar, rtol=1e-14, atol=0)
    assert avg["T"] is q["T"]                                 # not owned: passed through
    assert not np.array_equal(avg["w"], q["w"])               # the average lags the iterate
    # closed form of the recursion: p̄_3 = γ³ p_0 + (1 − γ) Σ_j γ^{3−j} p_j
    assert opt.t == 3


def test_ema_keeps_dtype_does_not_alias_and_leaves_the_steps_unchanged():
    p = {"w": np.ones(4, dtype=np.float32)}
    g = {"w": np.full(4, 0.3, dtype=np.float32)}
    plain, avg = Adam(p, lr=0.1), Adam(p, lr=0.1, ema_decay=0.9)
    a, b = plain.step(p, g), avg.step(p, g)
    np.testing.assert_array_equal(a["w"], b["w"])            # the average never feeds back
    out = avg.averaged(b)
    assert out["w"].dtype == np.float32
    out["w"][:] = 7.0                                          # a copy: the state is untouched
    assert not np.any(avg.ema["w"] == 7.0) and np.all(p["w"] == 1.0)


@given(st.integers(0, 2**31 - 1), st.integers(1, 5))
def test_ema_state_round_trip_through_a_checkpoint_continues_exactly(tmp_path_factory, seed,
                                                                     n_before):
    import npflow.checkpoint as ck

    class Holder:                                   # the smallest thing checkpoint.save takes
        config = {}

        def __init__(self, params):
            self.params = params

    rng = np.random.default_rng(seed)
    p = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4)}
    grads = [{k: rng.normal(size=v.shape).astype(v.dtype) for k, v in p.items()}
             for _ in range(n_before + 3)]
    opt = Adam(p, lr=0.01, schedule=StepDecay(2, 0.5), ema_decay=0.95)
    q = p
    for g in grads[:n_before]:
        q = opt.step(q, g)
    path = tmp_path_factory.mktemp("ema") / "c.h5"
    ck.save(path, Holder(q), optimizer=opt)
    state = ck.load_training_state(path)["optimizer"]
    opt2 = Adam({k: np.zeros_like(v) for k, v in p.items()}, schedule=StepDecay(2, 0.5),
                ema_decay=0.5)                      # the saved γ wins, like the saved lr
    opt2.load_state_dict(state)
    assert opt2.ema_decay == 0.95
    q1, q2 = q, q
    for g in grads[n_before:]:
        q1 = opt.step(q1, g)
        q2 = opt2.step(q2, g)
    for k in p:
        np.testing.assert_array_equal(q1[k], q2[k])
        np.testing.assert_array_equal(opt.averaged(q1)[k], opt2.averaged(q2)[k])
        assert opt2.ema[k].dtype == p[k].dtype


def test_ema_errors_name_the_problem():
    p = {"w": np.zeros(2)}
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="ema_decay must be in"):
            Adam(p, ema_decay=bad)
    with pytest.raises(ValueError, match="ema_decay > 0"):
        Adam(p).averaged(p)
    with pytest.raises(ValueError, match="has parameter average"):
        Adam(p).load_state_dict(Adam(p, ema_decay=0.9).state_dict())
    with pytest.raises(ValueError, match="has no parameter average"):
        Adam(p, ema_decay=0.9).load_state_dict(Adam(p).state_dict())
