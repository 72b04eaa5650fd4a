"""Model structures and inputs a skorch user brings, against float64 references.

Shared and reused parameters (weights tied between two modules, a module called twice, a weight
used outside its module's call), submodules never called, an LSTM regressor, ``nn.Embedding``
on integer token ids, and X given as a dict, a skorch ``SliceDict`` or a torch ``Dataset``.
Every expected value is an independent float64 reference (tests/_float64_reference.py: plain
autograd, one sample at a time, on a float64 copy of the same trained module); where softrank
cannot compute a quantity (KFAC on shared weights or an LSTM), the test pins a clear error that
names the problem and offers only options the raising estimator has.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier, NeuralNetRegressor
from skorch.helper import SliceDict
from torch import nn
from torch.nn import functional as Fn

from softrank import TIC, ApproxLOO, HessianNorm, ModelData, SoftRankFIM, TraceRatio, curvature
from softrank.layers import JacobianRule, UnsupportedLayerError

from ._float64_reference import Reference64, rel_err

LAM = 1e-2
RTOL = 1e-5  # float32 nets against float64 references of the same weights


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _classifier(module, X, y, epochs=20, **kw):
    torch.manual_seed(0)
    return NeuralNetClassifier(module, criterion=nn.CrossEntropyLoss, optimizer=torch.optim.SGD,
                               lr=0.2, optimizer__weight_decay=LAM, max_epochs=epochs,
                               train_split=None, verbose=0, **kw).fit(X, y)


def _data(n=60, d=4, K=3, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randn(n, d).astype(np.float32), rng.randint(0, K, n)


# ------------------------------------------------------------------ shared parameters
class Tied(nn.Module):
    """b's weight is a's (a tied embedding/decoder pair in miniature)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.b.weight = self.a.weight

    def forward(self, X):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(X)))))


class Reuse(nn.Module):
    """One module called twice."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, X):
        return self.head(torch.tanh(self.a(torch.tanh(self.a(X)))))


class Outside(nn.Module):
    """a's weight used a second time outside a's call (no hook sees it)."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, X):
        h = torch.tanh(self.a(X))
        return self.head(torch.tanh(Fn.linear(h, self.a.weight)))


@pytest.fixture(scope="module", params=[Tied, Reuse, Outside])
def shared(request):
    X, y = _data()
    net = _classifier(request.param, X, y)
    return request.param.__name__, net, X, y, Reference64(net.module_, X, y, "ce")


@pytest.mark.parametrize("approximation", ["exact", "dense", "gram"])
def test_shared_parameters_count_every_use(shared, approximation):
    name, net, X, y, ref = shared
    est = SoftRankFIM(net, prefit=True, lam=LAM, approximation=approximation).fit(X, y)
    assert rel_err(est.measure_, ref.soft_rank(LAM)) < RTOL, name
    assert rel_err(est.gap_, ref.gap(LAM)) < RTOL, name  # exact traces of C and F inside


def test_shared_parameters_exact_traces_and_tic(shared):
    name, net, X, y, ref = shared
    tr = TraceRatio(net, prefit=True).fit(X, y).result_.diagnostics
    assert rel_err(tr["trace_F"], float(ref.F.trace())) < RTOL, name
    assert rel_err(tr["trace_C"], float(ref.C.trace())) < RTOL, name
    tic = TIC(net, prefit=True, lam=LAM, approximation="gram").fit(X, y).measure_
    assert rel_err(tic, ref.tic(LAM)) < RTOL, name


def test_shared_parameters_diagonal_is_the_exact_diagonal(shared):
    name, net, X, y, ref = shared
    md = ModelData(net.module_, net.criterion_, X, y)
    assert isinstance(md.rules[0], JacobianRule), name
    D = curvature(md, "fisher", "diagonal").diagonal()
    assert float((D - ref.F.diagonal()).abs().max()) < RTOL * float(ref.F.diagonal().max())


def test_shared_parameters_approx_loo(shared):
    """ApproxLOO's exact blocks satisfy Σ_i tr(A_i P_i) = rank_λ(F) (n_train = n)."""
    name, net, X, y, ref = shared
    est = ApproxLOO(net, prefit=True, lam=LAM).fit(X, y)
    assert rel_err(est.soft_rank_, ref.soft_rank(LAM)) < RTOL, name
    sub = ApproxLOO(net, prefit=True, lam=LAM, method="subsample", n_points=5,
                    random_state=0).fit(X, y)  # no KFAC preconditioner for these layers
    assert np.isfinite(sub.measure_)


@pytest.mark.parametrize("model, reason", [
    (Tied, r"parameter 'a.weight' is shared by the modules 'a' and 'b'"),
    (Reuse, r"module 'a' \(Linear\) is called 2 times in one forward pass"),
    (Outside, r"do not reproduce the network's gradient"),
])
def test_kfac_refuses_shared_parameters_with_advice_the_estimator_has(model, reason):
    X, y = _data(n=20)
    net = _classifier(model, X, y, epochs=1)
    with pytest.raises(UnsupportedLayerError, match=reason) as err:
        SoftRankFIM(net, prefit=True, lam=LAM, approximation="kfac").fit(X, y)
    assert "approximation='exact', 'gram', 'diagonal' or 'matrix_free'" in str(err.value)
    with pytest.raises(UnsupportedLayerError, match=reason) as err:
        ApproxLOO(net, prefit=True, lam=LAM, method="kfac").fit(X, y)
    assert "approximation=" not in str(err.value)  # ApproxLOO has no such parameter


# ------------------------------------------------------------------ unused parameters
class Leftover(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.old_head = nn.Linear(6, 5)  # never called

    def forward(self, X):
        return self.l2(torch.tanh(self.l1(X)))


USED = ["l1.weight", "l1.bias", "l2.weight", "l2.bias"]


@pytest.fixture(scope="module")
def leftover():
    X, y = _data(n=50)
    net = _classifier(Leftover, X, y)
    return net, X, y, Reference64(net.module_, X, y, "ce", names=USED)


@pytest.mark.parametrize("approximation", ["exact", "dense", "gram"])
def test_unused_parameters_have_zero_curvature(leftover, approximation):
    net, X, y, ref = leftover
    est = SoftRankFIM(net, prefit=True, lam=LAM, approximation=approximation).fit(X, y)
    assert rel_err(est.measure_, ref.soft_rank(LAM)) < RTOL
    assert rel_err(est.gap_, ref.gap(LAM)) < RTOL


@pytest.mark.parametrize("approximation", ["diagonal", "kfac", "ekfac"])
def test_unused_parameters_add_nothing_to_approximations(leftover, approximation):
    net, X, y, _ = leftover
    every = SoftRankFIM(net, prefit=True, lam=LAM, approximation=approximation).fit(X, y)
    used = SoftRankFIM(net, prefit=True, lam=LAM, approximation=approximation,
                       params=USED).fit(X, y)
    assert every.measure_ == pytest.approx(used.measure_, rel=1e-10)


@pytest.mark.parametrize("method", ["exact", "kfac"])
def test_unused_parameters_approx_loo(leftover, method):
    net, X, y, ref = leftover
    every = ApproxLOO(net, prefit=True, lam=LAM, method=method).fit(X, y)
    used = ApproxLOO(net, prefit=True, lam=LAM, method=method, params=USED).fit(X, y)
    assert every.measure_ == pytest.approx(used.measure_, rel=1e-8)
    if method == "exact":
        assert rel_err(every.soft_rank_, ref.soft_rank(LAM)) < RTOL


def test_unused_parameters_hessian(leftover):
    net, X, y, ref = leftover
    trH = HessianNorm(net, prefit=True).fit(X, y).measure_
    assert rel_err(trH, float(ref.H().trace())) < RTOL


# ------------------------------------------------------------------ LSTM
class SeqReg(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 5, batch_first=True)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(5, 1)

    def forward(self, X):
        h, _ = self.lstm(X)
        return self.out(self.drop(h[:, -1]))


@pytest.fixture(scope="module")
def lstm():
    rng = np.random.RandomState(0)
    X = rng.randn(40, 4, 3).astype(np.float32)
    y = (X[:, :, 0].sum(1) + 0.3 * rng.randn(40)).astype(np.float32)
    torch.manual_seed(0)
    net = NeuralNetRegressor(SeqReg, criterion=nn.MSELoss, optimizer=torch.optim.Adam, lr=0.02,
                             optimizer__weight_decay=LAM, max_epochs=20, train_split=None,
                             verbose=0).fit(X, y)
    net.module_.train()  # the user's net stays in train mode (dropout on)
    return net, X, y, Reference64(net.module_, X, y[:, None], "mse")


@pytest.mark.parametrize("approximation", ["exact", "gram", "dense"])
def test_lstm_soft_rank(lstm, approximation):
    net, X, y, ref = lstm
    modes = [m.training for m in net.module_.modules()]
    est = SoftRankFIM(net, prefit=True, lam=LAM, approximation=approximation).fit(X, y)
    assert rel_err(est.measure_, ref.soft_rank(LAM)) < RTOL
    assert modes == [m.training for m in net.module_.modules()]


def test_lstm_traces_tic_and_hessian(lstm):
    net, X, y, ref = lstm
    tr = TraceRatio(net, prefit=True).fit(X, y).result_.diagnostics
    assert rel_err(tr["trace_F"], float(ref.F.trace())) < RTOL
    assert rel_err(tr["trace_C"], float(ref.C.trace())) < RTOL
    assert rel_err(TIC(net, prefit=True, lam=LAM).fit(X, y).measure_, ref.tic(LAM)) < RTOL
    assert rel_err(HessianNorm(net, prefit=True).fit(X, y).measure_,
                   float(ref.H().trace())) < 1e-4  # float32 second derivatives


def test_lstm_kfac_names_the_layer(lstm):
    net, X, y, _ = lstm
    with pytest.raises(UnsupportedLayerError, match=r"module 'lstm' \(LSTM\) returns a tuple"):
        SoftRankFIM(net, prefit=True, lam=LAM, approximation="kfac").fit(X, y)


def test_float64_lstm_without_torch_func_batching():
    """torch.func cannot vmap nn.LSTM in float64: Jacobians fall back to one sample at a time
    and the dense Hessian to reverse-over-reverse; exact to float64 precision."""
    torch.manual_seed(1)
    module = SeqReg().double().eval()
    module.lstm, module.out = nn.LSTM(3, 2, batch_first=True).double(), nn.Linear(2, 1).double()
    X = torch.randn(12, 4, 3, dtype=torch.float64)
    y = torch.randn(12, 1, dtype=torch.float64)
    md = ModelData(module, nn.MSELoss(), X, y, batch_size=5)
    ref = Reference64(module, X, y, "mse")
    assert rel_err(curvature(md, "fisher", "gram").soft_rank(LAM), ref.soft_rank(LAM)) < 1e-9
    assert rel_err(curvature(md, "fisher", "dense").soft_rank(LAM), ref.soft_rank(LAM)) < 1e-9
    assert rel_err(curvature(md, "hessian", "dense").trace(), float(ref.H().trace())) < 1e-9
    v = torch.randn(md.n_params, dtype=torch.float64)
    from softrank.curvature import hessian_vector_product
    assert float((hessian_vector_product(md, v) - ref.H() @ v).norm()) < 1e-9 * float(
        (ref.H() @ v).norm())


# ------------------------------------------------------------------ integer inputs
class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(12, 4), nn.Linear(4, 3)

    def forward(self, X):
        return self.out(torch.tanh(self.emb(X).mean(1)))


def test_embedding_on_token_ids():
    rng = np.random.RandomState(0)
    X, y = rng.randint(0, 12, (60, 5)).astype(np.int64), rng.randint(0, 3, 60)
    net = _classifier(Bag, X, y)
    ref = Reference64(net.module_, X, y, "ce")
    est = SoftRankFIM(net, prefit=True, lam=LAM).fit(X, y)
    assert rel_err(est.measure_, ref.soft_rank(LAM)) < RTOL
    assert ModelData(net.module_, net.criterion_, X, y).X.dtype == torch.int64
    assert est.predict(X).shape == (60,)
    fresh = NeuralNetClassifier(Bag, criterion=nn.CrossEntropyLoss, max_epochs=2,
                                train_split=None, verbose=0)
    assert np.isfinite(SoftRankFIM(fresh, lam=LAM, random_state=0).fit(X, y).measure_)


def test_integer_valued_features_for_a_floating_point_module():
    """An MLP fed int64 features (counts): cast to the module's dtype, same numbers."""
    X, y = _data()
    Xi = np.round(3 * X).astype(np.int64)
    net = _classifier(Tied, Xi.astype(np.float32), y, epochs=2)
    a = SoftRankFIM(net, prefit=True, lam=LAM).fit(Xi, y)
    b = SoftRankFIM(net, prefit=True, lam=LAM).fit(Xi.astype(np.float32), y)
    assert a.measure_ == b.measure_ and np.array_equal(a.predict(Xi), b.predict(Xi))


def test_inputs_the_module_cannot_take_name_the_dtype():
    X, y = _data(n=10)
    net = _classifier(Bag, np.zeros((10, 5), np.int64), y, epochs=1)
    with pytest.raises(ValueError, match=r"cannot process X of shape \(10, 4\) and dtype "
                                         r"torch.float32") as err:
        ModelData(net.module_, net.criterion_, X, y)
    assert "number of features" not in str(err.value)


# ------------------------------------------------------------------ dict, SliceDict, Dataset
class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(2, 4), nn.Linear(8, 3)

    def forward(self, xa, xb):
        return self.out(torch.cat([torch.tanh(self.a(xa)), torch.tanh(self.b(xb))], 1))


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.X.items()}, self.y[i]


@pytest.fixture(scope="module")
def two_inputs():
    rng = np.random.RandomState(0)
    Xd = {"xa": rng.randn(50, 3).astype(np.float32), "xb": rng.randn(50, 2).astype(np.float32)}
    y = rng.randint(0, 3, 50)
    net = _classifier(TwoInputs, Xd, y, epochs=5)
    return net, Xd, y, Reference64(net.module_, Xd, y, "ce")


@pytest.mark.parametrize("kind", ["dict", "SliceDict", "Dataset"])
def test_named_inputs(two_inputs, kind):
    net, Xd, y, ref = two_inputs
    X, yy = {"dict": (Xd, y), "SliceDict": (SliceDict(**Xd), y),
             "Dataset": (PairDataset(Xd, y), None)}[kind]
    est = SoftRankFIM(net, prefit=True, lam=LAM).fit(X, yy)
    assert rel_err(est.measure_, ref.soft_rank(LAM)) < RTOL
    assert est.score(X, yy) == pytest.approx(-(ref.train_loss() + ref.gap(LAM)), rel=RTOL)
    assert est.predict(X).shape == (50,) and est.predict_proba(X).shape == (50, 3)
    lev = est.transform(X)
    assert lev.shape == (50, 1) and lev.sum() == pytest.approx(est.measure_, rel=1e-8)


def test_named_inputs_through_every_approximation(two_inputs):
    net, Xd, y, ref = two_inputs
    for approximation in ("gram", "kfac", "diagonal", "matrix_free"):
        v = SoftRankFIM(net, prefit=True, lam=LAM, approximation=approximation,
                        random_state=0).fit(Xd, y).measure_
        assert np.isfinite(v) and v > 0, approximation
    assert rel_err(HessianNorm(net, prefit=True).fit(Xd, y).measure_,
                   float(ref.H().trace())) < 1e-4
    assert np.isfinite(ApproxLOO(net, prefit=True, lam=LAM, method="subsample", n_points=4,
                                 random_state=0).fit(Xd, y).measure_)


def test_a_fresh_net_fits_on_named_inputs(two_inputs):
    _, Xd, y, _ = two_inputs
    fresh = NeuralNetClassifier(TwoInputs, criterion=nn.CrossEntropyLoss, max_epochs=2,
                                train_split=None, verbose=0)
    est = SoftRankFIM(fresh, lam=LAM, random_state=0).fit(Xd, y)
    assert np.isfinite(est.measure_) and est.n_train_ == 50


def test_unusable_datasets_get_clear_errors(two_inputs):
    net, Xd, y, _ = two_inputs

    class NoPairs(PairDataset):
        def __getitem__(self, i):
            return {k: v[i] for k, v in self.X.items()}

    with pytest.raises(ValueError, match=r"X is a torch Dataset \(PairDataset\).*pass y=None"):
        SoftRankFIM(net, prefit=True, lam=LAM).fit(PairDataset(Xd, y), y)
    with pytest.raises(ValueError, match=r"items of the torch Dataset X \(NoPairs\) must be "
                                         r"\(Xi, yi\) pairs"):
        SoftRankFIM(net, prefit=True, lam=LAM).fit(NoPairs(Xd, y), None)
    with pytest.raises(ValueError, match="different numbers of samples"):
        SoftRankFIM(net, prefit=True, lam=LAM).fit({"xa": Xd["xa"], "xb": Xd["xb"][:40]}, y)
