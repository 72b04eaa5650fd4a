"""Matrix-free estimates (softrank.stochastic, approximation='matrix_free') against dense float64
references: each converges to the dense value as probes / Lanczos steps / CG iterations grow,
its error bar covers its error, one Lanczos run serves a whole λ grid, and CG-TIC equals the
Gram/Woodbury TIC.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from torch import nn

from softrank import ModelData, curvature, measures
from softrank.curvature import GramCurvature, MatrixFreeCurvature
from softrank.curvature.matfree import GGNOperator, conjugate_gradients, minres
from softrank.stochastic import (hutchinson, hutchpp, lanczos, lanczos_eigenvalues,
                                 logdet_function, slq, soft_rank_function, spectral_density)
from softrank.stochastic.lanczos import _gauss, _radau

from .cases import build_case
from .reference import Reference, assert_rel, logdet_dim, soft_rank
from .reference import tic as ref_tic

LAM = 0.05
CASES = ["mlp-ce", "cnn-mse3", "bn-poisson", "mlp-huber"]  # Kronecker, conv, generic layers
PHIS = {"soft_rank": (soft_rank_function, soft_rank), "logdet": (logdet_function, logdet_dim)}


def one_batch(store, case_id):
    """The case with all samples in one batch (fast products; streaming is tested apart)."""
    case = store.case(case_id)
    return store._get(("md1", case_id), lambda: case.model_data(batch_size=len(case.X)))


def psd_matrix(p=40, decay=0.8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    return Q @ torch.diag(decay ** torch.arange(p, dtype=torch.float64) * 5) @ Q.T


def dense_phi_trace(M, phi, lam):
    s = torch.linalg.eigvalsh(M)
    return float(phi(s, lam).sum())


# ------------------------------------------------------------------ estimators on plain matrices
def test_hutchpp_error_shrinks_and_is_exact_at_full_budget():
    M = psd_matrix()
    exact = float(M.trace())
    errors = []
    for budget in (6, 30, 120):
        errs = [abs(hutchpp(lambda X: M @ X, 40, budget, random_state=s).value - exact)
                for s in range(10)]
        errors.append(np.mean(errs))
    assert errors[0] > errors[1] > errors[2] == pytest.approx(0, abs=1e-10)


def test_hutchpp_beats_hutchinson_and_stderr_tracks_spread():
    M = psd_matrix(decay=0.7)
    exact = float(M.trace())
    hpp = [hutchpp(lambda X: M @ X, 40, 30, random_state=s) for s in range(40)]
    hut = [hutchinson(lambda X: M @ X, 40, 30, random_state=s) for s in range(40)]
    err_hpp = np.sqrt(np.mean([(e.value - exact) ** 2 for e in hpp]))
    err_hut = np.sqrt(np.mean([(e.value - exact) ** 2 for e in hut]))
    assert err_hpp < err_hut / 3
    assert 0.5 < np.mean([e.stderr for e in hut]) / err_hut < 2.0


def test_squared_hutchpp_is_frobenius():
    M = psd_matrix(decay=0.9)
    est = hutchpp(lambda X: M @ X, 40, 120, square=True, random_state=0)
    assert est.value == pytest.approx(float((M * M).sum()), rel=1e-10)


@pytest.mark.parametrize("name", PHIS)
def test_lanczos_quadrature_brackets_and_converges(name):
    """For one probe: Radau ≤ zᵀφ(M)z ≤ Gauss at every step, the bracket shrinks to 0."""
    phi = PHIS[name][0]
    M = psd_matrix(p=30, decay=0.6)
    z = torch.randn(30, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s, U = torch.linalg.eigh(M)
    exact = float(((U.T @ z[:, 0]) ** 2 * phi(s, LAM)).sum())
    widths = []
    for steps in (2, 4, 8, 30):
        run = lanczos(lambda X: M @ X, z, steps)
        T = run.tridiagonal(0)
        t, w = _gauss(T)
        gauss = float((w * phi(t, LAM)).sum()) * float(run.start_norms[0]) ** 2
        if run.exhausted(0):
            radau = gauss
        else:
            tr, wr = _radau(T, float(run.beta[0, -1]), -1e-12)
            radau = float((wr * phi(tr, LAM)).sum()) * float(run.start_norms[0]) ** 2
        assert radau - 1e-9 <= exact <= gauss + 1e-9
        widths.append(gauss - radau)
    assert widths[0] > widths[1] > widths[2] and widths[3] == pytest.approx(0, abs=1e-9)


def test_lanczos_reorthogonalized_basis_spans_the_space():
    M = psd_matrix(p=25)
    run = lanczos(lambda X: M @ X, torch.ones(25, 2, dtype=torch.float64), 25)
    for c in range(2):  # T has M's eigenvalues once the Krylov space is full
        assert_rel(torch.linalg.eigvalsh(run.tridiagonal(c)), torch.linalg.eigvalsh(M),
                   tol=1e-8, what="Ritz values")


def test_lanczos_eigenvalues_error_bound_holds_and_shrinks():
    M = psd_matrix(p=60, decay=0.9)
    spectrum = torch.linalg.eigvalsh(M).flip(0).numpy()
    errors = []
    for steps in (3, 8, 20):
        est = lanczos_eigenvalues(lambda X: M @ X, 60, k=3, steps=steps, random_state=0)
        nearest = np.abs(est.values[:, None] - spectrum[None, :]).min(1)
        assert (nearest <= est.diagnostics["ritz_residuals"] + 1e-12).all()  # some σ within ρ
        errors.append(abs(est.values[0] - spectrum[0]))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-8 * spectrum[0]
    assert est.converged
    assert (np.abs(est.values - spectrum[:3]) <= est.stderrs + 1e-12).all()


def test_spectral_density_is_a_density_of_the_spectrum():
    M = psd_matrix(p=40, decay=0.9)
    q = slq(lambda X: M @ X, 40, n_probes=50, steps=40, random_state=0)
    grid = np.linspace(-1, 6, 2001)
    rho = spectral_density(q, grid, width=0.05)
    assert np.trapezoid(rho, grid) == pytest.approx(1.0, abs=1e-3)
    mean = np.trapezoid(grid * rho, grid)
    assert mean == pytest.approx(float(M.trace()) / 40, rel=0.1)


def test_minres_solves_indefinite_and_cg_flags_it():
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))
    M = Q @ torch.diag(torch.linspace(-1, 2, 30, dtype=torch.float64)) @ Q.T
    R = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    shift = torch.full((30,), 0.013, dtype=torch.float64)  # M + shift is indefinite
    res = minres(lambda X: M @ X, R, shift=shift, tol=1e-10, maxiter=200)
    assert res.converged.all()
    assert_rel(res.x, torch.linalg.solve(M + torch.diag(shift), R), tol=1e-8, what="minres")
    assert conjugate_gradients(lambda X: M @ X, R, shift=shift).indefinite.any()


# ------------------------------------------------------------------ products on the models
@pytest.mark.parametrize("matrix", ["fisher", "gsm", "hessian"])
@pytest.mark.parametrize("case_id", CASES)
def test_products_equal_dense(store, case_id, matrix):
    """Streaming over batches of 3 (every cross-batch sum), several columns at once."""
    ref = store.reference(case_id)
    M = curvature(store.model_data(case_id), matrix, "matrix_free")
    V = torch.randn(sum(ref.sizes), 3, dtype=torch.float64)
    assert_rel(M.matvec(V), ref.matrix(matrix) @ V, what="M V")
    assert_rel(M.matvec(V[:, 0]), ref.matrix(matrix) @ V[:, 0], what="M v")
    assert M.n_matvec == 4


def test_sampled_fisher_and_centered_c_products_equal_dense(store):
    md = store.model_data("mlp-ce")
    V = torch.randn(md.n_params, 2, dtype=torch.float64)
    for matrix, kw in (("fisher_mc", {"random_state": 3, "mc_samples": 2}),
                       ("gsm", {"centered": True})):
        dense = curvature(md, matrix, "dense", **kw)
        M = curvature(md, matrix, "matrix_free", **kw)
        assert_rel(M.matvec(V), dense.M @ V, what=f"{matrix} {kw}")
        assert_rel(M.diagonal(), dense.M.diagonal(), what=f"diagonal {matrix}")


# ------------------------------------------------------------------ convergence to dense values
@pytest.mark.parametrize("case_id,name,matrix,lam", [
    ("mlp-ce", "soft_rank", "fisher", LAM), ("cnn-mse3", "soft_rank", "fisher", LAM),
    ("bn-poisson", "logdet", "fisher", LAM), ("mlp-ce", "soft_rank", "hessian", 1.0)])
def test_slq_converges_with_probes(store, case_id, name, matrix, lam):
    """F: Gauss–Radau bracket; H (indefinite, λ_min ≈ −0.6 < λ = 1): no bracket."""
    phi, ref_fn = PHIS[name]
    ref = store.reference(case_id)
    exact = ref_fn(ref.matrix(matrix), ref.lam(lam))
    scale = float(phi(torch.linalg.eigvalsh(ref.matrix(matrix)), lam).abs().sum())
    md = one_batch(store, case_id)
    p = md.n_params

    def estimate(n_probes, seed):
        M = MatrixFreeCurvature(md, matrix, n_probes=n_probes, lanczos_steps=p,
                                random_state=seed)
        value = getattr(M, "soft_rank" if name == "soft_rank" else "logdet_dim")(lam)
        return value, M.last_estimate

    few = np.mean([abs(estimate(4, s)[0] - exact) for s in range(4)])
    value, est = estimate(300, 0)
    assert abs(value - exact) < few
    assert abs(value - exact) <= 4 * est.stderr
    assert abs(value - exact) <= 0.04 * scale  # H: terms of both signs
    assert est.converged and est.n_matvec <= 300 * p


@pytest.mark.parametrize("case_id", CASES[:2])
def test_slq_converges_with_lanczos_steps(store, case_id):
    """Same probes: the quadrature error bound shrinks and the estimate settles."""
    md = one_batch(store, case_id)
    p = md.n_params
    values, bounds = [], []
    for steps in (2, 6, p):
        M = MatrixFreeCurvature(md, n_probes=20, lanczos_steps=steps, random_state=0)
        values.append(M.soft_rank(LAM))
        bounds.append(M.last_estimate.diagnostics["quadrature_error"][0])
    assert bounds[0] > bounds[1] > bounds[2] and bounds[2] < 1e-8
    assert abs(values[0] - values[2]) > abs(values[1] - values[2])
    assert abs(values[0] - values[2]) <= bounds[0] + 1e-12  # the bracket covers the bias


def test_lambda_grid_equals_separate_runs(store):
    md = one_batch(store, "mlp-ce")
    lams = [1e-3, 0.05, 1.0]
    M = MatrixFreeCurvature(md, n_probes=12, lanczos_steps=10, random_state=7)
    grid = M.soft_rank_grid(lams)
    grid_se = M.last_estimate.stderrs
    logdets = M.logdet_grid(lams)
    n_matvec = M.n_matvec
    assert n_matvec == 12 * 10  # one Lanczos run for everything
    for k, lam in enumerate(lams):
        single = MatrixFreeCurvature(md, n_probes=12, lanczos_steps=10, random_state=7)
        assert single.soft_rank(lam) == pytest.approx(grid[k], rel=1e-12)
        assert single.last_estimate.stderr == pytest.approx(grid_se[k], rel=1e-9)
        assert single.logdet_dim(lam) == pytest.approx(logdets[k], rel=1e-12)
    assert M.soft_rank(lams[1]) == pytest.approx(grid[1], rel=1e-12) and M.n_matvec == n_matvec


def test_soft_rank_with_per_tensor_lambda(store):
    ref = store.reference("mlp-ce")
    lam = {name: 0.02 * (1 + k) for k, name in enumerate(ref.names)}
    exact = soft_rank(ref.F, ref.lam(lam))
    md = one_batch(store, "mlp-ce")
    M = MatrixFreeCurvature(md, n_probes=300, lanczos_steps=md.n_params, random_state=0)
    value = M.soft_rank(lam)
    assert abs(value - exact) <= min(4 * M.last_estimate.stderr, 0.04 * exact)


@pytest.mark.parametrize("what", ["trace", "frobenius_norm"])
@pytest.mark.parametrize("matrix", ["fisher", "hessian"])
def test_hutchpp_trace_and_frobenius_converge(store, matrix, what):
    ref = store.reference("cnn-mse3")
    D = ref.matrix(matrix)
    exact = float(D.trace()) if what == "trace" else float(torch.linalg.matrix_norm(D))
    md = one_batch(store, "cnn-mse3")
    errors = []
    for budget in (6, 30, 3 * md.n_params):
        M = MatrixFreeCurvature(md, matrix, random_state=0)
        errors.append(abs(getattr(M, what)(n_matvec=budget) - exact))
        assert errors[-1] <= 4 * M.last_estimate.stderr + 1e-9 * abs(exact)
    assert errors[0] > errors[1] > errors[2] and errors[2] <= 1e-9 * abs(exact)


@pytest.mark.parametrize("matrix", ["fisher", "hessian"])
def test_spectral_norm_and_top_eigenvalues_converge(store, matrix):
    ref = store.reference("cnn-mse3")
    s = torch.linalg.eigvalsh(ref.matrix(matrix))
    md = one_batch(store, "cnn-mse3")
    errors = []
    for steps in (2, 5, 40):
        M = MatrixFreeCurvature(md, matrix, lanczos_steps=steps, random_state=0)
        value = M.spectral_norm()
        errors.append(abs(value - float(s.abs().max())))
        nearest = float((s.abs() - value).abs().min())  # some |σ| within the Ritz residual
        assert nearest <= M.last_estimate.diagnostics["ritz_residuals"][0] + 1e-12
    assert errors[0] > errors[1] > errors[2] and errors[2] <= 1e-8 * float(s.abs().max())
    assert M.last_estimate.n_matvec <= 40 and M.last_estimate.converged  # F: rank ≤ nK < 40
    assert_rel(M.eigvals(k=3), s[-3:], tol=1e-6, what="top eigenvalues")


@pytest.mark.parametrize("matrix", ["fisher", "hessian"])
def test_solve_converges_with_tolerance(store, matrix):
    ref = store.reference("mlp-ce")
    lam = 1.0  # H + Λ positive definite here (λ_min(H) ≈ −0.6)
    V = torch.randn(sum(ref.sizes), 2, dtype=torch.float64)
    exact = torch.linalg.solve(ref.matrix(matrix) + lam * torch.eye(len(V), dtype=V.dtype), V)
    md = one_batch(store, "mlp-ce")
    errors = []
    for tol in (1e-2, 1e-5, 1e-10):
        M = MatrixFreeCurvature(md, matrix, tol=tol)
        errors.append(float((M.solve(V, lam) - exact).abs().max() / exact.abs().max()))
        assert M.last_estimate.converged and M.last_estimate.value <= tol
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-8


def test_kfac_preconditioner_cuts_cg_iterations():
    """One Linear layer with MSE: KFAC is exact, so preconditioned CG needs one step."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=gen, dtype=torch.float64) * torch.logspace(-2, 1, 6)
    md = ModelData(nn.Linear(6, 2).double(), nn.MSELoss(), X,
                   torch.randn(200, 2, generator=gen, dtype=torch.float64), batch_size=200)
    V = torch.randn(md.n_params, 2, generator=gen, dtype=torch.float64)
    plain = MatrixFreeCurvature(md, tol=1e-10)
    kfac = MatrixFreeCurvature(md, tol=1e-10, preconditioner="kfac")
    x0, x1 = plain.solve(V, 1e-4), kfac.solve(V, 1e-4)
    assert_rel(x1, x0, tol=1e-7, what="preconditioned solution")
    assert kfac.last_cg.iterations <= 2 < plain.last_cg.iterations


# ------------------------------------------------------------------ TIC
@pytest.mark.parametrize("case_id", ["mlp-ce", "cnn-ce"])
def test_cg_tic_equals_gram_woodbury_tic(store, case_id):
    md = store.model_data(case_id)
    gram = GramCurvature(md)
    expected = gram.tic_sum(md.rules, md.batches("residual"), LAM)
    M = MatrixFreeCurvature(md, tol=1e-11, n_probes=md.n)  # n ≤ n_probes: per-sample solves
    value = M.tic_sum(md.rules, md.batches("residual"), LAM)
    assert_rel(value, expected, tol=1e-8, what="CG TIC vs Gram TIC")
    assert M.last_estimate.converged and M.last_estimate.method == "per-sample solves"


def test_sample_space_hutchinson_tic_converges():
    case = build_case("mlp-ce", n=60)
    md = case.model_data(batch_size=60)
    ref = Reference(case)
    exact = ref_tic(ref.C, ref.F, ref.lam(LAM)) * md.n
    few = np.mean([abs(MatrixFreeCurvature(md, n_probes=3, random_state=s, tol=1e-10).tic_sum(
        md.rules, md.batches("residual"), LAM) - exact) for s in range(3)])
    M = MatrixFreeCurvature(md, n_probes=59, random_state=0, tol=1e-10)
    value = M.tic_sum(md.rules, md.batches("residual"), LAM)
    est = M.last_estimate
    assert est.method.startswith("hutchinson") and est.n_matvec > 59
    assert abs(value - exact) < few and abs(value - exact) <= 4 * est.stderr


def test_tic_measure_matrix_free_matches_dense(store):
    md = one_batch(store, "mlp-ce")
    for variant, lam in (("fisher", LAM), ("hessian", 1.0)):
        dense = measures.tic(md, lam, "dense", variant)
        with warnings.catch_warnings():
            warnings.simplefilter("error", measures.IndefiniteWarning)
            mf = measures.tic(md, lam, "matrix_free", variant, n_probes=md.n, tol=1e-11)
        assert mf.value == pytest.approx(dense.value, rel=1e-8)
        assert mf.approximation == "matrix_free" and mf.diagnostics["converged"]
        assert "stderr" in mf.diagnostics and "n_matvec" in mf.diagnostics


def test_centered_tic_matrix_free_matches_dense(store):
    md = one_batch(store, "mlp-ce")
    dense = measures.tic(md, LAM, "dense", centered=True)
    mf = measures.tic(md, LAM, "matrix_free", centered=True, n_probes=md.n, tol=1e-11)
    assert mf.value == pytest.approx(dense.value, rel=1e-8)


def test_hessian_tic_warns_when_indefinite(store):
    md = one_batch(store, "mlp-huber")
    with pytest.warns(measures.IndefiniteWarning):
        r = measures.tic(md, 1e-3, "matrix_free", "hessian", n_probes=md.n, tol=1e-10,
                         random_state=0)
    assert r.diagnostics["indefinite"]
    with pytest.warns(measures.IndefiniteWarning):
        dense = measures.tic(md, 1e-3, "dense", "hessian")
    assert r.value == pytest.approx(dense.value, rel=1e-6)  # MINRES needs no definiteness


# ------------------------------------------------------------------ measures and API
@pytest.mark.parametrize("ord", ["trace", "spectral", "max_eigenvalue", "frobenius"])
def test_hessian_norms_matrix_free(store, ord):
    md = one_batch(store, "cnn-mse3")
    dense = measures.hessian_norms(md, ord)
    mf = measures.hessian_norms(md, ord, approximation="matrix_free", random_state=0,
                                n_probes=md.n_params, lanczos_steps=md.n_params)
    assert mf.value == pytest.approx(dense.value, rel=1e-8)
    assert {"stderr", "n_matvec", "converged"} <= set(mf.diagnostics)


def test_soft_rank_measure_reports_error_bar(store):
    md = one_batch(store, "mlp-ce")
    r = measures.soft_rank(md, LAM, "matrix_free", n_probes=50, lanczos_steps=20,
                           random_state=0)
    exact = measures.soft_rank(md, LAM, "dense")
    assert r.approximation == "matrix_free" and r.diagnostics["stderr"] > 0
    assert abs(r.value - exact.value) <= 4 * r.diagnostics["stderr"]
    assert r.gap == pytest.approx(exact.gap * r.value / exact.value, rel=1e-9)


def test_random_state_and_options(store):
    md = one_batch(store, "mlp-ce")
    a = curvature(md, "fisher", "matrix_free", random_state=1, n_probes=5, lanczos_steps=5)
    b = curvature(md, "fisher", "matrix_free", random_state=1, n_probes=5, lanczos_steps=5)
    c = curvature(md, "fisher", "matrix_free", random_state=2, n_probes=5, lanczos_steps=5)
    assert a.soft_rank(LAM) == b.soft_rank(LAM) != c.soft_rank(LAM)
    assert a.trace() == b.trace() != c.trace()
    with pytest.raises(TypeError, match="matrix_free"):
        curvature(md, "fisher", "kfac", n_probes=5)


def test_ggn_operator_kept_for_loo(store):
    md = one_batch(store, "mlp-ce")
    ref = store.reference("mlp-ce")
    op = GGNOperator(md, tol=1e-12)
    v = torch.randn(md.n_params, dtype=torch.float64)
    expected = torch.linalg.solve(ref.F + LAM * torch.eye(md.n_params, dtype=v.dtype), v)
    assert_rel(op.solve(v, LAM), expected, tol=1e-9, what="GGNOperator.solve")
    assert op.last_cg.converged.all() and op.n_matvec == op.last_cg.iterations


# ------------------------------------------------------------------ honest error bars, warnings
def test_rounding_of_the_products_enters_the_error_bars():
    """Products accurate only to a relative δ (a float32 model): Lanczos' Ritz bound and an
    exact Hutch++ would claim ~0 error; the rounding term δ·‖M‖ (Weyl) must cover a perturbed
    operator's eigenvalue and trace."""
    M = psd_matrix(p=30)
    delta = float(torch.finfo(torch.float32).eps)
    gen = torch.Generator().manual_seed(0)
    E = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    E = (E + E.T) / 2
    E *= 0.5 * delta * float(torch.linalg.matrix_norm(M, 2)) / float(torch.linalg.matrix_norm(E, 2))
    top = float(torch.linalg.eigvalsh(M + E).max())
    est = lanczos_eigenvalues(lambda X: (M + E) @ X, 30, steps=30, random_state=0,
                              matvec_rtol=delta)
    exact_top = float(torch.linalg.eigvalsh(M).max())
    assert est.converged and est.diagnostics["ritz_bounds"][0] < 1e-12
    assert abs(est.value - top) < 1e-10  # Lanczos found the perturbed operator's eigenvalue ...
    assert abs(est.value - exact_top) <= est.stderr  # ... and the bar covers M's
    assert est.stderr == pytest.approx(delta * abs(est.value), rel=1e-6)
    tr = hutchpp(lambda X: (M + E) @ X, 30, 90, random_state=0, matvec_rtol=delta)
    assert tr.diagnostics["probes"] == 0 and tr.stderr > 0  # exact sketch, rounding only
    assert abs(tr.value - float(M.trace())) <= tr.stderr
    plain = hutchpp(lambda X: M @ X, 30, 90, random_state=0)
    assert plain.stderr == 0.0


def test_one_probe_has_no_error_bar_and_is_not_converged():
    M = psd_matrix()
    est = hutchinson(lambda X: M @ X, 40, 1, random_state=0)
    assert est.stderr == np.inf and not est.converged
    assert hutchinson(lambda X: M @ X, 40, 5, random_state=0).converged


@pytest.mark.parametrize("what, kw, call, advice", [
    ("lanczos", {"lanczos_steps": 2}, lambda M: M.spectral_norm(), "raise lanczos_steps"),
    ("slq", {"lanczos_steps": 2, "n_probes": 40}, lambda M: M.soft_rank(LAM),
     "quadrature error exceeds the sampling error"),
    ("cg", {"maxiter": 2, "tol": 1e-12},
     lambda M: M.solve(torch.ones(M.n_params, dtype=torch.float64), LAM),
     "relative residual"),
])
def test_unconverged_matrix_free_estimates_warn(store, what, kw, call, advice):
    md = one_batch(store, "mlp-ce")
    M = curvature(md, "fisher", "matrix_free", random_state=0, **kw)
    with pytest.warns(ConvergenceWarning, match=advice):
        call(M)
    assert not M.last_estimate.converged
    converged = curvature(md, "fisher", "matrix_free", random_state=0, n_probes=5,
                          lanczos_steps=md.n_params, maxiter=md.n_params * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        call(converged)
    assert converged.last_estimate.converged


def test_ggn_operator_leaves_convergence_reporting_to_its_caller(store):
    md = one_batch(store, "mlp-ce")
    op = GGNOperator(md, tol=1e-14, maxiter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        op.solve(torch.ones(md.n_params, dtype=torch.float64), LAM)
    assert not op.last_cg.converged.all()
