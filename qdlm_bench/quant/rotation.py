"""QuaRot's transforms (Ashkboos et al., 2024), each leaving the FP model's outputs unchanged.

Convention: a rotation ``R`` acts on row vectors, ``x -> x R``. A linear ``y = x W^T + b``
keeps its output when its input is rotated if ``W -> W R`` (input side: rows of ``W``
transformed); its output is rotated by ``W -> R^T W``, ``b -> b R`` (output side: columns).
Weights are transformed in float32 a chunk at a time and written back in place.

* ``fuse_norms``: RMSNorm weights folded into the linears they feed (head untied), set to 1;
* ``rotate_residual``: the residual stream rotated by a random Hadamard matrix ``Q`` (weight-free
  RMSNorm commutes with ``Q``): embedding, q/k/v/gate/up inputs, o/down outputs, LM head;
* ``rotate_heads``: a head-wise Hadamard on V (v_proj output, bias included) undone on o_proj's
  input, plus (``online``) a cross-head Hadamard computed on o_proj's input;
* ``hadamard_down_proj``: an online Hadamard of size d_ff on down_proj's input;
* ``rotate_qk``: Q and K rotated head-wise after RoPE (before the K quantizer);
* ``BlockRotation``: an online block-diagonal rotation with a permutation (DuQuant's transform).

QuaRot applies the first five (``methods/quarot.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from .hadamard import OnlineHadamard, hadamard_transform, random_signs
from .linear import QuantLinear
from .spec import QuantSpec

_CHUNK = 4096


def _rows_(w: torch.Tensor, fn) -> None:
    """Each row ``w[r] <- fn(w[r])`` (input side of a linear, or embedding rows)."""
    for i in range(0, w.shape[0], _CHUNK):
        w[i:i + _CHUNK] = fn(w[i:i + _CHUNK].float())


def _cols_(w: torch.Tensor, fn) -> None:
    """Each column ``w[:, c] <- fn(w[:, c])`` (output side of a linear)."""
    for i in range(0, w.shape[1], _CHUNK):
        w[:, i:i + _CHUNK] = fn(w[:, i:i + _CHUNK].T.float()).T


def _fold(norm: nn.Module, linears) -> None:
    for lin in linears:
        _rows_(lin.weight, lambda w: w * norm.weight.float())
    norm.weight.fill_(1.0)


def _norms(model) -> list[nn.Module]:
    return [model.norm] + [n for b in model.blocks for n in (b.attn_norm, b.mlp_norm)]


@torch.no_grad()
def fuse_norms(model) -> None:
    """Fold every RMSNorm weight into the linears it feeds (attn_norm -> q/k/v, mlp_norm -> gate/up,
    final norm -> lm_head, untied from the embedding first) and set the norm weights to 1."""
    if model.lm_head.weight is model.embed.weight:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    for b in model.blocks:
        _fold(b.attn_norm, (b.q_proj, b.k_proj, b.v_proj))
        _fold(b.mlp_norm, (b.gate_proj, b.up_proj))
    _fold(model.norm, (model.lm_head,))


@torch.no_grad()
def rotate_residual(model, seed: int = 0) -> None:
    """Rotate the residual stream by ``Q = diag(s) H^T / √d`` (``s`` random ±1 from ``seed``)."""
    if not all(torch.all(n.weight == 1) for n in _norms(model)):
        raise ValueError("rotate_residual needs RMSNorms without weights (only those commute with a "
                         "rotation): call fuse_norms first")
    s = random_signs(model.config.d_model, seed, model.device)

    def rot(x):
        return hadamard_transform(x * s)

    _rows_(model.embed.weight, rot)
    for b in model.blocks:
        for lin in (b.q_proj, b.k_proj, b.v_proj, b.gate_proj, b.up_proj):
            _rows_(lin.weight, rot)
        for lin in (b.o_proj, b.down_proj):
            _cols_(lin.weight, rot)
            if lin.bias is not None:
                lin.bias.copy_(rot(lin.bias.float()))
    if model.lm_head.weight is not model.embed.weight:
        _rows_(model.lm_head.weight, rot)


def _online(block: nn.Module, name: str, transform: OnlineHadamard) -> None:
    """Compute ``transform`` on the input of ``block.<name>`` (a ``QuantLinear`` input transform)
    and fold it into the weight: ``x W^T = T(x) T(W)^T`` for an orthogonal ``T``."""
    layer = getattr(block, name)
    if getattr(layer, "input_transform", None) is not None:
        raise ValueError(f"{name} already has an input transform ({layer.input_transform})")
    if not isinstance(layer, QuantLinear):
        layer = QuantLinear(layer, QuantSpec())
        setattr(block, name, layer)
    _rows_(layer.weight, transform)
    layer.input_transform = transform


@torch.no_grad()
def rotate_heads(model, online: bool = True) -> None:
    """Hadamard of size head_dim on each head of V (v_proj output rows and bias), undone on o_proj's
    input columns (GQA: query heads share their KV head's rotation). With ``online``, o_proj's input
    also gets a cross-head Hadamard computed at run time, so o_proj sees ``H_heads ⊗ H_head_dim``."""
    cfg = model.config
    hd = cfg.head_dim

    def per_head(x):
        return hadamard_transform(x, hd)

    for b in model.blocks:
        _cols_(b.v_proj.weight, per_head)
        if b.v_proj.bias is not None:
            b.v_proj.bias.copy_(per_head(b.v_proj.bias.float()))
        _rows_(b.o_proj.weight, per_head)
        if online:
            _online(b, "o_proj", OnlineHadamard(cfg.n_heads, hd, model.device, model.dtype))


@torch.no_grad()
def hadamard_down_proj(model) -> None:
    """An online Hadamard of size d_ff on every down_proj input, folded into its weight."""
    for b in model.blocks:
        _online(b, "down_proj", OnlineHadamard(model.config.d_ff, 1, model.device, model.dtype))


def rotate_qk(model) -> None:
    """Rotate Q and K by a head_dim Hadamard after RoPE (scores unchanged; K quantizes better)."""
    for b in model.blocks:
        b.qk_rotate = OnlineHadamard(model.config.head_dim, 1, model.device, model.dtype)


def apply_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ blockdiag(blocks)`` over the last dim of ``x`` ``[..., d]`` (zero-padded to whole
    blocks and cut back, so a shorter last block acts on its own channels only), in float32 or
    ``x``'s dtype if wider."""
    n, b, _ = blocks.shape
    d = x.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = nn.functional.pad(x.to(dtype), (0, n * b - d)).unflatten(-1, (n, b))
    return torch.einsum("...nb,nbc->...nc", x, blocks.to(dtype)).flatten(-2)[..., :d]


class BlockRotation(nn.Module):
    """The online input transform ``x -> ((x R1)[..., perm]) R2`` with block-diagonal rotations
    ``R1``, ``R2`` ``[n, b, b]`` and a permutation (DuQuant's ``M = R1 P R2``): an orthogonal ``M``,
    so a linear's weight rows take the same transform (``W -> W M``, ``transform(W)``). Computed in
    float32, returned in the input's dtype."""

    def __init__(self, r1: torch.Tensor, perm: torch.Tensor, r2: torch.Tensor):
        super().__init__()
        self.register_buffer("r1", r1)
        self.register_buffer("perm", perm)
        self.register_buffer("r2", r2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_blocks(apply_blocks(x, self.r1)[..., self.perm], self.r2).to(x.dtype)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """``x -> x M^T = ((x R2^T)[..., perm^-1]) R1^T``."""
        undo = self.perm.argsort()
        return apply_blocks(apply_blocks(x, self.r2.transpose(1, 2))[..., undo], self.r1.transpose(1, 2)).to(x.dtype)

    def extra_repr(self) -> str:
        n, b, _ = self.r1.shape
        return f"dim={self.perm.numel()}, blocks={n}x{b}"
