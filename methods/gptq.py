"""GPTQ (Frantar et al., 2023): Hessian-aware weight quantization, block by block on calibration data.

Quantizes every target linear of every block (q/k/v included), weights only; activations are
quantized afterwards by the recipe's ``install_quantizers`` when ``a < 16``, as RTN. Runs in the
model's dtype with Hessians in float32. Biases (Dream's q/k/v) are left untouched.

The solver follows the reference implementation (IST-DASLab ``gptq.py``, ``fasterquant``; AutoGPTQ's
is the same): dead columns, dampening ``damp * mean(diag H)``, Cholesky of ``H^-1``, lazy batch updates over blocks of columns, act-order with optional static
groups. Per-row parameters come from the weights as given; a group's, when the group starts, from
the full matrix ``W``, which the lazy batch update changes only after each block: the weights as
they stood when the group's block started. The grid is GPTQ's (``quant.quantizer``, ``"gptq"``:
symmetric over all ``2^b`` codes); QuaRot passes its own. Token weights in ``Hessian.add`` let
weighted variants (DLLMQuant's CGQ) reuse it; the linears that share an input (and so a Hessian)
are solved as one stacked matrix.

A Hessian that Cholesky cannot factor: the reference and AutoGPTQ raise at once (torch's
``linalg.cholesky`` error; the fix is a larger ``damp_percent``); GPTQModel raises ``damp`` by a fixed
step until it reaches 1. Here, deliberately, ``damp`` is raised x10 (with a warning) up to 1.0, and
the run then fails with ``NumericalFault("hessian_not_pd", layer)`` naming the layer(s); a Hessian
holding NaN or Inf (non-finite calibration inputs) fails the same way without retries. Never a
silent fallback: a layer is either solved or the run fails.
"""

from __future__ import annotations

import warnings
from typing import Annotated

from pydantic import Field

from qdlm_bench import quant
from qdlm_bench.faults import NumericalFault
from qdlm_bench.lazy import lazy_import, no_grad

from . import options, register

torch = lazy_import("torch")


@options
class GPTQOptions:
    """``conf/method/gptq.yaml``."""

    block_size: Annotated[int, Field(ge=1)] = 128
    damp: Annotated[float, Field(ge=0)] = 0.01
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    batch_size: Annotated[int, Field(ge=1)] = 8


class Hessian:
    """Running ``H = 2/n * sum_t w_t x_t x_t^T`` over the ``n`` tokens seen so far, float32."""

    def __init__(self, dim: int, device=None):
        self.H = torch.zeros(dim, dim, device=device, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """``x`` ``[*, dim]``; ``weights`` ``[*]`` (optional, per token)."""
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        xw = x if weights is None else x * weights.reshape(-1, 1).float()
        self.H.addmm_(xw.t(), x, alpha=2 / self.n)


def _hinv_cholesky(H: torch.Tensor, damp: float, max_damp: float, name: str):
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``, raising ``damp`` x10 until it works;
    ``NumericalFault("hessian_not_pd", name)`` when ``H`` is not finite or ``damp`` passes ``max_damp``."""
    if not bool(torch.isfinite(H).all()):
        bad = int((~torch.isfinite(H)).sum())
        raise NumericalFault("hessian_not_pd", name, f"the Hessian holds {bad} NaN/Inf entries "
                             "(non-finite calibration inputs of this layer)")
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], device=H.device)
    while True:
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, damp
        if damp >= max_damp:
            raise NumericalFault("hessian_not_pd", name, f"GPTQ: Cholesky failed even with damp={damp:g} "
                                 f"(max_damp={max_damp:g}); more or longer calibration samples may help")
        new = damp * 10 if damp > 0 else 1e-6
        warnings.warn(f"GPTQ {name}: Cholesky failed with damp={damp:g}; retrying with damp={new:g}")
        damp = new


@no_grad
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, sym: bool, group_size: int | None = None,
                  block_size: int = 128, damp: float = 0.01, act_order: bool = False,
                  static_groups: bool = False, max_damp: float = 1.0, name: str = "layer", grid: str = "gptq"):
    """Quantize ``W`` ``[out, in]`` on ``grid`` against the input Hessian ``H`` ``[in, in]`` (neither is modified).

    Returns ``(Q, info)``: the dequantized weights (``W``'s shape, dtype and column order) and
    ``{"damp": damp used, "loss": the reference's summed error, "dead": dead columns}``.
    ``group_size`` None means one (scale, zero) per output row. With ``act_order`` columns are
    processed by decreasing ``diag H``; ``static_groups`` then fixes every group's parameters
    up front on the original column grouping (so groups stay contiguous in the stored layout).
    """
    dtype, cols = W.dtype, W.shape[1]
    W, H = W.float().clone(), H.float().clone()

    def params(w):
        return quant.quant_params(w, bits, sym, grid=grid)

    gs = group_size
    if gs is None:  # before dead columns are zeroed, as the reference
        scale, zero = params(W)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if gs is not None and static_groups:
        groups = [params(W[:, i:i + gs]) for i in range(0, cols, gs)]

    perm = torch.arange(cols, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp = _hinv_cholesky(H, damp, max_damp, name)

    Q = torch.zeros_like(W)
    loss = torch.zeros((), device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if gs is not None:
                if static_groups:
                    scale, zero = groups[int(perm[col]) // gs]
                elif col % gs == 0:  # W as it stood when this block started (updated after each block)
                    scale, zero = params(W[:, col:col + gs])
            w, d = W1[:, i], Hinv1[i, i]
            q = quant.dequantize(quant.quantize(w[:, None], scale, zero, bits, sym, grid), scale, zero)[:, 0]
            Q[:, col] = q
            err = (w - q) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        loss += (Err1**2).sum() / 2  # the reference's sum of (w - q)^2 / d^2 / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(dtype), {"damp": damp, "loss": float(loss), "dead": int(dead.sum())}


class InputHessian(Hessian):
    """The Hessian of the input a layer's weight sees: after its ``input_transform`` (if any)."""

    def __init__(self, layer):
        super().__init__(layer.in_features, layer.weight.device)
        self.transform = getattr(layer, "input_transform", None)

    def add(self, x, weights=None):
        super().add(x if self.transform is None else self.transform(x), weights)


@register("gptq", GPTQOptions, calibration=True)
def quantize_weights(state, opts: GPTQOptions, grid: str = "gptq") -> dict:
    """GPTQ the target weights of ``state.model`` in place on ``grid`` (compositions pass their
    reference's), block by block on ``state.calib`` (its ``token_weights`` weigh the Hessians);
    returns ``{"layers": count, "max_damp": largest damp}``."""
    selected = set(quant.targets(state.model, state.spec))
    spec, solver = state.spec, dict(block_size=opts.block_size, damp=opts.damp, act_order=opts.act_order,
                                    static_groups=opts.static_groups, grid=grid)
    done, damps = [], []

    def fn(i, block, stats):
        shared: dict[int, list[str]] = {}  # the selected linears of each Hessian (one per subset)
        for name, hess in stats.items():
            if f"blocks.{i}.{name}" in selected:
                shared.setdefault(id(hess), []).append(name)
        for names in shared.values():
            # GPTQ treats rows independently given H: one solve over the stacked rows of the
            # linears that share H equals one solve per linear, at one column loop for all.
            layers = [getattr(block, n) for n in names]
            q, info = gptq_quantize(torch.cat([lin.weight for lin in layers]), stats[names[0]].H, spec.w_bits,
                                    spec.w_sym, spec.group_size, name=f"blocks.{i}.{'+'.join(names)}", **solver)
            for lin, part in zip(layers, q.split([lin.out_features for lin in layers])):
                lin.weight.copy_(part)
            done.extend(f"blocks.{i}.{n}" for n in names)
            damps.append(info["damp"])

    quant.walk_blocks(state.model, state.calib, fn, InputHessian, batch_size=opts.batch_size,
                      true_sequential=opts.true_sequential, token_weights=getattr(state.calib, "token_weights", None))
    return {"layers": len(done), "max_damp": max(damps, default=None)}
