"""The scaling-law fitter (fwl_scale/plan/fits.py) against data generated from known laws."""
import numpy as np
import pytest

from fwl_scale.plan.fits import (Chinchilla, FlopsLaw, PowerLaw, fit_chinchilla, fit_flops, fit_power_law,
                                 frontier)


def test_power_law_recovers_known_parameters():
    true = PowerLaw(E=2.1, A=60.0, alpha=0.31, huber=0.0)
    n = np.logspace(5, 9, 9)
    got = fit_power_law(n, true(n))
    assert got.E == pytest.approx(true.E, rel=1e-3)
    assert got.A == pytest.approx(true.A, rel=1e-2)
    assert got.alpha == pytest.approx(true.alpha, rel=1e-3)


def test_chinchilla_recovers_its_published_parameters():
    # Hoffmann et al. (2022), eq. 10: E = 1.69, A = 406.4, B = 410.7, α = 0.34, β = 0.28.
    true = Chinchilla(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28, huber=0.0)
    n, d = np.meshgrid(np.logspace(6, 9, 5), np.logspace(8, 11, 5))
    n, d = n.ravel(), d.ravel()
    got = fit_chinchilla(n, d, true(n, d))
    for field in ("E", "alpha", "beta"):
        assert getattr(got, field) == pytest.approx(getattr(true, field), rel=1e-2), field
    for field in ("A", "B"):
        assert getattr(got, field) == pytest.approx(getattr(true, field), rel=5e-2), field
    # With 0.3% multiplicative noise the exponents stay within 10%.
    rng = np.random.default_rng(0)
    noisy = fit_chinchilla(n, d, true(n, d) * np.exp(rng.normal(0, 3e-3, n.shape)))
    assert noisy.alpha == pytest.approx(0.34, rel=0.1) and noisy.beta == pytest.approx(0.28, rel=0.1)


def test_frontier_matches_the_closed_form_for_flops_6n():
    """With F(N) = 6N, Chinchilla's closed form: N_opt = G (C/6)^(β/(α+β)), G = (αA/(βB))^(1/(α+β))."""
    law = Chinchilla(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28, huber=0.0)
    compute = np.array([1e18, 1e21, 1e24])
    got = frontier(law, FlopsLaw(k=6.0, gamma=1.0), compute)
    a, b = law.alpha, law.beta
    G = (a * law.A / (b * law.B)) ** (1 / (a + b))
    want = G * (compute / 6) ** (b / (a + b))
    np.testing.assert_allclose(got["n_opt"], want, rtol=0.01)  # the grid's spacing is 0.25%
    np.testing.assert_allclose(got["d_opt"] * 6 * got["n_opt"], compute, rtol=1e-12)


def test_flops_law_is_exact_on_a_power():
    n = np.array([1e5, 1e6, 1e7])
    law = fit_flops(n, 7.0 * n ** 1.1)
    assert law.k == pytest.approx(7.0, rel=1e-9) and law.gamma == pytest.approx(1.1, rel=1e-12)


def test_too_few_points_or_bad_values_are_refused():
    with pytest.raises(ValueError, match="needs >= 3 distinct sizes"):
        fit_power_law([1e5, 1e6], [3.0, 2.9])
    with pytest.raises(ValueError, match="L must be finite and positive"):
        fit_power_law([1e5, 1e6, 1e7], [3.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match=">= 2 token budgets"):
        fit_chinchilla([1e5, 1e6, 1e7, 1e8, 1e9], [1e9] * 5, [3, 2.9, 2.8, 2.7, 2.6])
