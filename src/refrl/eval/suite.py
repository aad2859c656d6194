"""What an evaluation suite is: `EvalItem`s to generate and score, and the `Suite` holding them.

A suite is a list of `EvalItem`s — one image to generate each, with the sample the
policy is conditioned on, the sample the rewards compare against and the noise
stream ``(seed, noise_index)`` — plus the metrics it reports by default. The suites
themselves: `refrl.eval.refworld` (``refworld``, ``refine``), `refrl.eval.omniref`,
`refrl.eval.dreambench`; the runner that generates and scores them: `refrl.eval.runner`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from refrl.data.schema import LoadedSample
from refrl.runfolder.files import safe_filename

DEFAULT_IMAGE_SIZE = 32  # when the policy does not say (the tiny DiT's native size)


@dataclass
class EvalItem:
    """One image to generate: conditioned on ``sample``, scored against ``score_sample``
    (default: the same sample), with noise ``(seed, noise_index)``."""

    image_id: str
    sample: LoadedSample
    noise_index: int
    score_sample: LoadedSample | None = None
    record: dict[str, Any] = field(default_factory=dict)  # extra fields for samples.jsonl

    @property
    def scored(self) -> LoadedSample:
        return self.score_sample if self.score_sample is not None else self.sample

    @property
    def file_name(self) -> str:
        """``<image_id>.png``, the id made safe to use as a file name (ids come from data)."""
        return f"{safe_filename(self.image_id)}.png"


@dataclass
class Suite:
    """Items to generate, the metrics to report and what identifies the generated images."""

    name: str
    items: list[EvalItem]
    metrics: dict[str, str]  # metric name -> reward name (`refrl.rewards.build`) or builtin metric
    size: tuple[int, int]
    params: dict[str, Any]  # suite parameters that determine the images (checked on resume)
    n_samples: int
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    group_keys: tuple[str, ...] = ()  # extra aggregation keys of the records (e.g. subject)
    protocol: str = ""
