"""``vlm_judge``: a Qwen2.5-VL judge scoring an output against its references, OmniRef-Bench style.

The judge sees the sample's references (in prompt order, each named by its type),
then the generated image, and is asked for a JSON object with a 0-10 rating per
dimension: one per reference type present (subject, style, background,
layout/pose, lighting) plus ``prompt`` (instruction following) and ``quality``;
dimensions whose reference type is absent are -1 (OmniRef-Bench's convention).

Score: the mean of the rated dimensions (0-10). ``extras``: each dimension's rating
(-1 where absent, NaN where the answer did not parse) and ``parsed`` (1/0).
An answer that does not parse — no JSON object, a missing dimension, a value
outside [0, 10] — gives NaN, is counted in ``unparseable`` and kept in
``last_answers``; it is never replaced by a made-up number.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from refrl.data.schema import LoadedSample
from refrl.rewards.base import RewardOutput
from refrl.rewards.zoo.base import ZooReward
from refrl.rewards.zoo.loading import load_tokenizer, load_transformers, read_json
from refrl.rewards.zoo.qwen_vl import IMAGE, QwenImagePrep, chat_prompt, encode_conversations

# Reference type -> judged dimension (OmniRef-Bench's dimensions).
REFERENCE_DIMENSIONS = {"subject": "subject", "style": "style", "background": "background", "layout": "layout",
                        "lighting": "lighting"}
ALWAYS_DIMENSIONS = ("prompt", "quality")
DIMENSIONS = (*REFERENCE_DIMENSIONS.values(), *ALWAYS_DIMENSIONS)
ABSENT = -1.0
SCORE_RANGE = (0.0, 10.0)
DEFAULT_MAX_NEW_TOKENS = 96
JUDGE_PIXELS = 256 * 28 * 28  # per image; Qwen2.5-VL's own default allows far more
DIMENSION_HELP = {
    "subject": "does the generated image show the same subject (identity, details) as the subject reference(s)",
    "style": "does it follow the artistic style of the style reference",
    "background": "does it use the background of the background reference",
    "layout": "does it follow the pose/layout reference",
    "lighting": "does it follow the lighting of the lighting reference",
    "prompt": "does it follow the instruction",
    "quality": "visual quality: sharp, coherent, free of artifacts",
}


def judge_dimensions(sample: LoadedSample) -> dict[str, bool]:
    """Each dimension -> whether it applies to this sample (reference dimensions need their reference type)."""
    present = {REFERENCE_DIMENSIONS[t] for t in sample.ref_types if t in REFERENCE_DIMENSIONS}
    return {d: (d in present or d in ALWAYS_DIMENSIONS) for d in DIMENSIONS}


def judge_instruction(sample: LoadedSample) -> str:
    """The question after the images: what each image is, the dimensions, the answer format."""
    applies = judge_dimensions(sample)
    lines = [f"Images 1 to {sample.n_refs} are references: "
             + ", ".join(f"image {i + 1} is a {t} reference" for i, t in enumerate(sample.ref_types)) + "."
             if sample.n_refs else "There are no reference images.",
             f"The last image was generated for the instruction: \"{sample.prompt}\".",
             "Rate the generated image from 0 (worst) to 10 (best) on each dimension; write -1 for a dimension "
             "marked absent."]
    for d in DIMENSIONS:
        lines.append(f"- {d}: {DIMENSION_HELP[d]}" + ("" if applies[d] else " (absent: -1)"))
    example = ", ".join(f'"{d}": {"<0-10>" if applies[d] else -1}' for d in DIMENSIONS)
    lines.append(f"Answer with one JSON object only: {{{example}}}")
    return "\n".join(lines)


_JSON_OBJECT = re.compile(r"\{[^{}]*\}", re.S)
_PAIR = re.compile(r'"?([a-z_]+)"?\s*[:=]\s*(-?\d+(?:\.\d+)?)', re.I)


def parse_judge_answer(text: str, applies: dict[str, bool]) -> dict[str, float] | None:
    """Ratings of the applicable dimensions from a judge's answer, or None if it does not parse.

    Reads the last JSON object in the text (else ``name: number`` pairs); every
    applicable dimension must be present with a value in [0, 10]. Values for absent
    dimensions are ignored (they are -1 by definition)."""
    values: dict[str, float] = {}
    for block in reversed(_JSON_OBJECT.findall(text)):
        try:
            obj = json.loads(block)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            values = {str(k).lower(): v for k, v in obj.items()}
            break
    if not values:
        values = {k.lower(): float(v) for k, v in _PAIR.findall(text)}
    out: dict[str, float] = {}
    for dim, applies_here in applies.items():
        if not applies_here:
            continue
        value = values.get(dim)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if not (SCORE_RANGE[0] <= float(value) <= SCORE_RANGE[1]) or math.isnan(float(value)):
            return None
        out[dim] = float(value)
    return out


class VlmJudgeReward(ZooReward):
    """A VLM judge (Qwen2.5-VL through transformers) rating outputs 0-10 per dimension."""

    name = "vlm_judge"
    needs = ("prompt",)
    default_checkpoint = "Qwen/Qwen2.5-VL-7B-Instruct"

    def __init__(self, checkpoint: str | None = None, model_class: str = "Qwen2_5_VLForConditionalGeneration",
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, pixels: int | None = JUDGE_PIXELS,
                 batch_size: int = 4, **common: Any):
        super().__init__(batch_size=batch_size, **common)
        self.checkpoint = checkpoint or self.default_checkpoint
        self.model = load_transformers(model_class, self.checkpoint, self.name, self.device, self.dtype)
        self.tokenizer = load_tokenizer(self.checkpoint, self.name)
        config = read_json(self.checkpoint, "preprocessor_config.json", self.name)
        self.prep = QwenImagePrep.from_config(config, max_pixels=pixels)
        self.prep.min_pixels = min(self.prep.min_pixels, self.prep.max_pixels)
        self.max_new_tokens = int(max_new_tokens)
        self.answers_total = 0
        self.unparseable = 0
        self.last_answers: list[str] = []

    def generate_answers(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> list[str]:
        """Greedy answers of the judge, one per (image, sample)."""
        prompts = [chat_prompt([*([IMAGE] * s.n_refs), IMAGE, judge_instruction(s)]) for s in samples]
        pictures = [[*(r.float().cpu() for r in s.ref_images), im.float().cpu()] for im, s in zip(images, samples, strict=True)]
        batch = encode_conversations(self.tokenizer, self.prep, prompts, pictures, padding_side="left")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad)
        return self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def score(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        answers: list[str] = []
        for i in range(0, images.shape[0], self.batch_size):
            answers += self.generate_answers(images[i : i + self.batch_size], samples[i : i + self.batch_size])
        return self.score_answers(answers, samples)

    def score_answers(self, answers: list[str], samples: Sequence[LoadedSample]) -> RewardOutput:
        """Parse the answers into scores and per-dimension extras; count the unparseable ones."""
        n = len(answers)
        scores = torch.full((n,), float("nan"))
        extras = {d: torch.full((n,), float("nan")) for d in DIMENSIONS}
        parsed = torch.zeros(n)
        for b, (text, sample) in enumerate(zip(answers, samples, strict=True)):
            applies = judge_dimensions(sample)
            for d, a in applies.items():
                if not a:
                    extras[d][b] = ABSENT
            ratings = parse_judge_answer(text, applies)
            if ratings is None:
                self.unparseable += 1
                continue
            parsed[b] = 1.0
            for d, v in ratings.items():
                extras[d][b] = v
            scores[b] = sum(ratings.values()) / len(ratings)
        self.answers_total += n
        self.last_answers = list(answers)
        return RewardOutput(scores=scores, extras={**extras, "parsed": parsed})
