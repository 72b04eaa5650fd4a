"""Error bars, spectral-norm naming, memory refusal and clear errors: the cases of the shared
bug-case scripts 16 (indefinite Hessian) and 20 (many parameters), the matrix-free error bar of
a float32 net, refusing before allocating beyond the available memory, and unclear errors.
Expected values come from dense float64 references built with torch.func on the same module."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier, NeuralNetRegressor
from torch import nn
from torch.func import functional_call, hessian

import softrank.memory as memory
from softrank import NotStationaryWarning
from softrank import TIC, ApproxLOO, HessianNorm, SoftRankFIM
from softrank.calibration import fit_temperature
from softrank.measures import IndefiniteWarning


def _hessian_reference(module, X, Y, loss):
    """Dense float64 Hessian of the mean loss of ``module`` on (X, Y)."""
    m = copy.deepcopy(module).double().eval()
    names = [k for k, _ in m.named_parameters()]
    shapes = [p.shape for p in m.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    Xt = torch.as_tensor(X, dtype=torch.float64)
    Yt = torch.as_tensor(Y)

    def mean_loss(t):
        params, i = {}, 0
        for k, s in zip(names, shapes):
            c = int(np.prod(s))
            params[k] = t[i:i + c].reshape(s)
            i += c
        return loss(functional_call(m, params, (Xt,)), Yt)

    return hessian(mean_loss)(theta)


# -- bug case 16: indefinite Hessian ------------------------------------------------------------
class TanhNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(2, 3), nn.Linear(3, 1)

    def forward(self, X):
        return self.l2(torch.tanh(self.l1(X)))


@pytest.fixture(scope="module")
def indefinite():
    """An untrained regressor (far from a minimum) whose Hessian's most negative eigenvalue is
    larger in magnitude than its largest one."""
    rng = np.random.RandomState(0)
    X = rng.randn(30, 2).astype(np.float32)
    Y = (5 + rng.randn(30, 1)).astype(np.float32)
    torch.manual_seed(6)
    net = NeuralNetRegressor(TanhNet, criterion=nn.MSELoss, optimizer__weight_decay=1e-3,
                             train_split=None, verbose=0).initialize()
    H = _hessian_reference(net.module_, X, Y, lambda z, y: ((z - y.double()) ** 2).mean())
    ev = torch.linalg.eigvalsh(H)
    assert -ev.min() > ev.max() > 0  # the case: |σ_min| > σ_max
    return net, X, Y, ev


def test_spectral_is_the_norm_and_max_eigenvalue_the_top(indefinite):
    net, X, Y, ev = indefinite
    norm, top = float(ev.abs().max()), float(ev.max())
    for approximation, kw, tol in (("exact", {}, 1e-6), ("matrix_free", {"random_state": 0}, 1e-5)):
        spectral = HessianNorm(net, prefit=True, ord="spectral", approximation=approximation,
                               **kw).fit(X, Y)
        largest = HessianNorm(net, prefit=True, ord="max_eigenvalue",
                              approximation=approximation, **kw).fit(X, Y)
        assert spectral.measure_ == pytest.approx(norm, rel=tol), approximation
        assert largest.measure_ == pytest.approx(top, rel=tol), approximation
    with pytest.warns(IndefiniteWarning):
        TIC(net, prefit=True, variant="hessian", lam=1e-3).fit(X, Y)


# -- matrix-free error bars on a float32 net ------------------------------------------------------
class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, X):
        return self.l2(torch.tanh(self.l1(X)))


@pytest.fixture(scope="module")
def small_classifier():
    rng = np.random.RandomState(0)
    X = rng.randn(80, 6).astype(np.float32)
    y = rng.randint(0, 4, 80)
    torch.manual_seed(0)
    net = NeuralNetClassifier(SmallNet, criterion=nn.CrossEntropyLoss, optimizer=torch.optim.SGD,
                              lr=0.2, optimizer__weight_decay=1e-2, max_epochs=20,
                              train_split=None, verbose=0).fit(X, y)
    return net, X, y


def test_matrix_free_spectral_error_bar_covers_the_seeds(small_classifier):
    """Lanczos' own Ritz bound is ~1e-38 here, but the float32 Hessian-vector products move the
    value by ~1e-8 from seed to seed: the error bar must include the products' rounding."""
    net, X, y = small_classifier
    H = _hessian_reference(net.module_, X, y, nn.functional.cross_entropy)
    exact = float(torch.linalg.matrix_norm(H, 2))
    fits = [HessianNorm(net, prefit=True, ord="spectral", approximation="matrix_free",
                        random_state=s).fit(X, y) for s in range(3)]
    values = np.array([f.measure_ for f in fits])
    for f in fits:
        assert 0 < f.stderr_ < 1e-6 * exact  # informative, not zero
        assert abs(f.measure_ - exact) <= 2 * f.stderr_
    assert values.max() - values.min() <= 2 * min(f.stderr_ for f in fits)


# -- bug case 20 and refusing before allocating ---------------------------------------------------
class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(100, 1000), nn.Linear(1000, 20)

    def forward(self, X):
        return self.l2(torch.relu(self.l1(X)))


@pytest.fixture(scope="module")
def wide():
    rng = np.random.RandomState(0)
    X = rng.randn(40, 100).astype(np.float32)
    y = rng.randint(0, 20, 40)
    torch.manual_seed(0)
    net = NeuralNetClassifier(Wide, criterion=nn.CrossEntropyLoss, optimizer__weight_decay=1e-3,
                              max_epochs=1, train_split=None, verbose=0).fit(X, y)
    return net, X, y


def test_many_parameters_exact_picks_gram_and_hessian_advice_is_matrix_free(wide):
    net, X, y = wide
    assert SoftRankFIM(net, prefit=True).fit(X, y).approximation_ == "gram"
    with pytest.raises(MemoryError, match="memory_budget=95.37 MiB"):
        SoftRankFIM(net, prefit=True, approximation="dense", memory_budget="100MB").fit(X, y)
    with pytest.raises(MemoryError) as info:  # 3·8·p² ≈ 380 GiB: above any machine here
        HessianNorm(net, prefit=True).fit(X, y)
    msg = str(info.value)
    assert msg.startswith("HessianNorm") and "approximation='matrix_free'" in msg
    assert "gram" not in msg and "kfac" not in msg
    with pytest.raises(ValueError, match="needs the Hessian.*matrix_free"):
        HessianNorm(net, prefit=True, approximation="kfac").fit(X, y)


@pytest.fixture
def small_machine(monkeypatch):
    """Pretend 200 KiB are available; no data pass may start."""
    monkeypatch.setattr(memory, "available_memory",
                        lambda device=None: (200 * 2 ** 10, "test memory"))

    def no_data_pass(*args, **kwargs):
        raise AssertionError("a data pass started before the memory check")

    from softrank.model import ModelData
    monkeypatch.setattr(ModelData, "batches", no_data_pass)


@pytest.mark.parametrize("make, must, must_not", [
    (lambda net: SoftRankFIM(net, prefit=True, approximation="gram"),
     ["SoftRankFIM", "approximation='gram'", "the 200.00 KiB of test memory",
      "approximation='diagonal'"], []),
    (lambda net: ApproxLOO(net, prefit=True, method="exact"),
     ["ApproxLOO(method='exact')", "200.00 KiB of test memory", "n_curvature_samples"],
     ["approximation="]),
    (lambda net: HessianNorm(net, prefit=True),
     ["HessianNorm", "200.00 KiB of test memory"], ["gram", "kfac", "ekfac", "diagonal"]),
])
def test_refuses_beyond_available_memory_before_any_data_pass(small_classifier, small_machine,
                                                              make, must, must_not):
    net, X, y = small_classifier
    with pytest.raises(MemoryError) as info:
        make(net).fit(X, y)
    msg = str(info.value)
    for text in must:
        assert text in msg
    for text in must_not:
        assert text not in msg
    assert "set memory_budget" in msg and "Nothing was computed" in msg


def test_an_explicit_budget_overrides_the_available_memory(small_classifier, monkeypatch):
    net, X, y = small_classifier
    monkeypatch.setattr(memory, "available_memory", lambda device=None: (2 ** 20, "test memory"))
    est = SoftRankFIM(net, prefit=True, approximation="gram", memory_budget="1GB").fit(X, y)
    assert est.measure_ > 0


def test_available_memory_reads_this_machine():
    found = memory.available_memory()
    assert found is not None and 0 < found[0] and isinstance(found[1], str)


# -- unclear errors -------------------------------------------------------------------------------
class TenOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 10)

    def forward(self, X):
        return self.l(X)


class NoParameters(nn.Module):
    def forward(self, X):
        return X[:, :3]


def _unfitted(module=TenOut):
    return NeuralNetClassifier(module, criterion=nn.CrossEntropyLoss, max_epochs=1,
                               train_split=None, verbose=0)


@pytest.fixture(scope="module")
def data4():
    rng = np.random.RandomState(0)
    return rng.randn(30, 4).astype(np.float32), rng.randint(0, 10, 30)


def test_label_beyond_the_module_outputs_is_named_before_training(data4):
    X, y = data4
    y = y.copy()
    y[0] = 15
    with pytest.raises(ValueError, match="label 15, but the module has 10 outputs"):
        SoftRankFIM(_unfitted()).fit(X, y)


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), "lots", True, -5, "0MB"])
def test_memory_budget_must_be_a_finite_positive_size(data4, budget):
    with pytest.raises(ValueError, match="memory_budget"):
        SoftRankFIM(_unfitted(), memory_budget=budget).fit(*data4)


def test_complex_lam_is_named(data4):
    with pytest.raises(TypeError, match="lam must be real.*complex"):
        SoftRankFIM(_unfitted(), lam=1j).fit(*data4)


def test_values_overflowing_float32_are_named_as_such(data4):
    X, y = data4
    X = X.astype(np.float64)
    X[0, 0] = 1e39
    with pytest.raises(ValueError, match="overflow the module's dtype float32") as info:
        SoftRankFIM(_unfitted()).fit(X, y)
    assert "NaN" not in str(info.value)


def test_module_without_parameters(data4):
    X, y = data4
    with pytest.raises(ValueError, match="NoParameters has no parameters"):
        SoftRankFIM(_unfitted(NoParameters), prefit=False).fit(X, y % 3)


def test_fit_temperature_refuses_nan_logits():
    rng = np.random.RandomState(0)
    logits, y = rng.randn(20, 3), rng.randint(0, 3, 20)
    assert np.isfinite(fit_temperature(logits, y))
    logits[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_temperature(logits, y)
    with pytest.raises(ValueError, match="labels must be integers in 0..2"):
        fit_temperature(rng.randn(20, 3), np.full(20, 3))
    with pytest.raises(ValueError, match="20 samples but y has 19"):
        fit_temperature(rng.randn(20, 3), y[:19])


def test_converged_matrix_free_estimates_do_not_warn(small_classifier):
    net, X, y = small_classifier
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the fixture's net is not at a minimizer: that warning is not the one tested here
        warnings.filterwarnings("ignore", category=NotStationaryWarning)
        HessianNorm(net, prefit=True, ord="spectral", approximation="matrix_free",
                    random_state=0).fit(X, y)
