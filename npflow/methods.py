"""Training methods: one unit per method, a registry, and their composition (docs/training.md,
section 11).

A training method is what the command line's ``--method NAME`` selects: FFJORD (maximum
likelihood, the empty method), RNODE, TO-FLOW, STEER, OT-Flow, CFM, OT-CFM. Each is one
``Method`` subclass here that names itself, adds its own flags, says what it cannot be combined
with, sets the model settings it needs, supplies the state terms the CNF integrates for it
and builds its training hooks. ``METHODS`` is the registry (name -> instance, in the order the
examples list them); ``compose("toflow+rnode")`` checks the exclusions and chains the parts, so
a combination is the methods' parts applied in registry order.

Where each method's parts are:
  RNODE    here: its settings λ_K, λ_J, its state terms ``KineticEnergy`` and
           ``JacobianFrobenius`` (rates and their adjoints, docs/cnf.md eq. 3.1-3.2 and
           5.1b-c) and its stats keys; the CNF models (npflow/cnf.py, npflow/multiscale.py)
           ask the registry which terms to carry (``model_settings``, ``state_terms``) and
           integrate them by the generic rules of docs/training.md eq. 11.1-11.4.
  TO-FLOW, STEER  their flags here, their loop steps in npflow/training.py (``TimeOptimizer``,
           ``SteerHook``; section 6), built by their ``hooks``.
  OT-Flow, CFM, OT-CFM  models of their own (npflow/otflow.py, npflow/cfm.py) that a script
           builds when ``Method.model`` names them.
"""
from __future__ import annotations

__all__ = ["Method", "StateTerm", "FFJORD", "RNODE", "KineticEnergy", "JacobianFrobenius",
           "TOFlow", "STEER", "OTFlowMethod", "FlowMatching", "METHODS", "Composite", "compose",
           "method_names", "register", "model_settings", "state_terms", "term_names",
           "sum_features"]


def sum_features(a):
    """Σ over every axis but the batch axis: (B, ...) -> (B,)."""
    return a.reshape(a.shape[0], -1).sum(axis=1)


class StateTerm:
    """One integral a method adds to the CNF's augmented state beside z and ℓ
    (docs/training.md, eq. 11.1-11.4):

        dq/dt = r(f, Jε),   q(0) = 0,   loss += λ · (1/B) Σ_b q_b(T),   q̄(T) = λ/B

    Attributes
        name     str, the state field and the stats / history key (the batch mean of q(T)).
        setting  str, the model setting holding the loss weight λ (one of the method's
                 ``settings``).

    Both rules take the quantities the CNF dynamics computes anyway (shapes for a block on
    events of shape S, batch B, K probes):
        f     (B, *S)     the network's output f(z, t)
        Jeps  (K, B, *S)  the Jacobian-probe products Jε_k = (∂f/∂z) ε_k
        w     float       the trace weight (1 for the exact basis, 1/K for Hutchinson)

        rate(f, Jeps, w) -> (B,)                         r of eq. 11.1
        rate_backward(rbar, f, Jeps, w) -> (fbar, Jeps_bar)
              the adjoint of ``rate`` (eq. 11.4): rbar (B,) -> cotangents like f and Jeps,
              either None where r does not depend on it. Tested against central differences
              and by the dot-product test.
    """

    name = ""
    setting = ""

    def rate(self, f, Jeps, w):
        raise NotImplementedError

    def rate_backward(self, rbar, f, Jeps, w):
        raise NotImplementedError

    def __repr__(self):
        return f"<state term {self.name}>"


class Method:
    """The contract of a training method (docs/training.md, section 11).

    Attributes
        name      str, the ``--method`` spelling (lower case, no '+').
        help      str, one line for ``--help``.
        excludes  tuple of method names it cannot be combined with; "*" means every other
                  method. Exclusion is symmetric: declaring it on either side suffices.
        model     None (the CNF of npflow.cnf) or the name of the model family the method
                  trains ("otflow", "cfm"); methods with a model of their own exclude "*".
        settings  dict, the CNF model settings the method owns (name -> the value that
                  switches it off, also the default); the CNF models accept them as keyword
                  arguments and keep them in their config (``model_settings``).
        terms     tuple of ``StateTerm``, the integrals the method adds to the CNF state.

    Methods (each has a no-op default, so a method overrides only what it changes)
        add_arguments(parser)          add the method's own flags (argparse), with defaults
                                       that leave the model unchanged when the method is off.
        check(args, T0)                ValueError naming the flag, before any work; T0 is the
                                       (initial) end time.
        configure(config, args) -> config
                                       set the model settings the method needs in the dict
                                       ``config`` of model keyword arguments (λ_K, λ_J,
                                       train_T, ...), flags winning over the method's
                                       defaults; returns ``config``.
        check_settings(config)         ValueError for a bad value of its ``settings`` in a
                                       model's config, before the model is built.
        state_terms(config) -> tuple   the terms the model carries under ``config``: all of
                                       ``terms`` when any of ``settings`` is on, else none.
        hooks(model, args, comm=None, **given) -> list of npflow.training.TrainHook
                                       the loop steps of the method (TO-FLOW's T step, STEER's
                                       T draw); ``given`` holds script-computed values
                                       (``steer_b``); ``comm`` the MPI ranks.
        optimizer_skip(model) -> set   parameter names the weight optimizer must leave to
                                       the method's hooks (TO-FLOW's end times).

    How to add a method:
      1. Subclass ``Method``; set ``name``, ``help`` and, if it cannot combine with some
         methods, ``excludes``.
      2. Put its flags in ``add_arguments`` and their checks in ``check``.
      3. A new integral in the CNF state (a regularizer like RNODE's): a ``StateTerm`` with
         its rate and the rate's adjoint (derive both in docs/, eq. 11.1-11.4), listed in
         ``terms``; its loss weight is a model setting named in ``settings`` and checked in
         ``check_settings``; ``configure`` sets it from the flags. The CNF models integrate
         the term, add λ·mean q(T) to the loss, seed its cotangent λ/B, report it in stats
         and the training history, and give ∂L/∂θ and ∂L/∂T, without being edited.
      4. Anything it does between weight steps is a ``TrainHook`` (npflow/training.py)
         returned by ``hooks``.
      5. ``register(YourMethod())``; the examples list it in ``--method``'s choices and help,
         add its flags and build its hooks without being edited (a script restricts the
         names it offers when its model cannot run a method).
      6. Test: its flags, its exclusions, that training with it changes what it should, and
         every rate_backward against central differences and by the dot-product test.
    """

    name = ""
    help = ""
    excludes: tuple = ()
    model = None
    settings: dict = {}
    terms: tuple = ()

    def add_arguments(self, parser) -> None:
        pass

    def check(self, args, T0: float) -> None:
        pass

    def configure(self, config: dict, args) -> dict:
        return config

    def check_settings(self, config: dict) -> None:
        pass

    def state_terms(self, config: dict) -> tuple:
        on = any(config.get(k, off) != off for k, off in self.settings.items())
        return tuple(self.terms) if on else ()

    def hooks(self, model, args, comm=None, **given) -> list:
        return []

    def optimizer_skip(self, model) -> set:
        return set()

    def __repr__(self):
        return f"<method {self.name}>"


class FFJORD(Method):
    """Maximum likelihood through the ODE (FFJORD): the empty method."""

    name = "ffjord"
    help = "maximum likelihood (FFJORD)"


class KineticEnergy(StateTerm):
    """RNODE's kinetic energy E (docs/cnf.md eq. 3.1): r = ‖f‖²/D, adjoint f̄ = (2/D) r̄ f
    (eq. 5.1b); D the number of features of one sample."""

    name = "kinetic"
    setting = "kinetic"

    def rate(self, f, Jeps, w):
        return sum_features(f * f) / f[0].size                                    # eq. 3.1

    def rate_backward(self, rbar, f, Jeps, w):
        bshape = (-1,) + (1,) * (f.ndim - 1)              # (B,) -> broadcast over (B, ...)
        return (2.0 / f[0].size) * rbar.reshape(bshape) * f, None                 # eq. 5.1b


class JacobianFrobenius(StateTerm):
    """RNODE's Jacobian Frobenius norm n (docs/cnf.md eq. 3.2, the estimator of eq. 2.3):
    r = w Σ_k ‖Jε_k‖²/D, adjoint (Jε_k)‾ = (2w/D) r̄ Jε_k (eq. 5.1c)."""

    name = "jacobian"
    setting = "jacobian"

    def rate(self, f, Jeps, w):
        return w * sum_features((Jeps * Jeps).sum(axis=0)) / f[0].size            # eq. 3.2

    def rate_backward(self, rbar, f, Jeps, w):
        bshape = (1, -1) + (1,) * (f.ndim - 1)            # (B,) -> broadcast over (K, B, ...)
        return None, (2.0 * w / f[0].size) * rbar.reshape(bshape) * Jeps          # eq. 5.1c


class RNODE(Method):
    """RNODE (Finlay et al. 2020): λ_K ∫‖f‖²/D dt + λ_J ∫‖∂f/∂z‖²_F/D dt added to the loss
    (docs/cnf.md eq. 3.1-4.1). Its settings ``kinetic`` = λ_K and ``jacobian`` = λ_J; with
    either > 0 the CNF carries both integrals (``KineticEnergy``, ``JacobianFrobenius``) and
    reports them as stats "kinetic" and "jacobian"."""

    name = "rnode"
    help = "adds λ_K ∫‖f‖² and λ_J ∫‖∂f/∂z‖²_F (RNODE)"
    default_weight = 0.01
    settings = {"kinetic": 0.0, "jacobian": 0.0}
    terms = (KineticEnergy(), JacobianFrobenius())

    def add_arguments(self, parser):
        a = parser.add_argument
        a("--kinetic", type=float, default=None,
          help="λ_K of RNODE's ∫‖f‖² (default: 0.01 with rnode, else 0)")
        a("--jacobian", type=float, default=None,
          help="λ_J of RNODE's ∫‖∂f/∂z‖²_F (default: 0.01 with rnode, else 0)")

    @staticmethod
    def weights(args, on: bool) -> tuple:
        """(λ_K, λ_J): the flags when given, else 0.01 each with RNODE on and 0 without."""
        d = RNODE.default_weight if on else 0.0
        k = getattr(args, "kinetic", None)
        j = getattr(args, "jacobian", None)
        return (k if k is not None else d), (j if j is not None else d)

    def configure(self, config, args):
        config["kinetic"], config["jacobian"] = self.weights(args, True)
        return config

    def check_settings(self, config):
        k, j = config["kinetic"], config["jacobian"]
        if not (k >= 0 and j >= 0):
            raise ValueError(f"regularizer weights must be >= 0, got kinetic={k}, "
                             f"jacobian={j}")


class TOFlow(Method):
    """TO-FLOW: the end time T trained by its own Adam after each weight step
    (``TimeOptimizer``, docs/training.md section 6)."""

    name = "toflow"
    help = "end time T trained by its own optimizer after each weight step (TO-FLOW)"

    def add_arguments(self, parser):
        a = parser.add_argument
        a("--alpha-T", type=float, default=0.1, help="TO-FLOW temporal regularization α·|T|")
        a("--eps-T", type=float, default=0.1, help="TO-FLOW clipping ε: T in [t0+ε, 2T0−t0−ε]")
        a("--lr-T", type=float, default=1e-2, help="TO-FLOW learning rate of the T optimizer")
        a("--T-grad", default="analytic", choices=["analytic", "discrete", "stale"],
          help="TO-FLOW ∂L/∂T at the updated weights: 'analytic' (terminal formula), "
               "'discrete' (exact derivative of the discrete loss), or 'stale' = the analytic "
               "value from the weight step (no extra solve)")

    def configure(self, config, args):
        if getattr(args, "train_T", None):
            raise ValueError("--train-T (joint T training) and --method toflow (T by its own "
                             "optimizer) exclude each other; choose one")
        config["train_T"] = True
        return config

    def hooks(self, model, args, comm=None, **given):
        from .training import TimeOptimizer
        return [TimeOptimizer(model, lr=args.lr_T, alpha=args.alpha_T, eps=args.eps_T,
                              kind=args.T_grad, comm=comm)]

    def optimizer_skip(self, model):
        return set(model.time_names)


class STEER(Method):
    """STEER: each training step integrates to T' ~ U[T − b, T + b] (``SteerHook``,
    docs/training.md section 6)."""

    name = "steer"
    help = "each training step integrates to T' ~ U[T − b, T + b] (STEER)"

    def add_arguments(self, parser):
        parser.add_argument("--steer-b", type=float, default=None,
                            help="STEER half-width b (default: T0/2)")

    @staticmethod
    def half_width(args, T0: float) -> float:
        """b: --steer-b, or T0/2."""
        b = getattr(args, "steer_b", None)
        return b if b is not None else 0.5 * T0

    def check(self, args, T0):
        b = self.half_width(args, T0)
        if not 0 < b < T0:
            raise ValueError(f"--steer-b must be in (0, T) = (0, {T0}), got {b}")

    def hooks(self, model, args, comm=None, steer_b=None, **given):
        from .training import SteerHook
        return [SteerHook(steer_b if steer_b is not None else
                          self.half_width(args, float(model.config["T"])))]


class OTFlowMethod(Method):
    """OT-Flow (npflow/otflow.py): a model and loss of its own."""

    name = "otflow"
    help = "OT-Flow: potential flow with transport costs (npflow.otflow)"
    model = "otflow"
    excludes = ("*",)


class FlowMatching(Method):
    """Conditional flow matching (npflow/cfm.py, docs/cfm.md): regression onto path
    velocities, no ODE solve in training; ``coupling`` pairs data and noise."""

    model = "cfm"
    excludes = ("*",)

    def __init__(self, name: str, coupling: str, help: str):
        self.name, self.coupling, self.help = name, coupling, help


METHODS: dict = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (its name must be new); returns it."""
    if not method.name or "+" in method.name or method.name != method.name.lower():
        raise ValueError(f"a method name is lower case without '+', got {method.name!r}")
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered already")
    taken = {"z", "logdet", "nll", "bpd", "T"} | {t.name for m in METHODS.values()
                                                    for t in m.terms}
    clash = [t.name for t in method.terms if t.name in taken or not t.name.isidentifier()]
    if clash:
        raise ValueError(f"method {method.name!r}: state term name(s) {clash} are taken or "
                         "not identifiers; choose new ones")
    METHODS[method.name] = method
    return method


for _m in (FFJORD(), RNODE(), TOFlow(), STEER(), OTFlowMethod(),
           FlowMatching("cfm", "independent", "conditional flow matching (npflow.cfm)"),
           FlowMatching("otcfm", "ot", "flow matching with data and noise paired by exact "
                                       "optimal transport per batch (npflow.cfm)")):
    register(_m)
del _m


def method_names(allowed=None) -> tuple:
    """The registered names in registry order, restricted to ``allowed`` if given."""
    return tuple(n for n in METHODS if allowed is None or n in allowed)


def _cnf_methods():
    """The registered methods that train the CNF (``model`` None): the owners of its settings
    and state terms."""
    return [m for m in METHODS.values() if m.model is None]


def model_settings(given: dict, owner: str = "the model") -> dict:
    """Every CNF method setting (registry order): its value in ``given`` (the model's keyword
    arguments beyond its own), else the method's off value, cast to the off value's type and
    checked by its method (``check_settings``). TypeError naming an unknown argument of
    ``owner``."""
    out = {}
    for m in _cnf_methods():
        for k, off in m.settings.items():
            out[k] = type(off)(given.get(k, off))
    unknown = sorted(set(given) - set(out))
    if unknown:
        raise TypeError(f"{owner} got unknown argument(s) {', '.join(unknown)}: method "
                        f"settings are {', '.join(out) or 'none'}")
    for m in _cnf_methods():
        m.check_settings(out)
    return out


def state_terms(config: dict) -> tuple:
    """The state terms a CNF with model settings ``config`` carries, in registry order
    (docs/training.md eq. 11.1); each term's ``name`` is unique."""
    return tuple(t for m in _cnf_methods() for t in m.state_terms(config))


def term_names() -> tuple:
    """Names of every registered state term: the stats and history keys the methods add."""
    return tuple(t.name for m in _cnf_methods() for t in m.terms)


def _excluded(a: Method, b: Method) -> bool:
    return "*" in a.excludes or b.name in a.excludes


class Composite:
    """Methods applied together (registry order). Same interface as ``Method`` for
    ``configure``, ``check``, ``hooks`` and ``optimizer_skip``; ``names`` is their set."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.names = {m.name for m in self.parts}
        models = {m.model for m in self.parts}
        self.model = models.pop() if len(models) == 1 else None

    def __contains__(self, name):
        return name in self.names

    def check(self, args, T0):
        for m in self.parts:
            m.check(args, T0)

    def configure(self, config, args):
        for m in self.parts:
            config = m.configure(config, args)
        return config

    def hooks(self, model, args, comm=None, **given):
        return [h for m in self.parts for h in m.hooks(model, args, comm=comm, **given)]

    def optimizer_skip(self, model):
        return set().union(*(m.optimizer_skip(model) for m in self.parts))


def compose(text, allowed=None) -> Composite:
    """The methods named by ``text``: a name or a '+' combination such as "toflow+rnode" (or
    an iterable of names), each in ``allowed`` (default: every registered name). ValueError listing the valid names
    for an unknown one, or naming the pair when two of them exclude each other."""
    allowed = method_names() if allowed is None else tuple(allowed)
    if not isinstance(text, str):                  # an iterable of names, e.g. a set
        text = "+".join(sorted(text))
    parts = [m.strip().lower() for m in text.split("+") if m.strip()]
    bad = [m for m in parts if m not in allowed or m not in METHODS]
    if not parts or bad:
        combo = " or a '+' combination such as toflow+rnode" if "toflow" in allowed else ""
        raise ValueError(f"unknown method {text!r}: use one of {', '.join(allowed)}{combo}")
    chosen = [METHODS[n] for n in METHODS if n in parts]
    for i, a in enumerate(chosen):
        for b in chosen[i + 1:]:
            if _excluded(a, b) or _excluded(b, a):
                lone = a if "*" in a.excludes else b if "*" in b.excludes else None
                if lone is not None and lone.model == "cfm":
                    raise ValueError(f"method {text!r}: cfm and otcfm train by flow matching "
                                     "and combine with no other method; give one alone")
                if lone is not None:
                    raise ValueError(f"method {text!r}: {lone.name} combines with no other "
                                     "method; train one method at a time")
                raise ValueError(f"method {text!r}: {a.name} and {b.name} exclude each other")
    return Composite(chosen)
