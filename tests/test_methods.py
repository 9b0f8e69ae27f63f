"""The training-method contract (npflow/methods.py, docs/training.md section 11): the registry,
composition with exclusions, flags, configure and hooks, and a method added in one place."""
from __future__ import annotations

import argparse
import types

import numpy as np
import pytest

from npflow import methods as M
from npflow.training import SteerHook, TrainHook


def _args(**kw):
    base = dict(kinetic=None, jacobian=None, alpha_T=0.1, eps_T=0.1, lr_T=0.01,
                T_grad="analytic", steer_b=None, train_T=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_registry_holds_every_method_in_listing_order():
    assert M.method_names() == ("ffjord", "rnode", "toflow", "steer", "otflow", "cfm", "otcfm")
    assert all(M.METHODS[n].name == n for n in M.METHODS)


def test_compose_chains_the_parts_in_registry_order():
    c = M.compose("rnode+toflow")
    assert [m.name for m in c.parts] == ["rnode", "toflow"]
    assert M.compose({"toflow", "rnode"}).names == {"toflow", "rnode"}
    assert M.compose("ffjord").configure({"kinetic": 0.0}, _args()) == {"kinetic": 0.0}


@pytest.mark.parametrize("text, words", [
    ("cfm+rnode", "combine with no other method"),
    ("otcfm+cfm", "combine with no other method"),
    ("otflow+ffjord", "one method at a time"),
    ("magic", "unknown method 'magic'"),
    ("", "unknown method"),
])
def test_compose_refuses_unknown_names_and_excluded_pairs(text, words):
    with pytest.raises(ValueError, match=words):
        M.compose(text)


def test_compose_refuses_names_outside_allowed():
    with pytest.raises(ValueError, match="unknown method 'otflow'"):
        M.compose("otflow", allowed=("ffjord", "rnode"))


def test_rnode_configure_sets_default_weights_and_flags_win():
    assert M.compose("rnode").configure({}, _args()) == {"kinetic": 0.01, "jacobian": 0.01}
    cfg = M.compose("toflow+rnode").configure({}, _args(kinetic=0.5))
    assert cfg == {"kinetic": 0.5, "jacobian": 0.01, "train_T": True}
    assert M.RNODE.weights(_args(), False) == (0.0, 0.0)


def test_toflow_excludes_joint_T_training():
    with pytest.raises(ValueError, match="exclude each other"):
        M.compose("toflow").configure({}, _args(train_T=True))


def test_steer_checks_its_half_width():
    M.compose("steer").check(_args(), 1.0)                        # b = T0/2
    with pytest.raises(ValueError, match="--steer-b must be in"):
        M.compose("steer").check(_args(steer_b=1.5), 1.0)


def test_hooks_of_a_composition_are_the_methods_hooks():
    model = types.SimpleNamespace(config={"train_T": True, "T": 1.0}, time_names=["T"],
                                  params={"T": np.ones(())})
    hooks = M.compose("steer+toflow+rnode").hooks(model, _args(), steer_b=0.25)
    assert sorted(type(h).__name__ for h in hooks) == ["SteerHook", "TimeOptimizer"]
    steer = next(h for h in hooks if isinstance(h, SteerHook))
    assert steer.b == 0.25
    assert M.compose("toflow").optimizer_skip(model) == {"T"}
    assert M.compose("ffjord").hooks(model, _args()) == []


def _common():
    """examples/common.py, imported as the scripts import it."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    import common
    return common


def test_flags_come_from_the_methods():
    common = _common()
    p = argparse.ArgumentParser()
    common.add_method_arguments(p, ("ffjord", "rnode", "toflow"), t_grad_default="stale")
    a = p.parse_args([])
    assert (a.kinetic, a.lr_T, a.T_grad) == (None, 0.01, "stale")
    assert not hasattr(a, "steer_b")


def test_a_method_added_in_one_place_is_listed_flagged_and_hooked():
    class Tick(TrainHook):
        name = "tick"

    class Demo(M.Method):
        name = "demo"
        help = "a test method"
        excludes = ("steer",)

        def add_arguments(self, parser):
            parser.add_argument("--demo-rate", type=float, default=2.0)

        def configure(self, config, args):
            config["demo_rate"] = args.demo_rate
            return config

        def hooks(self, model, args, comm=None, **given):
            return [Tick()]

    M.register(Demo())
    try:
        common = _common()
        p = argparse.ArgumentParser()
        common.add_method_arguments(p, M.method_names())
        a = p.parse_args(["--method", "rnode+demo", "--demo-rate", "3"])
        c = M.compose(a.method)
        assert c.configure({}, a)["demo_rate"] == 3.0
        assert [type(h) for h in c.hooks(None, a)] == [Tick]
        with pytest.raises(ValueError, match="demo and steer exclude each other|steer and "
                                             "demo exclude each other"):
            M.compose("demo+steer")
        with pytest.raises(ValueError, match="registered already"):
            M.register(Demo())
    finally:
        del M.METHODS["demo"]
