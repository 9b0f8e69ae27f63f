"""Butcher tableaus: consistency conditions (docs/solvers.md eq. 1.3, 1.4) and their checks."""
import dataclasses

import pytest

from npflow import tableau as T

ALL = sorted(T.TABLEAUS.values(), key=lambda t: t.name)
IDS = [t.name for t in ALL]


@pytest.mark.parametrize("tab", ALL, ids=IDS)
def test_row_sums_of_A_equal_c(tab):
    for i in range(tab.stages):
        assert sum(tab.A[i]) == pytest.approx(tab.c[i], abs=1e-15)


@pytest.mark.parametrize("tab", ALL, ids=IDS)
def test_solution_weights_sum_to_one(tab):
    assert sum(tab.b) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("tab", ALL, ids=IDS)
def test_A_is_strictly_lower_triangular(tab):
    for i in range(tab.stages):
        for j in range(i, tab.stages):
            assert tab.A[i][j] == 0.0


@pytest.mark.parametrize("tab", ALL, ids=IDS)
def test_order_conditions_hold_up_to_the_declared_order_and_fail_above(tab):
    res = T.order_condition_residuals(tab.c, [list(r) for r in tab.A], tab.b, tab.order)
    assert max(abs(r) for r in res.values()) < 1e-14
    if tab.order < 5:
        above = T.order_condition_residuals(tab.c, [list(r) for r in tab.A], tab.b,
                                            tab.order + 1)
        assert max(abs(r) for r in above.values()) > 1e-3   # the declared order is sharp


def test_declared_orders():
    assert {t.name: t.order for t in ALL} == {
        "euler": 1, "midpoint": 2, "rk4": 4, "rk38": 4, "bosh3": 3, "dopri5": 5}


def test_dopri5_error_weights_are_shampines_and_the_embedded_solution_has_order_4():
    tab = T.DOPRI5
    shampine = (1951 / 21600, 0, 22642 / 50085, 451 / 720, -12231 / 42400, 649 / 6300, 1 / 60)
    assert tab.b_hat == pytest.approx(shampine, abs=1e-16)
    assert sum(tab.b_err) == pytest.approx(0.0, abs=1e-16)
    res = T.order_condition_residuals(tab.c, [list(r) for r in tab.A], tab.b_hat, 4)
    assert max(abs(r) for r in res.values()) < 1e-14
    res5 = T.order_condition_residuals(tab.c, [list(r) for r in tab.A], tab.b_hat, 5)
    assert max(abs(r) for r in res5.values()) > 1e-5          # b̂ is not 5th order


def test_bosh3_error_weights_are_bogacki_shampines_and_the_embedded_solution_has_order_2():
    tab = T.BOSH3
    assert tab.b == pytest.approx((2 / 9, 1 / 3, 4 / 9, 0.0), abs=1e-16)
    assert tab.b_hat == pytest.approx((7 / 24, 1 / 4, 1 / 3, 1 / 8), abs=1e-16)
    res = T.order_condition_residuals(tab.c, [list(r) for r in tab.A], tab.b_hat, 2)
    assert max(abs(r) for r in res.values()) < 1e-15
    res3 = T.order_condition_residuals(tab.c, [list(r) for r in tab.A], tab.b_hat, 3)
    assert max(abs(r) for r in res3.values()) > 1e-3          # b̂ is not 3rd order


def test_bosh3_is_fsal_and_its_last_stage_only_feeds_the_error():
    tab = T.BOSH3
    assert tab.fsal and tab.c[-1] == 1.0 and tab.A[-1][:3] == tab.b[:3]
    assert tab.b[-1] == 0.0 and tab.n_solution_stages == 3 and tab.adaptive


def test_fixed_grid_and_solver_names_are_derived_from_the_tableaus():
    assert T.solver_names() == list(T.TABLEAUS)
    assert set(T.solver_names(adaptive=True)) == {"bosh3", "dopri5"}
    assert set(T.solver_names(adaptive=False)) == {"euler", "midpoint", "rk4", "rk38"}
    for name, tab in T.TABLEAUS.items():
        assert T.fixed_grid(name) == (tab.b_err is None) == T.fixed_grid(tab)
    with pytest.raises(ValueError, match="unknown method 'rk45'"):
        T.fixed_grid("rk45")


def test_dopri5_is_fsal_and_its_last_stage_only_feeds_the_error():
    tab = T.DOPRI5
    assert tab.fsal and tab.c[-1] == 1.0 and tab.A[-1][:6] == tab.b[:6]
    assert tab.b[-1] == 0.0 and tab.n_solution_stages == 6 and tab.adaptive


def test_rk38_differs_from_classical_rk4():
    assert T.RK38.A != T.RK4.A and T.RK38.b != T.RK4.b


def _broken(**change):
    fields = {f.name: getattr(T.RK4, f.name) for f in dataclasses.fields(T.RK4)}
    fields.update(change)
    return T.Tableau(**fields)


def test_row_sum_violation_is_rejected():
    with pytest.raises(T.TableauError, match="row 1 of A sums"):
        _broken(c=(0.0, 0.4, 0.5, 1.0))


def test_non_explicit_tableau_is_rejected():
    A = [list(r) for r in T.RK4.A]
    A[1] = [0.25, 0.25, 0.0, 0.0]
    with pytest.raises(T.TableauError, match="not explicit"):
        _broken(A=A)


def test_wrong_weights_are_rejected():
    with pytest.raises(T.TableauError, match="Σ b = 1"):
        _broken(b=(0.2, 1 / 3, 1 / 3, 1 / 6))
    with pytest.raises(T.TableauError, match="order condition"):
        _broken(b=(1 / 4, 1 / 4, 1 / 4, 1 / 4))


def test_overstated_order_is_rejected():
    with pytest.raises(T.TableauError, match="order condition"):
        _broken(order=5)


def test_inconsistent_error_weights_are_rejected():
    with pytest.raises(T.TableauError, match="Σ b_err"):
        _broken(b_err=(0.1, 0.0, 0.0, 0.0), error_order=1)
    with pytest.raises(T.TableauError, match="error_order"):
        _broken(b_err=(0.1, -0.1, 0.0, 0.0), error_order=None)


def test_fsal_requires_last_row_equal_to_b():
    with pytest.raises(T.TableauError, match="fsal"):
        _broken(fsal=True)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(T.TableauError, match="shapes disagree"):
        _broken(c=(0.0, 0.5, 0.5))


def test_tableaus_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        T.RK4.order = 3


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="dopri5"):
        T.get_tableau("rk45")
    assert T.get_tableau(T.RK38) is T.RK38
