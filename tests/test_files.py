"""The floor, refrl.runfolder: safe names from data, atomic (fsync'd) writes with ordinary permissions,
the run-folder lock, the run-folder layout and checkpoint resolution."""

import os
import subprocess
import sys

import pytest
import torch

from refrl.errors import RefrlError
from refrl.runfolder import files
from refrl.runfolder.files import (
    atomic_dir,
    atomic_path,
    atomic_write_text,
    atomic_writer,
    prepare_out_dir,
    safe_filename,
    save_safetensors,
)
from refrl.runfolder.layout import SHIPPED, latest_checkpoint, list_checkpoints, resolve_checkpoint
from refrl.runfolder.lock import LOCK_FILE, lock_run_folder


@pytest.mark.parametrize("name", ["rw-000001", "backpack-0-3", "a.b_c", "0", "x..y"])
def test_safe_names_are_kept(name):
    assert safe_filename(name) == name


@pytest.mark.parametrize("name", ["../../x", "sub/../../x", "/abs/x", "..", ".", ".hidden", "a\\b", "a\x00b",
                                  "caf\u00e9", "a b", "x" * 300, "C:evil", "grid"])
def test_unsafe_names_stay_in_their_folder(name, tmp_path):
    safe = safe_filename(name, reserved=("grid",))
    assert safe != name and safe and not safe.startswith(".") and len(safe.encode()) < 200
    assert set(safe) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
    assert (tmp_path / f"{safe}.png").resolve().parent == tmp_path.resolve()


def test_different_names_never_share_a_file():
    names = ["a/b", "a_b", "a\\b", "a b", "a:b", "../a_b", "a_b-" + safe_filename("a/b").split("-")[-1]]
    assert len({safe_filename(n) for n in names}) == len(names)


def test_atomic_writes_and_safetensors_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        text = atomic_write_text(tmp_path / "a.txt", "hello")
        tensors = save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert text.read_text() == "hello"
    assert [p.stat().st_mode & 0o777 for p in (text, tensors)] == [0o640, 0o640]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "w.safetensors"]  # no temp files left


def test_a_failed_atomic_write_leaves_the_old_file(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_writer(path, "w") as f:
        f.write("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_prepare_out_dir_refuses_files(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RefrlError, match="is a file, not a folder"):
        prepare_out_dir(tmp_path / "f")
    with pytest.raises(RefrlError, match="a part of this path is a file"):
        prepare_out_dir(tmp_path / "f" / "sub")
    assert prepare_out_dir(tmp_path / "new" / "deeper").is_dir()


def test_the_lock_is_reentrant_here_and_exclusive_elsewhere(tmp_path):
    run = tmp_path / "run"
    probe = ("import sys\nfrom refrl.runfolder.lock import lock_run_folder\nfrom refrl.errors import RefrlError\n"
             f"try:\n    lock_run_folder({str(run)!r}).__enter__()\nexcept RefrlError as e:\n    sys.exit(str(e))\n")

    def other_process() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)

    with lock_run_folder(run), lock_run_folder(run):  # quickstart -> GRPO in the same folder
        res = other_process()
        assert res.returncode == 1 and "in use by another refrl process" in res.stderr
    assert (run / LOCK_FILE).read_bytes() == b""
    assert other_process().returncode == 0  # released


def _count_fsyncs(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(files.os, "fsync", counting)
    return calls


def test_every_atomic_write_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    calls = _count_fsyncs(monkeypatch)
    atomic_write_text(tmp_path / "a.txt", "hello")
    save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "x.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "y.bin").write_bytes(b"y")
    assert len(calls) == 4
    assert (tmp_path / "ckpt" / "sub" / "y.bin").read_bytes() == b"y"


def test_atomic_path_places_links_without_touching_their_target(tmp_path):
    src = tmp_path / "src.png"
    src.write_bytes(b"png")
    os.chmod(src, 0o444)
    with atomic_path(tmp_path / "out" / "link.png") as tmp:
        os.symlink(src, tmp)
    link = tmp_path / "out" / "link.png"
    assert link.is_symlink() and link.read_bytes() == b"png" and src.stat().st_mode & 0o777 == 0o444
    assert [p.name for p in link.parent.iterdir()] == ["link.png"]


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    final = tmp_path / "step-3"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("killed")
    assert (final / "a").read_text() == "old"
    (tmp_path / "step-3.tmp").mkdir()  # left by a crash: removed by the next write
    with atomic_dir(final) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3"]


def test_checkpoint_resolution(tmp_path):
    assert resolve_checkpoint("tiny-sft") == SHIPPED["tiny-sft"]
    run = tmp_path / "run"
    for step in (2, 10):
        (run / "checkpoints" / f"step-{step}" / "policy").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step}" / "policy" / "config.json").write_text("{}")
    (run / "checkpoints" / "step-11.tmp").mkdir()
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-2", "step-10"]
    last = latest_checkpoint(run / "checkpoints")
    assert resolve_checkpoint(run) == last / "policy" == resolve_checkpoint(last) == resolve_checkpoint(last / "policy")
    assert latest_checkpoint(tmp_path / "none") is None
    with pytest.raises(RefrlError, match="checkpoint not found"):
        resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(RefrlError, match="holds no checkpoint"):
        resolve_checkpoint(tmp_path)
