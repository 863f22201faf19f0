"""The bad-input table and its benchmark:

    python -m qdlm_bench.bench config_errors [run=<path of a run.py>] [timeout=60] [out=bench.json] [workers=2]

``CASES`` is the one table of bad input (a configuration error, a missing or corrupted checkpoint,
calibration source or benchmark data, a corrupted record, an unusable store), each with the
strings its message must hold (the bad value, and what is allowed or the fix). ``make_fixtures``
builds the broken files in a folder; ``run_cases`` runs every case as a user would, each in a
fresh subprocess (offline, in that folder, with its own ``store=``), and reports each one's exit
status, wall time, the lines of its error and whether it held: exit status 2, the expected
strings, no model loaded (no "loading model" line) and no record in its store. tests/test_bad_input.py
asserts that every case holds; this bench prints the JSON and the table as markdown (``markdown``).
``run`` times another checkout's ``run.py`` (e.g. the commit before a change); the default is this
checkout's, or ``python -m qdlm_bench.cli`` for an installed package. Issue target: every
configuration error in at most 3 s on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qdlm_bench.paths import PACKAGE_DIR, ZOO_DIR


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]  # run.py overrides; {dir} is the fixtures folder
    expect: tuple[str, ...]  # in the error output: the bad value, and what is allowed (or the fix)


def _c(name: str, args: str, *expect: str) -> Case:
    return Case(name, tuple(args.split()), expect)


CASES = (
    # bit strings
    _c("bits out of range", "bits=w9a3", "w9a3", "w_bits must be 2..8", "Valid forms"),
    _c("bits garbage", "bits=garbage", "'garbage'", "unrecognised form", "Valid forms"),
    _c("group wider than a layer", "bits=w4a16g512", "group size 512", "q_proj (256)", "group size <= 256"),
    _c("group wider than a shape preset's layer", "model=tiny_random_llada bits=w4a16g256", "group size 256",
       "q_proj (128)", "group size <= 128"),
    _c("kv bits with FP weights (no K/V quantizer)", "bits=w16a16kv4", "kv4 with 16-bit weights",
       "quantize the weights too"),
    _c("kv bits out of range", "bits=w4a4kv9", "kv_bits must be 2..8", "got 9"),
    # names
    _c("unknown method", "method=gtpq", "method=gtpq", "did you mean method=gptq", "available: awq"),
    _c("unknown model", "model=tiny_llada_instrct", "model=tiny_llada_instrct",
       "did you mean model=tiny_llada_instruct", "available:"),
    _c("unknown calib", "method=gptq calib=wikitext", "calib=wikitext", "did you mean calib=wikitext2"),
    _c("unknown task", "tasks=[mini_mat]", "unknown task 'mini_mat'", "did you mean 'mini_math'", "Project tasks"),
    _c("unknown task in prompts: source", "method=gptq calib.source=prompts:mini_cod",
       "unknown task 'mini_cod'", "did you mean 'mini_code'"),
    _c("unknown method option (+)", "method=gptq +method.dampp=0.1", "'dampp'", "did you mean 'damp'",
       "valid keys"),
    _c("unknown method option (no +)", "method=gptq method.dampp=0.1", "dampp", "not in struct",
       "+method.<key>"),
    _c("unknown top-level setting", "+seeed=1", "'seeed'", "did you mean 'seed'", "valid top-level settings"),
    _c("unknown model family", "model.family=lada", "model.family='lada'", "did you mean 'llada'",
       "supported: llada, dream"),
    _c("unknown shape preset", "model=tiny_random_llada model.shape=tiny-lada", "model.shape='tiny-lada'",
       "did you mean 'tiny-llada'"),
    # option values
    _c("method option value", "method=gptq method.damp=-1", "method.damp=-1", "greater than or equal to 0"),
    _c("method option type", "method=gptq method.act_order=maybe", "method.act_order", "true or false"),
    _c("method option choice", "method=quarot method.weights=awq", "method.weights", "must be one of"),
    _c("quant option value", "bits=w4a8 quant.act_clip_ratio=1.5", "1.5", "(0, 1]"),
    _c("quant act layer", "bits=w4a8 quant.act_layers=[q_proj,qproj]", "qproj", "valid: q_proj"),
    _c("dtype", "dtype=float64x", "float64x", "bfloat16"),
    _c("seed", "seed=abc", "seed='abc'", "integer"),
    _c("baseline", "baseline=sometimes", "baseline='sometimes'", "auto, skip"),
    _c("wandb mode", "wandb.mode=sometimes", "sometimes", "wandb"),
    _c("tasks as a comma string", "tasks='mini_math,mini_code'", "tasks='mini_math,mini_code'",
       "tasks=[mini_math,mini_code]"),
    _c("no tasks", "tasks=[]", "no tasks given", "tasks=["),
    _c("eval.limit 0", "eval.limit=0", "eval.limit", "> 0"),
    _c("eval.limit negative", "eval.limit=-3", "eval.limit", "got -3"),
    _c("eval.batch_size 0", "eval.batch_size=0", "eval.batch_size", ">= 1"),
    # calibration
    _c("calib.n_samples 0", "method=gptq calib.n_samples=0", "calib.n_samples", ">= 1, got 0"),
    _c("calib.masking", "method=gptq calib.masking=half", "calib.masking", "'none' or 'random'"),
    _c("calibration file missing", "method=gptq calib.source={dir}/absent.txt", "absent.txt", "not found",
       "calib.source is a name"),
    _c("calibration file empty", "method=gptq calib.source={dir}/empty.txt", "empty.txt", "is empty"),
    _c("calibration jsonl without the field", "method=gptq calib.source={dir}/notext.jsonl",
       "no field 'text'", "calib.text_field", "fields: ['body']"),
    _c("calibration data missing offline", "method=gptq calib=wikitext2 eval.data_dir={dir}/nodata",
       "'wikitext2'", "not found", "eval.data_dir"),
    # benchmark data
    _c("benchmark data missing offline", "tasks=[wikitext_local] eval.data_dir={dir}/nodata",
       "wikitext_local", "does not exist", "eval.data_dir"),
    # checkpoints
    _c("checkpoint folder absent", "model.path={dir}/absent", "absent", "holds no config.json"),
    _c("checkpoint without config.json", "model.path={dir}/ckpt_noconfig", "holds no config.json",
       "config.json, tokenizer files"),
    _c("checkpoint config.json not JSON", "model.path={dir}/ckpt_badjson", "config.json is not valid JSON"),
    _c("checkpoint of another architecture", "model.path={dir}/ckpt_gpt2", "unsupported architecture",
       "GPT2LMHeadModel", "supported: llada"),
    _c("checkpoint config our code cannot build", "model.path={dir}/ckpt_gelu", "activation_type",
       "gelu", "supported"),
    _c("checkpoint config and tensors disagree", "model.path={dir}/ckpt_layers", "does not match its config.json",
       "missing tensors"),
    _c("truncated safetensors", "model.path={dir}/ckpt_truncated", "is truncated", "copy (or download) it again"),
    _c("shard missing from the index", "model.path={dir}/ckpt_shard",
       "model-00002-of-00002.safetensors", "copy (or download) every shard"),
    # the store
    _c("corrupted record at the run's key", "store={dir}/corrupt_store", "unreadable result record",
       "force=true"),
    _c("store is a file", "store={dir}/a_file", "is a file, not a folder", "store=<a writable folder>"),
    _c("store under a file (cannot be created)", "store={dir}/a_file/results", "lies under", "a file, not a folder",
       "store=<a writable folder>"),
)
TARGET_S = 3.0
LOG_PREFIX = re.compile(r"^\[[^]]*\]\[[^]]*\]\[\w+\] - ")  # Hydra's job logging: [time][logger][LEVEL] -
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}


LOADED = "loading model"  # factory.load_fp_model's first log line: the model began to load


def error_line(output: str) -> str:
    """The lines that report the error (Hydra's own, or the run's "invalid configuration"), without
    their log prefix, joined, cut at 600 characters."""
    lines = [LOG_PREFIX.sub("", line).strip() for line in output.splitlines() if line.strip()]
    marks = ("invalid configuration", "error", "could not", "mismatched", "unknown", "not in struct")
    start = next((i for i, line in enumerate(lines) if any(m in line.lower() for m in marks)), 0)
    return " ".join(line for line in lines[start:] if not line.startswith("Set the environment variable"))[:600]


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))


def make_fixtures(folder: str | Path, command: list[str] | None = None) -> None:
    """The broken files the cases name under ``{dir}``: checkpoints (copies of the embedded
    tiny-llada-instruct, 13 MB each, broken one way each), calibration files, an empty data folder,
    a file where a store should be, and a store holding a corrupted record at the default run's key."""
    root = Path(folder)
    model = ZOO_DIR / "tiny-llada-instruct"
    (root / "empty.txt").write_text("")
    (root / "notext.jsonl").write_text('{"body": "no text field"}\n')
    (root / "nodata").mkdir()
    (root / "a_file").write_text("not a folder\n")
    _copy_model(model, root / "ckpt_noconfig").joinpath("config.json").unlink()
    _copy_model(model, root / "ckpt_badjson").joinpath("config.json").write_text("{\"d_model\": 256,")
    _edit_config(_copy_model(model, root / "ckpt_gpt2"), model_type="gpt2", architectures=["GPT2LMHeadModel"])
    _edit_config(_copy_model(model, root / "ckpt_gelu"), activation_type="gelu")
    _edit_config(_copy_model(model, root / "ckpt_layers"), n_layers=7)
    weights = _copy_model(model, root / "ckpt_truncated") / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    sharded = _copy_model(model, root / "ckpt_shard")
    from qdlm_bench.models.layout import INDEX, safetensors_header

    names = sorted(safetensors_header(sharded / "model.safetensors"))
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    weight_map = {n: f"model-0000{1 + (i == len(names) - 1)}-of-00002.safetensors" for i, n in enumerate(names)}
    (sharded / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    corrupt = root / "corrupt_store"
    corrupt.mkdir()
    (corrupt / f"{_default_key(corrupt)}.json").write_text('{"key": "trunc')


def _default_key(store: Path) -> str:
    """The record key of ``run.py store=<store>`` (the default run)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from qdlm_bench import runspec
    from qdlm_bench.paths import CONF_DIR
    from qdlm_bench.store import spec_key

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=[f"store={store}"]), resolve=True)
    return spec_key(runspec.build(cfg).semantic())


def run_case(command: list[str], case: Case, folder: str, timeout: float) -> dict:
    """One case in a fresh subprocess (its own store unless it names one); a run still going after
    ``timeout`` s (it took the bad input) is stopped. ``held``: exit status 2, every expected string
    in the output, no model loaded, no record in the store."""
    args = [a.replace("{dir}", folder) for a in case.args]
    store = next((a.split("=", 1)[1] for a in args if a.startswith("store=")), None)
    if store is None:
        store = f"{folder}/stores/{re.sub(r'[^a-z0-9]+', '_', case.name.lower())}"
        args.append(f"store={store}")
    args.append(f"hydra.run.dir={folder}/outputs/{re.sub(r'[^a-z0-9]+', '_', case.name.lower())}")
    before = {p.name for p in Path(store).glob("*.json")} if Path(store).is_dir() else set()
    start = time.perf_counter()
    try:
        out = subprocess.run([*command, *args], cwd=folder, capture_output=True, text=True,
                             env=os.environ | OFFLINE, timeout=timeout)
        status, output = out.returncode, out.stderr + "\n" + out.stdout
    except subprocess.TimeoutExpired as err:
        tail = b"".join(x if isinstance(x, bytes) else x.encode() for x in (err.stderr, err.stdout) if x)
        status, output = None, f"no error: still running after {timeout:g} s\n{tail.decode(errors='replace')}"
    wall = round(time.perf_counter() - start, 2)
    output = output if isinstance(output, str) else output.decode(errors="replace")
    written = sorted({p.name for p in Path(store).glob("*.json")} - before) if Path(store).is_dir() else []
    missing = [e for e in case.expect if e not in output]
    loaded = LOADED in output
    return {"case": case.name, "args": " ".join(a.replace(folder, "$DIR") for a in case.args),
            "exit_status": status, "wall_s": wall, "error": error_line(output).replace(folder, "$DIR"),
            "missing": missing, "model_loaded": loaded, "records_written": written,
            "held": status == 2 and not missing and not loaded and not written}


def command_of(script: str) -> list[str]:
    """``python <script>``; by default this checkout's run.py, else (installed) ``python -m qdlm_bench.cli``."""
    if not script and (PACKAGE_DIR.parent / "run.py").is_file():
        script = str(PACKAGE_DIR.parent / "run.py")
    return [sys.executable, os.path.abspath(script)] if script else [sys.executable, "-m", "qdlm_bench.cli"]


def run_cases(folder: str, command: list[str] | None = None, timeout: float = 60.0, workers: int = 2,
              cases=CASES) -> list[dict]:
    """Every case, ``workers`` subprocesses at a time, in ``folder`` (fixtures made first)."""
    command = command or command_of("")
    make_fixtures(folder)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda c: run_case(command, c, folder, timeout), cases))


def markdown(results: list[dict]) -> str:
    """The table: input, message, exit status, time to fail, whether the case held."""
    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    rows = ["| # | case | input | message | exit | time to fail (s) | held |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        rows.append(f"| {i} | {cell(r['case'])} | `{cell(r['args'])}` | {cell(r['error'][:300])} | "
                    f"{r['exit_status']} | {r['wall_s']} | {'yes' if r['held'] else 'NO: ' + cell(r['missing'])} |")
    return "\n".join(rows)


def run(argv: list[str]) -> dict:
    from .common import parse_args

    a = parse_args(argv, dict(run="", timeout=60.0, out="", workers=2))
    command = command_of(a["run"])
    with tempfile.TemporaryDirectory() as folder:
        cases = run_cases(folder, command, a["timeout"], a["workers"])
    print(markdown(cases), file=sys.stderr)
    return {"command": " ".join(command), "cpus": os.cpu_count(), "workers": a["workers"], "target_s": TARGET_S,
            "max_wall_s": max(c["wall_s"] for c in cases), "held": sum(c["held"] for c in cases),
            "cases": cases}
