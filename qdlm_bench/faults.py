"""Numerical faults of a quantized model, named by kind and layer.

A run whose quantization leaves the model numerically broken fails with a ``NumericalFault``;
its record (status "failed") then holds ``fault: {"kind": ..., "layer": ...}`` next to the
traceback, and the sweep goes on. Kinds (``KINDS``):

- ``hessian_not_pd``: a calibrated method's Hessian is not positive definite even after its
  dampening retries, or holds NaN/Inf (non-finite calibration inputs of that layer);
- ``non_finite_weights``: a parameter or buffer holds NaN or Inf after quantization;
- ``non_finite_activations``: a module's output is non-finite in the probe forward;
- ``non_finite_logits``: the logits are, while every module before the LM head is finite.

``check_model`` runs after quantization: every floating parameter and buffer is checked, then one
probe forward (one row of at most ``PROBE_TOKENS`` tokens: the start of the first calibration
sample, else a fixed random batch half masked as the sampler's inputs are) with a forward hook
on every module names the first module whose output is non-finite. The probe runs under
``torch.no_grad`` and draws its random tokens from its own generator: the global RNG streams,
and so every evaluation number, are untouched.
"""

from __future__ import annotations

from qdlm_bench.lazy import lazy_import

torch = lazy_import("torch")

KINDS = ("hessian_not_pd", "non_finite_weights", "non_finite_activations", "non_finite_logits")
PROBE_TOKENS = 32
PROBE_SEED = 1234


class NumericalFault(RuntimeError):
    """A numerical fault of kind ``kind`` (one of ``KINDS``) at module ``layer``."""

    def __init__(self, kind: str, layer: str, detail: str = ""):
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {KINDS}")
        self.kind, self.layer, self.detail = kind, layer, detail
        super().__init__(f"{kind.replace('_', ' ')} at {layer}" + (f": {detail}" if detail else ""))

    def __reduce__(self):  # picklable (multiprocessing, Hydra launchers)
        return type(self), (self.kind, self.layer, self.detail)

    def as_dict(self) -> dict:
        """The record's ``fault`` field."""
        return {"kind": self.kind, "layer": self.layer, "detail": self.detail}


def find(exc: BaseException | None) -> NumericalFault | None:
    """The NumericalFault ``exc`` is, or was raised from / during (its cause and context chain)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, NumericalFault):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _module_of(name: str) -> str:
    return name.rpartition(".")[0] or name


def _non_finite(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())


def check_weights(model) -> None:
    """Raise ``non_finite_weights`` naming the module of the first parameter or buffer (in the
    model's order) that holds NaN or Inf."""
    tensors = [*model.named_parameters(remove_duplicate=True), *model.named_buffers(remove_duplicate=True)]
    for name, t in tensors:
        if _non_finite(t):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise NumericalFault("non_finite_weights", _module_of(name),
                                 f"{name} holds {nan} NaN and {inf} Inf of {t.numel()} values")


def probe_input(model, calib=None, tokens: int = PROBE_TOKENS):
    """``(input_ids [1, L], attention_mask or None)``: the start of the first calibration sample,
    else ``tokens`` random ids (own generator, ``PROBE_SEED``) with every other one the mask token."""
    device = model.device
    if calib is not None and getattr(calib, "input_ids", None) is not None and len(calib.input_ids):
        ids = calib.input_ids[:1]
        mask = getattr(calib, "attention_mask", None)
        if mask is not None:  # left padding: keep the last tokens, the real ones
            return ids[:, -tokens:].to(device), mask[:1, -tokens:].to(device)
        return ids[:, :tokens].to(device), None
    gen = torch.Generator().manual_seed(PROBE_SEED)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=gen)
    if getattr(cfg, "mask_token_id", None) is not None:
        ids[:, 1::2] = cfg.mask_token_id
    return ids.to(device), None


def probe_forward(model, input_ids, attention_mask=None) -> None:
    """One forward pass with a hook on every module: raise ``non_finite_activations`` naming the
    first module (in execution order) whose output is non-finite, or ``non_finite_logits``
    when only the LM head's output (the logits) is."""
    first: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    head = getattr(model, "lm_head", None)

    def hook(module, args, output):
        if first:
            return
        outs = output if isinstance(output, (tuple, list)) else (output,)
        if any(_non_finite(o) for o in outs):
            first.append(names[module])

    handles = [m.register_forward_hook(hook) for m in names if m is not model]
    try:
        with torch.no_grad():
            logits = model(input_ids, attention_mask=attention_mask)
    finally:
        for h in handles:
            h.remove()
    where = first[0] if first else None
    if where is not None and (head is None or names.get(head) != where):
        raise NumericalFault("non_finite_activations", where, f"probe forward of {input_ids.shape[1]} tokens")
    if where is not None or _non_finite(logits):
        raise NumericalFault("non_finite_logits", where or "lm_head",
                             f"probe forward of {input_ids.shape[1]} tokens")


def check_model(model, calib=None) -> None:
    """``check_weights``, then ``probe_forward`` on ``probe_input``; raises NumericalFault."""
    check_weights(model)
    probe_forward(model, *probe_input(model, calib))
