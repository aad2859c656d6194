"""Trackers, offline: a tiny RL run with `trackers: [tensorboard]` (and wandb in offline mode)
logs the reward scalars, read back from what the tracker wrote (docs/guides/logging.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")  # the `trackers` extra; `make test` installs it with `dev`

def test_config_is_flattened_to_scalars_for_tensorboard():
    from refrl.train.trackers import flat_config

    flat = flat_config({"optim": {"lr": 1e-4, "betas": [0.9, 0.99]}, "data": {"manifest": None}, "seed": 3,
                        "rewards": [{"name": "identity", "weight": 2.0}], "on_policy_check": True})
    assert flat == {"optim.lr": 1e-4, "optim.betas": "[0.9, 0.99]", "data.manifest": "None", "seed": 3,
                    "rewards": '[{"name": "identity", "weight": 2.0}]', "on_policy_check": True}


def tiny_rl(policy_dir: Path, out: Path, tracker: str, env: dict[str, str] | None = None) -> list[dict]:
    """`refrl rl` as a user runs it: 2 iterations of a tiny policy; returns metrics.jsonl's lines."""
    config = out.parent / "tiny-rl.yaml"  # the config's defaults plus a tiny budget, independent of the presets
    config.write_text(f"""\
model: {{init: {policy_dir}}}
iterations: 2
groups_per_iteration: 2
group_size: 4
minibatch_size: 4
clip_range: 0.2
checkpoint_every: 2
sampling: {{steps: 4, sde_steps: all}}
data: {{max_refs: 2}}
rewards: [{{name: identity}}, {{name: layout}}]
trackers: [{tracker}]
""")
    args = [sys.executable, "-m", "refrl", "rl", "-c", str(config), "--out", str(out)]
    res = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=out.parent,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_event_file_holds_the_reward_scalars(tmp_path, tiny_policy_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    lines = tiny_rl(tiny_policy_dir, out, "tensorboard")
    logdir = out / "refrl-grpo"  # RUN/refrl-<kind>: where docs/guides/logging.md says to point tensorboard
    assert list(logdir.glob("events.out.tfevents.*")), sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for name in ("reward/identity", "reward/layout", "loss"):
        assert name in tags, tags
        logged = acc.Scalars(name)
        assert [e.step for e in logged] == [1, 2]
        # the same numbers as metrics.jsonl (tensorboard stores float32)
        assert [e.value for e in logged] == pytest.approx([line[name] for line in lines], rel=1e-6, abs=1e-7)


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline run's ``run-*.wandb`` file. The file is LevelDB's log
    format (a 7-byte header, then 32 KiB blocks of records: crc32, length, type, data; types
    1 full, 2 first, 3 middle, 4 last), each record a wandb ``Record`` protobuf."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw, pos, block, records, part = path.read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        part += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(part)
            part = b""
    rows = []
    for data in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_reward_scalars(tmp_path, tiny_policy_dir):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}
    lines = tiny_rl(tiny_policy_dir, out, "wandb", env)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    rows = wandb_history(runs[0])
    assert [row["_step"] for row in rows] == [1, 2]
    for row, line in zip(rows, lines, strict=True):
        for name in ("reward/identity", "reward/layout", "loss"):
            assert row[name] == pytest.approx(line[name], rel=1e-9, abs=1e-12)
