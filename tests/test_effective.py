"""Effective Λ of nets as trained: the optimizer route against closed forms (one full-batch Adam
step: Λ = (|g|+ε)/η; SGD: (1−μ)/(ηT)), the balance route's least-squares property against a
float64 autograd gradient, the center in the stationarity of the effective objective,
lam='effective' in the estimators and GridSearchCV, the user's net untouched, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from skorch import NeuralNetClassifier
from torch import nn

from softrank import (ApproxLOO, EffectiveLam, InitialParameters, InSampleSplit, SoftRankFIM,
                      effective_lam, relative_stationarity)
from tests.test_estimators import assert_same, snapshot, teacher_data
from tests.test_stationarity import TanhMLP

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore::softrank.NotStationaryWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def net_of(optimizer=torch.optim.Adam, wd=1e-3, epochs=5, batch_size=16, lr=0.02, seed=0,
           **kw):
    torch.manual_seed(seed)
    return NeuralNetClassifier(TanhMLP, module__dtype=F64, criterion=nn.CrossEntropyLoss,
                               optimizer=optimizer, lr=lr, optimizer__weight_decay=wd,
                               max_epochs=epochs, batch_size=batch_size, train_split=None,
                               verbose=0, **{"callbacks": [InitialParameters()], **kw})


@pytest.fixture(scope="module")
def data():
    return teacher_data()


@pytest.fixture(scope="module")
def trained(data):
    X, y = data
    return net_of().fit(X, y)


def _theta0(net):
    return dict(net.callbacks_)["InitialParameters"].theta0_


def _flat(net, names=None):
    named = dict(net.module_.named_parameters())
    names = names or list(named)
    return torch.cat([named[n].detach().double().reshape(-1) for n in names])


def _grad(net, X, y, theta=None):
    """float64 ∇ of the mean cross-entropy at the net's parameters (autograd, full batch)."""
    module = TanhMLP(dtype=F64)
    module.load_state_dict(net.module_.state_dict())
    loss = nn.functional.cross_entropy(module(torch.as_tensor(X, dtype=F64)),
                                       torch.as_tensor(y))
    grads = torch.autograd.grad(loss, list(module.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def test_one_adam_step_closed_form(data):
    """One full-batch Adam step from θ₀: v̂ = g², so Λ = (|g(θ₀)| + ε)/η per element."""
    X, y = data
    net = net_of(wd=0.0, epochs=1, batch_size=len(X), lr=0.01).fit(X, y)
    module = TanhMLP(dtype=F64)
    module.load_state_dict({k: v for k, v in _theta0(net).items()})
    loss = nn.functional.cross_entropy(module(torch.as_tensor(X, dtype=F64)),
                                       torch.as_tensor(y))
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(module.parameters()))])
    L = effective_lam(net, X, y, per="element")
    assert L.weight_decay == 0.0 and L.per == "element"
    torch.testing.assert_close(L.lam, (g.abs() + 1e-8) / 0.01, rtol=1e-10, atol=0)


def test_sgd_closed_form(data):
    """SGD with momentum μ after T steps: Λ_es = (1 − μ)/(ηT), plus the weight decay."""
    X, y = data
    net = net_of(optimizer=torch.optim.SGD, wd=1e-3, epochs=3, batch_size=20, lr=0.1,
                 optimizer__momentum=0.9).fit(X, y)  # 60 samples / 20 = 3 steps per epoch
    L = effective_lam(net, X, y, per="scalar")
    assert L.lam == pytest.approx(1e-3 + 0.1 / (0.1 * 9), rel=1e-12)


def test_optimizer_per_layer_is_median_of_elements(trained, data):
    """One value per module (weight and bias together, as KFAC needs): the median of its
    elements' values."""
    X, y = data
    elem = effective_lam(trained, X, y, per="element")
    layer = effective_lam(trained, X, y, per="layer")
    sizes = [p.numel() for p in trained.module_.parameters()]
    chunks = dict(zip(layer.lam, elem.lam.split(sizes)))
    for module in ("hidden", "out"):
        values = torch.cat([chunks[f"{module}.weight"], chunks[f"{module}.bias"]]) - 1e-3
        expected = 1e-3 + float(np.median(values.numpy()))
        assert layer.lam[f"{module}.weight"] == pytest.approx(expected, rel=1e-12)
        assert layer.lam[f"{module}.bias"] == layer.lam[f"{module}.weight"]
    assert layer.lam["hidden.weight"] != layer.lam["out.weight"]
    scalar = effective_lam(trained, X, y, per="scalar")
    assert scalar.lam == pytest.approx(1e-3 + float(np.median((elem.lam - 1e-3).numpy())),
                                       rel=1e-12)


@pytest.mark.parametrize("per", ["scalar", "layer"])
def test_balance_is_least_squares(trained, data, per):
    """λ_es minimizes ‖∇J + λ_es(θ − θ₀)‖ (per layer: each layer's residual ⟂ its θ − θ₀)."""
    X, y = data
    L = effective_lam(trained, X, y, method="balance", per=per)
    names = list(dict(trained.module_.named_parameters()))
    theta = _flat(trained)
    theta0 = torch.cat([_theta0(trained)[n].reshape(-1) for n in names])
    d = theta - theta0
    g = _grad(trained, X, y) + 1e-3 * theta  # ∇ of the objective as trained
    sizes = [p.numel() for p in trained.module_.parameters()]
    lam = (torch.full_like(theta, L.lam) if per == "scalar" else
           torch.cat([torch.full((s,), L.lam[n], dtype=F64) for n, s in zip(names, sizes)]))
    residual = g + (lam - 1e-3) * d
    layer_sizes = [sizes[0] + sizes[1], sizes[2] + sizes[3]]  # (hidden.weight, .bias), (out...)
    blocks = ([(residual, d)] if per == "scalar" else
              zip(residual.split(layer_sizes), d.split(layer_sizes)))
    for res, dd in blocks:
        assert abs(float(res @ dd)) <= 1e-8 * float(res.norm() * dd.norm())
    assert (lam > 1e-3).all()  # the budget pulls back toward θ₀ on this net


def test_balance_without_pull_back(trained, data):
    """A residual gradient pointing away from θ₀: with weight decay the budget adds nothing
    (Λ_eff = Λ); without weight decay there is no positive Λ to report — a clear error."""
    X, y = data
    names = list(dict(trained.module_.named_parameters()))
    theta = _flat(trained)
    g = _grad(trained, X, y) + 1e-3 * theta
    away = theta - g  # θ − θ₀ = g: ⟨∇J, θ − θ₀⟩ > 0
    L = effective_lam(trained, X, y, method="balance", per="scalar", theta0=away)
    assert L.lam == pytest.approx(1e-3, rel=1e-12)
    layer = effective_lam(trained, X, y, method="balance", per="layer", theta0=away)
    assert list(layer.lam) == names  # every layer: ⟨g_l, θ_l − θ₀_l⟩ = ‖g_l‖² > 0
    assert all(v == pytest.approx(1e-3, rel=1e-12) for v in layer.lam.values())
    with pytest.raises(ValueError, match="does not pull the net back"):
        effective_lam(trained, X, y, method="balance", per="scalar", theta0=away, lam=0.0)


def test_stationarity_of_the_effective_objective(trained, data):
    """r with an EffectiveLam = ‖∇L + Λθ + Λ_es(θ − θ₀)‖ / ‖Λθ + Λ_es(θ − θ₀)‖."""
    X, y = data
    L = effective_lam(trained, X, y, method="balance", per="scalar")
    theta = _flat(trained)
    theta0 = torch.cat([v.reshape(-1) for v in _theta0(trained).values()])
    pull = 1e-3 * theta + (L.lam - 1e-3) * (theta - theta0)
    expected = float((_grad(trained, X, y) + pull).norm() / pull.norm())
    assert relative_stationarity(trained, X, y, lam=L) == pytest.approx(expected, rel=1e-8)
    # the balance removes the part of the residual along θ − θ₀: r drops below the trained r
    assert relative_stationarity(trained, X, y, lam=L) < relative_stationarity(trained, X, y)


def test_lam_effective_in_estimators_and_grid_search(trained, data):
    X, y = data
    before = snapshot(trained)
    by_name = ApproxLOO(trained, lam="effective", method="exact", prefit=True).fit(X, y)
    explicit = ApproxLOO(trained, lam=effective_lam(trained, X, y), method="exact",
                         prefit=True).fit(X, y)
    assert by_name.gap_ == explicit.gap_
    assert isinstance(by_name.lam_, EffectiveLam)
    assert by_name.stationarity_ == pytest.approx(explicit.stationarity_, rel=1e-12)
    plain = ApproxLOO(trained, method="exact", prefit=True).fit(X, y)
    assert by_name.gap_ < plain.gap_  # a larger Λ: a smaller leave-one-out gap
    assert_same(before, snapshot(trained))
    # the center changes r only, never the estimate: Λ alone gives the same gap
    as_tensor = ApproxLOO(trained, lam=explicit.lam_.lam, method="exact", prefit=True).fit(X, y)
    assert as_tensor.gap_ == pytest.approx(explicit.gap_, rel=1e-12)
    assert "effective Λ" in str(by_name.summary())
    search = GridSearchCV(SoftRankFIM(net_of(epochs=2), lam="effective"),
                          {"estimator__optimizer__weight_decay": [1e-3, 1e-1]},
                          cv=InSampleSplit()).fit(X, y)
    assert search.best_params_ and np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert clone(SoftRankFIM(trained, lam="effective")).lam == "effective"


def test_per_layer_lam_reaches_kfac(trained, data):
    X, y = data
    est = SoftRankFIM(trained, lam="effective", approximation="kfac", prefit=True).fit(X, y)
    exact = SoftRankFIM(trained, lam="effective", prefit=True).fit(X, y)
    assert 0 < est.measure_ and 0 < exact.measure_ < sum(p.numel() for p in
                                                         trained.module_.parameters())


def test_per_element_lam_reaches_approx_loo_and_gram_refuses(trained, data):
    X, y = data
    L = effective_lam(trained, X, y, per="element")
    loo = ApproxLOO(trained, lam=L, method="exact", prefit=True).fit(X, y)
    assert np.isfinite(loo.gap_) and loo.gap_ > 0
    with pytest.raises(ValueError, match="per-element"):
        SoftRankFIM(trained, lam=L, approximation="gram", prefit=True).fit(X, y)


def test_initial_parameters_records_the_start(data):
    X, y = data
    net = net_of(epochs=1)
    net.initialize()
    start = {k: v.detach().clone() for k, v in net.module_.named_parameters()}
    net.fit(X, y)  # fit re-initializes: record the fresh parameters of this fit
    recorded = _theta0(net)
    assert recorded.keys() == start.keys()
    first = {k: v.clone() for k, v in recorded.items()}
    net.partial_fit(X, y)  # continues: keeps the first record
    for k in first:
        assert torch.equal(_theta0(net)[k], first[k])


@pytest.mark.parametrize("kwargs, match", [
    (dict(lam=-1e-3), "finite number ≥ 0"),
    (dict(lam=float("nan")), "finite number ≥ 0"),
    (dict(lam={"hidden.weight": 1e-3}), "no value for parameters"),
    (dict(method="newton"), "method must be one of"),
    (dict(per="tensor"), "per must be one of"),
    (dict(method="balance", per="element"), "per layer or one overall"),
])
def test_bad_options(trained, data, kwargs, match):
    X, y = data
    with pytest.raises(ValueError, match=match):
        effective_lam(trained, X, y, **kwargs)


def test_balance_needs_theta0_and_optimizer_needs_a_known_state(data):
    X, y = data
    torch.manual_seed(0)
    net = NeuralNetClassifier(TanhMLP, module__dtype=F64, criterion=nn.CrossEntropyLoss,
                              optimizer=torch.optim.RMSprop, lr=0.01, max_epochs=1,
                              train_split=None, verbose=0).fit(X, y)
    with pytest.raises(ValueError, match="InitialParameters"):
        effective_lam(net, X, y, method="balance")
    with pytest.raises(ValueError, match="RMSprop is neither"):
        effective_lam(net, X, y)


def test_mismatched_parameters_and_string_lam(trained, data):
    X, y = data
    L = effective_lam(trained, X, y, params=["out.weight", "out.bias"])
    with pytest.raises(ValueError, match="computed for parameters"):
        ApproxLOO(trained, lam=L, prefit=True).fit(X, y)
    with pytest.raises(ValueError, match="resolved by the estimators"):
        relative_stationarity(trained, X, y, lam="effective")


def test_documented_tables_are_the_measured_ones():
    """docs/stationarity.md shows exactly what the benchmark's report prints from its CSV."""
    import csv
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "bench_effective_lam", root / "benchmarks" / "bench_effective_lam.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with open(root / "docs" / "stationarity" / "effective_lam.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len({(r["dataset"], r["optimizer"], r["width"], r["weight_decay"], r["epochs"])
                for r in rows}) == len(bench.configs())  # every net of the grid measured
    page = (root / "docs" / "stationarity.md").read_text()
    start = page.index("<!-- table: python benchmarks/bench_effective_lam.py")
    start = page.index("\n", start) + 1
    shown = page[start:page.index("<!-- end table -->", start)].strip()
    assert shown == bench.report(rows).strip()


def test_untrained_scheduled_and_unfitted_nets(data):
    """No Adam step yet, a learning-rate schedule, an unfitted net: each says what is wrong."""
    from sklearn.exceptions import NotFittedError
    from skorch.callbacks import LRScheduler

    X, y = data
    fresh = net_of()
    with pytest.raises(NotFittedError, match="effective_lam reads a trained net") as info:
        effective_lam(fresh, X, y)
    assert "prefit" not in str(info.value)  # effective_lam has no prefit
    fresh.initialize()
    with pytest.raises(ValueError, match="Adam has taken no step"):
        effective_lam(fresh, X, y)
    scheduled = net_of(callbacks=[InitialParameters(),
                                  LRScheduler(torch.optim.lr_scheduler.StepLR, step_size=2,
                                              gamma=0.1)]).fit(X, y)
    with pytest.warns(UserWarning, match="learning rate .* changed during training"):
        effective_lam(scheduled, X, y)


@pytest.mark.parametrize("method, measured", [("optimizer", "within 2x on 14 of 20"),
                                              ("balance", "within 2x on 7 of 20")])
def test_summary_states_the_route_it_measured(trained, data, method, measured):
    X, y = data
    L = effective_lam(trained, X, y, method=method)
    s = ApproxLOO(trained, lam=L, method="exact", prefit=True).fit(X, y).summary()
    statement = s.statements[s.regimes.index("effective_lam")]
    assert measured in statement and "selection guide" in statement
    assert "θ₀ is unknown" not in statement  # InitialParameters recorded it
    bare = net_of(callbacks=[]).fit(X, y)
    s = ApproxLOO(bare, lam="effective", method="exact", prefit=True).fit(X, y).summary()
    assert "θ₀ is unknown" in s.statements[s.regimes.index("effective_lam")]
