"""Agreement with peer curvature libraries (tests/_peers.py, tests/PEERS_NOTES.md).

curvlinops (GGN, KFAC and EKFAC: type-2, joint bias, expand), BackPACK (DiagGGNExact) and
nngeometry (KFAC trace), all in softrank's conventions: mean loss, float64, parameters in
``model.parameters()`` order. Skipped when a library is not installed.
"""
from __future__ import annotations

import pytest
import torch

from . import _peers
from .reference import assert_rel

pytestmark = pytest.mark.crosscheck

CASES = ["mlp-ce", "cnn-ce", "mlp-mse1", "mlp-mse3", "cnn-mse3"]
CE_CASES = [c for c in CASES if c.endswith("-ce")]


def peer_args(store, case_id):
    case = store.case(case_id)
    return case.model, case.criterion, case.X, case.y


@pytest.mark.parametrize("approximation", ["dense", "gram"])
@pytest.mark.parametrize("case_id", CASES)
def test_curvlinops_ggn(store, case_id, approximation):
    pytest.importorskip("curvlinops")
    args = peer_args(store, case_id)
    F = store.curvature(case_id, "fisher", approximation)
    assert_rel(F.to_dense(), _peers.curvlinops_ggn_dense(*args, batch_size=3), tol=1e-10)
    v = torch.randn(F.n_params, 3, dtype=torch.float64)
    assert_rel(F.matvec(v), _peers.curvlinops_ggn_matvec(*args, v), tol=1e-10)


@pytest.mark.parametrize("case_id", CASES)
def test_curvlinops_kfac(store, case_id):
    """Same Kronecker factors A (with the bias folded in) and G per layer, same matrix."""
    pytest.importorskip("curvlinops")
    peer = _peers.curvlinops_kfac(*peer_args(store, case_id), joint_bias=True)
    K = store.curvature(case_id, "fisher", "kfac")
    assert len(peer["layers"]) == len(K.A)
    for layer, A, G in zip(peer["layers"], K.A, K.G):
        assert_rel(A, layer["A"], tol=1e-10, what=f"A of {layer['name']}")
        assert_rel(G, layer["G"], tol=1e-10, what=f"G of {layer['name']}")
    assert_rel(K.to_dense(), peer["dense"], tol=1e-10, what="KFAC matrix")
    assert_rel(K.trace(), peer["trace"], tol=1e-10, what="KFAC trace")


@pytest.mark.parametrize("case_id", CASES)
def test_curvlinops_ekfac(store, case_id):
    pytest.importorskip("curvlinops")
    peer = _peers.curvlinops_ekfac(*peer_args(store, case_id), joint_bias=True)
    E = store.curvature(case_id, "fisher", "ekfac")
    assert_rel(E.to_dense(), peer["dense"], tol=1e-10, what="EKFAC matrix")
    assert_rel(E.trace(), peer["trace"], tol=1e-10, what="EKFAC trace")


@pytest.mark.parametrize("case_id", CASES)
def test_backpack_diagonal(store, case_id):
    pytest.importorskip("backpack")
    peer = _peers.backpack_diag_ggn(*peer_args(store, case_id))
    assert_rel(store.curvature(case_id, "fisher", "diagonal").diagonal(), peer, tol=1e-10)


@pytest.mark.parametrize("case_id", CE_CASES)
def test_nngeometry_kfac_trace(store, case_id):
    pytest.importorskip("nngeometry")
    case = store.case(case_id)
    peer = _peers.nngeometry_kfac_trace(case.model, case.X, case.y)
    assert_rel(store.curvature(case_id, "fisher", "kfac").trace(), peer, tol=1e-10)
