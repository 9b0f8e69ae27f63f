"""Toy 2-D densities (docs/data.md, section 1) and validate_data (section 5)."""
import math

import numpy as np
import pytest

from npflow.data import TOY_NAMES, toy, toy_log_density, validate_data

G8_CENTRES = 4.0 * np.stack([np.cos(np.arange(8) * math.pi / 4),
                             np.sin(np.arange(8) * math.pi / 4)], axis=1) / 1.414


def test_toy_names_are_the_eight_of_design_section_7():
    assert set(TOY_NAMES) == {"swissroll", "circles", "rings", "moons", "8gaussians",
                              "pinwheel", "2spirals", "checkerboard"}


@pytest.mark.parametrize("name", TOY_NAMES)
@pytest.mark.parametrize("n", [1, 2, 7, 101])
def test_toy_shape_dtype_and_finiteness(name, n):
    x = toy(name, n, np.random.default_rng(n))
    assert x.shape == (n, 2) and x.dtype == np.float64
    assert np.isfinite(x).all()


@pytest.mark.parametrize("name", TOY_NAMES)
def test_same_generator_state_gives_same_samples(name):
    a = toy(name, 500, np.random.default_rng(123))
    b = toy(name, 500, np.random.default_rng(123))
    c = toy(name, 500, np.random.default_rng(124))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_draws_only_from_the_given_generator(name):
    np.random.seed(0)
    a = toy(name, 200, np.random.default_rng(5))
    np.random.seed(1)  # the legacy global state must not matter
    b = toy(name, 200, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["circles", "rings", "moons", "pinwheel", "2spirals"])
def test_block_built_sets_are_shuffled(name):
    # a prefix must look like the whole: both halves of the sample have similar means
    x = toy(name, 4000, np.random.default_rng(0))
    np.testing.assert_allclose(x[:2000].mean(0), x[2000:].mean(0), atol=0.25)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: swissroll, circles"):
        toy("spiral", 10, np.random.default_rng(0))


@pytest.mark.parametrize("n", [0, -3, 2.5, "10", True, None])
def test_n_must_be_a_positive_int(n):
    with pytest.raises(ValueError, match="positive int"):
        toy("moons", n, np.random.default_rng(0))


def test_rng_must_be_a_generator():
    with pytest.raises(ValueError, match="numpy.random.Generator"):
        toy("moons", 10, np.random.RandomState(0))


def test_checkerboard_samples_lie_on_the_support_of_area_32():
    x = toy("checkerboard", 20000, np.random.default_rng(1))
    assert np.all(toy_log_density("checkerboard", x) == -math.log(32.0))
    assert x.min() >= -4.0 and x.max() < 4.0
    # each of the 32 occupied 2x2 cells holds about 1/32 of the mass
    cells = np.floor(x / 2.0).astype(int) + 2
    counts = np.bincount(cells[:, 0] * 4 + cells[:, 1], minlength=16)
    occupied = counts[counts > 0]
    assert occupied.size == 8  # 8 of 16 cells of size 2x2 (area 4 each: 8 * 4 = 32)
    np.testing.assert_allclose(occupied / x.shape[0], 1 / 8, atol=0.012)


def test_8gaussians_points_sit_around_the_eight_centres():
    x = toy("8gaussians", 20000, np.random.default_rng(2))
    d = np.linalg.norm(x[:, None, :] - G8_CENTRES[None], axis=2)
    k = d.argmin(axis=1)
    np.testing.assert_allclose(np.bincount(k, minlength=8) / x.shape[0], 1 / 8, atol=0.01)
    resid = x - G8_CENTRES[k]
    np.testing.assert_allclose(resid.std(axis=0), 0.5 / 1.414, rtol=0.03)
    np.testing.assert_allclose(resid.mean(axis=0), 0.0, atol=0.01)


def test_rings_radii_are_3_225_15_075():
    x = toy("rings", 8000, np.random.default_rng(3))
    r = np.linalg.norm(x, axis=1)
    radii = np.array([3.0, 2.25, 1.5, 0.75])
    nearest = np.abs(r[:, None] - radii[None]).argmin(axis=1)
    np.testing.assert_allclose(np.bincount(nearest, minlength=4) / 8000, 0.25, atol=0.01)
    for j, rad in enumerate(radii):
        np.testing.assert_allclose(np.median(r[nearest == j]), rad, atol=0.03)


def test_circles_radii_are_3_and_15():
    r = np.linalg.norm(toy("circles", 8000, np.random.default_rng(4)), axis=1)
    outer = r > 2.25
    np.testing.assert_allclose(outer.mean(), 0.5, atol=0.01)
    np.testing.assert_allclose(np.median(r[outer]), 3.0, atol=0.03)
    np.testing.assert_allclose(np.median(r[~outer]), 1.5, atol=0.03)


def test_moons_mean_matches_the_construction():
    # E[(cos θ, sin θ)] = (0, 2/π) and E[(1 − cos θ, 0.5 − sin θ)] = (1, 0.5 − 2/π) for θ
    # uniform on [0, π]; the set is their average, times 2, shifted by (−1, −0.2)
    x = toy("moons", 20000, np.random.default_rng(5))
    np.testing.assert_allclose(x.mean(axis=0), [0.0, 0.3], atol=0.02)


def test_pinwheel_radius_and_2spirals_symmetry():
    p = toy("pinwheel", 20000, np.random.default_rng(6))
    np.testing.assert_allclose(np.median(np.linalg.norm(p, axis=1)), 2.0, atol=0.05)
    s = toy("2spirals", 20000, np.random.default_rng(7))
    np.testing.assert_allclose(s.mean(axis=0), 0.0, atol=0.03)  # the set is point-symmetric
    assert np.abs(s).max() < 3.0 * math.pi / 3.0 + 1.0


def test_swissroll_stays_in_its_band():
    x = toy("swissroll", 20000, np.random.default_rng(8))
    r = np.linalg.norm(x, axis=1)
    # noise-free radius t/5 with t in [1.5π, 4.5π]; noise N(0, 1)/5 per coordinate
    assert 0.6 < np.quantile(r, 0.01) and np.quantile(r, 0.99) < 3.1


@pytest.mark.parametrize("name,lo,hi,h", [("8gaussians", -5.0, 5.0, 0.02),
                                          ("checkerboard", -5.0, 5.0, 0.05)])
def test_toy_log_density_integrates_to_one(name, lo, hi, h):
    g = np.arange(lo + h / 2, hi, h)  # cell midpoints
    xx, yy = np.meshgrid(g, g, indexing="ij")
    p = np.exp(toy_log_density(name, np.stack([xx.ravel(), yy.ravel()], axis=1)))
    np.testing.assert_allclose(p.sum() * h * h, 1.0, rtol=1e-3)


def test_8gaussians_entropy_matches_reference_value():
    # docs/reference.md, section 1: entropy 2.8318 ± 0.0003 nats (Monte Carlo with the exact density)
    x = toy("8gaussians", 100000, np.random.default_rng(9))
    lp = toy_log_density("8gaussians", x)
    se = lp.std() / math.sqrt(lp.size)
    assert abs(-lp.mean() - 2.8318) < 4 * se + 1e-3


def test_8gaussians_log_density_peaks_at_the_centres():
    # at a centre: its own component plus the tails of the others, summed directly
    lp = toy_log_density("8gaussians", G8_CENTRES)
    s2 = (0.5 / 1.414) ** 2
    for j in range(8):
        d2 = np.sum((G8_CENTRES - G8_CENTRES[j]) ** 2, axis=1)
        expected = math.log(sum(math.exp(-v / (2 * s2)) for v in d2) / (8 * 2 * math.pi * s2))
        assert lp[j] == pytest.approx(expected, rel=1e-12)


def test_toy_log_density_refuses_other_names_and_shapes():
    with pytest.raises(ValueError, match="no closed-form"):
        toy_log_density("moons", np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        toy_log_density("8gaussians", np.zeros((3, 3)))


# --- validate_data (docs/data.md, section 5) ---

def test_validate_data_returns_good_data_unchanged():
    x = np.random.default_rng(0).standard_normal((5, 3))
    assert validate_data(x, dim=3) is x
    img = np.zeros((2, 1, 4, 4), dtype=np.uint8)
    assert validate_data(img, image_shape=(1, 4, 4)) is img


def test_validate_data_counts_nan_and_inf_and_names_first_bad_row():
    x = np.zeros((10, 2))
    x[3, 1] = np.nan
    x[7, 0] = np.inf
    x[7, 1] = np.nan
    with pytest.raises(ValueError, match=r"training data contains 2 NaN and 1 Inf value\(s\) in "
                                         r"2 of 10 samples \(first bad sample: row 3\)"):
        validate_data(x, name="training data")


def test_validate_data_wrong_dimension():
    with pytest.raises(ValueError, match="feature dimension 3 but the model expects 2"):
        validate_data(np.zeros((4, 3)), dim=2)


@pytest.mark.parametrize("shape,hint", [((5,), "single sample"), ((2, 3, 4), "images")])
def test_validate_data_wrong_rank(shape, hint):
    with pytest.raises(ValueError, match=hint):
        validate_data(np.zeros(shape))


def test_validate_data_wrong_image_shape_empty_and_dtype():
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        validate_data(np.zeros((2, 28, 28)), image_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="no samples"):
        validate_data(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="real numbers"):
        validate_data(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="must be an array"):
        validate_data([[1.0, 2.0]])
