"""The wheel carries the package data an installed ``qdlm-bench`` needs (configs, tasks, models,
methods) inside ``qdlm_bench``; the default data folder of an install."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qdlm_bench.evaluation import tasks

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = ["qdlm_bench/methods/gptq.py", "qdlm_bench/methods/README.md", "qdlm_bench/conf/config.yaml",
            "qdlm_bench/conf/method/gptq.yaml", "qdlm_bench/tasks/mini_math.yaml", "qdlm_bench/tasks/mini_utils.py",
            "qdlm_bench/tasks/mini/mini_math.jsonl", "qdlm_bench/cli.py", "qdlm_bench/conf/hydra/launcher/slurm.yaml",
            "qdlm_bench/conf/hydra/sweeper/qdlm.yaml", "qdlm_bench/conf/decode/exact.yaml",
            "qdlm_bench/conf/experiment/qdlm_study.yaml", "hydra_plugins/qdlm_bench_sweeper/__init__.py"]


def test_wheel_holds_configs_tasks_models_and_methods_inside_the_package(tmp_path):
    pytest.importorskip("setuptools", reason="the build backend (setuptools) is not installed")
    src = tmp_path / "src"  # a copy of the tree: the build writes build/ and *.egg-info beside its sources
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for rel in listed:
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("qdlm_bench-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    models = [p.relative_to(ROOT).as_posix() for p in (ROOT / "qdlm_bench/zoo/models").rglob("*") if p.is_file()]
    packages = [p.relative_to(ROOT).as_posix() for p in ROOT.glob("qdlm_bench/**/__init__.py")]
    packages += [f"qdlm_bench/{p.relative_to(ROOT).as_posix()}" for p in ROOT.glob("methods/**/__init__.py")]
    assert models and not [n for n in EXPECTED + models + packages if n not in names]
    assert all(n.startswith(("qdlm_bench", "hydra_plugins/qdlm_bench_sweeper/")) for n in names)  # no top-level methods/, conf/ or tasks/
    assert "qdlm-bench = qdlm_bench.cli:main" in entry_points


def test_default_data_dir_beside_a_checkout_else_in_the_working_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("QDLM_DATA_DIR", raising=False)
    assert tasks.default_data_dir() == ROOT.parent / "shared" / "data"
    monkeypatch.setattr(tasks, "PACKAGE_DIR", tmp_path / "site-packages" / "qdlm_bench")  # installed
    monkeypatch.chdir(tmp_path)
    assert tasks.default_data_dir() == tmp_path / "data"
    monkeypatch.setenv("QDLM_DATA_DIR", "/data/qdlm")
    assert tasks.default_data_dir() == Path("/data/qdlm")
