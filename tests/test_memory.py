"""Memory estimates (softrank.memory) and the guard that refuses before computing."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from softrank import ModelData, approx_loo, curvature, measures, memory
from softrank.memory import (MEMORY_APPROXIMATIONS, MemoryEstimate, check_loo_memory,
                             check_memory, estimate_loo_memory, estimate_memory, parse_bytes)

from .cases import build_case


def mlp_data(n, hidden=64, batch_size=32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, hidden), nn.ReLU(), nn.Linear(hidden, 5))
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(n, 20, generator=gen)
    y = torch.randint(0, 5, (n,), generator=gen)
    return ModelData(model, nn.CrossEntropyLoss(), X, y, batch_size=batch_size)


class DataPassCounter:
    """Counts forward passes of the network over batches of data (the estimate itself runs one
    forward of a single sample to read the layer shapes)."""

    def __init__(self, md):
        self.count = 0
        md.net.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if len(args[0]) > 1:
            self.count += 1


@pytest.mark.parametrize("approximation", MEMORY_APPROXIMATIONS)
def test_streaming_estimates_do_not_grow_with_n(approximation):
    small, large = mlp_data(64), mlp_data(6400)
    a = estimate_memory(small, approximation)
    b = estimate_memory(large, approximation)
    if approximation == "gram":  # the nK×nK kernel: quadratic in n
        assert b.total > 5000 * a.total / 2
    else:
        assert a.total == b.total, (a, b)


def test_estimates_scale_as_documented():
    md = mlp_data(100)
    p = md.n_params
    dense = estimate_memory(md, "dense")
    assert dense.breakdown["matrix and eigendecomposition"] == 2 * 8 * p * p
    gram = estimate_memory(md, "gram")
    assert gram.breakdown["kernel, Cholesky, inverse"] == 3 * 8 * (100 * 5) ** 2
    mf = estimate_memory(md, "matrix_free", n_probes=10, lanczos_steps=20)
    assert mf.breakdown["Lanczos basis"] == 8 * 20 * p * 10
    blocked = estimate_memory(md, "matrix_free", n_probes=10, lanczos_steps=20, block_size=2)
    assert blocked.total < mf.total
    kfac = estimate_memory(md, "kfac")
    assert kfac.total < dense.total and estimate_memory(md, "ekfac").total > kfac.total
    assert "matrix_free" in str(mf) and "Lanczos basis" in str(mf)


def test_conv_layers_use_their_spatial_positions():
    md = build_case("cnn-ce").model_data()
    conv = md.rules[0]
    est = estimate_memory(md, "kfac")
    # Conv2d(1, 2, 3, stride 2, padding 1) on 5×5: T = 9 positions of 1·3·3 (+1) inputs
    records = est.breakdown["layer records (one batch)"]
    assert records >= 3 * 9 * (conv.d_in_tilde + 3 * conv.d_out) * 8


@pytest.mark.parametrize("approximation,matrix", [("dense", "fisher"), ("dense", "hessian"),
                                                  ("gram", "fisher"), ("kfac", "fisher"),
                                                  ("matrix_free", "hessian")])
def test_guard_refuses_before_any_data_pass(approximation, matrix):
    md = mlp_data(100, hidden=8)
    counter = DataPassCounter(md)
    need = estimate_memory(md, approximation, matrix).total
    with pytest.raises(MemoryError, match=f"approximation='{approximation}'.*Nothing was computed"):
        curvature(md, matrix, approximation, memory_budget=need - 1)
    assert counter.count == 0
    M = curvature(md, matrix, approximation, memory_budget=need)  # fits: computes
    if approximation == "matrix_free":
        M.matvec(torch.ones(md.n_params, dtype=torch.float64))
    assert counter.count > 0


def test_guard_names_what_would_fit_and_measures_pass_it_on():
    md = mlp_data(2000)
    budget = estimate_memory(md, "kfac").total * 2
    with pytest.raises(MemoryError, match=r"within budget: .*kfac") as info:
        measures.soft_rank(md, 0.1, "gram", memory_budget=budget)
    assert "gram" in str(info.value) and "dense" not in str(info.value).split("within")[1]
    assert check_memory(md, "kfac", "fisher", budget).total <= budget


@pytest.mark.parametrize("text,expected", [(1000, 1000), ("2GB", 2 * 10 ** 9),
                                           ("1.5 GiB", int(1.5 * 2 ** 30)), ("512MiB", 2 ** 29),
                                           ("3e6", 3 * 10 ** 6)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_parse_bytes_rejects_nonsense():
    with pytest.raises(ValueError, match="memory_budget"):
        parse_bytes("lots")


# -- the estimators: memory_budget and estimate_memory ---------------------------------------------
def _estimators():
    from softrank import TIC, ApproxLOO, HessianNorm, SoftRankFIM, TraceRatio
    return [(SoftRankFIM, {}, "dense"), (SoftRankFIM, {"approximation": "kfac"}, "kfac"),
            (TIC, {}, "dense"), (TraceRatio, {}, "diagonal"), (HessianNorm, {}, "dense"),
            (ApproxLOO, {}, "method='exact'"), (ApproxLOO, {"method": "kfac"}, "method='kfac'"),
            (ApproxLOO, {"method": "subsample", "n_points": 10}, "method='subsample'")]


ESTIMATORS = _estimators()
IDS = [f"{cls.__name__}-{'-'.join(map(str, kw.values())) or 'default'}"
       for cls, kw, _ in ESTIMATORS]


@pytest.fixture(scope="module")
def fitted_net():
    from .test_estimators import classifier, teacher_data
    X, y = teacher_data()
    return classifier(wd=1e-2).fit(X, y), X, y


@pytest.fixture
def batch_counter(monkeypatch):
    """Counts the batches ModelData streams (every data pass: losses, curvatures)."""
    count = {"batches": 0}
    original = ModelData.batches

    def batches(self, *args, **kwargs):
        for b in original(self, *args, **kwargs):
            count["batches"] += 1
            yield b
    monkeypatch.setattr(ModelData, "batches", batches)
    return count


@pytest.mark.parametrize("cls,kw,names", ESTIMATORS, ids=IDS)
def test_estimator_refuses_a_tiny_budget_before_any_data_pass(fitted_net, batch_counter, cls,
                                                              kw, names):
    net, X, y = fitted_net
    with pytest.raises(MemoryError) as info:
        cls(net, memory_budget=1000, **kw).fit(X, y)
    msg = str(info.value)
    assert msg.startswith(cls.__name__) and names in msg
    assert "memory_budget=1000 B" in msg and "Nothing was computed" in msg
    assert batch_counter["batches"] == 0


@pytest.mark.parametrize("cls,kw,names", ESTIMATORS, ids=IDS)
def test_a_large_budget_changes_nothing(fitted_net, cls, kw, names):
    net, X, y = fitted_net
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KFAC-LOO's invalid-points warning
        plain = cls(net, random_state=0, **kw).fit(X, y)
        budgeted = cls(net, random_state=0, memory_budget="1GB", **kw).fit(X, y)
    assert budgeted.measure_ == plain.measure_
    assert budgeted.gap_ == plain.gap_ and budgeted.stderr_ == plain.stderr_


@pytest.mark.parametrize("cls,kw,names", ESTIMATORS, ids=IDS)
def test_estimate_memory_lists_what_fit_checks(fitted_net, batch_counter, cls, kw, names):
    net, X, y = fitted_net
    est = cls(net, **kw)
    estimates = est.estimate_memory(X)
    assert batch_counter["batches"] == 0 and not hasattr(est, "n_features_in_")
    assert estimates and all(isinstance(e, MemoryEstimate) for e in estimates)
    for e in estimates:
        assert e.total > 0 and e.total == sum(e.breakdown.values())
        assert all(isinstance(k, str) and v >= 0 for k, v in e.breakdown.items())
    # fit checks exactly these: a budget just below the largest refuses, at it passes the check
    need = max(e.total for e in estimates)
    with pytest.raises(MemoryError):
        cls(net, memory_budget=need - 1, **kw).fit(X, y)
    assert cls(net, **kw).estimate_memory(X, y) == estimates  # y only checked


def test_estimate_memory_follows_the_fit_configuration(fitted_net):
    from softrank import ApproxLOO, SoftRankFIM, TIC
    net, X, y = fitted_net
    fim = SoftRankFIM(net).estimate_memory(X)
    assert [(e.approximation, e.matrix) for e in fim] == [
        ("dense", "fisher"), ("diagonal", "gsm"), ("diagonal", "fisher")]
    # TIC with a dense M also builds the dense C; with KFAC it streams C
    assert [e.matrix for e in TIC(net).estimate_memory(X)] == ["fisher", "gsm"]
    assert [e.approximation for e in TIC(net, approximation="kfac").estimate_memory(X)] == ["kfac"]
    # n_curvature_samples: the estimate is of the subsample
    full = ApproxLOO(net).estimate_memory(X)[0]
    sub = ApproxLOO(net, n_curvature_samples=20).estimate_memory(X)[0]
    # p = 53 < nK (60·3 and 20·3): both in parameter space; the per-point blocks are of n
    p = sum(t.numel() for t in net.module_.parameters())
    assert p < 20 * 3
    key = "Gauss–Newton Hessian + nΛ (p²), factored in place"
    assert full.breakdown[key] == sub.breakdown[key] == 8 * p ** 2
    assert full.breakdown["per-point K×K blocks"] == 3 * sub.breakdown["per-point K×K blocks"]


def test_estimate_memory_needs_a_fitted_net(fitted_net):
    from sklearn.exceptions import NotFittedError

    from softrank import SoftRankFIM

    from .test_estimators import classifier
    _, X, y = fitted_net
    est = SoftRankFIM(classifier(max_epochs=2))
    with pytest.raises(NotFittedError, match="fit the net first"):
        est.estimate_memory(X)
    est.fit(X, y)  # after fit: the fitted clone (estimator_) is used
    assert est.estimate_memory(X)[0].approximation == "dense"


def test_clone_and_get_params_keep_memory_budget(fitted_net):
    from sklearn.base import clone

    from softrank import TIC, ApproxLOO, HessianNorm, SoftRankFIM, TraceRatio
    net, X, y = fitted_net
    for cls in (SoftRankFIM, TIC, TraceRatio, HessianNorm, ApproxLOO):
        est = cls(net, memory_budget="2GB")
        assert est.get_params()["memory_budget"] == "2GB"
        assert clone(est).memory_budget == "2GB"
        assert cls(net).memory_budget is None
        assert est.set_params(memory_budget=123).memory_budget == 123


@pytest.mark.parametrize("bad", ["lots", 0, -5, True])
def test_bad_memory_budget_is_a_clear_error(fitted_net, bad):
    from softrank import SoftRankFIM
    net, X, y = fitted_net
    with pytest.raises(ValueError, match="memory_budget"):
        SoftRankFIM(net, memory_budget=bad).fit(X, y)


# -- approx_loo's memory model ---------------------------------------------------------------------
def test_loo_exact_grows_quadratically_with_n_up_to_p():
    """'exact' holds the n·K kernel while nK ≤ p, then the p × p Gauss–Newton Hessian: its
    memory grows as n² up to p², then only linearly (the per-point blocks)."""
    small, mid, large = mlp_data(64), mlp_data(256), mlp_data(6400)  # p = 1,669
    a, b = estimate_loo_memory(small, "exact"), estimate_loo_memory(mid, "exact")
    for md, e in ((small, a), (mid, b)):
        assert memory.exact_loo_space(md) == "data"
        assert e.breakdown["Cholesky of I + BᵀΘB (mK')², in place"] == 8 * (md.n * 5) ** 2
    assert b.total > 8 * a.total  # 4× the samples: 16× the square, the other terms linear
    c = estimate_loo_memory(large, "exact")
    assert memory.exact_loo_space(large) == "parameters"
    assert c.breakdown["Gauss–Newton Hessian + nΛ (p²), factored in place"] == 8 * 1669 ** 2
    kernel = sum(memory._woodbury(memory._layout(large), large.n, 5).values())
    assert c.total < kernel / 100


def test_loo_kfac_does_not_grow_beyond_its_cache(monkeypatch):
    import softrank.memory
    monkeypatch.setattr(softrank.memory, "KFAC_CACHE_BYTES", 20_000)
    tiny, small, large = mlp_data(4), mlp_data(64), mlp_data(6400)
    a = estimate_loo_memory(tiny, "kfac")
    cache = "cached layer records (up to KFAC_CACHE_BYTES)"
    assert 0 < a.breakdown[cache] < 20_000  # 4 samples fit in the cache
    b, c = estimate_loo_memory(small, "kfac"), estimate_loo_memory(large, "kfac")
    assert b.breakdown[cache] == c.breakdown[cache] == 20_000
    # beyond the cache only the per-point K×K blocks grow (linearly)
    blocks = "per-point K×K blocks"
    assert c.breakdown[blocks] == 100 * b.breakdown[blocks]
    assert c.total - c.breakdown[blocks] == b.total - b.breakdown[blocks]
    kernel = sum(memory._woodbury(memory._layout(large), large.n, 5).values())
    assert kernel > 100 * c.total  # what 'exact' would hold in data space


def test_loo_subsample_scales_with_the_points():
    md = mlp_data(200)
    a = estimate_loo_memory(md, "subsample", n_points=10)
    b = estimate_loo_memory(md, "subsample", n_points=40)
    assert b.breakdown["CG vectors"] == 4 * a.breakdown["CG vectors"] == 4 * 7 * 8 * md.n_params * 50
    assert b.breakdown["per-sample Jacobians of the m points"] == 40 * 5 * md.n_params * (8 + 4)
    assert "KFAC preconditioner" not in estimate_loo_memory(md, "subsample", preconditioner=None
                                                            ).breakdown


def test_loo_nystrom_is_flat_in_n_and_quadratic_in_the_points():
    small, large = mlp_data(600), mlp_data(6400)
    key = "the kept points' Gram's Cholesky, C, its Cholesky, Y, Z (five (mK')²)"
    a = estimate_loo_memory(small, "nystrom", n_points=50)
    assert a.breakdown[key] == 5 * 8 * (50 * 5) ** 2
    # 10 samples per point are above half of 600 (all used, no jackknife), below half of
    # 6,400 and 12,800 (a subsample: its jackknife's 2·6 more squares), and then flat in n
    jk = "jackknife sums (curvature subsample): 2·(groups + 1) (mK')²"
    assert a.breakdown.get(jk, 0) == 0
    c = estimate_loo_memory(large, "nystrom", n_points=50)
    assert c.breakdown[jk] == 12 * 8 * (50 * 5) ** 2 and c.total == a.total + c.breakdown[jk]
    assert estimate_loo_memory(mlp_data(12800), "nystrom", n_points=50).total == c.total
    b = estimate_loo_memory(small, "nystrom", n_points=200)
    assert b.breakdown[key] == 16 * a.breakdown[key]
    # the default: LOO_NYSTROM_POINTS, at most n
    default = estimate_loo_memory(large, "nystrom").breakdown[key]
    from softrank.memory import LOO_NYSTROM_POINTS
    assert default == 5 * 8 * (LOO_NYSTROM_POINTS * 5) ** 2


def test_approx_loo_guard_names_the_methods_that_fit(batch_counter):
    md = mlp_data(400, hidden=8)
    kfac = estimate_loo_memory(md, "kfac").total
    with pytest.raises(MemoryError, match=r"ApproxLOO\(method='exact'\).*within budget: "
                                          r"method='kfac'.*Nothing was computed"):
        approx_loo(md, 0.1, "exact", memory_budget=kfac)
    assert batch_counter["batches"] == 0
    assert check_loo_memory(md, "kfac", kfac).total == kfac
