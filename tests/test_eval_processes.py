"""``accelerate launch --num_processes 2 -m refrl eval|generate``: the work is split across the
processes and the outputs are those of one process.

eval.json may differ only in ``processes`` (1 or 2) and ``seconds`` (timings); samples.jsonl,
grid.png and every image are byte-equal. generate.json, grid.png and the images are byte-equal."""

from __future__ import annotations

import json

import pytest

from refrl.data.refworld.generate import generate_refworld_to_disk
from refrl.eval.processes import Processes, batches
from refrl.eval.runner import EVAL_FILE, GRID_FILE, IMAGES_DIR, SAMPLES_FILE

DIFFERS = ("processes", "seconds")  # what legitimately depends on the number of processes


def test_batches_go_round_robin_and_one_process_is_the_identity():
    assert batches(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    one, second = Processes(), Processes(rank=1, world=2)
    assert one.is_main and all(one.share(k) for k in range(3))
    assert [second.share(k) for k in range(4)] == [False, True, False, True] and not second.is_main
    assert one.gather("x") == ["x"] and one.broadcast(3) == 3
    with pytest.raises(ValueError, match="boom"):
        one.run(lambda: (_ for _ in ()).throw(ValueError("boom")))


@pytest.mark.slow
def test_two_processes_write_what_one_writes(tmp_path, launch):
    # 5 samples in batches of 2: process 0 draws and scores batches 0 and 2, process 1 batch 1
    manifest = generate_refworld_to_disk(tmp_path / "data", n=5, seed=3, split="test")
    common = ["--ckpt", "tiny-sft", "--sampling-steps", "2", "--batch-size", "2"]
    ev = ["eval", *common, "--suite", "manifest", "--data", str(manifest)]
    gen = ["generate", *common, "--manifest", str(manifest)]
    launch((2, [*ev, "--out", str(tmp_path / "ev2")]), (1, [*ev, "--out", str(tmp_path / "ev1")]))
    launch((2, [*gen, "--out", str(tmp_path / "gen2")]), (1, [*gen, "--out", str(tmp_path / "gen1")]))

    one, two = (json.loads((tmp_path / d / EVAL_FILE).read_text()) for d in ("ev1", "ev2"))
    assert (one["processes"], two["processes"], two["generated"], two["n"]) == (1, 2, 5, 5)
    assert {k: v for k, v in one.items() if k not in DIFFERS} == {k: v for k, v in two.items() if k not in DIFFERS}
    for name in (SAMPLES_FILE, GRID_FILE):
        assert (tmp_path / "ev1" / name).read_bytes() == (tmp_path / "ev2" / name).read_bytes(), name
    images = sorted(p.name for p in (tmp_path / "ev1" / IMAGES_DIR).iterdir())
    assert len(images) == 5 and images == sorted(p.name for p in (tmp_path / "ev2" / IMAGES_DIR).iterdir())
    for name in images:
        assert (tmp_path / "ev1" / IMAGES_DIR / name).read_bytes() == (tmp_path / "ev2" / IMAGES_DIR / name).read_bytes()

    files = sorted(p.name for p in (tmp_path / "gen1").iterdir() if not p.name.startswith("."))
    assert len(files) == 5 + 2  # an image per sample, grid.png, generate.json
    assert files == sorted(p.name for p in (tmp_path / "gen2").iterdir() if not p.name.startswith("."))
    for name in files:
        assert (tmp_path / "gen1" / name).read_bytes() == (tmp_path / "gen2" / name).read_bytes(), name
