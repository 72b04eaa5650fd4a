"""Curvature representations against the brute-force float64 references (tests/reference.py).

Exact representations ('dense', 'gram') agree with the reference to 1e-8 relative on every case;
'diagonal' is the exact diagonal and its soft rank an upper bound; KFAC is exact for one Linear
layer with MSE; EKFAC is closer to F than KFAC and has the exact trace; the Hessian agrees.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from softrank import ModelData, curvature
from softrank.curvature import hessian_vector_product

from .cases import CASE_IDS, KRONECKER_CASE_IDS, LOSSES, Case, build_case
from .reference import Reference, assert_rel, lam_vector, logdet_dim, soft_rank
from .reference import tic as ref_tic

EXACT = ("dense", "gram")
MATRICES = ("fisher", "gsm")
LAM = 0.05


def lam_of(kind, ref):
    """Scalar λ, or a dict with a different value on every parameter tensor."""
    if kind == "scalar":
        return LAM
    return {name: 0.02 * (1 + k) for k, name in enumerate(ref.names)}


def random_vectors(p, *cols):
    gen = torch.Generator().manual_seed(p)
    return torch.randn(p, *cols, generator=gen, dtype=torch.float64)


# ------------------------------------------------------------------ exact: dense and gram
@pytest.mark.parametrize("matrix", MATRICES)
@pytest.mark.parametrize("approximation", EXACT)
@pytest.mark.parametrize("case_id", CASE_IDS)
class TestExact:
    def test_trace(self, store, case_id, approximation, matrix):
        M = store.curvature(case_id, matrix, approximation)
        assert_rel(M.trace(), store.reference(case_id).matrix(matrix).trace(), what="trace")

    def test_diagonal(self, store, case_id, approximation, matrix):
        M = store.curvature(case_id, matrix, approximation)
        assert_rel(M.diagonal(), store.reference(case_id).matrix(matrix).diagonal(),
                   what="diagonal")

    def test_to_dense(self, store, case_id, approximation, matrix):
        M = store.curvature(case_id, matrix, approximation)
        assert_rel(M.to_dense(), store.reference(case_id).matrix(matrix), what="to_dense")

    @pytest.mark.parametrize("cols", [(), (3,)])
    def test_matvec(self, store, case_id, approximation, matrix, cols):
        ref = store.reference(case_id)
        v = random_vectors(sum(ref.sizes), *cols)
        M = store.curvature(case_id, matrix, approximation)
        assert_rel(M.matvec(v), ref.matrix(matrix) @ v, what="matvec")

    @pytest.mark.parametrize("lam_kind", ["scalar", "per_tensor"])
    def test_solve(self, store, case_id, approximation, matrix, lam_kind):
        ref = store.reference(case_id)
        lam = lam_of(lam_kind, ref)
        v = random_vectors(sum(ref.sizes), 2)
        expected = torch.linalg.solve(ref.matrix(matrix) + torch.diag(ref.lam(lam)), v)
        M = store.curvature(case_id, matrix, approximation)
        assert_rel(M.solve(v, lam), expected, what="solve")
        assert_rel(M.solve(v[:, 0], lam), expected[:, 0], what="solve of one vector")

    @pytest.mark.parametrize("lam_kind", ["scalar", "per_tensor"])
    def test_soft_rank(self, store, case_id, approximation, matrix, lam_kind):
        """Before and after the eigenvalues are known (Gram: Cholesky, then spectrum)."""
        ref = store.reference(case_id)
        lam = lam_of(lam_kind, ref)
        expected = soft_rank(ref.matrix(matrix), ref.lam(lam))
        M = curvature(store.model_data(case_id), matrix, approximation)
        assert_rel(M.soft_rank(lam), expected, what="soft rank")
        M.eigvals()
        assert_rel(M.soft_rank(lam), expected, what="soft rank after eigvals()")

    @pytest.mark.parametrize("lam_kind", ["scalar", "per_tensor"])
    def test_logdet_dim(self, store, case_id, approximation, matrix, lam_kind):
        ref = store.reference(case_id)
        lam = lam_of(lam_kind, ref)
        M = store.curvature(case_id, matrix, approximation)
        assert_rel(M.logdet_dim(lam), logdet_dim(ref.matrix(matrix), ref.lam(lam)),
                   what="log-det dimension")

    def test_eigvals_nonzero_part(self, store, case_id, approximation, matrix):
        """Dense has p eigenvalues, Gram the n·V that can be nonzero: the largest min(p, n·V)
        agree; the ones a representation leaves out are zero."""
        expected = torch.linalg.eigvalsh(store.reference(case_id).matrix(matrix)).flip(0)
        got = store.curvature(case_id, matrix, approximation).eigvals().sort(descending=True)[0]
        k = min(len(got), len(expected))
        assert_rel(got[:k], expected[:k], what="eigenvalues")
        assert float(expected[k:].abs().sum()) <= 1e-8 * float(expected[0]) * len(expected)

    def test_frobenius_norm(self, store, case_id, approximation, matrix):
        M = store.curvature(case_id, matrix, approximation)
        expected = torch.linalg.matrix_norm(store.reference(case_id).matrix(matrix))
        assert_rel(M.frobenius_norm(), expected, what="Frobenius norm")


@pytest.mark.parametrize("lam_kind", ["scalar", "per_tensor"])
@pytest.mark.parametrize("approximation", EXACT)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_tic_sum_is_n_tr_C_inverse(store, case_id, approximation, lam_kind):
    r""":math:`\sum_i g_i^\top (F+\Lambda)^{-1} g_i = n\,\mathrm{Tr}\,C(F+\Lambda)^{-1}`."""
    ref = store.reference(case_id)
    lam = lam_of(lam_kind, ref)
    md = store.model_data(case_id)
    F = store.curvature(case_id, "fisher", approximation)
    got = F.tic_sum(md.rules, md.batches("residual"), lam)
    expected = ref.n * ref_tic(ref.C, ref.F, ref.lam(lam))
    assert_rel(got, expected, what="tic_sum")


@pytest.mark.parametrize("approximation", ["dense", "gram", "diagonal"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_centered_gradient_second_moment(store, case_id, approximation):
    r""":math:`C - \bar g\bar g^\top`: diagonal always; trace, matvec and soft rank when exact."""
    ref = store.reference(case_id)
    M = store.curvature(case_id, "gsm", approximation, centered=True)
    assert_rel(M.diagonal(), ref.C_centered.diagonal(), what="centered diagonal")
    if approximation == "diagonal":
        return
    v = random_vectors(sum(ref.sizes))
    lv = ref.lam(LAM)
    assert_rel(M.trace(), ref.C_centered.trace(), what="centered trace")
    assert_rel(M.matvec(v), ref.C_centered @ v, what="centered matvec")
    assert_rel(M.solve(v, LAM), torch.linalg.solve(ref.C_centered + torch.diag(lv), v),
               what="centered solve")
    assert_rel(M.soft_rank(LAM), soft_rank(ref.C_centered, ref.lam(LAM)), what="centered rank")


@pytest.mark.parametrize("approximation", EXACT)
@pytest.mark.parametrize("case_id", ["mlp-ce", "cnn-mse3", "bn-poisson"])
def test_params_subset_is_principal_submatrix(store, case_id, approximation):
    """params= selects rows and columns of the full matrix, in module order."""
    ref = store.reference(case_id)
    chosen = [ref.names[-1], ref.names[0]]  # given out of order on purpose
    md = store.case(case_id).model_data(params=chosen)
    assert md.param_names == [ref.names[0], ref.names[-1]]
    offsets = torch.tensor([0] + ref.sizes).cumsum(0)
    idx = torch.cat([torch.arange(offsets[0], offsets[1]),
                     torch.arange(offsets[-2], offsets[-1])])
    for matrix in MATRICES + ("hessian",) * (approximation == "dense"):
        M = curvature(md, matrix, approximation).to_dense()
        assert_rel(M, ref.matrix(matrix)[idx][:, idx], what=f"{matrix} on a subset")


def test_exact_picks_gram_above_max_params(store):
    md = store.model_data("mlp-ce")
    assert curvature(md, "fisher", "exact").approximation == "dense"
    big = curvature(md, "fisher", "exact", max_params=md.n_params - 1)
    assert big.approximation == "gram"
    assert_rel(big.trace(), store.reference("mlp-ce").F.trace())


# ------------------------------------------------------------------ diagonal
@pytest.mark.parametrize("matrix", MATRICES)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_diagonal_is_the_exact_diagonal(store, case_id, matrix):
    ref = store.reference(case_id)
    D = store.curvature(case_id, matrix, "diagonal")
    assert_rel(D.diagonal(), ref.matrix(matrix).diagonal(), what="diagonal")
    assert_rel(D.trace(), ref.matrix(matrix).trace(), what="trace")
    assert_rel(D.to_dense(), torch.diag(ref.matrix(matrix).diagonal()), what="to_dense")


@pytest.mark.parametrize("lam_kind", ["scalar", "per_tensor"])
@pytest.mark.parametrize("matrix", MATRICES)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_diagonal_soft_rank_is_an_upper_bound(store, case_id, matrix, lam_kind):
    r""":math:`\mathrm{rank}_\Lambda(\mathrm{diag}\,M) \ge \mathrm{rank}_\Lambda(M)`
    (Schur-concavity), and the diagonal soft rank is :math:`\sum_k d_k/(d_k+\lambda_k)`."""
    ref = store.reference(case_id)
    lam = lam_of(lam_kind, ref)
    M = ref.matrix(matrix)
    D = store.curvature(case_id, matrix, "diagonal")
    d, lv = M.diagonal(), ref.lam(lam)
    assert_rel(D.soft_rank(lam), (d / (d + lv)).sum(), what="diagonal soft rank")
    assert D.soft_rank(lam) >= soft_rank(M, lv) * (1 - 1e-10)


# ------------------------------------------------------------------ KFAC and EKFAC
def single_linear_mse(K):
    gen = torch.Generator().manual_seed(K)
    torch.manual_seed(K)
    model = nn.Linear(4, K).double()
    X = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(9, K, generator=gen, dtype=torch.float64)
    return model, X, y


@pytest.mark.parametrize("params", [None, ["weight"]])
@pytest.mark.parametrize("approximation", ["kfac", "ekfac"])
@pytest.mark.parametrize("K", [1, 3])
def test_kronecker_is_exact_for_one_linear_layer_with_mse(K, approximation, params):
    r"""One Linear layer, MSE: :math:`F = \frac2{nd}\sum_i \tilde x_i\tilde x_i^\top \otimes I`
    is a Kronecker product, so KFAC (and EKFAC) equal F (also without the bias)."""
    model, X, y = single_linear_mse(K)
    md = ModelData(model, nn.MSELoss(), X, y, batch_size=4, params=params)
    ref = Reference(Case("linear", LOSSES[f"mse{K}"], model, nn.MSELoss(), X, y))
    F = ref.F[: md.n_params, : md.n_params]  # weight first, then bias
    M = curvature(md, "fisher", approximation)
    assert_rel(M.to_dense(), F, what=f"{approximation} vs exact F")
    assert_rel(M.soft_rank(LAM), soft_rank(F, ref.lam(LAM)[: md.n_params]), what="soft rank")
    assert_rel(M.trace(), F.trace(), what="trace")


@pytest.mark.parametrize("matrix", MATRICES)
@pytest.mark.parametrize("case_id", KRONECKER_CASE_IDS)
def test_ekfac_closer_to_exact_than_kfac_and_trace_exact(store, case_id, matrix):
    r""":math:`\|F_{EKFAC}-F\|_F \le \|F_{KFAC}-F\|_F` (EKFAC is the best matrix diagonal in the
    KFAC eigenbasis) and :math:`\mathrm{Tr}\,F_{EKFAC} = \mathrm{Tr}\,F`."""
    M = store.reference(case_id).matrix(matrix)
    kfac = store.curvature(case_id, matrix, "kfac").to_dense()
    ekfac = store.curvature(case_id, matrix, "ekfac")
    err_k = float(torch.linalg.matrix_norm(kfac - M))
    err_e = float(torch.linalg.matrix_norm(ekfac.to_dense() - M))
    assert err_e <= err_k * (1 + 1e-10) + 1e-14
    assert_rel(ekfac.trace(), M.trace(), what="EKFAC trace")


@pytest.mark.parametrize("approximation", ["kfac", "ekfac"])
@pytest.mark.parametrize("case_id", KRONECKER_CASE_IDS)
def test_kronecker_tic_sum_matches_its_dense_form(store, case_id, approximation):
    r"""tic_sum = :math:`n\,\mathrm{Tr}\,C(F_{approx}+\lambda I)^{-1}` with :math:`F_{approx}`
    from to_dense() and the reference C."""
    ref = store.reference(case_id)
    md = store.model_data(case_id)
    M = store.curvature(case_id, "fisher", approximation)
    Fa = M.to_dense()
    got = M.tic_sum(md.rules, md.batches("residual"), LAM)
    expected = ref.n * ref_tic(ref.C, Fa, ref.lam(LAM))
    assert_rel(got, expected, what="Kronecker tic_sum")


@pytest.mark.parametrize("matrix", MATRICES)
@pytest.mark.parametrize("approximation", ["kfac", "ekfac"])
@pytest.mark.parametrize("case_id", KRONECKER_CASE_IDS)
def test_kronecker_methods_agree_with_its_dense_form(store, case_id, approximation, matrix):
    """trace, diagonal, eigvals, solve, soft rank and log-det all describe the to_dense() matrix."""
    M = store.curvature(case_id, matrix, approximation)
    D = M.to_dense()
    p = len(D)
    lv = torch.full((p,), LAM, dtype=torch.float64)
    v = random_vectors(p, 2)
    assert_rel(M.trace(), D.trace(), what="trace")
    assert_rel(M.diagonal(), D.diagonal(), what="diagonal")
    assert_rel(M.eigvals().sort()[0], torch.linalg.eigvalsh(D), what="eigvals")
    assert_rel(M.solve(v, LAM), torch.linalg.solve(D + torch.diag(lv), v), what="solve")
    assert_rel(M.soft_rank(LAM), soft_rank(D, lv), what="soft rank")
    assert_rel(M.logdet_dim(LAM), logdet_dim(D, lv), what="log-det dimension")
    layers = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in M.names))
    per_layer = {n: 0.02 * (1 + layers.index(n.rsplit(".", 1)[0])) for n in M.names}
    lv = lam_vector(per_layer, M.names, M.sizes)
    assert_rel(M.soft_rank(per_layer), soft_rank(D, lv), what="soft rank, λ per layer")
    assert_rel(M.solve(v, per_layer), torch.linalg.solve(D + torch.diag(lv), v),
               what="solve, λ per layer")


def test_kfac_and_exact_differ_on_a_hidden_layer(store):
    """Guard against vacuous Kronecker tests: on the MLP, KFAC is not the exact F."""
    F = store.reference("mlp-ce").F
    K = store.curvature("mlp-ce", "fisher", "kfac").to_dense()
    assert float(torch.linalg.matrix_norm(K - F)) > 1e-3 * float(torch.linalg.matrix_norm(F))


# ------------------------------------------------------------------ Hessian
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_hessian_dense(store, case_id):
    ref = store.reference(case_id)
    H = store.curvature(case_id, "hessian", "dense")
    assert_rel(H.to_dense(), ref.H, what="H")
    assert_rel(H.trace(), ref.H.trace(), what="Tr H")
    assert_rel(H.soft_rank(LAM), soft_rank(ref.H, ref.lam(LAM)), what="rank_λ(H)")


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_hessian_vector_product(store, case_id):
    ref = store.reference(case_id)
    md = store.model_data(case_id)
    V = random_vectors(sum(ref.sizes), 2)
    assert_rel(hessian_vector_product(md, V), ref.H @ V, what="H V")
    assert_rel(hessian_vector_product(md, V[:, 1]), ref.H @ V[:, 1], what="H v")


@pytest.mark.parametrize("case_id", ["mlp-ce", "cnn-ce"])
def test_relu_network_trace_of_hessian_equals_trace_of_fisher(store, case_id):
    r"""Every weight of a ReLU network enters z linearly: :math:`\partial^2 z/\partial\theta_k^2=0`,
    so :math:`\mathrm{Tr}\,H = \mathrm{Tr}\,F` although :math:`H \ne F`."""
    ref = store.reference(case_id)
    H = store.curvature(case_id, "hessian", "dense").to_dense()
    F = store.curvature(case_id, "fisher", "dense").to_dense()
    assert_rel(H.trace(), F.trace(), what="Tr H vs Tr F")
    assert float((ref.H - ref.F).abs().max()) > 1e-4 * float(ref.F.abs().max())


# ------------------------------------------------------------------ sampled Fisher
@pytest.mark.parametrize("case_id", ["mlp-ce", "mlp-bce", "cnn-mse3", "cnn-poisson"])
def test_sampled_fisher_is_unbiased(store, case_id):
    r""":math:`F_{MC}` with S labels per input approaches F (relative error ~ √(2/S) ≈ 2%)."""
    F = store.reference(case_id).F
    Fmc = curvature(store.model_data(case_id), "fisher_mc", "dense", random_state=0,
                    mc_samples=2000).to_dense()
    assert float(torch.linalg.matrix_norm(Fmc - F)) <= 0.1 * float(torch.linalg.matrix_norm(F))


@pytest.mark.parametrize("case_id", ["mlp-ce", "cnn-poisson"])
def test_sampled_fisher_is_reproducible_across_representations(store, case_id):
    """The same random_state draws the same labels on the dense and the layer-wise paths."""
    md = store.model_data(case_id)
    dense = curvature(md, "fisher_mc", "dense", random_state=3, mc_samples=4)
    for approximation in ("gram", "diagonal"):
        M = curvature(md, "fisher_mc", approximation, random_state=3, mc_samples=4)
        assert_rel(M.diagonal(), dense.diagonal(), what=approximation)
    other = curvature(md, "fisher_mc", "dense", random_state=4, mc_samples=4)
    assert not torch.allclose(other.diagonal(), dense.diagonal())


# ------------------------------------------------------------------ precision
@pytest.mark.parametrize("approximation", ["dense", "gram", "diagonal"])
@pytest.mark.parametrize("case_id", ["mlp-ce", "cnn-mse3", "bn-poisson"])
def test_float32_model_agrees_to_float32_precision(store, case_id, approximation):
    """A float32 copy of the model: sums and linear algebra in float64, inputs rounded once."""
    ref = store.reference(case_id)
    md = store.case(case_id).model_data(dtype=torch.float32)
    assert md.dtype == torch.float32
    M = curvature(md, "fisher", approximation)
    F = ref.F if approximation != "diagonal" else torch.diag(ref.F.diagonal())
    assert M.diagonal().dtype == torch.float64
    assert_rel(M.diagonal(), F.diagonal(), tol=1e-5, what="float32 diagonal")
    assert_rel(M.soft_rank(LAM), soft_rank(F, ref.lam(LAM)), tol=1e-5, what="float32 rank")


# ------------------------------------------------------------------ the registry itself
def test_batchnorm_case_has_nontrivial_statistics_and_dropout(store):
    """Guards the bn cases: running statistics far from (0, 1), Dropout active in train mode."""
    model = build_case("bn-ce").model
    bn = model[0][1]
    assert float(bn.running_mean.abs().max()) > 0.1
    assert float((bn.running_var - 1).abs().max()) > 0.1
    X = store.case("bn-ce").X
    eval_out = model(X)
    model.train()
    assert not torch.allclose(model(X), eval_out)


def test_model_in_train_mode_is_measured_in_eval_mode(store):
    """Dropout off and BatchNorm running statistics used, whatever the model's mode."""
    case = build_case("bn-mse3")
    case.model.train()
    F = curvature(case.model_data(), "fisher", "gram")
    assert_rel(F.trace(), store.reference("bn-mse3").F.trace())
