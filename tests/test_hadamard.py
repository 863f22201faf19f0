"""Hadamard matrices of every size the models use, and the fast (Kronecker-factored) transform."""

import math

import pytest
import torch

from qdlm_bench.quant.hadamard import (MAX_FACTOR, OnlineHadamard, hadamard_factors, hadamard_matrix,
                                       hadamard_transform, random_signs)

# 12 = 11+1, 20, 44, 60, 108 (Paley I, q prime); 28 = 27+1 (Paley I over GF(3^3));
# 36 = 2(17+1), 124 = 2(61+1), 148 = 2(73+1) (Paley II, q prime); 52 = 2(25+1) (Paley II over GF(5^2));
# 24, 40, 96 = Paley x Sylvester
SMALL = [1, 2, 4, 8, 12, 20, 24, 28, 36, 40, 44, 52, 60, 96, 108, 124, 148, 256]
# d_model, d_ff, head_dim and heads of tiny models, LLaDA-8B and Dream-7B
MODEL_SIZES = [128, 256, 3584, 4096, 12288, 18944]


@pytest.mark.parametrize("n", SMALL)
def test_small_orders_are_hadamard(n):
    H = hadamard_matrix(n)
    assert H.shape == (n, n) and torch.all(H.abs() == 1)
    assert torch.equal(H @ H.T, n * torch.eye(n))


@pytest.mark.parametrize("n,inner", [(12, 1), (28, 1), (148, 1), (96, 1), (1024, 1), (12, 8), (28, 4), (24, 3)])
def test_fast_transform_equals_dense(n, inner):
    H = hadamard_matrix(n).double()
    x = torch.randn(3, 2, 5 * n * inner, dtype=torch.float64)  # 5 blocks of n * inner on the last dim
    dense = torch.kron(torch.kron(torch.eye(5, dtype=torch.float64), H), torch.eye(inner, dtype=torch.float64))
    scale = 1 / math.sqrt(n)
    assert torch.allclose(hadamard_transform(x, n, inner), x @ dense.T * scale, atol=1e-12)
    assert torch.allclose(hadamard_transform(x, n, inner, transpose=True), x @ dense * scale, atol=1e-12)


@pytest.mark.parametrize("n", MODEL_SIZES)
def test_model_sizes_orthogonal_without_dense_matrix(n):
    factors = hadamard_factors(n)
    assert math.prod(len(f) for f in factors) == n
    assert all(len(f) <= MAX_FACTOR or f is factors[0] for f in factors)  # only the Paley factor may be larger
    assert all(torch.equal(f @ f.T, len(f) * torch.eye(len(f))) for f in factors)
    x = torch.randn(8, n, dtype=torch.float64)
    y = hadamard_transform(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)
    assert torch.allclose(hadamard_transform(y, transpose=True), x, atol=1e-12)
    assert (y - x).abs().max() > 0.1
    # columns of H / sqrt(n): every entry is ±1/sqrt(n)
    basis = torch.zeros(4, n, dtype=torch.float64)
    basis[range(4), [0, 1, n // 3, n - 1]] = 1
    cols = hadamard_transform(basis, transpose=True)
    assert torch.allclose(cols.abs(), torch.full_like(cols, n ** -0.5))


def test_known_factorizations():
    sizes = {n: [len(f) for f in hadamard_factors(n)] for n in (3584, 4096, 12288, 18944)}
    assert sizes == {3584: [28, 128], 4096: [64, 64], 12288: [12, 32, 32], 18944: [148, 128]}


@pytest.mark.parametrize("n", [3, 6, 10, 156, 172, 12 * 1024 + 4, 0])
def test_sizes_without_construction_raise(n):
    with pytest.raises(ValueError, match="Hadamard"):
        hadamard_factors(n)


def test_transform_shape_error():
    with pytest.raises(ValueError, match="not a multiple"):
        hadamard_transform(torch.randn(4, 36), 8)


def test_online_module_and_bf16():
    x = torch.randn(4, 7, 3584)
    m = OnlineHadamard(28, 128)
    assert torch.allclose(m(x), hadamard_transform(x, 28, 128), atol=1e-6)
    assert m.state_dict() == {}
    mb = OnlineHadamard(3584).to(torch.bfloat16)
    yb = mb(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    assert ((yb.float() - hadamard_transform(x)).norm() / x.norm()) < 1e-2


def test_random_signs_seeded():
    s = random_signs(4096, seed=3)
    assert torch.equal(s, random_signs(4096, seed=3)) and not torch.equal(s, random_signs(4096, seed=4))
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    x = torch.randn(5, 4096)
    y = hadamard_transform(x * s)  # x @ diag(s) H^T / sqrt(n): orthogonal
    assert torch.allclose(hadamard_transform(y, transpose=True) * s, x, atol=1e-5)
