"""What the CLI fault tests share: the presets, a small SFT override set, and the subprocess runner
of the installed command (``python -m refrl``) with its one-``error:``-line contract."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SFT_CFG = str(CONFIGS / "tiny-cpu-sft.yaml")
GRPO_CFG = str(CONFIGS / "tiny-cpu-grpo.yaml")
# A small SFT model and no held-out validation: a real run folder in seconds.
TINY_SFT = ["model.width=32", "model.depth=1", "model.heads=2", "batch_size=2", "noise_per_condition=1",
            "data.max_refs=2", "optim.warmup_steps=0", "checkpoint_every=1", "log_every=1", "validation.every=0",
            "validation.keep_best=null"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def refrl(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m refrl ARGS`` in ``cwd``, offline, one thread."""
    return subprocess.run([sys.executable, "-m", "refrl", *args], capture_output=True, text=True, cwd=cwd,
                          env={**ENV, **(env or {})}, timeout=timeout)


def error_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("error:")]


def one_error(res: subprocess.CompletedProcess, code: int) -> str:
    """The one ``error:`` line of a command that failed with ``code`` (and printed no traceback)."""
    output = res.stdout + res.stderr
    assert res.returncode == code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = error_lines(res)
    assert len(errors) == 1, res.stderr[-3000:]
    return errors[0]


def make_sft_run(run: Path) -> Path:
    """A finished two-step SFT run folder at ``run``."""
    res = refrl("sft", "-c", SFT_CFG, "--out", str(run), "--steps", "2", *TINY_SFT, cwd=run.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    return run
