"""Bad inputs and faults through the real entry point (``python -m refrl`` in a subprocess).

Every case in `CASES` checks the contract of a failing command: the exit code (2: the
user can fix it), exactly one ``error:`` line on stderr that names what is wrong, no
traceback, nothing written outside ``--out`` (the whole sandbox and the shared input
data are compared before and after), and, where a run folder is refused, that folder
left exactly as it was. Most cases fail while parsing options or the config, before
any model is loaded, so each costs one interpreter start (with torch where the
command imports it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_helpers import ENV, GRPO_CFG, SFT_CFG, TINY_SFT, error_lines, refrl
from PIL import Image

from refrl.runfolder.lock import LOCK_FILE, lock_run_folder


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root``: kind, size, mtime and (files) content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mtime_ns, digest)
    return out


def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


# --------------------------------------------------------------------------- shared inputs


def _sample(sid, image="ok.png", target="ok.png", **extra) -> str:
    line = {"id": sid, "prompt": "the red square of image 1", "references": [{"image": image, "type": "subject"}]}
    if target:
        line["target"] = target
    return json.dumps({**line, **extra})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Input files the cases read (never write): manifests good and bad, images, metadata."""
    d = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (16, 16), (200, 20, 20)).save(d / "ok.png")
    Image.new("1", (12000, 12000)).save(d / "huge.png")  # 144 MP, a few KB on disk
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (d / "good.jsonl").write_text(_sample("s1") + "\n" + _sample("s2") + "\n")
    (d / "empty.jsonl").write_text("")
    (d / "invalid.jsonl").write_text(_sample("s1") + "\n" + json.dumps({"id": "s2", "prompt": ""}) + "\n")
    (d / "notarget.jsonl").write_text(_sample("s1", target=None) + "\n")
    (d / "nul.jsonl").write_text(_sample("a\u0000b") + "\n")
    (d / "huge.jsonl").write_text(_sample("big", image="huge.png", target=None) + "\n")
    (d / "deep.jsonl").write_text("[" * 200_000 + "]" * 200_000 + "\n")
    (d / "long.jsonl").write_text(_sample("long", note="x" * (1 << 20)) + "\n")
    (d / "meta.jsonl").write_text(json.dumps({"prompt": "p", "edit_image": ["ok.png"], "image": "corrupt.png"}) + "\n")
    (d / "deep_meta.json").write_text("[" * 100_000 + "]" * 100_000)
    return d




# --------------------------------------------------------------------------- the cases


@dataclass
class Case:
    argv: list[str]  # {out} the command's output folder, {file} a regular file, {data} the inputs
    says: str  # part of the one error line: the option, key, value or file it is about
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)
    writes_out: bool = False  # the command may create --out (and write in it) before failing
    run: str | None = None  # "held": {out} is locked by this test; "done": {out} is a finished SFT run


C = Case
CASES = {
    # ---- item 1: usage errors are one line with exit 2, for every subcommand
    "eval-no-options": C(["eval"], "Missing option '--out'"),
    "eval-no-ckpt": C(["eval", "--out", "{out}"], "Missing option '--ckpt'"),
    "eval-missing-suite": C(["eval", "--ckpt", "tiny-sft", "--out", "{out}"], "Missing option '--suite'"),
    "sft-steps-not-int": C(["sft", "--steps", "abc"], "'--steps'"),
    "sft-unknown-option": C(["sft", "--bogus"], "No such option: --bogus"),
    "grpo-unknown-option": C(["grpo", "--iteration", "3"], "No such option: --iteration"),
    "generate-missing-out": C(["generate", "--ckpt", "tiny-sft", "--manifest", "{data}/good.jsonl"], "'--out'"),
    "data-unknown-command": C(["data", "convert"], "No such command 'convert'"),
    "unknown-command": C(["train"], "No such command 'train'"),
    "import-unknown-kind": C(["data", "import", "zip", "{data}/meta.jsonl", "--out", "{out}"], "unknown import kind 'zip'"),
    "serve-reward-no-name": C(["serve-reward"], "Missing argument 'name'"),
    # ---- item 1: invalid data exits non-zero (was 0)
    "validate-invalid": C(["data", "validate", "{data}/invalid.jsonl"], "1 of 2 lines invalid"),
    "validate-empty": C(["data", "validate", "{data}/empty.jsonl"], "no samples"),
    "import-corrupt-image": C(["data", "import", "diffsynth", "{data}/meta.jsonl", "--out", "{out}", "--link", "copy"],
                              "imported manifest is invalid", writes_out=True),
    # ---- item 3: a busy run folder is refused, untouched
    "sft-busy": C(["sft", "-c", SFT_CFG, "--out", "{out}", "--steps", "1", *TINY_SFT], "in use by another refrl process",
                  run="held"),
    "grpo-busy": C(["grpo", "-c", GRPO_CFG, "--out", "{out}", "--seed", "1"], "in use by another refrl process", run="held"),
    "eval-busy": C(["eval", "--ckpt", "tiny-sft", "--suite", "refworld", "--out", "{out}"], "in use", run="held"),
    "ablate-busy": C(["ablate", "--quick", "--variants", "sft", "--out", "{out}"], "in use", run="held"),
    "quickstart-busy": C(["quickstart", "--out", "{out}"], "in use", run="held"),
    "generate-busy": C(["generate", "--ckpt", "tiny-sft", "--manifest", "{data}/good.jsonl", "--out", "{out}"], "in use",
                       run="held"),
    "sft-resume-busy": C(["sft", "-c", SFT_CFG, "--out", "{out}", "--resume", "--steps", "3", *TINY_SFT], "in use",
                         run="done-held"),
    "sft-holds-checkpoints": C(["sft", "-c", SFT_CFG, "--out", "{out}", "--steps", "3", *TINY_SFT], "pass --resume",
                               run="done"),
    "sft-resume-other-frozen": C(["sft", "-c", SFT_CFG, "--out", "{out}", "--resume", "--steps", "3", *TINY_SFT,
                                  "model.frozen=[head]"], "resume with the model.frozen", run="done"),
    # ---- item 4: values are validated, naming the key and the range
    "sft-keep-last-negative": C(["sft", "-c", SFT_CFG, "keep_last=-1"], "'keep_last': Input should be greater than or equal to 0"),
    "sft-checkpoint-every-0": C(["sft", "-c", SFT_CFG, "checkpoint_every=0"], "'checkpoint_every': Input should be greater than or equal to 1"),
    "sft-log-every-0": C(["sft", "-c", SFT_CFG, "log_every=0"], "'log_every': Input should be greater than or equal to 1"),
    "sft-ema-decay-2": C(["sft", "-c", SFT_CFG, "ema_decay=2"], "'ema_decay': Input should be less than 1"),
    "sft-steps-0": C(["sft", "-c", SFT_CFG, "--steps", "0"], "'--steps'"),
    "sft-steps-negative": C(["sft", "-c", SFT_CFG, "--steps", "-5"], "'--steps'"),
    "sft-steps-override-0": C(["sft", "-c", SFT_CFG, "steps=0"], "'steps': Input should be greater than or equal to 1"),
    "sft-data-size-30": C(["sft", "-c", SFT_CFG, "--out", "{out}", "data.size=30"], "'data.size': 30 is not a multiple",
                          writes_out=True),
    "sft-model-width": C(["sft", "-c", SFT_CFG, "--out", "{out}", "model.width=30", "model.heads=4"], "model",
                         writes_out=True),
    "grpo-keep-last-negative": C(["grpo", "-c", GRPO_CFG, "keep_last=-1"], "'keep_last'"),
    "grpo-checkpoint-every-0": C(["grpo", "-c", GRPO_CFG, "checkpoint_every=0"], "'checkpoint_every'"),
    "grpo-iterations-0": C(["grpo", "-c", GRPO_CFG, "--iterations", "0"], "'--iterations'"),
    "grpo-frozen-unknown-module": C(["grpo", "-c", GRPO_CFG, "--out", "{out}", "model.frozen=[hed]"],
                                    "'model.frozen': 'hed' names no module", writes_out=True),
    "grpo-frozen-with-lora": C(["grpo", "-c", GRPO_CFG, "model.frozen=[head]", "model.lora_rank=4"],
                               "'model.frozen'"),
    "eval-n-0": C(["eval", "--ckpt", "tiny-sft", "--suite", "refworld", "--out", "{out}", "--n", "0"], "'--n'"),
    "eval-limit-0": C(["eval", "--ckpt", "tiny-sft", "--suite", "refworld", "--out", "{out}", "--limit", "0"], "'--limit'"),
    "eval-steps-0": C(["eval", "--ckpt", "tiny-sft", "--suite", "refworld", "--out", "{out}", "--sampling-steps", "0"],
                      "'--sampling-steps'"),
    "eval-batch-size-0": C(["eval", "--ckpt", "tiny-sft", "--suite", "refworld", "--out", "{out}", "--batch-size", "0"],
                           "'--batch-size'"),
    "eval-level-3": C(["eval", "--ckpt", "tiny-sft", "--suite", "refworld", "--out", "{out}", "--level", "3"], "'--level'"),
    "generate-limit-negative": C(["generate", "--ckpt", "tiny-sft", "--manifest", "{data}/good.jsonl", "--out", "{out}",
                                  "--limit", "-1"], "'--limit'"),
    "serve-reward-port-99999": C(["serve-reward", "dino", "--port", "99999"], "'--port'"),
    "refworld-n-0": C(["data", "refworld", "--out", "{out}", "--n", "0"], "'--n'"),
    "refworld-max-refs-9": C(["data", "refworld", "--out", "{out}", "--max-refs", "9"], "'--max-refs'"),
    "ablate-seeds-0": C(["ablate", "--seeds", "0", "--out", "{out}"], "'--seeds'"),
    "ablate-workers-0": C(["ablate", "--workers", "0", "--out", "{out}"], "'--workers'"),
    "ablate-eval-n-0": C(["ablate", "--eval-n", "0", "--out", "{out}"], "'--eval-n'"),
    "ablate-frozen-unknown-module": C(["ablate", "--quick", "--variants", "gdpo", "--frozen", "hed", "--out", "{out}"],
                                      "'model.frozen': 'hed' names no module", writes_out=True),
    "eval-out-is-file": C(["eval", "--ckpt", "tiny-sft", "--suite", "refworld", "--out", "{file}"], "is a file"),
    "sft-out-is-file": C(["sft", "-c", SFT_CFG, "--out", "{file}"], "is a file"),
    "generate-out-under-file": C(["generate", "--ckpt", "tiny-sft", "--manifest", "{data}/good.jsonl", "--out",
                                  "{file}/sub"], "is a file, not a folder"),
    "generate-out-unwritable": C(["generate", "--ckpt", "tiny-sft", "--manifest", "{data}/good.jsonl", "--out",
                                  "/proc/refrl-test/out"], "cannot create the folder"),
    "refworld-out-under-file": C(["data", "refworld", "--out", "{file}/sub", "--n", "2"], "is a file, not a folder"),
    "report-out-is-dir": C(["report", "{data}", "--out", "{data}"], "'--out'"),
    # ---- item 5: inputs are bounded
    "validate-huge-image": C(["data", "validate", "{data}/huge.jsonl"], "12000x12000 = 144,000,000 pixels"),
    "generate-huge-image": C(["generate", "--ckpt", "tiny-sft", "--manifest", "{data}/huge.jsonl", "--out", "{out}"],
                             "exceed the limit of 50,000,000 pixels"),
    "validate-pixel-limit-env": C(["data", "validate", "{data}/good.jsonl"], "16x16 = 256 pixels exceed the limit of 100 pixels",
                                  env={"REFRL_MAX_IMAGE_PIXELS": "100"}),
    "pixel-limit-env-not-int": C(["data", "validate", "{data}/good.jsonl"], "REFRL_MAX_IMAGE_PIXELS must be an integer",
                                 env={"REFRL_MAX_IMAGE_PIXELS": "lots"}),
    "validate-deep-json": C(["data", "validate", "{data}/deep.jsonl"], "nested deeper than the limit of 32"),
    "validate-long-line": C(["data", "validate", "{data}/long.jsonl"], "exceeds the limit of 1048576 bytes"),
    "import-deep-metadata": C(["data", "import", "diffsynth", "{data}/deep_meta.json", "--out", "{out}"],
                              "nested deeper"),
    "generate-empty-manifest": C(["generate", "--ckpt", "tiny-sft", "--manifest", "{data}/empty.jsonl", "--out", "{out}"],
                                 "the manifest is empty"),
    "sft-manifest-without-target": C(["sft", "-c", SFT_CFG, "--out", "{out}", "data.source=manifest",
                                      "data.manifest={data}/notarget.jsonl", *TINY_SFT], "have no 'target'",
                                     writes_out=True),
    "validate-nul-id": C(["data", "validate", "{data}/nul.jsonl"], "control characters"),
    "generate-nul-id": C(["generate", "--ckpt", "tiny-sft", "--manifest", "{data}/nul.jsonl", "--out", "{out}"],
                         "control characters"),
}
SLOW = {"sft-data-size-30", "sft-model-width", "sft-manifest-without-target", "sft-busy", "sft-resume-busy",
        "sft-holds-checkpoints"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_fault(name, data, sft_run, tmp_path):
    case = CASES[name]
    sandbox = tmp_path / "deep" / "down" / "sandbox"  # room for ../.. escapes inside tmp_path
    sandbox.mkdir(parents=True)
    out, afile = sandbox / "out", sandbox / "file"
    afile.write_text("a file, not a folder\n")
    if case.run in ("done", "done-held"):
        shutil.copytree(sft_run, out)
    argv = [a.format(out=out, file=afile, data=data) for a in case.argv]
    with lock_run_folder(out) if case.run in ("held", "done-held") else _nothing():
        before, inputs = snapshot(tmp_path), snapshot(data)
        run_before = snapshot(out) if out.exists() else None
        res = refrl(*argv, cwd=sandbox, env=case.env)
        after = snapshot(tmp_path)
    output = res.stdout + res.stderr
    assert res.returncode == case.code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = error_lines(res)
    assert len(errors) == 1, res.stderr[-3000:]
    assert case.says in errors[0], errors[0]
    assert snapshot(data) == inputs
    # creating --out changes its parent folder's time, and nothing else outside it may change
    outside = [p for p in changed(before, after)
               if not (case.writes_out and (_under(tmp_path / p, out) or tmp_path / p == out.parent))]
    assert outside == [], f"written outside --out: {outside}"
    if run_before is not None and case.run:
        assert snapshot(out) == run_before, "the refused run folder changed"


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40


# --------------------------------------------------------------------------- item 1: success is still 0


def test_validate_ok_exits_0(data, tmp_path):
    res = refrl("data", "validate", str(data / "good.jsonl"), cwd=tmp_path)
    assert res.returncode == 0 and "OK" in res.stdout and res.stderr == ""


def test_help_exits_0_and_no_args_shows_help(tmp_path):
    assert refrl("--help", cwd=tmp_path).returncode == 0
    res = refrl(cwd=tmp_path)
    assert "Usage" in res.stdout + res.stderr and "Traceback" not in res.stdout + res.stderr


# --------------------------------------------------------------------------- item 2: ids never leave --out


@pytest.mark.slow
def test_generate_and_eval_keep_unsafe_ids_inside_out(data, tmp_path):
    sandbox = tmp_path / "a" / "b" / "sandbox"
    (sandbox / "d" / "subject").mkdir(parents=True)
    shutil.copy(data / "ok.png", sandbox / "d" / "ok.png")
    shutil.copy(data / "ok.png", sandbox / "d" / "subject" / "ok.png")
    absolute = str(tmp_path / "abs" / "x")  # inside tmp_path, so a write there shows in the snapshot
    ids = ["../../x", "sub/../../x", absolute, "..", "grid", "plain-id"]
    (sandbox / "d" / "m.jsonl").write_text("".join(_sample(i) + "\n" for i in ids))
    rows = [{"index": i, "prompt": "p", "edit_image": ["subject/ok.png"]} for i in ("../../y", absolute + "y", "3")]
    (sandbox / "d" / "meta.json").write_text(json.dumps(rows))
    before = snapshot(tmp_path)

    gen, ev = sandbox / "gen", sandbox / "ev"
    res = refrl("generate", "--ckpt", "tiny-sft", "--manifest", "d/m.jsonl", "--out", "gen", "--sampling-steps", "1", cwd=sandbox)
    assert res.returncode == 0, res.stderr[-3000:]
    res = refrl("eval", "--ckpt", "tiny-sft", "--suite", "omniref", "--data", "d/meta.json", "--out", "ev",
                "--sampling-steps", "1", "--rewards", "psnr_inside", cwd=sandbox)
    assert res.returncode == 0, res.stderr[-3000:]

    new = [tmp_path / p for p in changed(before, snapshot(tmp_path))]
    assert all(_under(p, gen) or _under(p, ev) or p == sandbox for p in new), new
    names = json.loads((gen / "generate.json").read_text())["files"]
    assert sorted(names) == sorted(ids) and len(set(names.values())) == len(ids)
    assert names["plain-id"] == "plain-id.png" and names["grid"] != "grid.png"
    assert all((gen / f).is_file() and "/" not in f for f in names.values())
    assert (gen / "grid.png").is_file()
    assert len(list((ev / "images").glob("*.png"))) == 3 and (ev / "images" / "3.png").is_file()


# --------------------------------------------------------------------------- item 3: no stale lock


@pytest.mark.slow
def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom refrl.runfolder.lock import lock_run_folder\n"
         f"with lock_run_folder({str(run)!r}):\n    print('locked', flush=True)\n    time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = refrl("sft", "-c", SFT_CFG, "--out", str(run), "--resume", cwd=tmp_path)
        assert res.returncode == 2 and "in use by another refrl process" in res.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / LOCK_FILE).exists()  # the file stays; the lock went with the process
    res = refrl("sft", "-c", SFT_CFG, "--out", str(run), "--resume", cwd=tmp_path)
    assert res.returncode == 2 and error_lines(res) == [f"error: --resume: no checkpoint under {run / 'checkpoints'}"]


# --------------------------------------------------------------------------- item 6: torn metrics line


@pytest.mark.slow
def test_resume_drops_a_torn_metrics_line(sft_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    metrics = run / "metrics.jsonl"
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2]
    with metrics.open("a") as f:
        f.write('{"step": 3, "loss": 0.1')  # killed in the middle of a write
    res = refrl("sft", "-c", SFT_CFG, "--out", str(run), "--resume", "--steps", "4", *TINY_SFT, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- item 8: permissions follow the umask


@pytest.mark.slow
def test_written_files_follow_the_umask(sft_run, data, tmp_path):
    gen = tmp_path / "gen"
    res = subprocess.run([sys.executable, "-m", "refrl", "generate", "--ckpt", "tiny-sft", "--manifest",
                          str(data / "good.jsonl"), "--out", str(gen), "--sampling-steps", "1"],
                         capture_output=True, text=True, env=ENV, timeout=300, preexec_fn=lambda: os.umask(0o027))
    assert res.returncode == 0, res.stderr[-3000:]
    for p in gen.iterdir():
        assert p.stat().st_mode & 0o777 == 0o640, p
    # the fixture's run was written under the default umask of this process
    expected = 0o666 & ~_umask()
    for p in [*sft_run.rglob("*.safetensors"), *sft_run.rglob("trainer.pt"), sft_run / "metrics.jsonl"]:
        assert p.stat().st_mode & 0o777 == expected, p


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
