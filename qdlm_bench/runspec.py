"""A run's validated specification: everything that defines its result, checked up front.

Bad input (unknown method, bad bit string, missing checkpoint folder, unknown task, task data
absent offline) fails here with a message naming the fix, before any weights load.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from qdlm_bench import methods
from qdlm_bench import evaluation
from qdlm_bench.calibration import CalibConfig
from qdlm_bench.quant import QuantSpec, QuantSpecError

MODEL_FIELDS = ("name", "family", "hub_id", "path", "zoo", "shape", "tokenizer", "mask_token_id",
                "chat_template", "generation")
ZOO_DIR = Path(__file__).resolve().parent / "zoo" / "models"
# activation options of the quant: section -> QuantSpec fields
ACT_OPTIONS = {"act_sym": "a_sym", "act_clip_ratio": "a_clip_ratio", "act_layers": "act_layers"}


class ConfigError(ValueError):
    """A run's configuration is invalid; the message says how to fix it."""


@dataclass
class RunSpec:
    model: dict
    method: dict
    quant: QuantSpec
    exclude: tuple[str, ...]
    tasks: list[str]
    eval: dict
    settings: evaluation.EvalSettings
    calib: CalibConfig | None  # None for methods that need no calibration
    dtype: str
    device: str
    seed: int

    def semantic(self) -> dict:
        """What defines the result (the store key hashes this); devices and paths excluded."""
        model = {k: v for k, v in self.model.items() if k not in ("path", "hub_id")}
        model["source"] = (checkpoint_fingerprint(self.model["path"]) if self.model.get("path")
                           else self.model.get("hub_id") or self.model.get("shape"))
        evals = {k: v for k, v in self.eval.items() if k not in ("data_dir", "batch_size")}
        calib = {"calib": self.calib.defining()} if self.calib else {}
        quant = {"bits": self.quant.name, "exclude": list(self.exclude)}
        q = self.quant
        if q.a_bits < 16:  # activation options matter only then (weight-only keys unchanged)
            quant.update(act_sym=q.a_sym, act_clip_ratio=q.a_clip_ratio, act_layers=list(q.act_layers))
        return {"model": model, "method": self.method, **calib, "quant": quant,
                "tasks": list(self.tasks), "eval": evals, "dtype": self.dtype, "seed": self.seed}


def checkpoint_fingerprint(folder: str, sample: int = 1 << 20) -> str:
    """Identifies a local checkpoint by content, not location: its config.json, and each weight
    file's size, first and last MiB (cheap for 16 GB, and any two trained checkpoints differ there)."""
    folder = Path(folder).expanduser()
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(sample)
            f.seek(max(0, size - sample))
            digest.update(f"{path.name}:{size}".encode() + head + f.read(sample))
    return "local:" + digest.hexdigest()[:16]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but no CUDA GPU is visible; use device=cpu or device=auto")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ConfigError(f"dtype={dtype!r} is not a torch dtype; use auto, bfloat16, float16 or float32")
    return dtype


def check_model(model: dict) -> dict:
    unknown = set(model) - set(MODEL_FIELDS)
    if unknown:
        raise ConfigError(f"unknown model field(s) {sorted(unknown)}; valid: {list(MODEL_FIELDS)}")
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
    elif not (model.get("hub_id") or model.get("shape")):
        raise ConfigError(f"model {model.get('name')!r} needs model.path (a local checkpoint folder), "
                          "model.hub_id or model.shape (random weights)")
    return model


def quant_spec(bits: str, quant_cfg: dict) -> QuantSpec:
    """The QuantSpec of ``bits`` with the activation options of the ``quant:`` config section."""
    options = {field: quant_cfg[key] for key, field in ACT_OPTIONS.items() if quant_cfg.get(key) is not None}
    try:
        return QuantSpec.parse(bits, **options)
    except QuantSpecError as err:
        raise ConfigError(str(err)) from None
    except ValueError as err:  # an activation option
        raise ConfigError(f"quant.act_* ({', '.join(ACT_OPTIONS)}): {err}") from None


def build(cfg: dict) -> RunSpec:
    """Validate a resolved Hydra config (as a plain dict) into a RunSpec."""
    method = dict(cfg["method"])
    name = method.get("name")
    if name not in methods.available():
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(methods.available())}")
    quant = quant_spec("fp16" if name == "fp" else str(cfg["bits"]), cfg["quant"])
    if name != "fp" and quant.is_fp:
        raise ConfigError(f"method {name} quantizes, but bits={cfg['bits']} is full precision; "
                          "use method=fp for the baseline or a bit string like w4a16")
    model = check_model(dict(cfg["model"]))
    eval_cfg = dict(cfg["eval"])
    eval_cfg["data_dir"] = str(eval_cfg.get("data_dir") or evaluation.default_data_dir())
    if eval_cfg.get("apply_chat_template") is None:
        eval_cfg["apply_chat_template"] = bool(model.get("chat_template"))
    tasks = list(cfg["tasks"])
    try:
        settings = evaluation.EvalSettings.from_dict(
            {**eval_cfg, "seed": int(cfg["seed"])}, generation_defaults=model.get("generation") or {})
        evaluation.validate_tasks(tasks, settings.data_dir)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        calib = CalibConfig.from_dict(cfg["calib"]) if methods.needs_calibration(name) else None
    except ValueError as err:
        raise ConfigError(f"calib: {err}") from None
    device = resolve_device(str(cfg["device"]))
    return RunSpec(calib=calib, model=model, method=method, quant=quant, exclude=tuple(cfg["quant"].get("exclude") or ()),
                   tasks=tasks, eval=eval_cfg, settings=settings,
                   dtype=resolve_dtype(str(cfg["dtype"]), device), device=device, seed=int(cfg["seed"]))
