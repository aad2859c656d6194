"""Hostile and careless input, round two, through the installed command (``python -m refrl``):
non-finite and out-of-range config values, YAML alias bombs and oversized input, corrupt or
missing checkpoint files, a full disk, a read-only folder, SIGINT, and the training guard
that keeps NaN out of the weights (docs/guides/reliability.md).

Every failing case checks the contract of test_cli_faults.py: the exit code, exactly one
``error:`` line on stderr that names the key or file, no traceback.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import ENV, GRPO_CFG, SFT_CFG, TINY_SFT, one_error, refrl
from safetensors.torch import load_file, save_file

from refrl.runfolder.files import checkpoint_write_errors

# --------------------------------------------------------------------------- configs: finite and bounded


BOMB = ("a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
        "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
        "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
        "seed: [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n")

FILES = {
    "bomb.yaml": BOMB,
    "inf.yaml": "optim:\n  lr: .inf\n",
    "big_list.yaml": "data:\n  categories: [" + ",".join(["subject"] * 12_000) + "]\n",
    "deep.yaml": "seed: " + "[" * 5000 + "]" * 5000 + "\n",
    "huge.yaml": "model:\n  width: " + "x" * (2 << 20) + "\n",
    "long_value.yaml": "model:\n  width: " + "x" * 900_000 + "\n",
    "many_values.yaml": "data:\n  categories: [" + ",".join(["0"] * 500_000) + "]\n",
    "reward_inf.yaml": "rewards:\n  - name: identity\n    options: {threshold: .nan}\n",
}

CASES = {
    # (argv after the command, what the error line says)
    "lr-inf": (["sft", "-c", SFT_CFG, "optim.lr=.inf"], "config key 'optim.lr': must be a finite number"),
    "lr-1e400": (["sft", "-c", SFT_CFG, "optim.lr=1e400"], "config key 'optim.lr': must be a finite number"),
    "lr-too-big": (["sft", "-c", SFT_CFG, "optim.lr=3"], "config key 'optim.lr': Input should be less than or equal to 1"),
    "logit-std-nan": (["sft", "-c", SFT_CFG, "logit_std=nan"], "config key 'logit_std'"),
    "betas-nan": (["sft", "-c", SFT_CFG, "optim.betas=[0.9, .nan]"], "config key 'optim.betas.1'"),
    "yaml-inf": (["sft", "-c", "{d}/inf.yaml"], "config key 'optim.lr': must be a finite number"),
    "grpo-options-nan": (["rl", "-c", "{d}/reward_inf.yaml"], "config key 'rewards.0.options.threshold': must be a finite"),
    "seed-negative": (["sft", "-c", SFT_CFG, "seed=-1"], "config key 'seed': Input should be greater than or equal to 0"),
    "seed-huge": (["sft", "-c", SFT_CFG, "seed=" + "1" + "0" * 30], "config key 'seed'"),
    "seed-2**32": (["sft", "-c", SFT_CFG, f"seed={2**32}"], "config key 'seed': Input should be less than or equal to"),
    "width-huge": (["sft", "-c", SFT_CFG, "model.width=" + "1" + "0" * 30], "config key 'model.width'"),
    "width-big": (["sft", "-c", SFT_CFG, "model.width=1000000"], "config key 'model.width': Input should be less than"),
    "batch-huge": (["sft", "-c", SFT_CFG, "batch_size=" + "1" + "0" * 30], "config key 'batch_size'"),
    "batch-big": (["sft", "-c", SFT_CFG, "batch_size=1000000"], "config key 'batch_size': Input should be less than"),
    "group-size-big": (["rl", "-c", GRPO_CFG, "group_size=100000"], "config key 'group_size'"),
    "list-long": (["sft", "-c", "{d}/big_list.yaml"], "config key 'data.categories': 12,000 items exceed the limit"),
    "yaml-deep": (["sft", "-c", "{d}/deep.yaml"], "nested deeper than the limit of 32 levels"),
    "yaml-huge-file": (["sft", "-c", "{d}/huge.yaml"], "exceed the limit of 1,048,576 for a config file"),
    "override-alias": (["sft", "-c", SFT_CFG, "seed=&a [[1, 2], *a, *a]"], "YAML aliases (*a) are not allowed"),
    "generate-seed-negative": (["generate", "--ckpt", "tiny-sft", "--manifest", "m.jsonl", "--seed", "-1"], "'--seed'"),
    "refworld-seed-2**32": (["data", "refworld", "--seed", str(2**32)], "'--seed'"),
    "yaml-many-values": (["sft", "-c", "{d}/many_values.yaml"], "more than 20,000 values"),  # a 1 MB list: stops early
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("configs")
    for name, text in FILES.items():
        (d / name).write_text(text)
    return d


# Through the installed command in a subprocess: one case of each kind (a float on the command
# line and in YAML, a seed, a size, a long list, an alias, an option); the other cases check the
# same validation through `refrl.cli.run` in this process (the entry point the command calls),
# which saves an interpreter and torch start (~3 s) per case.
SUBPROCESS_CASES = ("lr-inf", "yaml-inf", "seed-negative", "width-huge", "list-long", "override-alias",
                    "generate-seed-negative", "refworld-seed-2**32")


@pytest.mark.parametrize("name", list(CASES))
def test_config_value_refused(name, inputs, tmp_path, monkeypatch, capsys):
    argv, says = CASES[name]
    out = tmp_path / "run"
    argv = [*[a.format(d=inputs) for a in argv], "--out", str(out)]
    if name in SUBPROCESS_CASES:
        line = one_error(refrl(*argv, cwd=tmp_path), 2)
    else:
        from refrl.cli import run

        monkeypatch.chdir(tmp_path)
        code = run(argv)
        errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert code == 2 and len(errors) == 1, errors
        line = errors[0]
    assert says in line, line
    assert len(line) < 1000, len(line)
    # refused before anything is written: no config.yaml (seed=-1 used to fail after writing it)
    assert not (out / "config.yaml").exists()


def test_alias_bomb_stops_fast_under_200_mb(inputs, tmp_path):
    """The 9-level bomb (9**7 strings once expanded) is refused at the first alias, before
    torch is imported; the peak RSS of the command is measured by a parent of its own."""
    probe = ("import resource, subprocess, sys\n"
             "r = subprocess.run([sys.executable, '-m', 'refrl', 'sft', '-c', sys.argv[1], '--out', sys.argv[2]],"
             " capture_output=True, text=True)\n"
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
             "sys.stderr.write(r.stderr)\n")
    assert len(BOMB.encode()) < 400
    res = subprocess.run([sys.executable, "-c", probe, str(inputs / "bomb.yaml"), str(tmp_path / "run")],
                         capture_output=True, text=True, env=ENV, timeout=120)
    code, rss_kb = map(int, res.stdout.split())
    assert code == 2 and "YAML aliases (*a) are not allowed in config files" in res.stderr, res.stderr
    assert rss_kb < 200 * 1024, rss_kb


def test_error_lines_are_bounded(inputs, tmp_path):
    """A 900 KB value and 10,000 unknown overrides give lines of a few KB at most."""
    res = refrl("sft", "-c", str(inputs / "long_value.yaml"), cwd=tmp_path)
    line = one_error(res, 2)
    assert "config key 'model.width'" in line and "xxx...xxx" in line and len(line) < 1000, len(line)
    unknown = [f"x{i}=1" for i in range(10_000)]
    res = refrl("sft", "-c", SFT_CFG, *unknown, cwd=tmp_path)
    line = one_error(res, 2)
    assert "config key 'x0': unknown key" in line and "and 9,990 more problems" in line, line[-300:]
    assert len(line) < 3000, len(line)


def test_line_separators_in_a_key_keep_one_line(tmp_path):
    res = refrl("sft", "-c", SFT_CFG, "bad\rkey\u2028x\u2029y\x85z\x0bw\x1b[31m=1", cwd=tmp_path)
    line = one_error(res, 2)
    assert len(res.stderr.splitlines()) == 1, res.stderr  # str.splitlines splits at \r, U+2028, U+0085 ...
    assert "unknown key" in line and "\\x1b" in line and "\x1b[31m" not in line


# --------------------------------------------------------------------------- checkpoints: one line each




def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    # name: (file under checkpoints/step-2, what is done to it, what the line says)
    "trainable-truncated": ("trainable.safetensors", _truncate, "not a readable safetensors file"),
    "ema-truncated": ("ema.safetensors", _truncate, "not a readable safetensors file"),
    "trainer-deleted": ("trainer.pt", Path.unlink, "the file is missing"),
    "trainer-truncated": ("trainer.pt", _truncate, "not a readable torch file"),
    "state-corrupt": ("state.json", lambda p: p.write_text('{"step": 2,'), "not valid JSON"),
    "state-no-step": ("state.json", lambda p: p.write_text("[]"), "expected a JSON dict"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DAMAGE))
def test_resume_from_a_damaged_checkpoint_is_one_line(name, sft_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    file, damage, says = DAMAGE[name]
    damage(run / "checkpoints" / "step-2" / file)
    res = refrl("sft", "-c", SFT_CFG, "--out", str(run), "--resume", "--steps", "3", *TINY_SFT, cwd=tmp_path)
    line = one_error(res, 2)
    assert f"checkpoints/step-2/{file}" in line and says in line, line
    assert f"delete the folder {run / 'checkpoints' / 'step-2'}" in line, line


@pytest.mark.slow
def test_generate_from_a_truncated_policy_is_one_line(sft_run, tmp_path):
    ckpt = tmp_path / "step-2"
    shutil.copytree(sft_run / "checkpoints" / "step-2", ckpt)
    _truncate(ckpt / "policy" / "model.safetensors")
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 20, 20)).save(tmp_path / "ok.png")
    line = {"id": "s1", "prompt": "the red square of image 1", "references": [{"image": "ok.png", "type": "subject"}]}
    (tmp_path / "m.jsonl").write_text(json.dumps(line) + "\n")
    res = refrl("generate", "--ckpt", str(ckpt), "--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "g"),
                cwd=tmp_path)
    line = one_error(res, 2)
    assert "policy/model.safetensors: not a readable safetensors file" in line, line


@pytest.mark.slow
def test_resume_with_another_width_names_model_width(sft_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    res = refrl("sft", "-c", SFT_CFG, "--out", str(run), "--resume", "--steps", "3", *TINY_SFT, "model.width=64",
                cwd=tmp_path)
    line = one_error(res, 2)
    assert "model.width=32 (now 64)" in line and "frozen" not in line and "lora_rank" not in line, line


# --------------------------------------------------------------------------- the training guard


def _policy_with(sft_run: Path, dest: Path, value: float) -> Path:
    """The run's policy with its output head set to ``value`` (3e38: finite weights whose output
    overflows; nan: non-finite weights)."""
    shutil.copytree(sft_run / "checkpoints" / "step-2" / "policy", dest)
    weights = load_file(str(dest / "model.safetensors"))
    weights["head.weight"] = torch.full_like(weights["head.weight"], value)
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_stop_the_run(sft_run, tmp_path):
    init = _policy_with(sft_run, tmp_path / "overflow", 3e38)
    run = tmp_path / "run"
    res = refrl("sft", "-c", SFT_CFG, "--out", str(run), "--steps", "4", *TINY_SFT, f"model.init={init}",
                "optim.nonfinite_limit=2", cwd=tmp_path)
    line = one_error(res, 1)
    assert "training stopped at step 2: 2 optimizer steps in a row had a non-finite loss or gradient" in line, line
    assert "Warning" not in res.stderr, res.stderr[-2000:]  # a skipped step is not the scheduler misuse torch warns of
    assert f"the latest checkpoint {run / 'checkpoints' / 'step-1'} holds finite weights" in line, line
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r.get("kind") != "validation"]
    assert [(r["step"], r["skipped_nonfinite"], r["loss"]) for r in records] == [(1, 1, None)]
    # the skipped step changed nothing: the checkpoint holds the initial (finite) weights
    saved = load_file(str(run / "checkpoints" / "step-1" / "policy" / "model.safetensors"))
    start = load_file(str(init / "model.safetensors"))
    assert all(torch.equal(saved[k], start[k]) for k in start)
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]


@pytest.mark.slow
def test_nonfinite_weights_stop_at_once_and_save_nothing(sft_run, tmp_path):
    init = _policy_with(sft_run, tmp_path / "nan", float("nan"))
    run = tmp_path / "run"
    res = refrl("sft", "-c", SFT_CFG, "--out", str(run), "--steps", "3", *TINY_SFT, f"model.init={init}", cwd=tmp_path)
    line = one_error(res, 1)
    assert "training stopped at step 1: the weights hold NaN or inf values" in line, line
    assert "no checkpoint was written" in line
    assert not any((run / "checkpoints").glob("step-*"))


# --------------------------------------------------------------------------- a full disk, a read-only folder


def _in_namespace(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) as root of a new user and mount namespace: it may mount a tmpfs or a
    read-only bind mount without privileges; skips where the kernel does not allow it."""
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip("unprivileged user and mount namespaces are not available here")
    (tmp_path / "script.sh").write_text(script)
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", str(tmp_path / "script.sh")],
                          capture_output=True, text=True, env=ENV, timeout=300)


@pytest.mark.slow
def test_a_full_disk_fails_with_one_line_and_keeps_the_earlier_checkpoint(sft_run, tmp_path):
    """A tmpfs that holds one checkpoint and a half: the second write fills it."""
    step = sft_run / "checkpoints" / "step-1"
    one = sum(f.stat().st_size for f in step.rglob("*") if f.is_file())
    size_kb = int(one * 1.4) // 1024 + 64
    mnt, after = tmp_path / "mnt", tmp_path / "after"
    mnt.mkdir()
    args = " ".join(f"'{a}'" for a in ["sft", "-c", SFT_CFG, "--out", str(mnt / "run"), "--steps", "3", *TINY_SFT,
                                       "keep_last=0"])
    script = (f"mount -t tmpfs -o size={size_kb}k tmpfs {mnt} || exit 99\n"
              f"{sys.executable} -m refrl {args} 2>{tmp_path / 'err'}\n"
              f"echo $? > {tmp_path / 'rc'}\ncp -a {mnt / 'run'} {after}\n")
    res = _in_namespace(script, tmp_path)
    assert res.returncode == 0, res.stderr
    stderr = (tmp_path / "err").read_text()
    fake = subprocess.CompletedProcess([], int((tmp_path / "rc").read_text()), "", stderr)
    line = one_error(fake, 1)
    assert f"could not write checkpoint {mnt / 'run' / 'checkpoints' / 'step-2'}" in line, line
    assert "No space left on device" in line or "disk full" in line, line
    assert f"{mnt / 'run' / 'checkpoints' / 'step-1'} is still the latest checkpoint" in line, line
    # the earlier checkpoint is whole and nothing half-written is left
    assert sorted(p.name for p in (after / "checkpoints").iterdir()) == ["step-1"]
    for f in step.rglob("*"):  # the same run's step 1, written on a roomy disk
        copy = after / "checkpoints" / "step-1" / f.relative_to(step)
        if f.name == "trainer.pt":  # torch.save writes a random serialization id: compare the contents
            a, b = (torch.load(x, weights_only=True) for x in (f, copy))
            assert all(torch.equal(x, y) for x, y in zip(a["rng"].values(), b["rng"].values(), strict=True)
                       if isinstance(x, torch.Tensor))
        elif f.is_file():
            assert copy.read_bytes() == f.read_bytes(), f


@pytest.mark.slow
def test_report_into_a_read_only_folder_exits_2(sft_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    script = (f"mount --bind {run} {run} && mount -o remount,bind,ro {run} || exit 99\n"
              f"{sys.executable} -m refrl report {run} 2>{tmp_path / 'err'}\necho $? > {tmp_path / 'rc'}\n")
    res = _in_namespace(script, tmp_path)
    assert res.returncode == 0, res.stderr
    fake = subprocess.CompletedProcess([], int((tmp_path / "rc").read_text()), "", (tmp_path / "err").read_text())
    line = one_error(fake, 2)
    assert "Read-only file system" in line and str(run) in line, line


def test_write_errors_of_libraries_become_one_line(tmp_path):
    """safetensors and torch.save raise their own errors on a full disk (not OSError)."""
    from safetensors import SafetensorError

    from refrl.errors import RunFailure

    root = tmp_path / "checkpoints"
    (root / "step-1").mkdir(parents=True)
    cases = [
        (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
         "No space left on device"),
        (RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: "
                      "file write failed"), "is the disk full?"),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 386753 vs 386708"), "is the disk full?"),
        (OSError(122, "Disk quota exceeded"), "Disk quota exceeded"),
    ]
    for exc, says in cases:
        with pytest.raises(RunFailure) as info, checkpoint_write_errors(root / "step-2"):
            raise exc
        assert says in str(info.value) and f"{root / 'step-1'} is still the latest checkpoint" in str(info.value)
    with pytest.raises(RuntimeError, match="a bug"), checkpoint_write_errors(root / "step-2"):
        raise RuntimeError("a bug")  # not a write failure: not hidden


# --------------------------------------------------------------------------- SIGINT


@pytest.mark.slow
def test_sigint_says_where_the_run_stopped_and_how_to_resume(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "refrl", "sft", "-c", SFT_CFG, "--out", str(run), "--steps", "200",
                             *TINY_SFT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=tmp_path)
    try:
        metrics = run / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()):  # in the loop: a step is done
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    res = subprocess.CompletedProcess([], proc.returncode, stdout, stderr)
    line = one_error(res, 130)
    step = max(json.loads(x)["step"] for x in metrics.read_text().splitlines())
    assert f"interrupted: stopped after step {step} of 200 and saved {run / 'checkpoints' / f'step-{step}'}" in line
    assert "run the same command with --resume" in line
    assert (run / "checkpoints" / f"step-{step}" / "state.json").is_file()


# --------------------------------------------------------------------------- the guard, in process


class _Dist:
    world = 1

    def max_across(self, value: float) -> float:
        return value


def test_finite_guard_skips_counts_resets_and_stops(tmp_path):
    from refrl.errors import RunFailure
    from refrl.train.finite import FiniteGuard

    guard = FiniteGuard(_Dist(), limit=3, ckpt_root=tmp_path / "checkpoints")
    w = [torch.ones(3)]
    nan = float("nan")
    assert guard.step_ok(torch.tensor(1.0), 0.5, w, step=1)
    assert not guard.step_ok(torch.tensor(nan), 0.5, w, step=2)
    assert not guard.step_ok(torch.tensor(1.0), math.inf, w, step=3)  # a non-finite loss alone
    assert guard.pop_skipped() == 2 and guard.pop_skipped() == 0
    assert guard.step_ok(torch.tensor(2.0), None, w, step=4) and guard.in_a_row == 0  # a good step resets the count
    assert not guard.step_ok(torch.tensor(math.inf), None, w, step=5)
    assert not guard.step_ok(torch.tensor(nan), None, w, step=6)
    with pytest.raises(RunFailure, match="at step 7: 3 optimizer steps in a row"):
        guard.step_ok(torch.tensor(nan), None, w, step=7)
    with pytest.raises(RunFailure, match="the weights hold NaN"):
        FiniteGuard(_Dist(), 3, tmp_path).step_ok(torch.tensor(1.0), 0.1, [torch.tensor([1.0, nan])], step=1)
    guard.check_saveable([torch.ones(2)], [torch.zeros(2)], step=8)
    with pytest.raises(RunFailure, match="checkpoint step-9 was not written"):
        guard.check_saveable([torch.ones(2)], [torch.tensor([math.inf])], step=9)


@pytest.mark.slow
def test_a_nan_gradient_is_skipped_and_training_goes_on(tmp_path):
    """One step's gradients are NaN: that step changes no weight, the next ones train."""
    from refrl.config import load_config
    from refrl.train.sft import SFTConfig, SFTTrainer

    class Flaky(SFTTrainer):
        def optimizer_step(self, loss=None):
            if self.scheduler.last_epoch == 1:  # the second step
                for p in self.params:
                    p.grad.fill_(float("nan"))
            return super().optimizer_step(loss)

        def step(self, i):
            record = super().step(i)
            self.snapshots.append([p.detach().clone() for p in self.params])
            return record

    cfg = load_config(SFTConfig, SFT_CFG, [*TINY_SFT, "checkpoint_every=10"])
    trainer = Flaky(cfg.model_copy(update={"steps": 3}), tmp_path / "run")
    trainer.snapshots = []
    trainer.train()
    s1, s2, s3 = trainer.snapshots
    assert all(torch.equal(a, b) for a, b in zip(s1, s2, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(s2, s3, strict=True))
    assert [r["skipped_nonfinite"] for r in trainer.history] == [0, 1, 0]
    assert all(torch.isfinite(p).all() for p in trainer.params)


@pytest.mark.slow
def test_a_nan_loss_on_one_rank_makes_every_rank_skip_and_stop(tmp_path):
    """Two CPU processes (torchrun, gloo): rank 1 alone sees a NaN loss at step 2. Both skip
    that step and keep equal weights; with optim.nonfinite_limit=1 both stop with the same line."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.is_file():
        pytest.skip("torchrun not installed")
    env = {**ENV, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                          str(29_000 + os.getpid() % 1000), str(Path(__file__).with_name("nan_rank_worker.py")),
                          str(tmp_path)], cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["changed"] == r1["changed"] == [True, False, True]
    assert r0["skipped"] == r1["skipped"] == [0, 1, 0]
    assert r0["weights"] == r1["weights"]
    assert r0["stopped"] == r1["stopped"] and "training stopped at step 2: 1 optimizer step in a row" in r0["stopped"]
