"""Memory estimates (softrank.memory) and the guard that refuses before computing."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from softrank import ModelData, curvature, measures
from softrank.memory import (MEMORY_APPROXIMATIONS, check_memory, estimate_memory,
                             parse_bytes)

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
