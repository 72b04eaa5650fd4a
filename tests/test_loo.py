"""ApproxLOO (SPEC §4a) against brute-force leave-one-out refits, PRESS and exact identities."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from softrank import loo as loo_module
from softrank import memory
from softrank.curvature import KroneckerCurvature, curvature
from softrank.families import Categorical
from softrank.loo import approx_loo
from softrank.measures import tic
from softrank.model import ModelData
from softrank.regularization import as_lam

from .cases import CASE_IDS, KRONECKER_CASE_IDS, build_case



@pytest.fixture(autouse=True)
def _float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _fit_linear(X, y, loss_fn, n_out, lam, n_reg, mask=None, init=None):
    """Newton's method on Σ_{i in mask} ℓ_i + (n_reg/2) λ ||θ||² for a linear model z = W x + b."""
    d = X.shape[1]
    Xs, ys = (X, y) if mask is None else (X[mask], y[mask])
    theta = torch.zeros(n_out * (d + 1)) if init is None else init.clone()

    def objective(th):
        W, b = th[: n_out * d].reshape(n_out, d), th[n_out * d:]
        z = Xs @ W.T + b
        return loss_fn(z, ys).sum() + n_reg * lam / 2 * (th ** 2).sum()

    for _ in range(50):
        g = torch.func.grad(objective)(theta)
        if g.norm() < 1e-12:
            break
        theta = theta - torch.linalg.solve(torch.func.hessian(objective)(theta), g)
    lin = nn.Linear(d, n_out)
    with torch.no_grad():
        lin.weight.copy_(theta[: n_out * d].reshape(n_out, d))
        lin.bias.copy_(theta[n_out * d:])
    return lin, theta


def _softmax_data(n=120, d=4, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    W = 1.5 * torch.randn(d, K, generator=g)
    y = torch.multinomial(torch.softmax(X @ W, 1), 1, generator=g).squeeze(1)
    return X, y


def _ce(z, y):
    return nn.functional.cross_entropy(z, y, reduction="none")


def _bce(z, y):
    return nn.functional.binary_cross_entropy_with_logits(z[:, 0], y, reduction="none")


def _brute_force_loo(X, y, loss_fn, n_out, lam):
    n = len(X)
    _, theta = _fit_linear(X, y, loss_fn, n_out, lam, n)
    losses, outputs = [], []
    for i in range(n):
        mask = torch.ones(n, dtype=torch.bool)
        mask[i] = False
        lin, _ = _fit_linear(X, y, loss_fn, n_out, lam, n, mask, init=theta)
        with torch.no_grad():
            z = lin(X[i:i + 1])
        outputs.append(z[0])
        losses.append(float(loss_fn(z, y[i:i + 1])[0]))
    return np.array(losses), torch.stack(outputs)


@pytest.mark.parametrize("lam", [3e-3, 3e-2])
@pytest.mark.parametrize("family", ["softmax", "logistic"])
def test_matches_brute_force_refits(family, lam):
    X, y = _softmax_data(K=3 if family == "softmax" else 2)
    if family == "softmax":
        loss_fn, crit, n_out, yt = _ce, nn.CrossEntropyLoss(), 3, y
    else:
        loss_fn, crit, n_out, yt = _bce, nn.BCEWithLogitsLoss(), 1, y.double()
    lin, _ = _fit_linear(X, yt, loss_fn, n_out, lam, len(X))
    md = ModelData(lin, crit, X, yt if family == "softmax" else yt[:, None], batch_size=50)
    res = approx_loo(md, lam, "exact")
    bf_losses, bf_z = _brute_force_loo(X, yt, loss_fn, n_out, lam)
    with torch.no_grad():
        z = lin(X)
        train = float(loss_fn(z, yt).mean())
    bf_gap = bf_losses.mean() - train
    assert res.train_loss == pytest.approx(train, rel=1e-10)
    assert 0.9 <= res.gap / bf_gap <= 1.1, (res.gap, bf_gap)
    # the output shift of each point is close to the refit's shift
    shift, bf_shift = res.loo_outputs - z.numpy(), (bf_z - z).numpy()
    rel = np.linalg.norm(shift - bf_shift, axis=1) / np.linalg.norm(bf_shift, axis=1)
    assert np.median(rel) < 0.05 and np.quantile(rel, 0.9) < 0.2, np.quantile(rel, [0.5, 0.9])
    assert np.median(np.abs(res.loo_losses - bf_losses)) < 0.05 * np.median(bf_losses)


def test_ridge_equals_press():
    """MSE: the Newton step is exact, ApproxLOO is the PRESS shortcut e_i / (1 - h_ii)."""
    g = torch.Generator().manual_seed(1)
    n, d, lam = 60, 5, 0.05
    X = torch.randn(n, d, generator=g)
    y = X @ torch.randn(d, generator=g) + 0.3 * torch.randn(n, generator=g)
    lin, theta = _fit_linear(X, y, lambda z, t: (z[:, 0] - t) ** 2, 1, lam, n)
    md = ModelData(lin, nn.MSELoss(), X, y[:, None], batch_size=16)
    res = approx_loo(md, lam, "exact")
    Xt = torch.cat([X, torch.ones(n, 1)], 1)
    hat = Xt @ torch.linalg.solve(Xt.T @ Xt + n * lam / 2 * torch.eye(d + 1), Xt.T)
    e = Xt @ theta - y
    press = (e / (1 - hat.diagonal())) ** 2
    np.testing.assert_allclose(res.loo_losses, press.numpy(), rtol=1e-8)


def _small_mlp_data(seed=0, n=40, K=3):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, K))
    X = torch.randn(n, 5)
    y = torch.randint(0, K, (n,))
    return net, X, y


def test_identities_rank_and_first_order_tic():
    net, X, y = _small_mlp_data()
    lam = 0.05
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=16)
    res = approx_loo(md, lam, "exact")
    rank = curvature(md, "fisher", "dense").soft_rank(lam)
    assert res.soft_rank == pytest.approx(rank, rel=1e-8)
    assert res.first_order_gap == pytest.approx(tic(md, lam, "dense").gap, rel=1e-8)


def test_identities_with_n_train_and_per_tensor_lam():
    net, X, y = _small_mlp_data(1)
    lam = {n: v for n, v in zip(dict(net.named_parameters()), [0.1, 0.02, 0.05, 0.01])}
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=16, n_train=100)
    res = approx_loo(md, lam, "exact")
    assert res.soft_rank == pytest.approx(curvature(md, "fisher", "dense").soft_rank(lam),
                                          rel=1e-8)
    assert res.first_order_gap == pytest.approx(tic(md, lam, "dense").gap, rel=1e-8)


def test_kfac_is_exact_for_linear_mse():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(30, 4, generator=g)
    Y = torch.randn(30, 2, generator=g)
    lin = nn.Linear(4, 2)
    md = ModelData(lin, nn.MSELoss(), X, Y, batch_size=8)
    exact, kfac = approx_loo(md, 0.1, "exact"), approx_loo(md, 0.1, "kfac")
    np.testing.assert_allclose(kfac.loo_losses, exact.loo_losses, rtol=1e-9)


def test_kfac_approaches_exact_as_lam_grows():
    """KFAC's error in P_i vanishes relative to the prior term as λ dominates."""
    net, X, y = _small_mlp_data(3)
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=16)
    errs = []
    for lam in [0.01, 1.0, 100.0]:
        e, k = approx_loo(md, lam, "exact"), approx_loo(md, lam, "kfac")
        errs.append(abs(k.gap - e.gap) / abs(e.gap))
    assert errs[-1] < errs[0] and errs[-1] < 1e-2


def test_subsample_converges_to_exact():
    net, X, y = _small_mlp_data(4)
    lam = 0.05
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=16)
    exact = approx_loo(md, lam, "exact")
    full = approx_loo(md, lam, "subsample", n_points=md.n, random_state=0, tol=1e-12)
    np.testing.assert_allclose(full.loo_losses, exact.loo_losses, rtol=1e-7)
    assert full.diagnostics["converged"]
    part = approx_loo(md, lam, "subsample", n_points=15, random_state=0)
    assert part.stderr > 0
    assert abs(part.gap - exact.gap) < 4 * part.stderr
    # the subset's points agree with the exact values for those points
    np.testing.assert_allclose(part.loo_losses, exact.loo_losses[part.indices], rtol=1e-6)


def test_model_untouched_and_errors():
    net, X, y = _small_mlp_data(5)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    md = ModelData(net, nn.CrossEntropyLoss(), X, y)
    approx_loo(md, 0.1, "exact")
    approx_loo(md, 0.1, "kfac")
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="lam must be > 0"):
        approx_loo(md, 0.0)
    with pytest.raises(ValueError, match="method must be one of"):
        approx_loo(md, 0.1, "bogus")
    with pytest.raises(ValueError, match="n_points"):
        approx_loo(md, 0.1, "subsample", n_points=10_000)
    with pytest.raises(ValueError, match="needs labels"):
        approx_loo(ModelData(net, nn.CrossEntropyLoss(), X), 0.1)


def _two_pass_kfac_blocks(md, L):
    """The former method='kfac' path: KFAC factors from the Fisher vectors, then a second pass
    of Jacobian vectors through ``output_blocks``."""
    F = KroneckerCurvature(md, "fisher", "fisher")
    return torch.cat([F.output_blocks(b.layers, L) for b in md.batches("jacobian")])


@pytest.mark.parametrize("cache", ["all", "part", "none"])
@pytest.mark.parametrize("case_id", KRONECKER_CASE_IDS)
def test_kfac_one_pass_matches_two_passes(case_id, cache, monkeypatch):
    """Fisher output gradients as combinations of the Jacobian ones (one backward pass), with
    the layer records cached for all, some or none of the batches: same blocks, same outputs."""
    md = build_case(case_id).model_data()
    L = as_lam(0.05, md.param_names, md.sizes)
    if cache != "all":
        first = next(md.batches("jacobian"))
        one = sum((lb.a.numel() + lb.g.numel()) * 8 for lb in first.layers)
        monkeypatch.setattr(memory, "KFAC_CACHE_BYTES", one if cache == "part" else 0)
    blocks, z, y = loo_module._kfac_blocks(md, L)
    ref = _two_pass_kfac_blocks(md, L)
    assert blocks.shape == ref.shape == (md.n, md.n_outputs, md.n_outputs)
    scale = float(ref.abs().max())
    np.testing.assert_allclose(blocks.numpy(), ref.numpy(), rtol=1e-10, atol=1e-12 * scale)
    out = list(md.batches(None))
    np.testing.assert_allclose(z.numpy(), torch.cat([b.z for b in out]).numpy(), rtol=1e-12)
    assert torch.equal(y, torch.cat([b.y for b in out]))


def test_kfac_from_factors_matches_constructor():
    md = build_case("cnn-ce").model_data()
    F = KroneckerCurvature(md, "fisher", "fisher")
    G = KroneckerCurvature.from_factors(md, F.A, F.G)
    assert G.soft_rank(0.05) == pytest.approx(F.soft_rank(0.05), rel=1e-12)
    for e1, e2 in zip(F.E, G.E):
        np.testing.assert_allclose(e2.numpy(), e1.numpy(), rtol=1e-9,
                                   atol=1e-12 * float(e1.max()))
    v = torch.randn(md.n_params)
    np.testing.assert_allclose(G.solve(v, 0.05).numpy(), F.solve(v, 0.05).numpy(), rtol=1e-9)


# -- per-parameter Λ against a dense float64 reference ------------------------------------------
def _dense_reference(net, X, y, lam_vec, n, extra=None, subset=None, parts=False):
    r"""Dense float64 ApproxLOO from torch.func: per-sample Jacobians J_i, A_i = ∇²_z ℓ_i,
    r_i = ∇_z ℓ_i, H = Σ_j J_jᵀA_jJ_j (over ``subset``, default all) + n Λ (+ ``extra``), and
    z_i^(−i) = z_i + P_i (I − A_iP_i)⁻¹ r_i with P_i = J_i H⁻¹ J_iᵀ for i in ``subset``.
    ``parts``: also (J_i, A_i, P_i) of those points."""
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in net.named_parameters()])

    def f(th, x):
        parts, i = {}, 0
        for name, shape in zip(names, shapes):
            parts[name] = th[i:i + shape.numel()].reshape(shape)
            i += shape.numel()
        return torch.func.functional_call(net, parts, (x[None],))[0]

    def loss(z, t):
        return nn.functional.cross_entropy(z[None], t[None])

    idx = torch.arange(len(X)) if subset is None else torch.as_tensor(subset)
    J = torch.func.vmap(torch.func.jacrev(f), (None, 0))(theta, X)  # (n, K, p)
    z = torch.func.vmap(f, (None, 0))(theta, X)
    A = torch.func.vmap(torch.func.hessian(loss))(z, y)
    r = torch.func.vmap(torch.func.grad(loss))(z, y)
    H = torch.einsum("ikp,ikl,ilq->pq", J[idx], A[idx], J[idx]) + n * torch.diag(lam_vec)
    if extra is not None:
        H = H + extra
    P = J[idx] @ torch.linalg.solve(H, J[idx].transpose(1, 2))
    eye = torch.eye(z.shape[1])
    z_loo = z[idx] + (P @ torch.linalg.solve(eye - A[idx] @ P, r[idx].unsqueeze(2))).squeeze(2)
    losses = nn.functional.cross_entropy(z_loo, y[idx], reduction="none").numpy()
    return (losses, J[idx], A[idx], P) if parts else losses


def _lam_cases(net):
    names = [k for k, _ in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]
    per_tensor = dict(zip(names, [0.03, 0.2, 0.01, 0.5]))
    layer_uniform = dict(zip(names, [0.03, 0.03, 0.1, 0.1]))
    g = torch.Generator().manual_seed(7)
    per_element = 0.01 * torch.exp(2 * torch.rand(sum(sizes), generator=g))
    return {"per_tensor": per_tensor, "layer_uniform": layer_uniform,
            "per_element": per_element}, names, sizes


@pytest.mark.parametrize("lam_case", ["per_tensor", "per_element"])
@pytest.mark.parametrize("method", ["exact", "cavity", "subsample"])
def test_per_parameter_lam_matches_dense_reference(method, lam_case):
    net, X, y = _small_mlp_data(6, n=30)
    lams, names, sizes = _lam_cases(net)
    lam = lams[lam_case]
    lam_vec = as_lam(lam, names, sizes).vector
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=8)
    kw = {"n_points": md.n, "random_state": 0}
    if method == "subsample":
        kw.update(tol=1e-13, maxiter=2000)
    res = approx_loo(md, lam, method, **({} if method == "exact" else kw))
    ref = _dense_reference(net, X, y, lam_vec, md.n)
    np.testing.assert_allclose(res.loo_losses, ref, rtol=1e-7 if method == "subsample" else 1e-9)
    assert res.diagnostics["invalid_points"] == 0


def test_kfac_accepts_per_parameter_lam():
    """Λ constant on each layer: KFAC + Λ exactly (dense reference from the KFAC matrix); a
    per-element Λ enters through its diagonal in the Kronecker eigenbasis, and the same Λ given
    as a dict or as a (p,) tensor gives the same numbers."""
    net, X, y = _small_mlp_data(8, n=30)
    lams, names, sizes = _lam_cases(net)
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=8)
    lam = lams["layer_uniform"]
    vec = as_lam(lam, names, sizes).vector
    res = approx_loo(md, lam, "kfac")
    F_kfac = KroneckerCurvature(md, "fisher", "fisher").to_dense()
    # the reference's H is Σ_j J_jᵀA_jJ_j + nΛ; replace the data term by n F_KFAC
    dense_F = curvature(md, "fisher", "dense").to_dense()
    ref = _dense_reference(net, X, y, vec, md.n, extra=md.n * (F_kfac - dense_F))
    np.testing.assert_allclose(res.loo_losses, ref, rtol=1e-8)
    again = approx_loo(md, vec.clone(), "kfac")
    np.testing.assert_allclose(again.loo_losses, res.loo_losses, rtol=1e-12)
    elem = approx_loo(md, lams["per_element"], "kfac")
    assert np.isfinite(elem.gap) and elem.gap != res.gap


@pytest.mark.parametrize("m", [12, 7])  # with and without the first pass on a quarter of S
@pytest.mark.parametrize("rtol", [1e-12, None])  # to the fixed point; the shipped stopping rule
def test_cavity_matches_its_dense_definition(m, rtol, monkeypatch):
    r"""m < n: H̃ = Σ_{j∈S} J_jᵀA_jJ_j + s (n − m) F_EKFAC + nΛ, every point's step valid, and s
    the fixed point s = Σ_i tr((I − M_i)K_i) / Σ_i tr K_i with M_i = B_iᵀJ_iH̃⁻¹J_iᵀB_i,
    K_i = B_iᵀJ_iJ_iᵀB_i (so tr K_i = tr(A_iJ_iJ_iᵀ), tr(M_iK_i) = tr(P_iA_iJ_iJ_iᵀA_i)), all from the
    dense float64 reference. With the shipped rule the iteration stops once s changes by less
    than 1 % or less than the standard error of the ratio."""
    if rtol is not None:
        monkeypatch.setattr(loo_module, "_SHRINK_RTOL", rtol)
        monkeypatch.setattr(loo_module, "_SHRINK_WITHIN_STDERR", False)
    net, X, y = _small_mlp_data(9, n=30)
    lams, names, sizes = _lam_cases(net)
    lam = lams["layer_uniform"]
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=8)
    res = approx_loo(md, lam, "cavity", n_points=m, random_state=3)
    assert len(res.indices) == m and res.stderr > 0
    s = res.diagnostics["rest_shrinkage"]
    assert 0 < s < 1
    its = res.diagnostics["rest_shrinkage_iterations"]
    assert its["all points"] >= 1 and (its["quarter of the points"] > 0) == (m >= 8)
    F_ekfac = KroneckerCurvature(md, "fisher", "fisher", ekfac=True).to_dense()
    ref, J, A, P = _dense_reference(net, X, y, as_lam(lam, names, sizes).vector, md.n,
                                    extra=s * (md.n - m) * F_ekfac, subset=res.indices,
                                    parts=True)
    np.testing.assert_allclose(res.loo_losses, ref, rtol=1e-9)
    assert res.diagnostics["invalid_points"] == 0 and res.diagnostics["max_point_leverage"] < 1
    JJ = J @ J.transpose(1, 2)
    trK = torch.einsum("ikl,ilk->", A, JJ)
    a = torch.einsum("ikl,ilk->i", A, JJ) - torch.einsum("ikl,ilm,imn,ink->i", P, A, JJ, A)
    b = torch.einsum("ikl,ilk->i", A, JJ)
    s_ref = float(a.sum() / trK)  # f(s), the next iterate
    se_ref = float((a - s_ref * b).std() / (b.mean() * m ** 0.5))
    assert res.diagnostics["rest_shrinkage_stderr"] == pytest.approx(se_ref, rel=1e-6)
    if rtol is not None:
        assert abs(s_ref - s) <= 1e-10 * s
    else:
        assert abs(s_ref - s) <= max(loo_module._SHRINK_RTOL * s, se_ref)
    # the shrinkage moves the estimate: without it (s = 1) the gap is smaller here
    plain = _dense_reference(net, X, y, as_lam(lam, names, sizes).vector, md.n,
                             extra=(md.n - m) * F_ekfac, subset=res.indices)
    assert res.loo_losses.mean() > plain.mean()


def test_inverse_diagonal_blocks_recursion():
    g = torch.Generator().manual_seed(11)
    X = torch.randn(60, 60, generator=g)
    M = X @ X.T + 60 * torch.eye(60)
    inv = torch.linalg.inv(M)
    ref = torch.stack([inv[3 * b:3 * b + 3, 3 * b:3 * b + 3] for b in range(20)])
    for leaf in (6, 9, 1024):  # several levels of recursion, and none
        got = loo_module._inverse_diagonal_blocks(torch.linalg.cholesky(M), 3, leaf=leaf)
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-10, atol=1e-14)


def test_fisher_rows_path_equals_the_full_blocks():
    """B_iᵀP_iB_i from the Fisher rows alone (one Cholesky, diagonal blocks of its inverse)
    equals the projection of the full K×K blocks from the Jacobian rows."""
    net, X, y = _small_mlp_data(10, n=30)
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=8, n_train=45)
    L = as_lam(0.02, md.param_names, md.sizes)
    w = loo_module._lam_weights(md.rules, L, 45)
    idx = np.arange(md.n)
    M, z, y2 = loo_module._woodbury_fisher_blocks(md, w, idx, 1.5)
    P, _, _ = loo_module._woodbury_blocks(md, w, idx, 1.5)
    B = md.family.factor(z, y2)
    np.testing.assert_allclose(M.numpy(), (B.transpose(1, 2) @ P @ B).numpy(), rtol=1e-9,
                               atol=1e-13)


@pytest.mark.parametrize("fisher_space", [True, False])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_exact_in_parameter_space_is_the_data_space_woodbury(case_id, fisher_space):
    """'exact' in parameter space (p × p Gauss–Newton Hessian + nΛ) gives the blocks of the
    data-space Woodbury (n·K' kernel), with a per-element Λ and a curvature subsample
    (n_train > n), on every layer kind and loss of the test cases."""
    md = build_case(case_id).model_data(n_train=13)
    lam = torch.linspace(0.02, 0.2, md.n_params)[torch.randperm(md.n_params,
                                                                 generator=torch.Generator()
                                                                 .manual_seed(0))]
    L = as_lam(lam, md.param_names, md.sizes)
    w = loo_module._lam_weights(md.rules, L, md.n_train)
    data = loo_module._woodbury(md, w, np.arange(md.n), md.n_train / md.n, fisher_space)
    params = loo_module._parameter_space_blocks(md, L, fisher_space)
    scale = float(data[0].abs().max())
    np.testing.assert_allclose(params[0].numpy(), data[0].numpy(), rtol=1e-9,
                               atol=1e-12 * scale)
    for a, b in zip(params[1:], data[1:]):
        assert torch.equal(a, b)


def test_exact_space_follows_the_smaller_matrix(monkeypatch):
    """'exact' runs in parameter space when p < nK (a smaller matrix than the kernel), and
    'auto' still decides on the kernel's memory, which bounds the exact method's time."""
    net, X, y = _small_mlp_data(3, n=40)  # p = 66 < nK = 120
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=16)
    assert memory.exact_loo_space(md) == "parameters"
    assert memory.exact_loo_space(md.subset(np.arange(20))) == "data"  # nK = 60 < p
    est = memory.estimate_loo_memory(md, "exact")
    assert est.breakdown["Gauss–Newton Hessian + nΛ (p²), factored in place"] == 8 * 66 ** 2
    calls = []
    real = loo_module._parameter_space_blocks
    monkeypatch.setattr(loo_module, "_parameter_space_blocks",
                        lambda *a: calls.append(1) or real(*a))
    res = approx_loo(md, 0.05, "exact")
    assert calls and res.stderr is None and res.diagnostics["exact_space"] == "parameters"
    monkeypatch.setattr(memory, "exact_loo_space", lambda md: "data")
    ref = approx_loo(md, 0.05, "exact")
    assert len(calls) == 1 and ref.diagnostics["exact_space"] == "data"
    np.testing.assert_allclose(res.loo_losses, ref.loo_losses, rtol=1e-10)
    # 'auto': the n·K' kernel's memory decides, not the (here smaller) p × p matrix's
    kernel = memory.estimate_loo_memory(md, "exact").total  # exact_loo_space is 'data' here
    assert est.total < kernel
    monkeypatch.setattr(memory, "LOO_AUTO_EXACT_BYTES", (est.total + kernel) // 2)
    assert memory.resolve_loo_method(md, "auto") == "nystrom"


def test_lower_solve_lower_is_the_triangular_solve():
    gen = torch.Generator().manual_seed(5)
    for N in (7, 600, 1300):
        A = torch.randn(N, N, generator=gen).tril() + N ** 0.5 * torch.eye(N)
        B = torch.randn(N, N, generator=gen).tril()
        got = loo_module._lower_solve_lower(A, B, leaf=256)
        want = torch.linalg.solve_triangular(A, B, upper=False)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-12)
        assert torch.equal(got.triu(1), torch.zeros_like(got))


def test_auto_picks_exact_then_nystrom(monkeypatch):
    net, X, y = _small_mlp_data(12, n=30)
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=8)
    assert approx_loo(md, 0.05).method == "exact"
    monkeypatch.setattr(memory, "LOO_AUTO_EXACT_BYTES", 0)
    monkeypatch.setattr(memory, "LOO_NYSTROM_POINTS", 10)  # a third of the points
    res = approx_loo(md, 0.05, random_state=0)
    assert res.method == "nystrom" and len(res.indices) == 10 and res.stderr > 0
    assert memory.resolve_loo_method(md, "auto") == "nystrom"
    assert memory.resolve_loo_method(md, "cavity") == "cavity"


def test_nystrom_uses_a_jackknifed_subsample_of_the_curvature_samples(monkeypatch):
    """'nystrom' keeps at most LOO_NYSTROM_SAMPLES_PER_POINT curvature samples per point: its
    points and random others, drawn after them from the same random state — the method on
    that subsample (n unchanged), jackknifed; the training loss is still every sample's."""
    net, X, y = _small_mlp_data(14, n=60)
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=16)
    monkeypatch.setattr(memory, "LOO_NYSTROM_SAMPLES_PER_POINT", 3)
    assert memory.nystrom_samples(60, 8) == 24  # at most half of the samples, else all:
    assert memory.nystrom_samples(40, 8) == 40 and memory.nystrom_samples(48, 8) == 24
    res = approx_loo(md, 0.05, "nystrom", n_points=8, random_state=3)
    assert res.diagnostics["curvature_samples"] == 24 and "jackknife" in res.diagnostics
    rng = np.random.RandomState(3)
    S = np.sort(rng.choice(60, 8, replace=False))
    used = np.sort(np.concatenate([S, rng.choice(np.setdiff1d(np.arange(60), S), 16,
                                                 replace=False)]))
    np.testing.assert_array_equal(res.indices, S)
    ref = approx_loo(md.subset(used), 0.05, "nystrom", indices=np.searchsorted(used, S))
    assert res.gap == pytest.approx(ref.gap, rel=1e-10)
    assert res.stderr == pytest.approx(ref.stderr, rel=1e-10)
    np.testing.assert_allclose(res.loo_losses, ref.loo_losses, rtol=1e-10)
    full_loss = nn.CrossEntropyLoss()(net(X), y).item()
    assert res.train_loss == pytest.approx(full_loss, rel=1e-6)
    assert md.subset(used).n_train == 60 and md.subset(used).n == 24
    monkeypatch.setattr(memory, "LOO_NYSTROM_SAMPLES_PER_POINT", None)  # every sample
    every = approx_loo(md, 0.05, "nystrom", n_points=8, random_state=3)
    assert every.diagnostics["curvature_samples"] == 60 and "jackknife" not in every.diagnostics


def test_subsample_not_converged_warns_and_has_no_stderr():
    net, X, y = _small_mlp_data(13, n=30)
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=8)
    with pytest.warns(RuntimeWarning, match="solver's error in the gap may reach"):
        res = approx_loo(md, 1e-3, "subsample", n_points=6, random_state=0, maxiter=2,
                         preconditioner=None)
    assert not res.diagnostics["converged"] and res.diagnostics["max_relative_residual"] > 1e-8
    assert np.isnan(res.stderr) and res.diagnostics["sampling_stderr"] > 0
    assert res.diagnostics["solver_error_bound"] > 0.1 * res.diagnostics["sampling_stderr"]


def test_subsample_solver_error_bounds_hold():
    """The bounds on the blocks' CG error hold entry by entry at every iteration count (against
    a solve to 1e-14), the first-order bound on the gap holds where it is small, and an
    unreached tol no longer costs the standard error once the bound is negligible beside it."""
    net, X, y = _small_mlp_data(13, n=30)
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=8)
    lam, idx = 1e-3, np.arange(0, 30, 5)
    L = as_lam(lam, md.param_names, md.sizes)
    ref, _, _ = loo_module._cg_blocks(md, L, torch.as_tensor(idx), 1e-14, 5000, None)
    exact = approx_loo(md, lam, "exact")
    exact_gap = float((exact.loo_losses - exact.point_losses)[idx].mean())
    for maxiter in (1, 4, 16, 32, 64):
        blocks, bounds, diag = loo_module._cg_blocks(md, L, torch.as_tensor(idx), 1e-14, maxiter,
                                                  None)
        assert not diag["converged"]
        assert ((blocks - ref).abs() <= bounds).all(), maxiter
    seen = set()
    for maxiter in (2, 4, 8, 16, 32, 64, 128):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            res = approx_loo(md, lam, "subsample", indices=idx, maxiter=maxiter, tol=1e-14,
                             preconditioner=None)
        warned = any("solver's error in the gap" in str(w.message) for w in record)
        bound, sampling = res.diagnostics["solver_error_bound"], float(np.std(
            res.loo_losses - res.point_losses, ddof=1) / np.sqrt(len(idx)))
        negligible = bound <= 0.1 * sampling
        seen.add(negligible)
        assert warned != negligible and np.isnan(res.stderr) != negligible, maxiter
        if bound < 0.1 * abs(exact_gap):  # first order: where the bound is small
            assert abs(res.gap - exact_gap) <= bound, maxiter
    assert seen == {True, False}  # both cases met along the way


@pytest.mark.parametrize("method", ["nystrom", "cavity", "subsample"])
def test_given_indices_measure_those_points(method):
    net, X, y = _small_mlp_data(13, n=36)
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=8)
    drawn = approx_loo(md, 0.05, method, n_points=9, random_state=3)
    given = approx_loo(md, 0.05, method, indices=drawn.indices[::-1].tolist())  # order free
    np.testing.assert_array_equal(given.indices, drawn.indices)
    np.testing.assert_allclose(given.loo_losses, drawn.loo_losses, rtol=1e-12)
    assert given.gap == pytest.approx(drawn.gap, rel=1e-12)
    assert given.stderr == pytest.approx(drawn.stderr, rel=1e-12)
    # the points a subset of another run's: the same points, another estimate of the others
    other = approx_loo(md, 0.05, method, indices=np.arange(0, 36, 4))
    np.testing.assert_array_equal(other.indices, np.arange(0, 36, 4))


def test_given_indices_errors():
    net, X, y = _small_mlp_data(14, n=20)
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=8)
    cases = [([1, 1, 2], "must not repeat a point; got 1"),
             ([0, 20], r"must lie in 0\.\.19"), ([-1, 3], r"must lie in 0\.\.19"),
             ([], "at least one point; got an empty array"), ([[0, 1]], "non-empty 1-D"),
             ([0.0, 1.0], "integer"),
             (np.zeros(20, bool), "not a boolean mask")]
    for idx, msg in cases:
        with pytest.raises(ValueError, match=msg):
            approx_loo(md, 0.1, "cavity", indices=idx)
    with pytest.raises(ValueError, match="n_points=3 contradicts the 2 given indices"):
        approx_loo(md, 0.1, "subsample", n_points=3, indices=[0, 1])
    for method in ("exact", "kfac", "auto"):
        with pytest.raises(ValueError, match="measures every point"):
            approx_loo(md, 0.1, method, indices=[0, 1])


def test_bench_loo_scale_configurations_measure_the_same_points():
    """bench_loo's scale part: a configuration with an EKFAC subsample measures the same points
    (the same rows of X) as the one with all n, and keeps n as the training-set size."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loo.py"
    spec = importlib.util.spec_from_file_location("bench_loo_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.scale_configs("10:all,5:20", 50) == [(10, 50), (5, 20)]
    net, X, y = _small_mlp_data(15, n=50)
    rng = np.random.RandomState(0)
    points = rng.permutation(50)[:10]
    others = rng.permutation(np.setdiff1d(np.arange(50), points))
    md_all, idx_all = bench.scale_data(net, X, y, 50, 5, 50, points, others)
    md_sub, idx_sub = bench.scale_data(net, X, y, 50, 5, 20, points, others)
    assert (md_all.n, md_sub.n, md_sub.n_train) == (50, 20, 50)
    np.testing.assert_array_equal(md_all.X[idx_all], md_sub.X[idx_sub])
    np.testing.assert_array_equal(np.sort(points[:5]), idx_all)
    a = approx_loo(md_all, 0.1, "cavity", indices=idx_all)
    b = approx_loo(md_sub, 0.1, "cavity", indices=idx_sub)
    np.testing.assert_allclose(a.point_losses, b.point_losses, rtol=1e-12)
    assert a.gap != b.gap  # the other points' EKFAC differs: from 20 samples against 50


def test_cavity_on_every_curvature_sample_of_a_larger_set_has_a_stderr():
    """All curvature samples kept, but they are a subsample of n_train: still a sample."""
    net, X, y = _small_mlp_data(16, n=24)
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=8, n_train=60)
    res = approx_loo(md, 0.1, "cavity", n_points=24)
    assert res.stderr is not None and res.stderr > 0
    full = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=8)
    assert approx_loo(full, 0.1, "cavity", n_points=24).stderr is None
    # 'nystrom' needs a sample outside its points to stand for the unsampled training points
    with pytest.raises(ValueError, match="other 36 of the 60 training points have no sample"):
        approx_loo(md, 0.1, "nystrom", n_points=24)
    assert approx_loo(md, 0.1, "nystrom", n_points=20, random_state=0).stderr > 0


def test_sampled_soft_rank_and_first_order_term_have_calibrated_stderrs():
    """The soft rank and the first-order term of 'subsample' are means over its points: over
    random subsets, their deviations from the values on every point, in units of the reported
    standard errors, have an RMS near 1 (below it by the finite-population factor
    √(1 − m/n) ≈ 0.79 here, since the standard error ignores it)."""
    net, X, y = _small_mlp_data(4)
    lam = 0.05
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=16)
    exact = approx_loo(md, lam, "exact")
    assert "soft_rank_stderr" not in exact.diagnostics
    z_rank, z_first = [], []
    for seed in range(30):
        part = approx_loo(md, lam, "subsample", n_points=15, random_state=seed, tol=1e-10)
        d = part.diagnostics
        z_rank.append((part.soft_rank - exact.soft_rank) / d["soft_rank_stderr"])
        z_first.append((part.first_order_gap - exact.first_order_gap)
                       / d["first_order_gap_stderr"])
    for z in (np.array(z_rank), np.array(z_first)):
        assert 0.5 < np.sqrt(np.mean(z ** 2)) < 1.2
    every = approx_loo(md, lam, "cavity", n_points=md.n)  # nothing sampled
    assert every.stderr is None and "soft_rank_stderr" not in every.diagnostics


@pytest.mark.parametrize("method", ["nystrom", "cavity", "subsample"])
def test_one_sampled_point_warns_that_there_is_no_standard_error(method):
    net, X, y = _small_mlp_data(6)
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=16)
    with pytest.warns(RuntimeWarning, match="one point measured, so the estimate has no "
                                            "standard error"):
        res = approx_loo(md, 0.1, method, n_points=1, random_state=0)
    assert np.isnan(res.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        two = approx_loo(md, 0.1, method, n_points=2, random_state=0)
    assert two.stderr > 0


def test_cavity_control_variate_matches_its_dense_definition():
    r"""'cavity' with points outside S: its control variate is, for every point j, the cavity
    step with all the other points through s (n − 1) F_EKFAC + nΛ (dense float64 reference,
    the Fisher-row and the Jacobian-row paths alike), and the reported gap, soft rank and
    first-order term are the regression estimates on it: ȳ_S + b (x̄ − x̄_S)."""
    net, X, y = _small_mlp_data(9, n=30)
    lams, names, sizes = _lam_cases(net)
    lam = lams["layer_uniform"]
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=8)
    res = approx_loo(md, lam, "cavity", n_points=9, random_state=1)
    s, n = res.diagnostics["rest_shrinkage"], md.n
    L = as_lam(lam, names, sizes)
    F = KroneckerCurvature(md, "fisher", "fisher", ekfac=True)
    gaps, ranks, firsts, _ = loo_module._cavity_proxy(md, F, L, s, True)
    again = loo_module._cavity_proxy(md, F, L, s, False)  # from the K×K blocks
    for a, b in zip((gaps, ranks, firsts), again):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-14)
    F_dense = F.to_dense()
    own = nn.functional.cross_entropy(net(X).double(), y, reduction="none").detach().numpy()
    for j in range(n):
        ref = _dense_reference(net, X, y, L.vector, n, extra=s * (n - 1) * F_dense, subset=[j])
        assert gaps[j] == pytest.approx(ref[0] - own[j], rel=1e-8, abs=1e-13)
    y_s, x_s = res.loo_losses - res.point_losses, gaps[res.indices]
    b = np.cov(y_s, x_s)[0, 1] / np.var(x_s, ddof=1)
    assert res.gap == pytest.approx(y_s.mean() + b * (gaps.mean() - x_s.mean()), rel=1e-10)
    assert res.diagnostics["sample_mean_gap"] == pytest.approx(y_s.mean(), rel=1e-12)
    cv = res.diagnostics["control_variate"]
    assert cv["gap"] == pytest.approx(gaps.mean()) and cv["slope"] == pytest.approx(b)
    assert cv["correlation"] == pytest.approx(np.corrcoef(y_s, x_s)[0, 1])
    # the soft rank's and the first-order term's per-point values on S, from the dense reference
    _, J, A, P = _dense_reference(net, X, y, L.vector, n, extra=s * (n - len(res.indices))
                                  * F_dense, subset=res.indices, parts=True)
    z = net(X[res.indices]).double().detach()
    r = torch.softmax(z, 1) - nn.functional.one_hot(y[res.indices], 3).double()
    rank_s = torch.einsum("ikl,ilk->i", A, P).numpy()
    first_s = torch.einsum("ik,ikl,il->i", r, P, r).numpy()
    for got, vals, x in ((res.soft_rank / n, rank_s, ranks), (res.first_order_gap, first_s,
                                                                firsts)):
        xs = x[res.indices]
        b = np.cov(vals, xs)[0, 1] / np.var(xs, ddof=1)
        assert got == pytest.approx(vals.mean() + b * (x.mean() - xs.mean()), rel=1e-7)
    assert res.estimated_test_loss == pytest.approx(res.train_loss + res.gap)


def test_regression_estimator_is_unbiased_with_a_calibrated_stderr():
    """Cochran's regression estimator on a heavy-tailed population: over repeated samples its
    mean is the population mean, its standard error has RMS z near √(1 − m/N) (the
    finite-population factor it leaves out), and it is far below the sample mean's when the
    control variate explains most of the variance."""
    rng = np.random.default_rng(0)
    N, m = 3000, 60
    x = rng.lognormal(0.0, 1.0, N)
    y = 0.2 + 0.8 * x + 0.1 * rng.standard_normal(N) * (1 + x)
    errs, zs, ratio = [], [], []
    for _ in range(400):
        idx = rng.choice(N, m, replace=False)
        est, se, b, corr = loo_module._regression_estimate(y[idx], x[idx], x)
        errs.append(est - y.mean())
        zs.append((est - y.mean()) / se)
        ratio.append(se / loo_module._mean_stderr(y[idx]))
    errs, zs = np.array(errs), np.array(zs)
    assert abs(errs.mean()) < 3 * errs.std() / np.sqrt(len(errs))
    assert 0.8 < np.sqrt(np.mean(zs ** 2)) < 1.2
    assert np.median(ratio) < 0.5
    # double sampling: x known on a random 600 of the 3,000, y on 60 of those; against the
    # mean of all 3,000 the first phase's error counts too (without its term: RMS z ≈ 1.7)
    zs = []
    for _ in range(400):
        first = rng.choice(N, 600, replace=False)
        idx = first[rng.choice(600, m, replace=False)]
        est, se, *_ = loo_module._regression_estimate(y[idx], x[idx], x[first], N)
        zs.append((est - y.mean()) / se)
    assert 0.8 < np.sqrt(np.mean(np.square(zs))) < 1.2
    # fewer than three points, or a constant control variate: the sample mean
    assert loo_module._regression_estimate(y[:2], x[:2], x)[:3] == (
        y[:2].mean(), loo_module._mean_stderr(y[:2]), 0.0)
    assert loo_module._regression_estimate(y[:9], np.ones(9), x)[0] == y[:9].mean()


def test_cavity_control_variate_cuts_the_standard_error():
    """On a small MLP the control variate's correlation with the kept points' values is high and
    the reported standard error is well below the sample mean's, for every draw of points."""
    net, X, y = _small_mlp_data(21, n=60)
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=16)
    for seed in range(5):
        res = approx_loo(md, 0.05, "cavity", n_points=15, random_state=seed)
        d = res.diagnostics
        assert d["control_variate"]["correlation"] > 0.9, seed
        assert res.stderr < 0.5 * d["sample_mean_stderr"], seed


def _nystrom_reference(net, X, y, lam_vec, n_train, S):
    r"""Dense float64 'nystrom' blocks P_i (K×K, i ∈ S) from their definition, without the
    streamed Woodbury: with U_j = J_jᵀB_j (B_jB_jᵀ = A_j), D = n Λ and G = UᵀD⁻¹U over every
    sample, V = L_S⁻¹G_{S·} (G_SS = L_SL_Sᵀ); G̃ = VᵀV + blockdiag(Δ), Δ_j = G_jj − V_jᵀV_j
    (0 on S); each other sample weighted c = (n − m)/(N − m) as Ê_j = (I + Δ_j)/c; then
    P_i = J_iD⁻¹J_iᵀ − X_i(Ê + VᵀV)⁻¹X_iᵀ, X_i = J_iD⁻¹U."""
    _, J, A, _ = _dense_reference(net, X, y, lam_vec, n_train, parts=True)
    N, K, _ = J.shape
    evals, evecs = torch.linalg.eigh(A)
    B = evecs * evals.clamp_min(0).sqrt().unsqueeze(1)  # (N, K, K): BBᵀ = A
    Dinv = 1.0 / (n_train * lam_vec)
    U = torch.einsum("ikp,ikc->pic", J, B).reshape(-1, N * K)  # (p, N·K), sample-major
    G = U.T @ (Dinv[:, None] * U)
    rows = np.concatenate([np.arange(i * K, (i + 1) * K) for i in S])
    GSS = G[np.ix_(rows, rows)] + 1e-10 * G[rows, rows].mean() * torch.eye(len(rows))
    V = torch.linalg.solve_triangular(torch.linalg.cholesky(GSS), G[rows], upper=False)
    Q = V.T @ V
    c = (n_train - len(S)) / (N - len(S))
    E = torch.zeros(N * K, N * K)
    for j in range(N):
        b = slice(j * K, (j + 1) * K)
        E[b, b] = torch.eye(K) if j in set(S) else (torch.eye(K) + G[b, b] - Q[b, b]) / c
    Xi = torch.einsum("ikp,pq->ikq", J[S], Dinv[:, None] * U)  # (m, K, N·K)
    theta = torch.einsum("ikp,ilp->ikl", J[S] * Dinv, J[S])
    return theta - Xi @ torch.linalg.solve(E + Q, Xi.transpose(1, 2)), B[S]


@pytest.mark.parametrize("fisher_space", [False, True])
def test_nystrom_jackknife_groups_are_the_method_without_them(fisher_space):
    """On a curvature subsample 'nystrom' also returns its blocks with each group of other
    samples left out: exactly the method run on the samples without that group (the other
    samples then standing for more training points each); with every training point a sample
    there is nothing to correct and no group."""
    net, X, y = _small_mlp_data(21, n=40)
    L = as_lam(0.05, *_lam_cases(net)[1:])
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=8, n_train=100)
    S = np.array([0, 3, 8, 9, 15, 22, 31])
    _, _, _, jack = loo_module._nystrom_blocks(md, L, S, fisher_space, groups=4)
    assert len(jack) == 4
    others = np.setdiff1d(np.arange(40), S)
    group = np.random.RandomState(0).permutation(len(others)) % 4
    for g, P_g in enumerate(jack):
        keep = np.sort(np.concatenate([S, others[group != g]]))
        md_g = ModelData(net, nn.CrossEntropyLoss(), X[keep], y[keep], batch_size=8,
                         n_train=100)
        ref, *_ = loo_module._nystrom_blocks(md_g, L, np.searchsorted(keep, S), fisher_space)
        np.testing.assert_allclose(P_g, ref, rtol=1e-8, atol=1e-12 * float(ref.abs().max()))
    full = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=8)
    assert loo_module._nystrom_blocks(full, L, S, fisher_space)[3] == []
    # other samples above half of the other training points: weighted, not jackknifed
    most = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=8, n_train=60)
    assert loo_module._nystrom_blocks(most, L, S, fisher_space)[3] == []


def test_nystrom_jackknife_corrects_the_subsample_bias():
    """A curvature subsample biases 'nystrom' upward (the inverse of a sampled sum); the
    jackknifed gap lands nearer the gap with every sample than the uncorrected one, its standard
    error grows by the jackknife's, and the diagnostics hold both."""
    torch.manual_seed(0)
    X = torch.randn(400, 10, dtype=torch.float64)
    y = (X[:, :3].sum(1) > 0).long() + (X[:, 3] > 1).long()
    net = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    opt = torch.optim.LBFGS(net.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(X), y) + 0.5e-2 * sum(
            (p ** 2).sum() for p in net.parameters())
        loss.backward()
        return loss

    opt.step(objective)  # finished to the regularized minimum the estimate assumes
    S = np.arange(0, 400, 10)
    all_samples = approx_loo(ModelData(net, nn.CrossEntropyLoss(), X, y), 1e-2, "nystrom",
                             indices=S).gap
    others = np.random.RandomState(1).permutation(np.setdiff1d(np.arange(400), S))[:160]
    sub = np.sort(np.concatenate([S, others]))
    md = ModelData(net, nn.CrossEntropyLoss(), X[sub], y[sub], n_train=400)
    res = approx_loo(md, 1e-2, "nystrom", indices=np.searchsorted(sub, S))
    jk = res.diagnostics["jackknife"]
    assert jk["groups"] == loo_module._JACKKNIFE_GROUPS == len(jk["left_out_gaps"])
    assert jk["uncorrected_gap"] > 1.2 * all_samples  # the bias corrected here
    assert abs(res.gap - all_samples) < 0.25 * (jk["uncorrected_gap"] - all_samples)
    G = jk["groups"]  # the gap is the jackknife of the per-point values, linear in them
    assert res.gap == pytest.approx(G * jk["uncorrected_gap"] - (G - 1) * np.mean(
        jk["left_out_gaps"]), rel=1e-10)
    assert jk["stderr"] > 0 and res.stderr > jk["stderr"]
    assert res.diagnostics["invalid_points"] == 0


@pytest.mark.parametrize("n_train", [None, 75])  # every training point, or a curvature subsample
def test_nystrom_matches_its_dense_definition(n_train):
    """'nystrom': the kept points' blocks from the dense data-space definition (Nyström on the
    kept points plus each other sample's exact own term), by the Jacobian-row and the
    Fisher-row paths; with S every sample it is 'exact'; every step valid; the control variate
    is the EKFAC one at the fixed point of its own shrinkage."""
    net, X, y = _small_mlp_data(9, n=30)
    lams, names, sizes = _lam_cases(net)
    lam = lams["per_element"]
    L = as_lam(lam, names, sizes)
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=8, n_train=n_train)
    S = np.array([1, 4, 5, 11, 17, 20, 26, 29])
    ref, B = _nystrom_reference(net, X, y, L.vector, md.n_train, S)
    P, *_ = loo_module._nystrom_blocks(md, L, S, False)
    np.testing.assert_allclose(P, ref, rtol=1e-7, atol=1e-10 * float(ref.abs().max()))
    M, *_ = loo_module._nystrom_blocks(md, L, S, True)
    Bf = Categorical().factor(net(X[S]).detach().double())  # (m, K, K − 1)
    np.testing.assert_allclose(M, Bf.transpose(1, 2) @ ref @ Bf, rtol=1e-7, atol=1e-8)
    res = approx_loo(md, lam, "nystrom", indices=S)
    assert res.diagnostics["invalid_points"] == 0 and res.diagnostics["max_point_leverage"] < 1
    assert res.stderr > 0 and "control_variate" in res.diagnostics
    s = res.diagnostics["proxy_shrinkage"]
    F = KroneckerCurvature(md, "fisher", "fisher", ekfac=True)
    fis, _, _ = loo_module._fisher_records(md, S)
    K = loo_module._euclidean_fisher_blocks(md, fis)
    Qs = torch.cat([loo_module._own_blocks(md.rules, f, loo_module._eigenbasis_weights(
        F, L, (md.n_train - 1) * s, md.n_train)) for f in fis])
    f_s, _ = loo_module._shrinkage_ratio(Qs @ torch.linalg.inv(torch.eye(2) + Qs), K)
    assert abs(f_s - s) <= loo_module._SHRINK_RTOL * s
    if n_train is None:
        everything = np.arange(md.n)
        P_all, *_ = loo_module._nystrom_blocks(md, L, everything, False)
        P_exact, *_ = loo_module._exact_blocks(md, L, False)
        np.testing.assert_allclose(P_all, P_exact, rtol=1e-6, atol=1e-9)
        full = approx_loo(md, lam, "nystrom", n_points=md.n)
        assert full.stderr is None
        np.testing.assert_allclose(full.loo_losses, approx_loo(md, lam, "exact").loo_losses,
                                   rtol=1e-9)


@pytest.mark.parametrize("method", ["nystrom", "cavity"])
def test_ekfac_methods_on_other_layers_point_to_the_methods_that_run(method):
    """'nystrom' and 'cavity' need EKFAC (their control variate) and refuse a BatchNorm net
    with the layer's error, naming 'exact' and 'subsample', which run on any layer."""
    from softrank.layers import UnsupportedLayerError
    md = build_case("bn-ce").model_data()
    with pytest.raises(UnsupportedLayerError, match="method='exact' .*or method='subsample'"):
        approx_loo(md, 0.1, method, n_points=4, random_state=0)
    assert approx_loo(md, 0.1, "exact").diagnostics["invalid_points"] == 0


@pytest.mark.parametrize("scale", [40.0, 80.0])
def test_nystrom_fisher_rows_keep_confidently_wrong_points_exact(scale):
    """A kept point the net gets confidently wrong (its input scaled up through a
    bias-free ReLU net): its Fisher rows are tiny — far below the Gram's jitter of 1e-10 of
    its mean diagonal — while its residual is not, and the Fisher-row step divides by BᵀB.
    It still equals the step from the Jacobian-row blocks (the own term without the jitter);
    with the jitter left in its own block it was off by 0.09 (scale 40) and 1.5e7 (80)."""
    torch.manual_seed(9)
    net = nn.Sequential(nn.Linear(5, 7, bias=False), nn.ReLU(), nn.Linear(7, 3, bias=False))
    X, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    y[0] = int(net(X[:1]).detach()[0].argmin())
    X[0] *= scale
    md = ModelData(net, nn.CrossEntropyLoss(), X, y, batch_size=8, n_train=90)
    assert float(torch.softmax(net(X[:1]).detach(), 1)[0, y[0]]) < 1e-7
    S = np.array([0, 3, 7, 11, 15, 19, 23, 27])
    L = as_lam(1e-3, md.param_names, md.sizes)
    M, zS, yS, _ = loo_module._nystrom_blocks(md, L, S, True)
    P, *_ = loo_module._nystrom_blocks(md, L, S, False)
    loo_f = loo_module._steps(md.family, M, zS, yS, True)[1]
    loo_j = loo_module._steps(md.family, P, zS, yS, False)[1]
    np.testing.assert_allclose(loo_f, loo_j, rtol=1e-6, atol=1e-6)
