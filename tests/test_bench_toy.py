"""Cross-check npflow against PyTorch autograd through torchdiffeq (bench/torch_cnf.py).

Same parameters (copied from npflow's into the torch model), same data, float64: the network,
its Jacobian, the loss of one training step and the gradient of every parameter must agree to
~1e-10, and one Adam step must give the same parameters. npflow's "rk38" is torchdiffeq's
"rk4" (Kutta's 3/8 rule); npflow's classical "rk4" is compared with the hand-written classical
loop of bench/torch_cnf.py. Skipped when torch / torchdiffeq are not installed (the bench extra;
CI does not install it).
"""
import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchdiffeq")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import torch_cnf  # noqa: E402

import npflow  # noqa: E402

pytest.importorskip("npflow.cnf")  # npflow.CNF's own tests report its import errors

RTOL = 1e-10


def _models(solver_np, solver_torch, seed=0, steps=8, T=0.5, hidden=(64, 64, 64)):
    model = npflow.CNF(dim=2, hidden=hidden, layer="concatsquash", activation="tanh", T=T,
                       solver=solver_np, steps=steps, trace="exact", dtype="float64", seed=seed)
    tmodel = torch_cnf.TorchCNF(dim=2, hidden=hidden, T=T, solver=solver_torch, steps=steps,
                                dtype=torch.float64, seed=seed)
    torch_cnf.load_npflow_params(tmodel, model.params)
    return model, tmodel


def _rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def test_parameter_mapping_covers_every_npflow_parameter_once():
    model, tmodel = _models("rk38", "rk38")
    names = torch_cnf.npflow_param_names(tmodel)
    assert sorted(names) == sorted(model.params)
    assert len({id(p) for p in names.values()}) == len(list(tmodel.parameters()))
    with pytest.raises(ValueError, match="no torch counterpart"):
        torch_cnf.load_npflow_params(tmodel, dict(model.params, extra=np.zeros(2)))
    with pytest.raises(ValueError, match="not set"):
        torch_cnf.load_npflow_params(tmodel, {"b0.0.weight": model.params["b0.0.weight"]})


@pytest.mark.parametrize("t", [0.0, 0.3125])
def test_network_and_jacobian_columns_equal_torch_autograd(t):
    """f(z, t) and the tangents J e_i of npflow's ODENet equal torch's network and autograd."""
    model, tmodel = _models("rk38", "rk38", seed=3)
    rng = np.random.default_rng(4)
    z = rng.standard_normal((5, 2))
    eye = np.broadcast_to(np.eye(2)[:, None, :], (2, 5, 2)).copy()     # (K=D, B, D) basis
    f, Jeps, _ = model.nets[0].forward(model.block_params(0), z, eye, t)
    zt = torch.from_numpy(z).requires_grad_(True)
    ft = tmodel.odefunc.net(torch.tensor(t, dtype=torch.float64), zt)
    assert _rel_err(f, ft.detach().numpy()) < RTOL
    for i in range(2):   # tangent i is column i of J: (J e_i)_j = ∂f_j/∂z_i
        rows = [torch.autograd.grad(ft[:, j].sum(), zt, retain_graph=True)[0][:, i]
                for j in range(2)]
        assert _rel_err(Jeps[i], torch.stack(rows, 1).numpy()) < RTOL


@pytest.fixture(autouse=True)
def _one_thread():
    """Correctness checks on tiny batches: one torch and one BLAS thread are fastest on a shared
    machine (OpenBLAS threads spinning on an overloaded machine cost 10-30x on small GEMMs)."""
    import bench_toy

    n, nb = torch.get_num_threads(), bench_toy.get_blas_threads()
    torch.set_num_threads(1)
    bench_toy.set_blas_threads(1)
    yield
    torch.set_num_threads(n)
    if nb is not None:
        bench_toy.set_blas_threads(nb)


@pytest.mark.parametrize("solver_np, solver_torch, steps", [("rk38", "rk38", 8),
                                                            ("rk4", "rk4_classical", 3),
                                                            ("midpoint", "midpoint", 3),
                                                            ("euler", "euler", 3)])
def test_loss_and_gradients_equal_torch_autograd(solver_np, solver_torch, steps):
    """One training step's loss and every parameter's gradient: npflow's discrete adjoint equals
    backprop through torchdiffeq's solve (discretize-then-optimize) to ~1e-10."""
    model, tmodel = _models(solver_np, solver_torch, seed=1, steps=steps)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 2)) * 1.5
    loss, grads, stats = model.loss_and_grad(x, rng)
    tloss = tmodel.loss(torch.from_numpy(x))
    tloss.backward()
    tgrads = torch_cnf.grads_as_npflow(tmodel)
    assert abs(loss - tloss.item()) < RTOL * abs(tloss.item())
    assert sorted(grads) == sorted(tgrads)
    for k in grads:
        assert grads[k].shape == tgrads[k].shape, k
        assert _rel_err(grads[k], tgrads[k]) < RTOL, (k, _rel_err(grads[k], tgrads[k]))
    # the comparison is not vacuous: moving one weight by 1e-4 changes loss and gradients far
    # beyond RTOL
    with torch.no_grad():
        tmodel.odefunc.net.layers[1]._layer.weight[0, 0] += 1e-4
    tmodel.zero_grad()
    tloss2 = tmodel.loss(torch.from_numpy(x))
    tloss2.backward()
    assert abs(tloss2.item() - loss) > 1e2 * RTOL * abs(loss)
    tgrads2 = torch_cnf.grads_as_npflow(tmodel)
    assert max(_rel_err(grads[k], tgrads2[k]) for k in grads) > 1e2 * RTOL


def test_adam_step_equals_torch_adam_with_coupled_weight_decay():
    """npflow.Adam(decoupled=False) after two steps equals torch.optim.Adam (FFJORD's optimiser)."""
    model, tmodel = _models("rk38", "rk38", seed=5, steps=2)
    rng = np.random.default_rng(6)
    opt = npflow.Adam(model.params, lr=1e-3, weight_decay=1e-5, decoupled=False)
    topt = torch_cnf.make_optimizer(tmodel, lr=1e-3, weight_decay=1e-5, kind="adam")
    params = model.params
    for _ in range(2):
        x = rng.standard_normal((8, 2))
        _, grads, _ = model.loss_and_grad(x, rng, params=params)
        params = opt.step(params, grads)
        torch_cnf.train_step(tmodel, topt, torch.from_numpy(x))
    tparams = torch_cnf.npflow_param_names(tmodel)
    for k, v in params.items():
        t = tparams[k].detach().numpy().reshape(v.shape)
        assert np.max(np.abs(v - t)) < 1e-9, k
        assert np.max(np.abs(v - model.params[k])) > 1e-5, k  # the step did move the weights


def test_torchdiffeq_rk4_is_the_three_eighths_rule():
    """torchdiffeq's fixed-step "rk4" integrates y' = y with the 3/8 rule's error, not classical RK4's
    (both are order 4; the one-step results differ at O(h^5))."""
    from torchdiffeq import odeint

    h = 0.5
    y = odeint(lambda t, y: y, torch.tensor([1.0], dtype=torch.float64),
               torch.tensor([0.0, h], dtype=torch.float64), method="rk4",
               options=dict(step_size=h))[-1].item()
    # one step of either rule on y' = y gives the Taylor polynomial of degree 4 in h exactly
    taylor4 = 1 + h + h**2 / 2 + h**3 / 6 + h**4 / 24
    assert abs(y - taylor4) < 1e-15
    # they differ on a time-dependent problem y' = t^4 (quadrature: 3/8 rule vs Simpson)
    y38 = odeint(lambda t, y: t**4 * torch.ones_like(y), torch.tensor([0.0], dtype=torch.float64),
                 torch.tensor([0.0, 1.0], dtype=torch.float64), method="rk4",
                 options=dict(step_size=1.0))[-1].item()
    simpson = (0 + 4 * 0.5**4 + 1) / 6              # classical RK4 on y' = t^4, one step
    three_eighths = (0 + 3 * (1 / 3)**4 + 3 * (2 / 3)**4 + 1) / 8
    assert abs(y38 - three_eighths) < 1e-15 and abs(y38 - simpson) > 1e-3


def test_benchmark_harness_runs_and_writes_json(tmp_path):
    """bench_toy.py end to end on a tiny budget: every runner timed, ratios and NFE reported."""
    import bench_toy

    out = tmp_path / "bench.json"
    rc = bench_toy.main(["--batch", "10", "--iters", "2", "--warmup", "1", "--block", "1",
                         "--runners", "torch:rk38", "npflow:rk38", "--threads", "1",
                         "--no-memory", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    entry = res["batches"]["10"]
    specs = sorted(e["spec"] for e in entry.values())
    assert specs == ["npflow:rk38", "torch:rk38"]
    for e in entry.values():
        assert e["n"] == 2 and e["median"] > 0 and np.isfinite(e["loss_last"])
        assert e["nfe_forward"] == 32
        assert e["ops_per_iter"]["total"] > 0
        if e["spec"].startswith("npflow"):
            assert e["ratio_to_torch"] > 0
