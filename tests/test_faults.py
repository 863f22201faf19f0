"""Numerical faults (issue 17, item 6): a Hessian not positive definite after the dampening
retries, NaN/Inf in weights, activations or logits after quantization each fail the run with a
record naming the layer and the fault, and the sweep goes on."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_pipeline import config

from qdlm_bench import faults, methods, pipeline
from qdlm_bench.faults import NumericalFault
from qdlm_bench.models import random_model
from qdlm_bench.report import records_frame, study_table
from qdlm_bench.store import ResultStore


def tiny():
    return random_model("tiny-llada", seed=0).eval()


# --- the checks ---------------------------------------------------------------------------------

def test_a_healthy_model_passes_and_the_probe_leaves_rng_and_outputs_alone():
    model = tiny()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    before = model(ids)
    rng = torch.get_rng_state()
    faults.check_model(model)
    assert torch.equal(torch.get_rng_state(), rng)  # no draw from the global generator
    assert torch.equal(model(ids), before)
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed
    ids, mask = faults.probe_input(model)
    assert ids.shape == (1, faults.PROBE_TOKENS) and mask is None
    assert (ids[0, 1::2] == model.config.mask_token_id).all()
    assert torch.equal(faults.probe_input(model)[0], ids)  # fixed


def test_non_finite_weights_name_the_layer():
    model = tiny()
    with torch.no_grad():
        model.blocks[1].down_proj.weight[3, 5] = float("nan")
        model.blocks[1].down_proj.weight[0, 0] = float("inf")
    with pytest.raises(NumericalFault) as err:
        faults.check_model(model)
    assert (err.value.kind, err.value.layer) == ("non_finite_weights", "blocks.1.down_proj")
    assert "blocks.1.down_proj.weight holds 1 NaN and 1 Inf" in str(err.value)


def test_non_finite_activations_name_the_first_module_and_logits_the_head():
    model = tiny()
    model.blocks[0].up_proj.register_forward_hook(lambda m, a, out: out * float("inf"))
    with pytest.raises(NumericalFault, match="non finite activations at blocks.0.up_proj") as err:
        faults.check_model(model)
    assert (err.value.kind, err.value.layer) == ("non_finite_activations", "blocks.0.up_proj")
    model = tiny()
    model.lm_head.register_forward_hook(lambda m, a, out: out.masked_fill(out > 0, float("nan")))
    with pytest.raises(NumericalFault) as err:
        faults.check_model(model)
    assert (err.value.kind, err.value.layer) == ("non_finite_logits", "lm_head")


def test_fault_found_through_the_exception_chain():
    fault = NumericalFault("hessian_not_pd", "blocks.0.q_proj")
    try:
        try:
            raise fault
        except NumericalFault as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as exc:
        assert faults.find(exc) is fault
    assert faults.find(ValueError("x")) is None
    with pytest.raises(ValueError, match="kind"):
        NumericalFault("nan", "x")


# --- through the pipeline -----------------------------------------------------------------------

def with_step(monkeypatch, step):
    """method=rtn with ``step`` run after its weights are quantized."""
    rtn = methods.get("rtn")
    monkeypatch.setitem(methods._REGISTRY, "rtn", replace(rtn, recipe=lambda o: [*rtn.recipe(o), step]))


def poison_weight(state):
    state.model.blocks[1].gate_proj.weight[0, 0] = float("nan")


def overflow_activations(state):  # finite weights whose products overflow float32
    state.model.blocks[0].gate_proj.weight.fill_(3e38)


@pytest.mark.parametrize("step, kind, layer", [
    (poison_weight, "non_finite_weights", "blocks.1.gate_proj"),
    (overflow_activations, "non_finite_activations", "blocks.0.gate_proj"),
])
def test_a_faulted_run_is_recorded_with_kind_and_layer_and_the_sweep_goes_on(tmp_path, monkeypatch, step,
                                                                               kind, layer):
    evaluated = []
    real_evaluate = pipeline.evaluation.run
    monkeypatch.setattr(pipeline.evaluation, "run", lambda *a, **k: evaluated.append(1) or real_evaluate(*a, **k))
    with_step(monkeypatch, step)
    record = pipeline.run(config("method=rtn", "bits=w4a16"), store_root=tmp_path)
    assert record["status"] == "failed" and not evaluated  # failed before the evaluation
    assert record["fault"]["kind"] == kind and record["fault"]["layer"] == layer
    assert f"NumericalFault: {kind.replace('_', ' ')} at {layer}" in record["error"]
    assert ResultStore(tmp_path).get(record["key"]) == record
    monkeypatch.undo()  # the next job of the sweep: a healthy method
    after = pipeline.run(config("method=rtn", "bits=w8a16"), store_root=tmp_path)
    assert after["status"] == "done" and after["fault"] is None
    frame = records_frame(ResultStore(tmp_path).records())  # the report shows the fault
    table = study_table(frame)
    assert f"failed: {kind} at {layer}" in list(table["status"])


def test_gptq_hessian_not_positive_definite_fails_the_run_naming_the_layer(tmp_path, monkeypatch):
    def never_pd(A, upper=False, **kwargs):
        return A, torch.ones((), dtype=torch.int32)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", never_pd)
    cfg = config("method=gptq", "bits=w4a16", "calib.n_samples=4", "calib.seqlen=32")
    with pytest.warns(UserWarning, match="Cholesky failed"):
        record = pipeline.run(cfg, store_root=tmp_path)
    assert record["status"] == "failed"
    assert record["fault"]["kind"] == "hessian_not_pd"
    assert record["fault"]["layer"] == "blocks.0.q_proj+k_proj+v_proj"  # the first solve: one Hessian for q, k, v
    assert "damp=1" in record["fault"]["detail"] and "hessian not pd at blocks.0.q_proj" in record["error"]
