"""Bounds on what a config may hold, checked before any work starts (docs/guides/reliability.md).

* `load_yaml`: YAML read with a safe loader that refuses aliases (``*name``: a 320-byte
  "billion laughs" would expand to gigabytes), nesting deeper than `MAX_YAML_DEPTH` and
  more than `MAX_YAML_NODES` values, so parsing a hostile file costs little memory.
* `check_values`: every number finite, every integer within ``int64``, every list at most
  `MAX_LIST_ITEMS` long, anywhere in a config, including free-form sections such as a
  reward's ``options``; the error names the dotted key.
* Upper bounds of the sizes and counts that the config classes use in their ``Field``\\ s
  (`MAX_BATCH`, `MAX_WIDTH`, ...), so a key such as ``batch_size=10**30`` is refused with
  its name instead of allocating without limit.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from refrl.errors import ConfigError, clip_text, quote

MAX_CONFIG_BYTES = 1 << 20  # a config file (presets are a few KB)
MAX_YAML_NODES = 20_000  # values (scalars, lists, mappings) in one YAML document (presets: ~100)
MAX_YAML_DEPTH = 32  # nesting of lists / mappings
MAX_LIST_ITEMS = 10_000  # items of any one list in a config

# Sizes and counts of the config classes: generous for real runs, small enough that a
# typo (an extra zero run, 10**30) is refused before anything is allocated.
SEED_MAX = 2**32 - 1  # what every RNG a run seeds accepts (NumPy's legacy seed is 32-bit)
MAX_STEPS = 10**9  # steps, iterations, checkpoint / log periods
MAX_BATCH = 65_536  # samples per batch, group, minibatch, eval batch
MAX_REPEATS = 4_096  # noise draws per condition, group size, inner epochs, training times
MAX_SAMPLING_STEPS = 10_000  # denoising steps
MAX_IMAGE_SIZE = 8_192  # pixels per side
MAX_WIDTH = 16_384  # a transformer's hidden size
MAX_DEPTH = 1_024  # blocks, heads, MLP ratio, LoRA rank
MAX_TOKENS = 65_536  # text tokens, references
MAX_EVAL_SAMPLES = 10**7
INT64_MAX = 2**63 - 1


class _ConfigLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` without aliases, with bounded nesting and number of values."""

    source = "config"

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0

    def _refuse(self, what: str) -> ConfigError:
        mark = self.peek_event().start_mark
        return ConfigError(f"{self.source}: line {mark.line + 1}, column {mark.column + 1}: {what}")

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            anchor = clip_text(self.peek_event().anchor, 40)
            raise self._refuse(f"YAML aliases (*{anchor}) are not allowed in config files; write the value out")
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise self._refuse(f"more than {MAX_YAML_NODES:,} values; a config file is refused beyond that")
        if self._depth >= MAX_YAML_DEPTH:
            raise self._refuse(f"nested deeper than the limit of {MAX_YAML_DEPTH} levels")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml(text: str, source: str) -> Any:
    """Parse one YAML document of a config (a file's text or an override's value) safely:
    no aliases, at most `MAX_YAML_DEPTH` levels and `MAX_YAML_NODES` values (ConfigError
    naming ``source`` and the line); other syntax errors are ``yaml.YAMLError``."""
    loader = _ConfigLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def check_values(data: Any, source: str = "config", prefix: str = "") -> None:
    """ConfigError naming the dotted key of the first value that is a non-finite float, an
    integer outside ``int64``, a list longer than `MAX_LIST_ITEMS` or nested deeper than
    `MAX_YAML_DEPTH` (iterative: safe on any input)."""
    stack: list[tuple[str, Any, int]] = [(prefix, data, 0)]
    while stack:
        key, value, depth = stack.pop()
        where = f"{source}: config key '{clip_text(key, 120) or '<root>'}'"
        if isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value}")
        if isinstance(value, int) and not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise ConfigError(f"{where}: {quote(value)} is out of range (an integer must fit in 64 bits)")
        if isinstance(value, dict | list | tuple):
            if depth >= MAX_YAML_DEPTH:
                raise ConfigError(f"{where}: nested deeper than the limit of {MAX_YAML_DEPTH} levels")
            if not isinstance(value, dict) and len(value) > MAX_LIST_ITEMS:  # unknown keys: pydantic names them
                raise ConfigError(f"{where}: {len(value):,} items exceed the limit of {MAX_LIST_ITEMS:,}")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                stack.append((f"{key}.{k}" if key else str(k), v, depth + 1))
