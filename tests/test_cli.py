"""The console entry point: one readable line and a non-zero exit, never a traceback."""

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refrl", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand():
    res = run("--help")
    assert res.returncode == 0
    for cmd in ("data", "sft", "rl", "grpo", "generate", "quickstart"):
        assert cmd in res.stdout


def test_user_error_is_one_line(tmp_path):
    res = run("sft", "--config", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope.yaml" in lines[0]


def test_bad_override_names_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 1\n")
    res = run("sft", "--config", str(cfg), "--out", str(tmp_path / "r"), "optim.schedule=linear")
    assert res.returncode == 2
    assert "optim.schedule" in res.stderr and "'constant' or 'cosine'" in res.stderr
    assert "Traceback" not in res.stderr


def test_system_failures_are_one_line_with_exit_1(monkeypatch, capsys, tmp_path):
    import errno

    import refrl.eval.report as report
    from refrl import cli

    disk_full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "report.html"))
    expected = [f"error: No space left on device: {tmp_path / 'report.html'}", "error: out of memory"]
    for exc, line in zip((disk_full, MemoryError()), expected, strict=True):
        def failing(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(report, "write_report", failing)
        assert cli.run(["report", str(tmp_path)]) == 1
        assert capsys.readouterr().err.strip().splitlines() == [line]
