"""What every training run shares: metrics.jsonl and a timer (seeded generators: `refrl.runfolder.rng`)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from refrl.errors import RefrlError
from refrl.runfolder.files import atomic_write_text

log = logging.getLogger(__name__)


def parse_metrics(text: str, source: str) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` text. A last line that does not parse is dropped:
    it is a write the process died in the middle of. A bad line anywhere else is an error."""
    lines = [(n, line) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if i == len(lines) - 1:
                log.warning("%s:%d: dropped a torn last line (the run was killed while writing it)", source, n)
                break
            raise RefrlError(f"{source}:{n}: not a JSON line; repair or delete that line") from None
        if not isinstance(record, dict):
            raise RefrlError(f"{source}:{n}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed every write)."""

    def __init__(self, path: str | Path, truncate_after_step: int | None = None):
        self.path = Path(path)
        if truncate_after_step is not None and self.path.exists():
            # Lines logged after the checkpoint a run starts from are redone, so the file
            # reads as one uninterrupted run (every step once).
            kept = [r for r in parse_metrics(self.path.read_text(), str(self.path))
                    if r.get("step", 0) <= truncate_after_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
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
    return parse_metrics(path.read_text(), str(path))


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t0 = now - self.t0, now
        return dt
