"""What the analysis commands (outliers, step_error) share with run.py: its config, models and data.

Their command lines are run.py's Hydra overrides (model=..., calib=..., method=..., bits=...)
mixed with the command's own ``key=value`` options; models, calibration and methods resolve
exactly as in a run, so any registered method works.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from qdlm_bench import artifacts, calibration, pipeline, runspec
from qdlm_bench.models.factory import load_fp_model
from qdlm_bench.paths import CONF_DIR
from qdlm_bench.report import slug
from qdlm_bench.tracking import WandbLogger


def parse_args(argv: list[str], options: dict) -> tuple[dict, dict, bool]:
    """Split ``key=value`` arguments into the command's own ``options`` (values parsed as YAML,
    defaults from ``options``) and Hydra overrides of run.py's config. Returns (resolved config,
    options, whether method= was given)."""
    own, overrides = dict(options), []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"arguments are key=value, got {arg!r}; own keys: {', '.join(options)}")
        if key in options:
            own[key] = yaml.safe_load(value)
        else:
            overrides.append(arg)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    except HydraException as err:
        raise SystemExit(f"{err}\n(this command's own keys: {', '.join(options)})") from None
    return cfg, own, any(o.lstrip("+~").startswith("method=") for o in overrides)


def build_spec(cfg: dict) -> runspec.RunSpec:
    """The validated run spec of ``cfg``; a bad config exits with status 2 and the reason."""
    try:
        return runspec.build(cfg)
    except runspec.ConfigError as err:
        print(f"invalid configuration: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def load(spec: runspec.RunSpec):
    """A fresh FP copy of the run's model, and its tokenizer."""
    return load_fp_model(spec.model, spec.dtype, spec.device, spec.seed)


def quantized(spec: runspec.RunSpec, cfg: dict | None = None):
    """The run's model quantized by its method, as pipeline.execute gets it: loaded from its artifact
    when one is saved (``artifacts`` and ``store`` of ``cfg``; default ``results/artifacts``), else
    quantized, checked and saved there (``pipeline.quantized_model``)."""
    model, _ = pipeline.quantized_model(spec, artifacts=artifacts.root_of(cfg or {}))
    return model.eval()


def token_windows(cfg: dict, spec: runspec.RunSpec, tokenizer, mask_token_id: int) -> torch.Tensor:
    """The unmasked token windows [n_samples, seqlen] of the config's ``calib`` set."""
    calib_cfg = dataclasses.replace(calibration.CalibConfig.from_dict(cfg["calib"]), masking="none")
    return calibration.build(calib_cfg, tokenizer, mask_token_id, data_dir=spec.settings.data_dir).input_ids


def label(spec: runspec.RunSpec) -> str:
    """The label of the analysed model: fp, or <method> <bits>."""
    return "fp" if spec.method["name"] == "fp" else f"{spec.method['name']} {spec.quant.name}"


def default_out(kind: str, name: str) -> Path:
    """reports/<kind>/<name, slugged>."""
    return Path("reports") / kind / slug(name)


def logger(cfg: dict) -> WandbLogger:
    """The wandb logger of the config's ``wandb`` group (disabled by default), grouped by ``sweep``."""
    return WandbLogger(**cfg["wandb"] | {"group": cfg.get("sweep")})
