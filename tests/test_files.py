"""refrl.files: safe names from data, atomic writes with ordinary permissions, the run-folder lock."""

import os
import subprocess
import sys

import pytest
import torch

from refrl.errors import RefrlError
from refrl.files import (
    LOCK_FILE,
    atomic_write_text,
    lock_run_folder,
    prepare_out_dir,
    safe_filename,
    save_safetensors,
)


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
    from refrl.files import atomic_writer

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
    probe = ("import sys\nfrom refrl.files import lock_run_folder\nfrom refrl.errors import RefrlError\n"
             f"try:\n    lock_run_folder({str(run)!r}).__enter__()\nexcept RefrlError as e:\n    sys.exit(str(e))\n")

    def other_process() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)

    with lock_run_folder(run), lock_run_folder(run):  # quickstart -> GRPO in the same folder
        res = other_process()
        assert res.returncode == 1 and "in use by another refrl process" in res.stderr
    assert (run / LOCK_FILE).read_bytes() == b""
    assert other_process().returncode == 0  # released
