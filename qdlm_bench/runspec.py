"""A run's validated specification: everything that defines its result, checked up front.

Bad input (unknown method or option, bad bit string, missing checkpoint folder, unknown task, task
data absent offline) fails here with a message naming the fix, before any weights load. Torch-free
until the last step (``device``/``dtype``), so a configuration error takes well under 3 s.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qdlm_bench import evaluation, methods
from qdlm_bench.calibration import CalibConfig, sources as calib_sources
from qdlm_bench.decoders.config import EXACT, DecodeConfig
from qdlm_bench.digest import checkpoint_fingerprint
from qdlm_bench.evaluation import tasks as task_defs
from qdlm_bench.models import layout
from qdlm_bench.paths import ZOO_DIR
from qdlm_bench.quant.spec import QuantSpec, QuantSpecError
from qdlm_bench.store import spec_key

MODEL_FIELDS = ("name", "family", "hub_id", "path", "zoo", "shape", "tokenizer", "mask_token_id",
                "chat_template", "generation")
# the top-level keys of conf/config.yaml (a key forced in with +key=... is refused)
TOP_KEYS = ("model", "method", "calib", "eval", "bits", "quant", "tasks", "seed", "dtype", "device", "store",
            "artifacts", "force", "decode", "runtime", "baseline", "sweep", "shard", "checkpoints", "wandb")
# the quant: section -> QuantSpec fields (besides the bit string)
QUANT_OPTIONS = {"act_sym": "a_sym", "act_clip_ratio": "a_clip_ratio", "act_layers": "act_layers",
                 "exclude": "exclude", "lm_head": "lm_head"}


class ConfigError(ValueError):
    """A run's configuration is invalid; the message says how to fix it."""


@dataclass
class RunSpec:
    model: dict
    method: dict  # the method's name, its options as a dict, and its table label when set
    options: Any  # the method's validated options (``methods.get(name).options``)
    quant: QuantSpec
    tasks: list[str]
    eval: dict
    settings: evaluation.EvalSettings
    calib: CalibConfig | None  # None for methods that need no calibration
    dtype: str
    device: str
    seed: int
    decode: DecodeConfig = EXACT  # generation's decoder; in the key (under eval) only when not exact
    runtime: str = "fake"  # fake | real (qdlm_bench.runtime.real); in the key only when real and quantized

    def semantic(self) -> dict:
        """What defines the result (the store key hashes this); devices and paths excluded. Each
        task's definition enters by content (``eval.task_hashes``: YAML, helper code, data files)."""
        evals = {k: v for k, v in self.eval.items() if k not in (
            "data_dir", "include_path", "batch_size", "code_sandbox", "progress", "request_cache", "compile")}
        evals["task_hashes"] = task_defs.task_hashes(self.tasks, self.settings.data_dir, self.settings.include_path)
        if not self.decode.is_exact:  # an eval setting: the FP baseline of a row is the FP run with its decode
            evals["decode"] = self.decode.as_dict()
        quantization = self.quantization()
        runtime = {"runtime": self.runtime} if self.runtime != "fake" and not self.quant.is_fp else {}
        return {**{k: quantization[k] for k in ("model", "method", "calib", "quant") if k in quantization},
                "tasks": list(self.tasks), "eval": evals, "dtype": self.dtype, "seed": self.seed, **runtime}

    def quantization(self) -> dict:
        """What defines the quantized model: ``semantic`` without tasks and evaluation (the model's
        source, method and options, calibration, bits and targets, dtype, seed). Runs sharing it share
        one quantized model; ``quantization_key`` names it."""
        model = {k: v for k, v in self.model.items() if k not in ("path", "hub_id")}
        model["source"] = (checkpoint_fingerprint(self.model["path"]) if self.model.get("path")
                           else self.model.get("hub_id") or self.model.get("shape"))
        calib = {"calib": self.calib.defining()} if self.calib else {}
        q = self.quant
        quant = {"bits": q.name, "exclude": list(q.exclude), **({"lm_head": True} if q.lm_head else {})}
        if q.a_bits < 16:  # activation options matter only then (weight-only keys unchanged)
            quant.update(act_sym=q.a_sym, act_clip_ratio=q.a_clip_ratio, act_layers=list(q.act_layers))
        return {"model": model, "method": self.method, **calib, "quant": quant, "dtype": self.dtype,
                "seed": self.seed}

    def quantization_key(self) -> str:
        """16 hex digits naming the quantized model (``quantization``)."""
        return spec_key(self.quantization())


def resolve_device(device: str) -> str:
    torch = importlib.import_module("torch")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but no CUDA GPU is visible; use device=cpu or device=auto")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    torch = importlib.import_module("torch")
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ConfigError(f"dtype={dtype!r} is not a torch dtype; use auto, bfloat16, float16 or float32")
    return dtype


def check_model(model: dict) -> dict:
    unknown = set(model) - set(MODEL_FIELDS)
    if unknown:
        raise ConfigError(f"unknown model field(s) {sorted(unknown)}; valid: {list(MODEL_FIELDS)}")
    if model.get("family") not in layout.FAMILIES:
        raise ConfigError(f"model.family={model.get('family')!r}{_hint(model.get('family'), layout.FAMILIES)}; "
                          f"supported: {', '.join(layout.FAMILIES)}")
    if model.get("zoo") and not model.get("path"):
        folder = ZOO_DIR / str(model["zoo"])
        if not folder.is_dir():
            shipped = sorted(p.name for p in ZOO_DIR.iterdir()) if ZOO_DIR.is_dir() else []
            raise ConfigError(f"model.zoo={model['zoo']} is not an embedded model; shipped: {shipped}")
        model["path"] = str(folder)
    if model.get("path"):
        folder = Path(model["path"]).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.path={folder} holds no config.json: point it at a checkpoint "
                              "folder (config.json, tokenizer files, *.safetensors)")
        try:
            layout.check(folder, model.get("family"))
        except layout.CheckpointError as err:
            raise ConfigError(f"model.path={folder}: {err}") from None
    elif not (model.get("hub_id") or model.get("shape")):
        raise ConfigError(f"model {model.get('name')!r} needs model.path (a local checkpoint folder), "
                          "model.hub_id or model.shape (random weights)")
    return model


def _hint(name: str, valid) -> str:
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(cfg: dict) -> None:
    """Every top-level key is one of conf/config.yaml's (``+key=...`` adds any name to the config)."""
    unknown = sorted(set(cfg) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}{_hint(unknown[0], TOP_KEYS)}; valid top-level settings: "
                          f"{', '.join(TOP_KEYS)}")


def task_list(tasks: Any) -> list[str]:
    """``tasks`` as a list: a single name (``tasks=mini_math``) is the one-task list."""
    if isinstance(tasks, str):
        if "," in tasks or " " in tasks.strip():
            names = [t.strip() for t in tasks.replace(" ", ",").split(",") if t.strip()]
            raise ConfigError(f"tasks={tasks!r} is one string; a list of tasks is written tasks=[{','.join(names)}]")
        return [tasks]
    if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks):
        raise ConfigError(f"tasks={tasks!r}: expected a task name or a list of names, e.g. tasks=[mini_math,mini_code]")
    return list(tasks)


def integer(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{key}={value!r} must be an integer")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r} must be an integer") from None


def check_groups(quant: QuantSpec, model: dict) -> None:
    """A weight group wider than a quantized linear's input would quantize it per channel under a
    group name: refused, naming the widths (known from config.json or the shape preset). A group
    size that does not divide a width is allowed: the last group is shorter, as in the reference GPTQ."""
    if model.get("shape") and not model.get("path"):
        from qdlm_bench.models.presets import SHAPES  # torch is loaded by now (device resolution)

        if model["shape"] not in SHAPES:
            raise ConfigError(f"model.shape={model['shape']!r} is not a shape preset{_hint(model['shape'], SHAPES)}; "
                              f"valid: {', '.join(SHAPES)}")
    if quant.is_fp or quant.group_size is None:
        return
    if model.get("path"):
        cfg = layout.check(model["path"], model.get("family"))
    elif model.get("shape"):
        from qdlm_bench.models.presets import SHAPES

        cfg = SHAPES[model["shape"]]
    else:  # a hub id not downloaded yet: its shapes are unknown here
        return
    widths = {n: w for n, w in layout.linear_inputs(cfg).items() if n != "lm_head" or quant.lm_head}
    narrow = {n: w for n, w in widths.items() if w < quant.group_size}
    if narrow:
        raise ConfigError(f"bits={quant.name}: group size {quant.group_size} is wider than the input of "
                          f"{', '.join(f'{n} ({w})' for n, w in narrow.items())} in model {model.get('name')}; "
                          f"use a group size <= {min(widths.values())} (e.g. g{_pow2_below(min(widths.values()))}) "
                          "or none (per channel)")


def _pow2_below(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def quant_spec(bits: str, quant_cfg: dict) -> QuantSpec:
    """The QuantSpec of ``bits`` with the options of the ``quant:`` config section."""
    unknown = sorted(set(quant_cfg) - set(QUANT_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown quant option(s) {unknown}; valid: {list(QUANT_OPTIONS)}")
    options = {field: quant_cfg[key] for key, field in QUANT_OPTIONS.items() if quant_cfg.get(key) is not None}
    try:
        return QuantSpec.parse(bits, **options)
    except QuantSpecError as err:
        raise ConfigError(str(err)) from None
    except ValueError as err:  # a quant: option
        raise ConfigError(f"quant options (quant.act_*, quant.exclude, quant.lm_head): {err}") from None


def method_options(method_cfg: dict) -> tuple[str, Any, str | None]:
    """``(name, validated options, label)`` of the ``method:`` config section."""
    cfg = dict(method_cfg)
    name, label = cfg.pop("name", None), cfg.pop("label", None)
    try:
        return name, methods.build_options(name, cfg), label
    except ValueError as err:  # unknown method, or a bad option (OptionError)
        raise ConfigError(str(err)) from None


def build(cfg: dict) -> RunSpec:
    """Validate a resolved Hydra config (as a plain dict) into a RunSpec; raises ConfigError."""
    check_keys(cfg)
    name, options, label = method_options(cfg["method"])
    method = {"name": name, **methods.as_dict(options), **({"label": label} if label else {})}
    quant = quant_spec("fp16" if name == "fp" else str(cfg["bits"]), dict(cfg["quant"]))
    if name != "fp" and quant.is_fp:
        raise ConfigError(f"method {name} quantizes, but bits={cfg['bits']} is full precision; "
                          "use method=fp for the baseline or a bit string like w4a16")
    model = check_model(dict(cfg["model"]))
    eval_cfg = dict(cfg["eval"])
    eval_cfg["data_dir"] = str(eval_cfg.get("data_dir") or evaluation.default_data_dir())
    eval_cfg["include_path"] = list(task_defs.include_folders(eval_cfg.get("include_path"))) or None
    if eval_cfg.get("apply_chat_template") is None:
        eval_cfg["apply_chat_template"] = bool(model.get("chat_template"))
    tasks = task_list(cfg["tasks"])
    try:
        decode = DecodeConfig.from_dict(cfg.get("decode"))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{err} (conf/decode/: exact, prefix_cache, dual_cache, parallel, prefix_cache_parallel, "
                          "dual_cache_parallel)") from None
    seed = integer("seed", cfg["seed"])
    try:
        settings = evaluation.EvalSettings.from_dict(
            {**eval_cfg, "seed": seed}, generation_defaults=model.get("generation") or {})
    except (TypeError, ValueError) as err:
        first = str(err).split(" ", 1)[0]
        raise ConfigError(f"eval.{err}" if first in eval_cfg else f"eval: {err}") from None
    try:
        evaluation.validate_tasks(tasks, settings.data_dir, settings.include_path, code_sandbox=settings.code_sandbox)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        calib = CalibConfig.from_dict(cfg["calib"]) if methods.needs_calibration(name) else None
        if calib:
            calib_sources.check(calib, settings.data_dir, settings.include_path)
    except (TypeError, ValueError, FileNotFoundError) as err:
        raise ConfigError(f"calib: {err}") from None
    settings.decode = decode
    for task in tasks if not decode.is_exact else ():  # the decoder against each task's sampler settings
        gen = settings.generation_config(task)
        try:
            decode.check(gen, gen.sampler or model["family"])
        except ValueError as err:
            raise ConfigError(f"task {task}: {err}") from None
    device = resolve_device(str(cfg["device"]))  # the first torch import: every check above is torch-free
    check_groups(quant, model)  # and the shape preset
    dtype = resolve_dtype(str(cfg["dtype"]), device)
    runtime = check_runtime(cfg.get("runtime", "fake"), quant, device, dtype)
    return RunSpec(calib=calib, model=model, method=method, options=options, quant=quant, tasks=tasks,
                   eval=eval_cfg, settings=settings, dtype=dtype, device=device, seed=seed, decode=decode,
                   runtime=runtime)


def check_runtime(runtime, quant: QuantSpec, device: str, dtype: str) -> str:
    """``runtime`` (fake | real); with real, a setting without a real kernel fails here, before loading
    (``runtime.real.plan``)."""
    from qdlm_bench.runtime import real

    runtime = "fake" if runtime is None else str(runtime)
    try:
        real.check_runtime(runtime)
        if runtime == "real":
            real.plan(quant, device, dtype)
    except real.RealRuntimeError as err:
        raise ConfigError(str(err)) from None
    return runtime
