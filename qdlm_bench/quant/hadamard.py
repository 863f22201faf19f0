"""Hadamard matrices for the sizes dLLMs use, and their fast orthonormal transform.

``H_n`` is built as a Kronecker product ``H_m ⊗ H_{2^k}`` with the largest power of two
possible: Sylvester's construction for ``2^k`` and a Paley construction for ``m``
(Paley I: order ``q + 1`` for a prime power ``q ≡ 3 mod 4``; Paley II: order ``2(q + 1)``
for ``q ≡ 1 mod 4``). LLaDA-8B: 4096, 12288 = 12·1024, head 128; Dream-7B: 3584 = 28·128
(q = 27 = 3^3), 18944 = 148·128 (q = 73), 28 heads.

The transform never forms ``H_n``: the power of two is split into Sylvester factors of at most
``MAX_FACTOR``, and each factor is one small matmul over its axis of the reshaped input.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

MAX_FACTOR = 256


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, e)`` with ``q = p^e`` for a prime ``p``, else None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    e = 0
    while q % p == 0:
        q, e = q // p, e + 1
    return (p, e) if q == 1 else None


def _digits(x: int, p: int, e: int) -> list[int]:
    return [x // p**i % p for i in range(e)]


def _polymod(a: list[int], f: list[int], p: int) -> list[int]:
    """``a mod f`` over GF(p); coefficients lowest degree first, ``f`` monic."""
    a = a + [0] * max(0, len(f) - 1 - len(a))
    for i in range(len(a) - len(f), -1, -1):
        c = a[i + len(f) - 1]
        for j, fj in enumerate(f):
            a[i + j] -= c * fj
    return [c % p for c in a[:len(f) - 1]]


def _monic(d: int, p: int):
    return (_digits(x, p, d) + [1] for x in range(p**d))


def _irreducible(p: int, e: int) -> list[int]:
    """The first monic irreducible polynomial of degree ``e`` over GF(p) (``x`` when e = 1)."""
    return next(f for f in _monic(e, p)
                if all(any(_polymod(f, g, p)) for d in range(1, e // 2 + 1) for g in _monic(d, p)))


def _quadratic_character(p: int, e: int) -> torch.Tensor:
    """χ over GF(p^e) (element ``x`` = polynomial with base-p digits of ``x``): 0, 1 (square), -1."""
    q, f = p**e, _irreducible(p, e)
    squares = set()
    for x in range(1, q):
        a = _digits(x, p, e)
        sq = [0] * (2 * e - 1)
        for i, ai in enumerate(a):
            for j, aj in enumerate(a):
                sq[i + j] += ai * aj
        squares.add(sum(c * p**i for i, c in enumerate(_polymod(sq, f, p))))
    return torch.tensor([0.0] + [1.0 if x in squares else -1.0 for x in range(1, q)])


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[a, b] = χ(a - b)`` over GF(q)."""
    p, e = _prime_power(q)
    digits = torch.tensor([_digits(x, p, e) for x in range(q)])
    diff = (digits[:, None] - digits[None]) % p
    return _quadratic_character(p, e)[(diff * p ** torch.arange(e)).sum(-1)]


def _bordered(core: torch.Tensor, col_sign: float) -> torch.Tensor:
    """``[[0, 1^T], [col_sign · 1, core]]``."""
    c = torch.zeros(len(core) + 1, len(core) + 1)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, col_sign, core
    return c


def _paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``m`` by Paley I or II, or None when neither applies."""
    q = m - 1
    if _prime_power(q) and q % 4 == 3:
        return _bordered(_jacobsthal(q), -1.0) + torch.eye(m)
    q = m // 2 - 1
    if m % 2 == 0 and _prime_power(q) and q % 4 == 1:
        c = _bordered(_jacobsthal(q), 1.0)
        return torch.kron(c, torch.tensor([[1.0, 1.0], [1.0, -1.0]])) + \
            torch.kron(torch.eye(q + 1), torch.tensor([[1.0, -1.0], [-1.0, -1.0]]))
    return None


def sylvester(n: int) -> torch.Tensor:
    """Sylvester's ±1 Hadamard matrix of order ``n = 2^k`` (symmetric)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1)
    while len(h) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


@functools.lru_cache(maxsize=None)
def hadamard_factors(n: int) -> tuple[torch.Tensor, ...]:
    """±1 float32 matrices whose Kronecker product (in order) is a Hadamard matrix of order ``n``:
    the Paley factor (if any), then Sylvester factors of at most ``MAX_FACTOR``. Cached: do not modify."""
    if n < 1:
        raise ValueError(f"Hadamard order must be positive, got {n}")
    for k in range((n & -n).bit_length() - 1, -1, -1):
        m = n >> k
        base = None if m > 1 and m % 4 else (torch.ones(1, 1) if m == 1 else _paley(m))
        if base is not None:
            chunks = -(-k // int(math.log2(MAX_FACTOR)))
            sizes = [k // chunks + (i < k % chunks) for i in range(chunks)]
            factors = ([base] if m > 1 else []) + [sylvester(2**s) for s in sizes]
            return tuple(factors) or (base,)
    raise ValueError(
        f"no Hadamard construction for size {n}: need n = 2^k * m with m = 1, q + 1 (q a prime power "
        f"≡ 3 mod 4) or 2(q + 1) (q ≡ 1 mod 4), e.g. 4096, 12288 = 12·1024, 3584 = 28·128, 18944 = 148·128")


def hadamard_matrix(n: int) -> torch.Tensor:
    """The dense ±1 Hadamard matrix of order ``n`` (``H H^T = n I``) that the transform applies; small ``n`` only."""
    return functools.reduce(torch.kron, hadamard_factors(n))


def _apply(x: torch.Tensor, factors, n: int, inner: int, transpose: bool) -> torch.Tensor:
    d = x.shape[-1]
    if d % (n * inner):
        raise ValueError(f"last dim {d} is not a multiple of n * inner = {n} * {inner}")
    y, right = x, n * inner
    for f in factors:
        size = len(f)
        right //= size
        f = (f.T if transpose else f).to(x.dtype)
        y = y.reshape(-1, size) @ f.T if right == 1 else torch.matmul(f, y.reshape(-1, size, right))
    return y.reshape(x.shape).mul_(1 / math.sqrt(n))


def hadamard_transform(x: torch.Tensor, n: int | None = None, inner: int = 1, transpose: bool = False) -> torch.Tensor:
    """Orthonormal ``H_n / √n`` over the last dim of ``x`` viewed as ``[..., outer, n, inner]``:
    ``y[.., o, i, r] = Σ_j H[i, j] x[.., o, j, r] / √n`` (``H^T`` with ``transpose``, the inverse).

    ``n`` defaults to ``x.shape[-1] // inner``. ``inner=1`` with ``n`` < the last dim is a
    block-diagonal (e.g. head-wise) transform; ``inner=head_dim`` mixes across heads.
    Computed in ``x``'s dtype; returns a new tensor.
    """
    n = x.shape[-1] // inner if n is None else n
    return _apply(x, [f.to(x.device) for f in hadamard_factors(n)], n, inner, transpose)


def random_signs(n: int, seed: int = 0, device=None) -> torch.Tensor:
    """A seeded random ±1 vector (the diagonal of a randomized Hadamard ``diag(s) H^T / √n``)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).float().to(device)


class OnlineHadamard(nn.Module):
    """``hadamard_transform(x, n, inner)`` as a module (e.g. a ``QuantLinear.input_transform``).

    The factors are non-persistent buffers: they follow ``.to()`` and leave state dicts alone.
    """

    def __init__(self, n: int, inner: int = 1, device=None, dtype=None):
        super().__init__()
        self.n, self.inner = n, inner
        for i, f in enumerate(hadamard_factors(n)):
            self.register_buffer(f"h{i}", f.to(device, dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply(x, list(self.buffers()), self.n, self.inner, False)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse (transposed) transform, ``x -> x M^T``."""
        return _apply(x, list(self.buffers()), self.n, self.inner, True)

    def extra_repr(self) -> str:
        return f"n={self.n}, inner={self.inner}"
