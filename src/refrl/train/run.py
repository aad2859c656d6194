"""What every training run shares: the run folder, metrics.jsonl, a seeded torch generator."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed every write)."""

    def __init__(self, path: str | Path, truncate_after_step: int | None = None):
        self.path = Path(path)
        if truncate_after_step is not None and self.path.exists():
            # On resume, drop lines logged after the checkpoint so the file reads as
            # one uninterrupted run.
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= truncate_after_step
            ]
            self.path.write_text("".join(k + "\n" for k in kept))
        self._fh = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def seeded_generator(*seeds: int) -> torch.Generator:
    """A torch generator whose state depends only on the given integers."""
    g = torch.Generator()
    acc = 0
    for s in seeds:
        acc = (acc * 1_000_003 + int(s) + 1) % (2**63 - 1)
    g.manual_seed(acc)
    return g


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t0 = now - self.t0, now
        return dt
