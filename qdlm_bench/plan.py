"""The bill first: what a run or sweep will cost, before any work.

    python -m qdlm_bench.plan -m method=fp,rtn bits=w4a16,w8a8 tasks=[mini_math,mini_qa]
    python -m qdlm_bench.plan -m model=llada_8b_instruct model.path=/data/llada-8b-instruct \
        method=rtn,gptq bits=w4a16g128,w4a4 tasks=[gsm8k_local,arc_easy_local] \
        plan.bench=reports/bench/h100-sampler.json

The arguments are ``run.py``'s (same configs, same ``-m`` expansion: ``qdlm_bench.sweep_jobs``)
plus the plan's own options, all prefixed ``plan.`` (no Hydra key is named ``plan``):

- ``plan.throughput=<TFLOP/s>``: achieved throughput of one GPU, for the hours;
  ``plan.throughput=measure`` measures it here, on the first run's model shape, dtype and device
  with random weights, by timing a sample of each kind of pass the plan holds through the real
  samplers (``measure_throughput``);
- ``plan.bench=<bench JSON>``: the throughput of ``python -m qdlm_bench.bench sampler`` (its
  ``achieved_tflops``: FLOPs of the batched LLaDA sampler per second) or ``bench forward``
  (``fp.achieved_tflops``), per kind of work where it has ``achieved_tflops_by_kind``; without
  either, the plan gives counts and FLOPs and no hours;
- ``plan.tokenizer=byte``: plan models whose files are not here (no ``model.path``: LLaDA/Dream
  from the hub, offline) with their family's shape preset and the byte tokenizer, a labelled stand-in
  whose token counts exceed the real BPE tokenizers' (``model_files``): an upper bound;
- ``plan.out=<file.json>``: also write the plan as JSON; ``plan.json=true`` (or ``--json``):
  print the JSON instead of the table;
- ``plan.verify=true``: then run the first run's evaluation here (weights loaded, quantized as
  ``pipeline.run`` does; no record written), counting the model's forward calls and timing each
  task, and print planned against counted and measured (``verify``): the check of the plan.

For each job it builds the run's tasks and their requests exactly as the evaluation does
(``evaluation.requests``: the prompts with their few-shot context and chat template, after
``eval.limit``), tokenizes them with the model's tokenizer (config.json and tokenizer files only;
no weights are loaded) and counts forward passes, tokens and FLOPs with ``qdlm_bench.cost`` (the
formula is in its docstring). Hours = FLOPs / throughput. Each row is one run x task; the status
says whether the run is already in the store (``in store``: a re-run skips it), repeats an
earlier job's record (``= #N``), or is an FP baseline that ``baseline=auto`` adds to a sweep
(``baseline``). Jobs with the same model, tasks and eval settings share one request build.

Quantization: a calibrated method's set is ``calib.n_samples x calib.seqlen`` tokens; the plan
shows one forward pass of it through the blocks (``calibration``) as a lower bound of the
quantization cost; the methods' own solver work (GPTQ's Hessians, AWQ's search, TMAS
trajectories) is not included (``python -m qdlm_bench.bench quantize`` measures it).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from qdlm_bench.cost import Cost

log = logging.getLogger("qdlm_bench")
PLAN_PREFIX = "plan."
OPTIONS = {"throughput": None, "bench": None, "out": None, "json": "false", "verify": "false", "tokenizer": None}
STAND_INS = ("byte",)  # plan.tokenizer: the stand-in for models whose files are not here
FAMILY_SHAPES = {"llada": "llada-8b", "dream": "dream-7b"}  # the shape preset of each family's real models
STATUS_TO_RUN, STATUS_DONE, STATUS_BASELINE = "to run", "in store", "baseline"


def has_artifact(spec, cfg: dict | None = None) -> bool:
    """Whether the quantized model of ``spec`` is already saved, complete and current
    (``<artifacts>/<quantization_key>/``, ``artifacts`` and ``store`` of the job's ``cfg``), so that its
    run loads it instead of calibrating and quantizing. Reads JSON only; FP runs have none."""
    if spec.method["name"] == "fp":
        return False
    from qdlm_bench.artifacts import ArtifactStore, root_of

    root = root_of(cfg or {})
    return root is not None and ArtifactStore(root).has(spec)


def artifact_slot(spec, cfg: dict) -> tuple[str, str] | None:
    """``(artifacts root, quantization key)`` where the quantized model of ``spec`` is saved; None for
    FP runs or with ``artifacts=null``. Runs of one sweep sharing it quantize once."""
    from qdlm_bench.artifacts import root_of

    root = root_of(cfg)
    return None if root is None or spec.method["name"] == "fp" else (str(root), spec.quantization_key())


# ------------------------------------------------------------------------------ arguments


def parse_argv(argv: list[str]) -> tuple[list[str], bool, dict]:
    """``(Hydra overrides, multirun, plan options)`` of the command line."""
    overrides, multirun, opts = [], False, dict(OPTIONS)
    for arg in argv:
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg == "--json":
            opts["json"] = "true"
        elif arg.startswith(PLAN_PREFIX):
            key, sep, value = arg[len(PLAN_PREFIX):].partition("=")
            if not sep or key not in OPTIONS:
                raise SystemExit(f"bad plan option {arg!r}; expected plan.<key>=<value> with key in {sorted(OPTIONS)}")
            opts[key] = value
        else:
            overrides.append(arg)
    for flag in ("json", "verify"):
        opts[flag] = str(opts[flag]).lower() in ("1", "true", "yes")
    return overrides, multirun, opts


def bench_throughput(path: str | Path) -> float:
    """Achieved TFLOP/s of a bench JSON: ``achieved_tflops`` (``bench sampler``) or
    ``fp.achieved_tflops`` (``bench forward``)."""
    data = json.loads(Path(path).read_text())
    for value in (data.get("achieved_tflops"), (data.get("fp") or {}).get("achieved_tflops")):
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    raise SystemExit(f"{path} holds no achieved_tflops (a `python -m qdlm_bench.bench sampler` or "
                     "`bench forward` JSON has it)")


def bench_rate(path: str | Path) -> Rate:
    """The ``Rate`` of a bench JSON: ``bench_throughput``, and per kind of work its
    ``achieved_tflops_by_kind`` when it has one (``{"generate": ..., "loglikelihood": ...}``)."""
    by_kind = json.loads(Path(path).read_text()).get("achieved_tflops_by_kind") or {}
    return Rate(bench_throughput(path), f"plan.bench={path}", {k: float(v) for k, v in by_kind.items()})


# -------------------------------------------------------------------------------- the model


def _hub_folder(hub_id: str) -> Path:
    """A hub model's config and tokenizer files (no weights), cached or downloaded."""
    from huggingface_hub import snapshot_download

    from qdlm_bench.runspec import ConfigError

    try:
        return Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.model", "*.txt", "*.tiktoken", "*.py"]))
    except Exception as err:  # noqa: BLE001 (offline, unknown repo...: one answer)
        raise ConfigError(f"the plan needs {hub_id}'s config.json and tokenizer files, which cannot be "
                          f"downloaded ({type(err).__name__}); pass model.path=<a local checkpoint folder>") from None


def model_files(model: dict, stand_in: str | None = None):
    """``(DLLMConfig, tokenizer)`` of a validated model preset (``RunSpec.model``), as
    ``models.factory`` would build them, without loading any weights. ``stand_in="byte"``
    (``plan.tokenizer=byte``): a model without local files (no ``path``, no ``shape``) is planned
    with its family's shape preset (``FAMILY_SHAPES``) and the byte tokenizer, whose token counts
    exceed a BPE tokenizer's (about 4x for English text): an upper bound of its cost."""
    from qdlm_bench.models import checkpoint, factory
    from qdlm_bench.models.tokenizer import byte_tokenizer
    from qdlm_bench.runspec import ConfigError

    tokenizer = byte_tokenizer() if model.get("tokenizer") == "byte" else None
    if stand_in == "byte" and not model.get("path") and not model.get("shape"):
        return factory._fit_vocab(FAMILY_SHAPES[model["family"]], byte_tokenizer()), byte_tokenizer()
    if model.get("path") or not model.get("shape"):
        folder = Path(model["path"]).expanduser() if model.get("path") else _hub_folder(model["hub_id"])
        cfg = checkpoint.config_from_hf(json.loads((folder / "config.json").read_text()), model["family"])
        tokenizer = tokenizer or checkpoint.load_tokenizer(folder)
    else:
        cfg = factory._fit_vocab(model["shape"], tokenizer)
    if tokenizer is None:
        raise ConfigError(f"model {model['name']!r} has no tokenizer files; add them to its folder "
                          "or set model.tokenizer=byte")
    return cfg, tokenizer


def planning_lm(cfg, tokenizer, settings):
    """The evaluation's lm-eval model (``DiffusionLMAdapter``) around a weightless stand-in: its
    tokenization, truncation and chat template are the evaluation's."""
    from qdlm_bench.evaluation.adapter import DiffusionLMAdapter

    return DiffusionLMAdapter(SimpleNamespace(config=cfg, device="cpu"), tokenizer, settings)


# --------------------------------------------------------------------------------- planning


@dataclass
class TaskPlan:
    task: str
    examples: int
    requests: int
    cost: Cost


@dataclass
class RunPlan:
    job: int  # 1-based job number (0: a baseline added by baseline=auto)
    overrides: list[str]
    model: str
    method: str
    bits: str
    key: str
    status: str
    artifact: bool = False
    tasks: list[TaskPlan] = field(default_factory=list)
    calibration: Cost | None = None
    calib_tokens: int = 0
    spec: object = field(default=None, repr=False)  # its RunSpec
    stand_in: str | None = None  # plan.tokenizer: planned with a stand-in shape and tokenizer (model_files)

    @property
    def runs(self) -> bool:
        """Whether this run costs anything when the sweep runs."""
        return self.status in (STATUS_TO_RUN, STATUS_BASELINE)


def plan_tasks(spec, progress=None, stand_in: str | None = None, builds: dict | None = None) -> list[TaskPlan]:
    """Per task of ``spec`` (a RunSpec): examples after ``limit``, requests and their cost.
    ``builds``: the tasks' requests, shared by the runs whose requests are built alike (the same
    tokenizer, eval settings, tasks and seed; the model's shape and sampler only enter the cost)."""
    from qdlm_bench import cost
    from qdlm_bench.evaluation import requests as eval_requests

    cfg, tokenizer = model_files(spec.model, stand_in)
    builds = {} if builds is None else builds
    key = json.dumps([tokenizer_key(spec.model, stand_in), spec.eval, spec.tasks, spec.seed], sort_keys=True,
                     default=str)
    if key not in builds:
        objs, settings = eval_requests.prepare_tasks(spec.tasks, spec.settings)
        lm = planning_lm(cfg, tokenizer, settings)
        builds[key] = (eval_requests.build_requests(objs, settings, lm, progress=progress), settings.groups)
    by_task, groups = builds[key]
    lm = planning_lm(cfg, tokenizer, spec.settings.within(groups))
    costs = cost.requests_cost(lm, [r for reqs in by_task.values() for r in reqs])
    return [TaskPlan(task, len({r.doc_id for r in reqs}), len(reqs), costs.get(task, Cost()))
            for task, reqs in by_task.items()]


def tokenizer_key(model: dict, stand_in: str | None = None) -> str:
    """What names the tokenizer ``model_files`` gives ``model``."""
    if model.get("tokenizer") == "byte" or (stand_in == "byte" and not model.get("path") and not model.get("shape")):
        return "byte"
    return str(model.get("path") or model.get("hub_id"))


def calibration_cost(spec, stand_in: str | None = None) -> tuple[Cost, int] | None:
    """One forward pass of the run's calibration set through the blocks (no LM head)."""
    if spec.calib is None:
        return None
    from qdlm_bench.cost import row_flops

    cfg, _ = model_files(spec.model, stand_in)
    n, seqlen = spec.calib.n_samples, spec.calib.seqlen
    return Cost(passes=0, tokens=n * seqlen, rows=n, flops=n * row_flops(cfg, seqlen, 0)), n * seqlen


def _eval_key(spec) -> str:
    """What the evaluation's work depends on (not the method or bits)."""
    return json.dumps([spec.model, spec.eval, spec.tasks, spec.seed], sort_keys=True, default=str)


def make_plan(overrides: list[str], multirun: bool, progress=None, stand_in: str | None = None) -> list[RunPlan]:
    """Every run of the command line (and the FP baselines ``baseline=auto`` adds), planned;
    ``stand_in``: ``model_files``'s."""
    from qdlm_bench import runspec, sweep_jobs
    from qdlm_bench.store import ResultStore, baseline_key, spec_key

    say = progress or (lambda msg: None)
    runs: list[RunPlan] = []
    planned: dict[str, int] = {}  # record key -> job number that runs it
    fp_planned: set[str] = set()  # baseline keys whose FP run is planned
    eval_cache: dict[str, list[TaskPlan]] = {}
    builds: dict = {}  # requests shared by runs built alike (plan_tasks)
    fp_done: dict[str, set[str]] = {}  # store root -> baseline keys of its finished FP records
    saving: set[tuple[str, str]] = set()  # (artifacts root, quantization key) an earlier planned run saves
    jobs = sweep_jobs.expand(overrides, multirun)
    say(f"{len(jobs)} job(s)")
    for num, job in enumerate(jobs, 1):
        cfg = sweep_jobs.compose(job, overrides)
        candidates = [(num, job, cfg)]
        if multirun and cfg.get("baseline") == "auto" and cfg["method"]["name"] != "fp":
            from qdlm_bench.pipeline import baseline_config

            candidates.insert(0, (0, ["(baseline=auto)"], baseline_config(cfg)))
        for job_num, job_overrides, job_cfg in candidates:
            spec = runspec.build(job_cfg)
            semantic = spec.semantic()
            key, store = spec_key(semantic), ResultStore(job_cfg["store"])
            base = baseline_key(semantic)
            if job_num == 0:  # the baseline ensure_baseline would run, unless it exists or is planned
                if str(store.root) not in fp_done:
                    found = store.records(method="fp", status="done") if store.root.is_dir() else []
                    fp_done[str(store.root)] = {r.get("baseline_key") for r in found}
                if base in fp_done[str(store.root)] or base in fp_planned or key in planned:
                    continue
                status = STATUS_BASELINE
            elif key in planned:
                status = f"= #{planned[key]}" if planned[key] else "= baseline"
            else:
                status = STATUS_DONE if store.root.is_dir() and _is_done(store, key) else STATUS_TO_RUN
            planned.setdefault(key, job_num)
            if spec.method["name"] == "fp":
                fp_planned.add(base)
            artifact = has_artifact(spec, job_cfg)
            quantized = artifact_slot(spec, job_cfg)
            if quantized is not None and status == STATUS_TO_RUN:
                artifact = artifact or quantized in saving  # quantized and saved by an earlier run of the sweep
                saving.add(quantized)
            run = RunPlan(job_num, job_overrides, spec.model["name"], spec.method["name"], spec.quant.name,
                          key, status, artifact=artifact, spec=spec, stand_in=stand_in)
            ek = _eval_key(spec)
            if ek not in eval_cache:
                name = spec.model["name"]
                eval_cache[ek] = plan_tasks(spec, lambda t, name=name: say(f"building requests: {name} / {t}"),
                                            stand_in, builds)
            run.tasks = eval_cache[ek]
            calib = None if run.artifact else calibration_cost(spec, stand_in)
            if calib:
                run.calibration, run.calib_tokens = calib
            runs.append(run)
    return runs


def _is_done(store, key: str) -> bool:
    try:
        return store.is_done(key)
    except ValueError:  # an unreadable record: the run will replace it
        return False


# ------------------------------------------------------------------------------ throughput


def _probe_inputs(probe, cfg):
    """The probe's work as the code runs it, shortened but with passes of the real shape: a
    generation keeps one LLaDA block (prompts lengthened by the blocks before it) or 8 Dream steps."""
    import dataclasses

    from qdlm_bench.cost import llada_steps

    if probe.kind == "loglikelihood":
        return probe.lengths, None
    gen = probe.gen
    if (gen.sampler or cfg.family) == "llada":
        before = gen.gen_length - gen.block_length
        steps = llada_steps(gen) // (gen.gen_length // gen.block_length)
        short = dataclasses.replace(gen, gen_length=gen.block_length, steps=steps)
        return [n + before for n in probe.lengths], short
    return probe.lengths, dataclasses.replace(gen, steps=min(gen.steps, 8))


def time_probe(model, probe, min_seconds: float = 2.0, warm: bool = True) -> tuple[float, float]:
    """``(FLOPs, seconds)`` of running ``probe`` (``cost.Probe``, shortened by ``_probe_inputs``)
    through the real sampler on ``model``: once untimed when ``warm``, then timed, repeated
    until ``min_seconds`` have passed."""
    import torch

    from qdlm_bench import cost, diffusion

    cfg = model.config
    lengths, gen = _probe_inputs(probe, cfg)
    g = torch.Generator().manual_seed(0)
    high = min(cfg.vocab_size, 1 << 20)

    def tokens(n):
        ids = torch.randint(0, high, (n,), generator=g)
        return ids.masked_fill(ids == cfg.mask_token_id, (cfg.mask_token_id + 1) % high).tolist()

    if gen is None:
        pairs = [(tokens(p), tokens(t)) for p, t in lengths]
        flops = cost.loglikelihood_cost(cfg, lengths, 1, len(pairs)).flops

        def work():
            diffusion.loglikelihood(model, pairs, mc_num=1, batch_size=len(pairs))
    else:
        prompts = [tokens(n) for n in lengths]
        flops = cost.generation_cost(cfg, lengths, gen, len(prompts)).flops

        def work():
            diffusion.generate(model, prompts, gen, batch_size=len(prompts))

    def sync():
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    if warm:
        work()
    sync()
    start, n = time.perf_counter(), 0
    while True:
        work()
        sync()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return flops * n, elapsed


@dataclass
class Rate:
    """Achieved TFLOP/s: one figure, or (measured) one per kind of work (``Cost.flops_by_kind``)."""

    tflops: float
    source: str
    by_kind: dict = field(default_factory=dict)

    def hours(self, cost: Cost) -> float:
        """Hours of ``cost``: each kind of work at its rate."""
        seconds = sum(f / (self.by_kind.get(k, self.tflops) * 1e12) for k, f in cost.flops_by_kind.items())
        rest = cost.flops - sum(cost.flops_by_kind.values())
        return (seconds + max(rest, 0.0) / (self.tflops * 1e12)) / 3600


def measure_throughput(runs: list[RunPlan], progress=None) -> Rate:
    """This machine's achieved TFLOP/s on the plan's work. The first run that runs (else the
    first run) gives the model shape (random weights: no checkpoint is read), dtype and device;
    for each of its tasks and each kind of work (generate, loglikelihood, is_greedy, rolling), a
    representative batch (``cost.Probe``: the middle batch of the largest part) is run through
    the real sampler and timed. A kind's rate = its FLOPs in that run / its time at the measured
    rates of its tasks; the overall figure weights the kinds by their FLOPs."""
    import torch

    from qdlm_bench.models.presets import random_model

    run = next((r for r in runs if r.runs), runs[0])
    spec = run.spec
    cfg, _ = model_files(spec.model, run.stand_in)
    model = random_model(cfg, dtype=getattr(torch, spec.dtype), device=spec.device, seed=0).eval()
    flops_of, seconds_of, warm = {}, {}, True
    for t in run.tasks:
        for kind, (_, probe) in t.cost.probes.items():
            f, s = time_probe(model, probe, warm=warm)
            warm = False  # one warm-up per model (allocator, kernels)
            if progress:
                progress(f"measured {t.task} / {kind}: {f / s / 1e12:.4g} TFLOP/s")
            flops_of[kind] = flops_of.get(kind, 0.0) + t.cost.flops_by_kind[kind]
            seconds_of[kind] = seconds_of.get(kind, 0.0) + t.cost.flops_by_kind[kind] / (f / s)
    if not seconds_of:
        raise SystemExit("plan.throughput=measure: the plan holds no work to measure")
    by_kind = {k: flops_of[k] / seconds_of[k] / 1e12 for k in flops_of}
    overall = sum(flops_of.values()) / sum(seconds_of.values()) / 1e12
    return Rate(overall, f"measured here on {spec.device}, {spec.dtype} (plan.throughput=measure)", by_kind)


def verify(run: RunPlan, rate: Rate | None = None, progress=None) -> list[dict]:
    """Run ``run``'s evaluation here and compare it with its plan: the model loaded and quantized
    as ``pipeline.run`` does it, then ``evaluation.run`` task by task while a wrapper around the
    model's ``forward`` counts its calls and their tokens (``input_ids.numel()``); each task is
    timed (lm-eval's task building and scoring included). Returns per task: planned and counted
    passes and tokens, planned hours (at ``rate``) and measured seconds. Loads the weights."""
    from qdlm_bench import evaluation, pipeline
    from qdlm_bench.models.factory import load_fp_model

    spec = run.spec
    model, tokenizer = load_fp_model(spec.model, spec.dtype, spec.device, spec.seed)
    pipeline.quantize(spec, model, tokenizer)
    seen = {"passes": 0, "tokens": 0}
    forward = model.forward

    def counting_forward(input_ids, *args, **kwargs):
        seen["passes"] += 1
        seen["tokens"] += input_ids.numel()
        return forward(input_ids, *args, **kwargs)

    model.forward = counting_forward
    out = []
    try:
        for t in run.tasks:
            if progress:
                progress(f"evaluating {t.task}")
            seen.update(passes=0, tokens=0)
            start = time.perf_counter()
            evaluation.run(model, tokenizer, [t.task], spec.settings)
            seconds = time.perf_counter() - start
            out.append({"task": t.task, "planned_passes": t.cost.passes, "counted_passes": seen["passes"],
                        "planned_tokens": t.cost.tokens, "counted_tokens": seen["tokens"],
                        "planned_s": rate and rate.hours(t.cost) * 3600, "measured_s": seconds})
    finally:
        model.forward = forward
    return out


def verify_table(rows: list[dict]) -> str:
    head = ("task", "passes planned", "counted", "tokens planned", "counted", "time planned", "measured", "ratio")
    body = []
    for r in rows + [{"task": "total", **{k: sum(x[k] or 0 for x in rows) for k in rows[0] if k != "task"}}]:
        ratio = f"{r['planned_s'] / r['measured_s']:.2f}" if r["planned_s"] else "-"
        planned = f"{r['planned_s']:.1f} s" if r["planned_s"] else "-"
        body.append((r["task"], str(r["planned_passes"]), str(r["counted_passes"]), str(r["planned_tokens"]),
                     str(r["counted_tokens"]), planned, f"{r['measured_s']:.1f} s", ratio))
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in [head, *body])


# ----------------------------------------------------------------------------------- output


def _num(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.0f}"


def _flops(x: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _time(h: float | None) -> str:
    if h is None:
        return "-"
    return f"{h:.3g} h" if h >= 1 else f"{h * 60:.3g} min" if h * 60 >= 1 else f"{h * 3600:.3g} s"


def totals(runs: list[RunPlan], rate: Rate | None, running_only: bool) -> dict:
    """Totals of the runs that run (``running_only``) or of all of them."""
    tot, calib = Cost(), Cost()
    for run in runs:
        if running_only and not run.runs:
            continue
        for t in run.tasks:
            tot.add(t.cost)
        if run.calibration:
            calib.add(run.calibration)
    return {"runs": sum(1 for r in runs if r.runs or not running_only),
            "passes": tot.passes, "tokens": tot.tokens, "flops": tot.flops, "hours": rate and rate.hours(tot),
            "calib_tokens": calib.tokens, "calib_flops": calib.flops, "calib_hours": rate and rate.hours(calib),
            "approx": tot.approx}


def as_json(runs: list[RunPlan], rate: Rate | None) -> dict:
    out = []
    for r in runs:
        tasks = {t.task: {"examples": t.examples, "requests": t.requests, **t.cost.as_dict(),
                          "hours": rate and rate.hours(t.cost)} for t in r.tasks}
        calib = r.calibration and {"tokens": r.calib_tokens, "flops": r.calibration.flops,
                                   "hours": rate and rate.hours(r.calibration)}
        out.append({"job": r.job, "overrides": r.overrides, "model": r.model, "method": r.method, "bits": r.bits,
                    "key": r.key, "status": r.status, "artifact": r.artifact, "tasks": tasks,
                    "calibration_one_pass": calib})
    return {"stand_in": next((r.stand_in for r in runs if r.stand_in), None),
            "throughput_tflops": rate and rate.tflops, "throughput_by_kind": rate and rate.by_kind,
            "throughput_source": rate and rate.source, "runs": out,
            "to_run": totals(runs, rate, True), "all": totals(runs, rate, False)}


def table(runs: list[RunPlan], rate: Rate | None) -> str:
    """The plan as a text table (one row per run x task) with its totals."""
    head = ("#", "model", "method", "bits", "task", "examples", "requests", "passes", "tokens", "FLOPs",
            "time", "status")
    rows = []
    for r in runs:
        num = str(r.job) if r.job else "+"
        status = r.status + (" (artifact)" if r.artifact else "")
        parts = [(t.task, str(t.examples), str(t.requests), str(t.cost.passes) + ("*" if t.cost.approx else ""),
                  t.cost) for t in r.tasks]
        if r.calibration:
            parts.append(("(calibration, 1 pass)", "-", "-", "-", r.calibration))
        for task, examples, requests, passes, c in parts:
            hours = _time(rate.hours(c)) if rate and r.runs else "-"
            rows.append((num, r.model, r.method, r.bits, task, examples, requests, passes, _num(c.tokens),
                         _flops(c.flops), hours, status))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    numeric = {5, 6, 7, 8, 9, 10}

    def line(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(head), line(["-" * w for w in widths]), *(line(r) for r in rows), ""]
    for label, running in (("to run", True), ("whole sweep (force=true)", False)):
        t = totals(runs, rate, running)
        calib = (f"; calibration (1 pass) {_num(t['calib_tokens'])} tokens, {_flops(t['calib_flops'])} FLOPs, "
                 f"{_time(t['calib_hours'])}") if t["calib_tokens"] else ""
        out.append(f"{label}: {t['runs']} run(s), {t['passes']}{'*' if t['approx'] else ''} forward passes, "
                   f"{_num(t['tokens'])} tokens, {_flops(t['flops'])} FLOPs, {_time(t['hours'])}{calib}")
    if rate:
        kinds = ", ".join(f"{k} {v:.4g}" for k, v in rate.by_kind.items())
        out.append(f"time at {rate.tflops:.4g} TFLOP/s achieved{f' ({kinds})' if kinds else ''}, {rate.source}; "
                   "on one device (GPU-hours)")
    else:
        out.append("no time: give plan.throughput=<TFLOP/s>, plan.throughput=measure or plan.bench=<bench JSON>")
    if any(t.cost.approx for r in runs for t in r.tasks):
        out.append("*: an upper bound (Dream's alg=origin draws how many steps run; parallel decoding, one token per step)")
    if any(r.stand_in for r in runs):
        out.append(f"plan.tokenizer={runs[0].stand_in}: models without local files are planned with their family's "
                   "shape preset and the byte tokenizer, whose token counts exceed the models' BPE tokenizers' "
                   "(about 4x on English text): tokens, FLOPs and time are upper bounds")
    if any(r.calibration for r in runs):
        out.append("calibration: one pass of the calibration set through the blocks; the methods' own "
                   "quantization work (GPTQ, AWQ, TMAS...) is not included")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    overrides, multirun, opts = parse_argv(sys.argv[1:] if argv is None else argv)
    from hydra.errors import HydraException

    from qdlm_bench.runspec import ConfigError

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notes, not the plan's business
    progress = lambda msg: print(f"plan: {msg}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    if opts["tokenizer"] not in (None, *STAND_INS):
        raise SystemExit(f"plan.tokenizer={opts['tokenizer']!r}; the stand-in tokenizers: {', '.join(STAND_INS)}")
    try:
        runs = make_plan(overrides, multirun, progress, opts["tokenizer"])
    except (ConfigError, HydraException) as err:
        print(f"invalid configuration: {err}", file=sys.stderr)
        return 2
    rate = None
    if opts["bench"]:
        rate = bench_rate(opts["bench"])
    if opts["throughput"] == "measure":
        rate = measure_throughput(runs, progress)
    elif opts["throughput"]:
        try:
            value = float(opts["throughput"])
        except ValueError:
            raise SystemExit(f"plan.throughput={opts['throughput']!r}: give TFLOP/s (a number) or measure") from None
        if not math.isfinite(value) or value <= 0:
            raise SystemExit("plan.throughput must be > 0")
        rate = Rate(value, "plan.throughput")
    data = as_json(runs, rate)
    data["plan_s"] = round(time.perf_counter() - start, 2)
    if opts["verify"]:
        run = next((r for r in runs if r.runs), runs[0])
        data["verify"] = {"job": run.job, "tasks": verify(run, rate, progress)}
    if opts["out"]:
        Path(opts["out"]).write_text(json.dumps(data, indent=2) + "\n")
    if opts["json"]:
        print(json.dumps(data, indent=2))
    else:
        print(table(runs, rate))
        print(f"(planned in {data['plan_s']} s)")
        if opts["verify"]:
            print(f"\nverify: job {data['verify']['job'] or '+'} evaluated here, plan against what happened")
            print(verify_table(data["verify"]["tasks"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
