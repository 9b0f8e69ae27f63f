"""Butcher tableaus of explicit Runge-Kutta methods, as frozen data (docs/solvers.md, section 1).

A method is the tableau (c, A, b) of eq. 1.1:

    k_i = F(t + c_i h, Y_i),   Y_i = y + h Σ_{j<i} a_ij k_j,   y_new = y + h Σ_i b_i k_i,

plus, for embedded pairs, the error weights b_err = b − b̂ of eq. 1.2 (err = h Σ_i b_err_i k_i).
The coefficients are written as the papers' rationals, checked exactly (fractions) when the
module is imported and checked in floating point whenever a `Tableau` is built:

- explicit: A strictly lower triangular;
- row sums of A equal c (eq. 1.3);
- the order conditions up to ``order`` for b (Σb = 1, Σb c = 1/2, ..., the 17 conditions of
  order ≤ 5; eq. 1.4) and up to ``error_order`` for b̂ = b − b_err (so Σ b_err = 0);
- FSAL ("first same as last"): the last row of A equals b and c_s = 1, so the last stage of a
  step is the first stage of the next.

Precision policy: coefficients are host floats (float64). The solver multiplies them by the
step h on the host and applies the product to arrays as a weak Python scalar, so the result
keeps the state's dtype (float32 stays float32) with no per-stage casts.

Tableaus: ``euler`` (order 1), ``midpoint`` (2), ``rk4`` (classical, 4), ``rk38`` (Kutta's
3/8 rule, 4: the method torchdiffeq calls "rk4"), ``bosh3`` (Bogacki-Shampine 3(2), FSAL),
``dopri5`` (Dormand-Prince 5(4), FSAL, with Shampine's error weights as torchdiffeq uses them).

The solver contract (docs/solvers.md, section 1): a solver IS its tableau. Everything else is
derived from the Tableau: the stage loop and its exact discrete adjoint (npflow.solvers, the
same code for every tableau), adaptivity (``Tableau.adaptive``: it has error weights), the
step-size controller's exponents (``order``, ``error_order``), the FSAL reuse (``fsal``), the
stages a step needs (``n_solution_stages``), the names the models accept (``TABLEAUS``), which
of them need a fixed mesh (``fixed_grid``), and the examples' ``--solver`` choices
(``solver_names``).

How to add a solver:

1. Write its coefficients as rationals (strings "p/q", ints or Fractions) in a call of
   ``_exact(name, c=..., A=..., b=..., order=p)`` below; for an embedded pair also
   ``b_err = b − b̂`` and ``error_order``, and ``fsal=True`` when the last row of A equals b
   and c_s = 1. ``_exact`` checks eq. 1.3 and the order conditions of eq. 1.4 exactly (orders
   up to 5) at import, and ``Tableau`` checks them again in floating point.
2. Add the tableau to ``TABLEAUS``. ``odeint(method=name)``, every model's ``solver=`` and the
   examples' ``--solver`` choices accept it from then on; nothing else is edited.
3. Test it (tests/test_tableau.py runs the consistency checks over every entry of TABLEAUS;
   tests/test_solvers.py measures the observed order, the log-log slope of the error against
   the step, of every tableau, and the discrete adjoint of every tableau by the dot-product
   test).
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction

import numpy  # host-side only: the tableau is host data, never model data

__all__ = ["Tableau", "TableauError", "EULER", "MIDPOINT", "RK4", "RK38", "BOSH3", "DOPRI5",
           "TABLEAUS", "get_tableau", "fixed_grid", "solver_names", "order_condition_residuals"]


class TableauError(ValueError):
    """A Butcher tableau that is inconsistent (names the failed condition)."""


def _order_conditions(c, A, b):
    """The order conditions Φ(τ) = 1/γ(τ) for the rooted trees τ with ≤ 5 nodes (eq. 1.4).

    Returns a list of (order, description, lhs, rhs); lhs is computed with numpy (host floats)
    or, when the arguments are lists of Fractions, exactly.
    """
    s = len(b)

    def matvec(M, v):
        return [sum((M[i][j] * v[j] for j in range(s)), start=0 * v[0]) for i in range(s)]

    def dot(u, v):
        return sum((u[i] * v[i] for i in range(s)), start=0 * u[0])

    def mul(u, v):
        return [u[i] * v[i] for i in range(s)]

    one = [c[0] * 0 + 1] * s
    c2, c3, c4 = mul(c, c), mul(mul(c, c), c), mul(mul(c, c), mul(c, c))
    Ac = matvec(A, c)
    Ac2, Ac3 = matvec(A, c2), matvec(A, c3)
    AAc = matvec(A, Ac)
    return [
        (1, "Σ b = 1", dot(b, one), Fraction(1)),
        (2, "Σ b c = 1/2", dot(b, c), Fraction(1, 2)),
        (3, "Σ b c² = 1/3", dot(b, c2), Fraction(1, 3)),
        (3, "Σ b A c = 1/6", dot(b, Ac), Fraction(1, 6)),
        (4, "Σ b c³ = 1/4", dot(b, c3), Fraction(1, 4)),
        (4, "Σ b c A c = 1/8", dot(b, mul(c, Ac)), Fraction(1, 8)),
        (4, "Σ b A c² = 1/12", dot(b, Ac2), Fraction(1, 12)),
        (4, "Σ b A A c = 1/24", dot(b, AAc), Fraction(1, 24)),
        (5, "Σ b c⁴ = 1/5", dot(b, c4), Fraction(1, 5)),
        (5, "Σ b c² A c = 1/10", dot(b, mul(c2, Ac)), Fraction(1, 10)),
        (5, "Σ b c A c² = 1/15", dot(b, mul(c, Ac2)), Fraction(1, 15)),
        (5, "Σ b c A A c = 1/30", dot(b, mul(c, AAc)), Fraction(1, 30)),
        (5, "Σ b (A c)² = 1/20", dot(b, mul(Ac, Ac)), Fraction(1, 20)),
        (5, "Σ b A c³ = 1/20", dot(b, Ac3), Fraction(1, 20)),
        (5, "Σ b A (c A c) = 1/40", dot(b, matvec(A, mul(c, Ac))), Fraction(1, 40)),
        (5, "Σ b A A c² = 1/60", dot(b, matvec(A, Ac2)), Fraction(1, 60)),
        (5, "Σ b A A A c = 1/120", dot(b, matvec(A, AAc)), Fraction(1, 120)),
    ]


def order_condition_residuals(c, A, b, order):
    """{condition: lhs − rhs} for the order conditions of order ≤ ``order`` (≤ 5), eq. 1.4."""
    if order > 5:
        raise ValueError(f"order conditions are implemented up to order 5, got {order}")
    return {name: lhs - rhs for (p, name, lhs, rhs) in _order_conditions(c, A, b) if p <= order}


@dataclasses.dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta method (eq. 1.1), validated when built.

    Fields (s = number of stages):
        name       short name ("rk4", "dopri5", ...)
        c          (s,) stage times as fractions of the step
        A          (s, s) strictly lower-triangular stage weights, tuple of row tuples
        b          (s,) solution weights (order ``order``)
        b_err      (s,) error weights b − b̂ of the embedded solution b̂ (eq. 1.2), or None
        order      classical order p of the solution b
        error_order  order of the embedded solution b̂ (None without b_err)
        fsal       the last stage equals the first stage of the next step (A[s−1] = b, c_s = 1)
        reference  where the coefficients come from
    Derived (read-only): ``stages``, ``adaptive``, ``a_rows`` (per stage i the nonzero
    (j, a_ij)), ``a_cols`` (per stage j the nonzero (i, a_ij), i > j), ``n_solution_stages``
    (stages needed for y_new: dopri5's 7th stage only feeds the error estimate).
    """

    name: str
    c: tuple
    A: tuple
    b: tuple
    b_err: tuple | None
    order: int
    error_order: int | None
    fsal: bool
    reference: str
    tol: float = 1e-13

    def __post_init__(self):
        to_t = lambda v: tuple(float(x) for x in v)  # noqa: E731
        object.__setattr__(self, "c", to_t(self.c))
        object.__setattr__(self, "A", tuple(to_t(row) for row in self.A))
        object.__setattr__(self, "b", to_t(self.b))
        if self.b_err is not None:
            object.__setattr__(self, "b_err", to_t(self.b_err))
        self._validate()
        s = len(self.b)
        a_rows = tuple(tuple((j, self.A[i][j]) for j in range(i) if self.A[i][j] != 0.0)
                       for i in range(s))
        a_cols = tuple(tuple((i, self.A[i][j]) for i in range(j + 1, s) if self.A[i][j] != 0.0)
                       for j in range(s))
        needed = [False] * s
        for j in reversed(range(s)):
            needed[j] = self.b[j] != 0.0 or any(needed[i] for i, _ in a_cols[j])
        n_sol = max(j for j in range(s) if needed[j]) + 1
        object.__setattr__(self, "_a_rows", a_rows)
        object.__setattr__(self, "_a_cols", a_cols)
        object.__setattr__(self, "_n_solution_stages", n_sol)

    # -- derived data
    @property
    def stages(self) -> int:
        return len(self.b)

    @property
    def adaptive(self) -> bool:
        return self.b_err is not None

    @property
    def a_rows(self):
        return self._a_rows

    @property
    def a_cols(self):
        return self._a_cols

    @property
    def n_solution_stages(self) -> int:
        return self._n_solution_stages

    @property
    def b_hat(self):
        """The embedded solution's weights b̂ = b − b_err (eq. 1.2)."""
        return None if self.b_err is None else tuple(x - e for x, e in zip(self.b, self.b_err))

    # -- checks
    def _validate(self):
        s = len(self.b)
        name = self.name
        if s == 0:
            raise TableauError(f"tableau {name!r}: no stages")
        if len(self.c) != s or len(self.A) != s or any(len(r) != s for r in self.A):
            raise TableauError(
                f"tableau {name!r}: shapes disagree: c has {len(self.c)} entries, b has {s}, "
                f"A has rows of lengths {[len(r) for r in self.A]} (expected {s}×{s})")
        if self.b_err is not None and len(self.b_err) != s:
            raise TableauError(f"tableau {name!r}: b_err has {len(self.b_err)} entries, "
                               f"expected {s}")
        for i in range(s):
            for j in range(i, s):
                if self.A[i][j] != 0.0:
                    raise TableauError(
                        f"tableau {name!r}: not explicit: A[{i}][{j}] = {self.A[i][j]} "
                        "(A must be strictly lower triangular)")
            rs = sum(self.A[i])
            if abs(rs - self.c[i]) > self.tol:
                raise TableauError(f"tableau {name!r}: row {i} of A sums to {rs!r}, "
                                   f"but c[{i}] = {self.c[i]!r} (eq. 1.3)")
        self._check_order("b", self.b, self.order)
        if self.b_err is not None:
            if self.error_order is None:
                raise TableauError(f"tableau {name!r}: b_err given without error_order")
            if abs(sum(self.b_err)) > self.tol:
                raise TableauError(f"tableau {name!r}: Σ b_err = {sum(self.b_err)!r} ≠ 0 "
                                   "(the embedded solution must be consistent)")
            self._check_order("b̂ = b − b_err", self.b_hat, self.error_order)
        if self.fsal:
            if self.c[-1] != 1.0 or any(abs(a - bb) > self.tol
                                        for a, bb in zip(self.A[-1], self.b)):
                raise TableauError(f"tableau {name!r}: fsal requires c_s = 1 and the last "
                                   "row of A equal to b")

    def _check_order(self, label, weights, order):
        if not 1 <= order <= 5:
            raise TableauError(f"tableau {self.name!r}: order {order} outside 1..5")
        c = numpy.asarray(self.c)
        A = numpy.asarray(self.A)
        w = numpy.asarray(weights)
        for cond, r in order_condition_residuals(list(c), [list(r) for r in A], list(w),
                                                  order).items():
            if abs(float(r)) > 1e-12:
                raise TableauError(f"tableau {self.name!r}: {label} fails the order "
                                   f"condition {cond} (residual {float(r):.3e}; eq. 1.4)")


def _q(v):
    """A rational from "p/q", an int, or a Fraction."""
    return Fraction(v)


def _exact(name, c, A, b, b_err=None, order=1, error_order=None, fsal=False, reference=""):
    """Build from rationals: exact checks with fractions first (eq. 1.3, 1.4), then floats."""
    c = [_q(x) for x in c]
    A = [[_q(x) for x in row] + [Fraction(0)] * (len(c) - len(row)) for row in A]
    b = [_q(x) for x in b]
    b_err = None if b_err is None else [_q(x) for x in b_err]
    for i, row in enumerate(A):
        assert sum(row) == c[i], (name, i)
    for cond, r in order_condition_residuals(c, A, b, order).items():
        assert r == 0, (name, cond, r)
    if b_err is not None:
        assert sum(b_err) == 0, name
        b_hat = [x - e for x, e in zip(b, b_err)]
        for cond, r in order_condition_residuals(c, A, b_hat, error_order).items():
            assert r == 0, (name, "b_hat", cond, r)
    return Tableau(name=name, c=c, A=A, b=b, b_err=b_err, order=order,
                   error_order=error_order, fsal=fsal, reference=reference)


EULER = _exact("euler", c=[0], A=[[]], b=[1], order=1,
               reference="Hairer, Nørsett & Wanner, Solving ODEs I, §II.1 (explicit Euler)")

MIDPOINT = _exact("midpoint", c=[0, "1/2"], A=[[], ["1/2"]], b=[0, 1], order=2,
                  reference="Hairer, Nørsett & Wanner, Solving ODEs I, §II.1 (Runge 1895)")

RK4 = _exact("rk4", c=[0, "1/2", "1/2", 1],
             A=[[], ["1/2"], [0, "1/2"], [0, 0, 1]],
             b=["1/6", "1/3", "1/3", "1/6"], order=4,
             reference="Kutta 1901; Hairer, Nørsett & Wanner, Solving ODEs I, Table II.1.2 "
                       "(classical RK4)")

RK38 = _exact("rk38", c=[0, "1/3", "2/3", 1],
              A=[[], ["1/3"], ["-1/3", 1], [1, -1, 1]],
              b=["1/8", "3/8", "3/8", "1/8"], order=4,
              reference="Kutta 1901, the 3/8 rule; Hairer, Nørsett & Wanner, Table II.1.2 "
                        "(torchdiffeq's 'rk4')")

_DP_B = ["35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84", 0]
_DP_B_HAT = ["1951/21600", 0, "22642/50085", "451/720", "-12231/42400", "649/6300", "1/60"]

DOPRI5 = _exact(
    "dopri5",
    c=[0, "1/5", "3/10", "4/5", "8/9", 1, 1],
    A=[[],
       ["1/5"],
       ["3/40", "9/40"],
       ["44/45", "-56/15", "32/9"],
       ["19372/6561", "-25360/2187", "64448/6561", "-212/729"],
       ["9017/3168", "-355/33", "46732/5247", "49/176", "-5103/18656"],
       _DP_B[:6]],
    b=_DP_B,
    b_err=[Fraction(x) - Fraction(y) for x, y in zip(_DP_B, _DP_B_HAT)],
    order=5, error_order=4, fsal=True,
    reference="Dormand & Prince 1980; error weights b̂ from Shampine 1986 as in torchdiffeq "
              "(docs/reference.md)")

BOSH3 = _exact("bosh3", c=[0, "1/2", "3/4", 1],
               A=[[], ["1/2"], [0, "3/4"], ["2/9", "1/3", "4/9"]],
               b=["2/9", "1/3", "4/9", 0],
               b_err=[Fraction(2, 9) - Fraction(7, 24), Fraction(1, 3) - Fraction(1, 4),
                      Fraction(4, 9) - Fraction(1, 3), Fraction(0) - Fraction(1, 8)],
               order=3, error_order=2, fsal=True,
               reference="Bogacki & Shampine 1989, 'A 3(2) pair of Runge-Kutta formulas' "
                         "(b̂ = 7/24, 1/4, 1/3, 1/8)")

TABLEAUS = {t.name: t for t in (EULER, MIDPOINT, RK4, RK38, BOSH3, DOPRI5)}


def get_tableau(method) -> Tableau:
    """The tableau named ``method`` (or ``method`` itself when it is a Tableau)."""
    if isinstance(method, Tableau):
        return method
    try:
        return TABLEAUS[method]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {method!r}: expected one of {sorted(TABLEAUS)} "
                         "or a npflow.tableau.Tableau") from None


def fixed_grid(method) -> bool:
    """True when ``method`` (a name or a Tableau) has no error weights, so it needs a fixed mesh
    (steps, step_size or grid); False for the adaptive pairs. Unknown names: get_tableau's error."""
    return not get_tableau(method).adaptive


def solver_names(adaptive=None) -> list:
    """The registered tableau names in TABLEAUS order (for ``--solver`` choices): all of them,
    or only the adaptive (``adaptive=True``) or fixed-grid (``adaptive=False``) ones."""
    return [n for n, t in TABLEAUS.items() if adaptive is None or t.adaptive == adaptive]
