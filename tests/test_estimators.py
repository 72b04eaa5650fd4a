"""GapEstimator family: numbers against float64 references built here with torch.func, the
skorch reading (λ, n, output transform, shapes, Pipeline), the untouched net, and the errors."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from skorch import NeuralNetBinaryClassifier, NeuralNetClassifier, NeuralNetRegressor
from skorch.dataset import ValidSplit
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from softrank import HessianNorm, SoftRankFIM, TIC, TraceRatio
from softrank.curvature import APPROXIMATIONS
from softrank.demo import MLP
from softrank.families import UnsupportedCriterionError

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny nets train fastest on one thread (and far faster than on two on shared cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# -- data and nets -----------------------------------------------------------------------------
def teacher_data(n=60, d=6, k=3, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.randn(n, d)
    logits = X @ rng.randn(d, k) * 1.5
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=pi) for pi in p])
    return X, y


def classifier(wd=1e-2, softmax=True, criterion=nn.NLLLoss, max_epochs=40, hidden=5,
               n_features=6, n_classes=3, dtype=F64, **kw):
    kw.setdefault("train_split", None)
    return NeuralNetClassifier(
        MLP, module__n_features=n_features, module__hidden=hidden, module__n_classes=n_classes,
        module__softmax=softmax, module__dtype=dtype, criterion=criterion,
        optimizer=torch.optim.Adam, lr=0.05, optimizer__weight_decay=wd, max_epochs=max_epochs,
        batch_size=32, verbose=0, **kw)


@pytest.fixture(scope="module")
def data():
    return teacher_data()


@pytest.fixture(scope="module")
def fitted(data):
    X, y = data
    torch.manual_seed(0)
    return classifier().fit(X, y)


# -- independent float64 reference -------------------------------------------------------------
class Reference:
    """Per-sample Jacobians of z = log(p + eps) (skorch's NLLLoss input), then F, C, H dense."""

    def __init__(self, net, X, y):
        module = copy.deepcopy(net.module_).to(F64).eval()
        self.names = [n for n, _ in module.named_parameters()]
        shapes = [p.shape for _, p in module.named_parameters()]
        theta = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
        X = torch.as_tensor(X, dtype=F64)
        self.y = torch.as_tensor(y)

        def unflatten(t):
            out, i = {}, 0
            for n, s in zip(self.names, shapes):
                out[n] = t[i:i + s.numel()].reshape(s)
                i += s.numel()
            return out

        def z_of(t, x):
            p = torch.func.functional_call(module, unflatten(t), (x[None],))[0]
            return torch.log(p + torch.finfo(p.dtype).eps)

        def mean_loss(t):
            z = torch.func.vmap(z_of, (None, 0))(t, X)
            return torch.nn.functional.cross_entropy(z, self.y)

        self.z = torch.func.vmap(z_of, (None, 0))(theta, X)
        J = torch.func.vmap(torch.func.jacrev(z_of), (None, 0))(theta, X)  # (n, K, p)
        pi = torch.softmax(self.z, 1)
        A = torch.diag_embed(pi) - pi[:, :, None] * pi[:, None, :]
        r = pi - torch.nn.functional.one_hot(self.y, pi.shape[1]).to(F64)
        g = torch.einsum("nkp,nk->np", J, r)
        self.n, self.p = len(X), theta.numel()
        self.F = torch.einsum("nkp,nkl,nlq->pq", J, A, J) / self.n
        self.C = g.T @ g / self.n
        self.H = torch.func.hessian(mean_loss)(theta)
        self.loss = float(-self.z[torch.arange(self.n), self.y].mean())
        self.sizes = [s.numel() for s in shapes]

    def lam_matrix(self, lam):
        if isinstance(lam, dict):
            return torch.diag(torch.cat([torch.full((k,), lam[n], dtype=F64)
                                         for n, k in zip(self.names, self.sizes)]))
        return lam * torch.eye(self.p, dtype=F64)

    def soft_rank(self, lam):
        L = self.lam_matrix(lam)
        return float(torch.linalg.solve(self.F + L, self.F).trace())

    def alpha(self):
        return float(self.C.trace() / self.F.trace())

    def tic(self, lam, M=None):
        M = self.F if M is None else M
        return float(torch.linalg.solve(M + self.lam_matrix(lam), self.C).trace())


@pytest.fixture(scope="module")
def ref(fitted, data):
    return Reference(fitted, *data)


# -- numbers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("approximation", ["dense", "gram"])
def test_soft_rank_fim_matches_reference(fitted, data, ref, approximation):
    est = SoftRankFIM(fitted, approximation=approximation).fit(*data)
    rank = ref.soft_rank(1e-2)
    assert est.lam_ == 1e-2 and est.n_train_ == 60 and est.approximation_ == approximation
    assert est.measure_ == pytest.approx(rank, rel=1e-8)
    assert est.gap_ == pytest.approx(ref.alpha() * rank / 60, rel=1e-8)
    assert est.train_loss_ == pytest.approx(ref.loss, rel=1e-10)
    assert est.stderr_ is None
    np.testing.assert_array_equal(est.classes_, [0, 1, 2])
    calibrated = SoftRankFIM(fitted, approximation=approximation, gap_formula="rank").fit(*data)
    assert calibrated.gap_ == pytest.approx(rank / 60, rel=1e-8)


@pytest.mark.filterwarnings("ignore::softrank.measures.IndefiniteWarning")
def test_tic_trace_ratio_hessian_match_reference(fitted, data, ref):
    tic_f = TIC(fitted).fit(*data)
    assert tic_f.measure_ == pytest.approx(ref.tic(1e-2), rel=1e-8)
    assert tic_f.gap_ == pytest.approx(ref.tic(1e-2) / 60, rel=1e-8)
    tic_h = TIC(fitted, variant="hessian").fit(*data)
    assert tic_h.measure_ == pytest.approx(ref.tic(1e-2, ref.H), rel=1e-7)
    tr = TraceRatio(fitted).fit(*data)
    assert tr.measure_ == pytest.approx(ref.alpha(), rel=1e-8)
    assert tr.gap_ == pytest.approx(ref.alpha() / 60, rel=1e-8)
    for ord_, value in [("trace", ref.H.trace()),
                        ("spectral", torch.linalg.eigvalsh(ref.H).abs().max()),
                        ("max_eigenvalue", torch.linalg.eigvalsh(ref.H).max()),
                        ("frobenius", torch.linalg.matrix_norm(ref.H))]:
        hn = HessianNorm(fitted, ord=ord_).fit(*data)
        assert hn.measure_ == pytest.approx(float(value), rel=1e-7)
        assert hn.gap_ is None
        assert hn.score(*data) == -hn.measure_


def test_lam_auto_reads_param_groups(data):
    X, y = data
    torch.manual_seed(0)
    net = classifier(wd=1e-2, optimizer__param_groups=[("out.*", {"weight_decay": 0.1})])
    net.fit(X, y)
    est = SoftRankFIM(net, approximation="dense").fit(X, y)
    lam = {"hidden.weight": 1e-2, "hidden.bias": 1e-2, "out.weight": 0.1, "out.bias": 0.1}
    assert est.lam_ == lam
    assert est.measure_ == pytest.approx(Reference(net, X, y).soft_rank(lam), rel=1e-8)
    explicit = SoftRankFIM(net, lam=0.05, approximation="dense").fit(X, y)
    assert explicit.lam_ == 0.05
    assert explicit.measure_ == pytest.approx(Reference(net, X, y).soft_rank(0.05), rel=1e-8)


def test_params_selects_the_measured_parameters(fitted, data, ref):
    head = ["out.weight", "out.bias"]
    est = SoftRankFIM(fitted, params=head, approximation="dense").fit(*data)
    idx = torch.arange(ref.p)[-(5 * 3 + 3):]  # the head's 18 parameters come last
    F = ref.F[idx][:, idx]
    expected = torch.linalg.solve(F + 1e-2 * torch.eye(18, dtype=F64), F).trace()
    assert est.measure_ == pytest.approx(float(expected), rel=1e-8)
    assert est.result_.diagnostics["trace_F"] == pytest.approx(float(F.trace()), rel=1e-8)


def test_n_curvature_samples_subsamples_without_changing_n(fitted, data):
    a = SoftRankFIM(fitted, n_curvature_samples=30, random_state=0).fit(*data)
    b = SoftRankFIM(fitted, n_curvature_samples=30, random_state=0).fit(*data)
    full = SoftRankFIM(fitted).fit(*data)
    assert a.n_train_ == 60 and a.result_.diagnostics["n_curvature_samples"] == 30
    assert a.measure_ == b.measure_ and a.measure_ != full.measure_
    assert a.train_loss_ == full.train_loss_  # the loss is over all of X


@pytest.mark.skipif("matrix_free" not in APPROXIMATIONS, reason="no matrix-free core yet")
def test_stochastic_approximation_reports_stderr(fitted, data, ref):
    hn = HessianNorm(fitted, approximation="matrix_free", random_state=0).fit(*data)
    assert hn.stderr_ is not None and hn.stderr_ > 0
    assert abs(hn.measure_ - float(ref.H.trace())) < 5 * hn.stderr_ + 1e-9
    again = HessianNorm(fitted, approximation="matrix_free", random_state=0).fit(*data)
    assert again.measure_ == hn.measure_  # random_state makes it reproducible
    sr = SoftRankFIM(fitted, approximation="matrix_free", random_state=0).fit(*data)
    assert abs(sr.measure_ - ref.soft_rank(1e-2)) < 5 * sr.stderr_ + 1e-9


# -- n: what the net trained on ----------------------------------------------------------------
def test_n_train_with_and_without_train_split():
    X, y = teacher_data(n=100)
    torch.manual_seed(0)
    split = classifier(train_split=ValidSplit(5, stratified=True), max_epochs=3).fit(X, y)
    whole = classifier(max_epochs=3).fit(X, y)
    est_split = SoftRankFIM(split).fit(X, y)
    assert (est_split.n_train_, est_split.n_train_source_) == (80, "history")
    assert est_split.result_.n == 80  # the gap estimate divides by 80, not by len(X) = 100
    assert SoftRankFIM(whole).fit(X, y).n_train_ == 100
    # a net restored from parameters has no history: n comes from its train_split on (X, y)
    restored = classifier(train_split=ValidSplit(5, stratified=True)).initialize()
    restored.module_.load_state_dict(split.module_.state_dict())
    est_restored = SoftRankFIM(restored).fit(X, y)
    assert (est_restored.n_train_, est_restored.n_train_source_) == (80, "train_split")
    assert est_restored.measure_ == pytest.approx(est_split.measure_, rel=1e-12)


def test_unfitted_net_is_fitted_on_a_clone_reproducibly(data):
    net = classifier(max_epochs=5)
    a = SoftRankFIM(net, random_state=3).fit(*data)
    b = SoftRankFIM(net, random_state=3).fit(*data)
    assert not hasattr(net, "module_")  # the user's net stays unfitted
    assert a.estimator_ is not net and a.estimator_.initialized_
    assert a.measure_ == b.measure_  # random_state seeds the training
    refit = SoftRankFIM(a.estimator_, prefit=False, random_state=3).fit(*data)
    assert refit.estimator_ is not a.estimator_ and refit.measure_ == a.measure_


# -- the wrapped net is never changed ------------------------------------------------------------
def snapshot(net):
    module = net.module_
    return {
        "state": {k: v.clone() for k, v in module.state_dict().items()},
        "modes": [m.training for m in module.modules()],
        "requires_grad": [p.requires_grad for p in module.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in module.parameters()],
        "optimizer": copy.deepcopy(net.optimizer_.state_dict()),
        "hooks": [(len(m._forward_hooks), len(m._backward_hooks)) for m in module.modules()],
        "history": len(net.history),
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k, v in a["state"].items():
        assert torch.equal(v, b["state"][k]), k
    assert a["modes"] == b["modes"] and a["requires_grad"] == b["requires_grad"]
    for g, h in zip(a["grads"], b["grads"]):
        assert (g is None and h is None) or torch.equal(g, h)
    assert a["hooks"] == b["hooks"] and a["history"] == b["history"]
    for k, v in a["optimizer"]["state"].items():
        for name, t in v.items():
            other = b["optimizer"]["state"][k][name]
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(other))
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_wrapped_net_bit_identical(data, mode):
    X, y = data
    torch.manual_seed(0)
    net = classifier(max_epochs=5).fit(X, y)
    net.module_.train(mode == "train")
    before = snapshot(net)
    est = SoftRankFIM(net, approximation="kfac").fit(X, y)
    est.score(X, y)
    est.transform(X)
    est.predict(X)
    est.predict_proba(X)
    TIC(net).fit(X, y)
    HessianNorm(net).fit(X, y)
    assert est.estimator_ is net
    assert_same(before, snapshot(net))


def test_predict_delegates_to_the_net(fitted, data):
    X, y = data
    est = SoftRankFIM(fitted).fit(X, y)
    np.testing.assert_array_equal(est.predict(X), fitted.predict(X))
    np.testing.assert_allclose(est.predict_proba(X), fitted.predict_proba(X))


# -- transform: leverage scores ------------------------------------------------------------------
def test_transform_leverage(fitted, data, ref):
    X, y = data
    X_new = teacher_data(n=15, seed=1)[0]
    dense = SoftRankFIM(fitted, approximation="dense").fit(X, y)
    gram = SoftRankFIM(fitted, approximation="gram").fit(X, y)
    lev = dense.transform(X)
    assert lev.shape == (60, 1)
    assert lev.sum() == pytest.approx(dense.measure_, rel=1e-8)
    np.testing.assert_allclose(gram.transform(X), lev, rtol=1e-8)
    np.testing.assert_allclose(gram.transform(X_new), dense.transform(X_new), rtol=1e-8)
    # reference for new points: Tr(F_i (F + λI)^-1) / n_fit from a float64 Jacobian
    new = Reference(fitted, X_new, np.zeros(15, dtype=int))
    pi = torch.softmax(new.z, 1)
    inv = torch.linalg.inv(ref.F + 1e-2 * torch.eye(ref.p, dtype=F64))
    J = _jacobians(fitted, X_new)
    A = torch.diag_embed(pi) - pi[:, :, None] * pi[:, None, :]
    expected = torch.einsum("nkp,nkl,nlq,qp->n", J, A, J, inv) / 60
    np.testing.assert_allclose(dense.transform(X_new)[:, 0], expected.numpy(), rtol=1e-8)
    # approximate representations: Tr(F_i (F̃+Λ)^-1), whose sum is close to rank_Λ(F̃)
    for approx in ("kfac", "ekfac", "diagonal"):
        est = SoftRankFIM(fitted, approximation=approx).fit(X, y)
        assert est.transform(X).sum() == pytest.approx(est.measure_, rel=0.25)
    assert not hasattr(TIC(fitted).fit(X, y), "transform")  # its contributions need labels


def _jacobians(net, X):
    module = copy.deepcopy(net.module_).eval()
    params = {n: p.detach() for n, p in module.named_parameters()}

    def z_of(ps, x):
        p = torch.func.functional_call(module, ps, (x[None],))[0]
        return torch.log(p + torch.finfo(p.dtype).eps)

    jac = torch.func.vmap(torch.func.jacrev(z_of), (None, 0))(params, torch.as_tensor(X))
    return torch.cat([jac[n].reshape(len(X), jac[n].shape[1], -1) for n in params], 2)


# -- other skorch nets and Pipelines ------------------------------------------------------------
def test_cross_entropy_classifier_has_no_output_transform(data):
    X, y = data
    torch.manual_seed(0)
    logits = classifier(softmax=False, criterion=nn.CrossEntropyLoss).fit(X, y)
    est = SoftRankFIM(logits, approximation="dense").fit(X, y)
    z = logits.forward(X, training=False)  # logits
    assert est.train_loss_ == pytest.approx(
        float(nn.functional.cross_entropy(z, torch.as_tensor(y))), rel=1e-10)


def test_binary_classifier_shapes():
    X, y = teacher_data(n=50, k=2)
    for out in ("column", "flat"):
        module = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1))
        if out == "flat":
            module.append(nn.Flatten(0))
        torch.manual_seed(0)
        net = NeuralNetBinaryClassifier(module, optimizer__weight_decay=1e-2, max_epochs=10,
                                        lr=0.1, train_split=None, verbose=0)
        est = SoftRankFIM(net, approximation="dense", random_state=0).fit(X.astype(np.float32), y)
        fitted = est.estimator_
        logit = fitted.module_.eval()(torch.as_tensor(X, dtype=torch.float32)).reshape(-1)
        bce = nn.functional.binary_cross_entropy_with_logits(logit.double(),
                                                             torch.as_tensor(y, dtype=F64))
        assert est.train_loss_ == pytest.approx(float(bce), rel=1e-6)
        assert 0 < est.gap_ and est.n_train_ == 50
        np.testing.assert_array_equal(est.classes_, [0, 1])


def test_regressor_accepts_1d_targets():
    rng = np.random.RandomState(0)
    X = rng.randn(40, 3).astype(np.float32)
    y = (X @ [1.0, -2.0, 0.5] + 0.1 * rng.randn(40)).astype(np.float32)
    torch.manual_seed(0)
    net = NeuralNetRegressor(nn.Linear(3, 1), optimizer__weight_decay=1e-2, max_epochs=30,
                             lr=0.05, train_split=None, verbose=0)
    est = SoftRankFIM(net, approximation="dense", random_state=0).fit(X, y)
    pred = est.predict(X)
    assert pred.shape == (40,)  # 1-D like the targets it was fitted on
    assert est.train_loss_ == pytest.approx(float(np.mean((pred - y) ** 2)), rel=1e-5)
    # ridge-like linear model: rank_λ(F) = Σ σ/(σ+λ) over the eigenvalues of F = (2/d) X̃ᵀX̃/n
    Xt = np.hstack([X, np.ones((40, 1), np.float32)]).astype(np.float64)
    sig = np.linalg.eigvalsh(2 * Xt.T @ Xt / 40)
    assert est.measure_ == pytest.approx(float((sig / (sig + 1e-2)).sum()), rel=1e-5)


def test_pipeline_measures_the_net_on_transformed_inputs(data):
    X, y = data
    X = X * 5 + 2
    torch.manual_seed(0)
    pipe = make_pipeline(StandardScaler(), classifier(max_epochs=10))
    est = SoftRankFIM(pipe, approximation="dense", random_state=0).fit(X, y)
    assert est.estimator_ is not pipe and est.n_features_in_ == 6
    fitted_pipe = est.estimator_
    direct = SoftRankFIM(fitted_pipe[-1], approximation="dense").fit(
        fitted_pipe[0].transform(X), y)
    assert est.measure_ == pytest.approx(direct.measure_, rel=1e-12)
    assert est.train_loss_ == pytest.approx(direct.train_loss_, rel=1e-12)
    np.testing.assert_array_equal(est.predict(X), fitted_pipe.predict(X))
    prefit = SoftRankFIM(fitted_pipe, prefit=True, approximation="dense").fit(X, y)
    assert prefit.estimator_ is fitted_pipe and prefit.measure_ == est.measure_


# -- errors --------------------------------------------------------------------------------------
def test_unfitted_net_with_prefit_true(data):
    with pytest.raises(NotFittedError, match="prefit=True but the wrapped NeuralNetClassifier "
                                             "is not fitted"):
        SoftRankFIM(classifier(), prefit=True).fit(*data)


def test_lam_auto_without_weight_decay(data):
    X, y = data
    torch.manual_seed(0)
    no_decay = classifier(wd=0.0, max_epochs=2).fit(X, y)
    with pytest.raises(ValueError, match=r"lam='auto' found no weight decay .*hidden.weight"):
        SoftRankFIM(no_decay).fit(X, y)
    bias_free = classifier(max_epochs=2, optimizer__param_groups=[
        ("*.bias", {"weight_decay": 0.0})]).fit(X, y)
    with pytest.raises(ValueError, match=r"\['hidden.bias', 'out.bias'\]"):
        TIC(bias_free).fit(X, y)
    assert SoftRankFIM(no_decay, lam=1e-3).fit(X, y).lam_ == 1e-3
    with pytest.raises(ValueError, match="must be > 0"):
        SoftRankFIM(no_decay, lam=-1.0).fit(X, y)
    with pytest.raises(ValueError, match="lam must be 'auto'"):
        SoftRankFIM(no_decay, lam="weight_decay").fit(X, y)


def test_bad_inputs(fitted, data):
    X, y = data
    est = SoftRankFIM(fitted).fit(X, y)
    X_nan = X.copy()
    X_nan[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        SoftRankFIM(fitted).fit(X_nan, y)
    with pytest.raises(ValueError, match="X has 5 features, but SoftRankFIM is expecting 6"):
        est.score(X[:, :5], y)
    with pytest.raises(ValueError, match="cannot process X of shape"):
        SoftRankFIM(fitted).fit(X[:, :5], y)
    with pytest.raises(ValueError, match="different numbers of samples|inconsistent"):
        SoftRankFIM(fitted).fit(X, y[:-1])
    y_new = y.copy()
    y_new[0] = 5
    with pytest.raises(ValueError, match=r"labels not seen in training: \[5\]"):
        est.score(X, y_new)
    with pytest.raises(ValueError, match="labels not seen in training"):
        SoftRankFIM(fitted).fit(X, y_new)
    with pytest.raises(ValueError, match="Unknown label type: continuous"):
        SoftRankFIM(fitted).fit(X, y + 0.5)
    with pytest.raises(ValueError, match="LabelEncoder"):
        SoftRankFIM(fitted).fit(X, np.array(["a", "b", "c"] * 20))
    with pytest.raises(ValueError, match="0 sample"):
        SoftRankFIM(fitted).fit(X[:0], y[:0])
    with pytest.raises(ValueError, match="requires y to be passed"):
        SoftRankFIM(fitted).fit(X, None)
    with pytest.raises(ValueError, match="approximation must be one of"):
        SoftRankFIM(fitted, approximation="lanczos").fit(X, y)
    with pytest.raises(ValueError, match="prefit must be"):
        SoftRankFIM(fitted, prefit="yes").fit(X, y)
    with pytest.raises(NotFittedError):
        SoftRankFIM(fitted).score(X, y)


def test_nan_parameters_are_refused(fitted, data):
    broken = copy.deepcopy(fitted)
    with torch.no_grad():
        broken.module_.out.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        SoftRankFIM(broken).fit(*data)


def test_criterion_outside_family_table(data):
    X, y = data
    torch.manual_seed(0)
    margin = classifier(softmax=False, criterion=nn.MultiMarginLoss, max_epochs=3)
    for cls in (SoftRankFIM, TraceRatio):
        with pytest.raises(UnsupportedCriterionError, match="MultiMarginLoss is not in "
                                                            "softrank's family table"):
            cls(margin).fit(X, y)
    with pytest.raises(UnsupportedCriterionError, match="family table"):
        TIC(margin.fit(X, y), variant="fisher").fit(X, y)
    # the Hessian-based measures work for any twice-differentiable criterion
    huber = NeuralNetRegressor(nn.Linear(6, 1, dtype=F64), criterion=nn.HuberLoss,
                               optimizer__weight_decay=1e-2, max_epochs=5, train_split=None,
                               verbose=0)
    y_reg = X[:, 0] + 0.1
    assert HessianNorm(huber, random_state=0).fit(X, y_reg).measure_ > 0
    assert TIC(huber, variant="hessian", random_state=0).fit(X, y_reg).gap_ > 0
    with pytest.raises(UnsupportedCriterionError, match="HuberLoss is not in"):
        SoftRankFIM(huber).fit(X, y_reg)


def test_non_skorch_estimator(data):
    with pytest.raises(TypeError, match="must be a skorch NeuralNetClassifier"):
        SoftRankFIM(LogisticRegression()).fit(*data)
    with pytest.raises(TypeError, match="Pipeline must end in a skorch"):
        SoftRankFIM(make_pipeline(StandardScaler(), LogisticRegression())).fit(*data)
