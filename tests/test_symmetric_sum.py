"""softrank._symmetric_sum: xᵀx summed by upper block rows equals the float64 matrix product."""
import pytest
import torch

from softrank._symmetric_sum import SymmetricSum


def gram_t(x):
    """xᵀx through one SymmetricSum.add."""
    s = SymmetricSum()
    s.add(x)
    return s.value()


@pytest.mark.parametrize("shape", [(3, 2), (257, 65), (40, 256), (300, 785), (7, 1100)])
def test_gram_t_equals_the_matrix_product_and_is_exactly_symmetric(shape):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = gram_t(x)
    want = x.T @ x
    assert got.dtype == torch.float64 and got.shape == (shape[1], shape[1])
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
    assert torch.equal(got, got.T)


def test_gram_t_takes_non_contiguous_views_and_leaves_the_input_alone():
    base = torch.randn(400, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = base[:, ::2]
    before = base.clone()
    assert torch.allclose(gram_t(x), x.T @ x, rtol=1e-12, atol=1e-9)
    assert torch.equal(base, before)


def test_gram_t_refuses_float32():
    with pytest.raises(TypeError, match="float64"):
        gram_t(torch.randn(4, 3))
    with pytest.raises(TypeError, match="float64"):
        SymmetricSum().add(torch.randn(4, 300))


def test_symmetric_sum_accumulates_weighted_batches():
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(n, 520, dtype=torch.float64, generator=gen) for n in (5, 300, 1)]
    s = SymmetricSum()
    for k, x in enumerate(xs):
        s.add(x, 0.5 * (k + 1))
    want = sum(0.5 * (k + 1) * x.T @ x for k, x in enumerate(xs))
    got = s.value()
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
    assert torch.equal(got, got.T)


def test_symmetric_sum_value_before_add_is_an_error():
    with pytest.raises(ValueError, match="before any add"):
        SymmetricSum().value()


def test_upper_is_the_sum_in_its_upper_triangle_and_cholesky_reads_only_that_one():
    """SymmetricSum.upper() hands over the running sum without mirroring it; ApproxLOO's
    'nystrom' and parameter-space 'exact' factor it with a Cholesky that reads the upper
    triangle only — checked here, so a torch that read both would fail this test."""
    gen = torch.Generator().manual_seed(2)
    for shape in [(50, 20), (700, 300)]:  # one product, and block rows
        x = torch.randn(*shape, dtype=torch.float64, generator=gen)
        s = SymmetricSum()
        s.add(x)
        want = x.T @ x + torch.eye(shape[1], dtype=torch.float64)
        up = s.upper().clone()
        up.diagonal().add_(1.0)
        assert torch.allclose(up.triu(), want.triu(), rtol=1e-12, atol=1e-10)
        up.tril_(-1).add_(want.triu())  # garbage below the diagonal, as after block rows
        up[torch.tril_indices(*up.shape, -1).unbind()] = float("nan")
        got = torch.linalg.cholesky_ex(up, upper=True)
        assert got.info == 0
        assert torch.allclose(got.L, torch.linalg.cholesky(want, upper=True), rtol=1e-10,
                              atol=1e-12)
    with pytest.raises(ValueError, match="before any add"):
        SymmetricSum().upper()
