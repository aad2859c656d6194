"""The README's "Use from Python" block runs as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_block(section: str) -> str:
    """The first ```python block after the heading ``## <section>``."""
    text = README.read_text()
    start = text.index(f"## {section}\n")
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match is not None, f"no python block under '## {section}'"
    return match.group(1)


def test_use_from_python_block_runs_as_written(tmp_path):
    code = python_block("Use from Python")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # run from an empty folder: the block must not depend on the repository's files
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("iteration ")]
    assert len(lines) == 8, res.stdout
    first, last = (float(line.split()[-1]) for line in (lines[0], lines[-1]))
    assert last > first, res.stdout  # the reward the function defines went up
    assert not list(tmp_path.iterdir())  # it wrote only to its temporary folder
