"""The built wheel, installed (not editable) into a fresh venv, run from an empty folder.

The wheel is built from a copy of the repo's sources; the fresh venv sees the
dependencies already installed in this interpreter's site-packages through a ``.pth``
line (so nothing is downloaded), but not its editable refrl: a ``.pth`` file inside a
folder added that way is not processed, and the test checks where ``refrl`` is imported
from. In an empty folder it runs ``refrl configs``, ``refrl rl --config tiny-cpu-grpo``
for 2 iterations, makes a manifest with ``refrl data refworld`` and evaluates it with
``refrl eval --suite manifest``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RL_BUDGET = ["iterations=2", "groups_per_iteration=1", "group_size=2", "minibatch_size=2", "gradient_accumulation=1",
             "sampling.steps=2", "sampling.first_m=2", "checkpoint_every=2"]


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel`` of a copy of the sources (the build writes build/ and *.egg-info next to them)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out),
         str(src)], cwd=src)
    (path,) = out.glob("refrl-*.whl")
    return path


def test_wheel_holds_the_presets_and_the_shipped_checkpoint(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = sorted(p.name for p in (ROOT / "src/refrl/configs").glob("*.yaml"))
    assert presets and all(f"refrl/configs/{p}" in names for p in presets)
    assets = [p.relative_to(ROOT / "src") for p in (ROOT / "src/refrl/assets/tiny-sft").rglob("*") if p.is_file()]
    assert assets and all(str(a) in names for a in assets)


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; dependencies seen through a .pth line."""
    root = tmp_path_factory.mktemp("venv") / "v"
    run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root.parent)
    python = root / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=root).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], cwd=root)
    return root


def test_installed_wheel_runs_from_an_empty_folder(venv, tmp_path):
    from refrl.eval.runner import SUITE_NAMES

    bin_ = venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PATH=f"{bin_}:{env.get('PATH', '')}")
    where = run([str(bin_ / "python"), "-c", "import refrl; print(refrl.__file__)"], cwd=tmp_path, env=env).stdout
    assert Path(where.strip()).is_relative_to(venv), where  # the wheel's refrl, not the editable one
    refrl = str(bin_ / "refrl")

    listing = run([refrl, "configs"], cwd=tmp_path, env=env).stdout
    assert "tiny-cpu-grpo" in listing and "eval-refworld" in listing
    preset = (ROOT / "src/refrl/configs/tiny-cpu-grpo.yaml").read_text()
    small = ["validation.n=2", "validation.steps=2", "validation.batch_size=2"] if "\nvalidation:" in preset else []
    run([refrl, "rl", "--config", "tiny-cpu-grpo", "--out", "runs/rl", *RL_BUDGET, *small], cwd=tmp_path, env=env)
    metrics = [json.loads(line) for line in (tmp_path / "runs/rl/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]  # (validation records come in between)
    assert (tmp_path / "runs/rl/checkpoints/step-2").is_dir()

    run([refrl, "data", "refworld", "--out", "data", "--n", "3", "--split", "test", "--no-preview"], cwd=tmp_path, env=env)
    if "manifest" not in SUITE_NAMES:
        pytest.skip("no `manifest` eval suite in this refrl yet")
    run([refrl, "eval", "--suite", "manifest", "--data", "data/test.jsonl", "--ckpt", "runs/rl", "--out", "runs/rl/eval",
         "sampling.steps=2"], cwd=tmp_path, env=env)
    result = json.loads((tmp_path / "runs/rl/eval/eval.json").read_text())
    assert result["suite"] == "manifest" and result["n_images"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "runs"]  # nothing written elsewhere
