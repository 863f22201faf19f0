"""The methods registry: typed options checked before any work, YAML and options in agreement, the
"Adding a method" example of methods/README.md registered and run, no torch at validation."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
import yaml
from test_pipeline import config

from qdlm_bench import methods, pipeline, runspec
from qdlm_bench.bench import quantize as quantize_bench
from qdlm_bench.models.presets import random_model
from qdlm_bench.paths import CONF_DIR
from qdlm_bench.quant import QuantSpec, fake_quant

ROOT = Path(__file__).resolve().parents[1]

# one out-of-range (or otherwise bad) value per method with options, and the message it must give
BAD_VALUES = {
    "gptq": ("damp", -1, "greater than or equal to 0"),
    "awq": ("n_grid", 0, "greater than or equal to 1"),
    "smoothquant": ("alpha", 1.5, "less than or equal to 1"),
    "duquant": ("lac", 0, "greater than 0"),
    "quarot": ("weights", "awq", "must be one of 'gptq' or 'rtn'"),
    "dllmquant": ("base", "rtn", "must be one of 'gptq', 'awq' or 'quarot'"),
}


def yaml_options(name: str) -> dict:
    cfg = yaml.safe_load((CONF_DIR / "method" / f"{name}.yaml").read_text())
    assert cfg.pop("name") == name
    return cfg


@pytest.mark.parametrize("name", sorted(methods.available()))
def test_method_yaml_and_options_agree(name):
    assert yaml_options(name) == methods.defaults(name)


def test_every_method_yaml_is_a_registered_method():
    assert sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml")) == methods.available()


def wrong_type(kind) -> object:
    """A value of the wrong type for a field annotated ``kind``."""
    return 1 if kind is str or typing.get_origin(kind) is typing.Literal else "bad"


@pytest.mark.parametrize("name", sorted(methods.available()))
def test_every_option_rejects_a_wrong_type_naming_key_and_value(name):
    for key, kind in typing.get_type_hints(methods.get(name).options).items():
        value = wrong_type(kind)
        with pytest.raises(methods.OptionError, match=re.escape(f"method.{key}")) as err:
            methods.build_options(name, {key: value})
        assert repr(value) in str(err.value), err.value


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_bad_option_value_and_unknown_key(name):
    key, value, allowed = BAD_VALUES[name]
    with pytest.raises(methods.OptionError, match=re.escape(allowed)) as err:
        methods.build_options(name, {key: value})
    assert f"method.{key}" in str(err.value) and repr(value) in str(err.value)
    with pytest.raises(methods.OptionError, match=r"unknown method keys \['nonexistent'\]; valid keys: \["):
        methods.build_options(name, {"nonexistent": 1})


def test_nested_and_base_options_name_their_path():
    with pytest.raises(methods.OptionError, match=r"method.base_opts.damp=-1"):
        methods.build_options("dllmquant", {"base_opts": {"damp": -1}})
    with pytest.raises(methods.OptionError, match=r"method.base_opts: unknown method keys \['damp'\]"):
        methods.build_options("dllmquant", {"base": "awq", "base_opts": {"damp": 0.1}})
    with pytest.raises(methods.OptionError, match=r"method.tmas_opts.seed='0'"):
        methods.build_options("dllmquant", {"tmas_opts": {"seed": "0"}})


@pytest.mark.parametrize("override, message", [
    ("method.damp=-1", "method.damp=-1: Input should be greater than or equal to 0"),
    ("+method.dampp=0.1", "unknown method keys ['dampp'] (did you mean 'damp'?)"),
])
def test_a_bad_option_is_a_config_error_before_anything_loads(override, message, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "execute", lambda *a: pytest.fail("a bad config reached execution"))
    with pytest.raises(runspec.ConfigError) as err:
        pipeline.run(config("method=gptq", override), store_root=tmp_path)
    assert message in str(err.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("override, message", [
    ("method.damp=-1", "method.damp=-1"),
    ("+method.nonexistent=1", "unknown method keys ['nonexistent']"),
])
def test_run_py_exits_2_on_a_bad_option_without_loading_torch(override, message, tmp_path):
    out = subprocess.run([sys.executable, "-X", "importtime", "run.py", "method=gptq", override,
                          f"store={tmp_path / 'results'}", f"hydra.run.dir={tmp_path / 'out'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stdout + out.stderr
    assert not (tmp_path / "results").exists()
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert not {"torch", "lm_eval", "transformers", "datasets", "pandas"} & imported


def test_options_and_config_check_load_no_torch():
    code = ("import sys, types\n"
            "from qdlm_bench import methods, runspec\n"
            "for n in methods.available(): methods.build_options(n)\n"
            "heavy = ('torch', 'lm_eval', 'transformers', 'datasets', 'pandas')\n"
            "print([m for m in heavy if type(sys.modules.get(m)) is types.ModuleType])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_bench_quantize_builds_options_as_a_run_does():
    result = quantize_bench.run(["method=gptq", "method.damp=0.05", "shape=tiny-llada", "n_samples=2", "seqlen=32",
                                 "batch_size=2"])
    assert result["options"] == {**methods.defaults("gptq"), "damp": 0.05, "batch_size": 2}
    with pytest.raises(runspec.ConfigError, match="method.damp=-1"):
        quantize_bench.run(["method=gptq", "method.damp=-1", "shape=tiny-llada"])


def readme_block(lang: str) -> str:
    """The first ``lang`` code block of methods/README.md's "Adding a method" section."""
    text = (ROOT / "methods" / "README.md").read_text().split("## Adding a method", 1)[1]
    return re.search(rf"```{lang}\n(.*?)```", text, re.S).group(1)


def test_adding_a_method_example_registers_and_runs(tmp_path, monkeypatch):
    source = readme_block("python")
    path = tmp_path / "rtn_clip_example.py"
    path.write_text(source)
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))  # the example leaves no trace
    spec = importlib.util.spec_from_file_location("rtn_clip_example", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "rtn_clip_example", module)
    spec.loader.exec_module(module)
    assert "rtn_clip" in methods.available() and not methods.needs_calibration("rtn_clip")
    example_yaml = yaml.safe_load(readme_block("yaml"))
    assert example_yaml.pop("name") == "rtn_clip" and example_yaml == methods.defaults("rtn_clip")
    with pytest.raises(methods.OptionError, match=re.escape("method.ratio=0: Input should be greater than 0")):
        methods.build_options("rtn_clip", {"ratio": 0})
    fp = random_model("tiny-llada").eval()
    model = copy.deepcopy(fp)
    info = methods.get("rtn_clip")(model, QuantSpec.parse("w4a8g32"), None, {"ratio": 0.8})
    assert info == {"layers": 14}
    for name in ("blocks.0.q_proj", "blocks.1.down_proj"):
        w = fp.get_submodule(name).weight
        got = model.get_submodule(name)
        assert torch.equal(got.weight, fake_quant(w, 4, True, 32, 0.8)) and got.act_quant.bits == 8
    lines = [line for line in source.splitlines() if line.strip()]
    assert len(lines) <= 30, len(lines)


def test_records_key_the_validated_options(tmp_path):
    spec = runspec.build(config("method=gptq", "method.damp=0.02"))
    assert spec.method == {"name": "gptq", **methods.defaults("gptq"), "damp": 0.02}
    assert dataclasses.asdict(spec.options) == {**methods.defaults("gptq"), "damp": 0.02}
    assert json.dumps(spec.semantic()["method"], sort_keys=True)  # plain JSON
