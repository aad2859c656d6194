"""``hpsv3``: HPSv3 (Ma et al. 2025) on current transformers — Qwen2-VL backbone + reward head.

The ``hpsv3`` package pins transformers 4.45.2 (plus deepspeed, trl), so it is not
installed; its model is re-created here from the released code:

* the Qwen2-VL-7B-Instruct tokenizer with one added special token ``<|Reward|>``
  (embeddings resized to the new vocabulary, as the checkpoint has them);
* the prompt: HPSv3's instruction with the text prompt, the image at
  ``256*28*28`` pixels, then "Please provide the overall ratings of this image:
  <|Reward|>", in Qwen's chat format;
* the head ("ranknet" with default sizes): Linear(h, 1024), ReLU, Dropout,
  Linear(1024, 16), ReLU, Linear(16, 2) on the hidden state at ``<|Reward|>``,
  in float32; the outputs are (mu, sigma) and the score is mu (about -5 .. 15).

``HPSv3.safetensors`` (transformers 4.45 names: ``model.*``, ``visual.*``,
``lm_head.*``, ``rm_head.*``) is mapped to transformers 5's ``Qwen2VLModel``
(``language_model.*``, ``visual.*``); ``save_pretrained`` writes a folder that
loads without the base repo.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.rewards.base import RewardOutput
from refrl.rewards.zoo.base import ZooReward
from refrl.rewards.zoo.loading import (
    load_pretrained,
    load_tokenizer,
    load_transformers,
    read_json,
    resolve_file,
)
from refrl.rewards.zoo.qwen_vl import IMAGE, QwenImagePrep, chat_prompt, encode_conversations
from refrl.runfolder.files import atomic_write_text, save_safetensors

HPSV3_FILE = "HPSv3.safetensors"
HPSV3_BASE = "Qwen/Qwen2-VL-7B-Instruct"
HPSV3_PIXELS = 256 * 28 * 28  # min_pixels = max_pixels in HPSv3's inference
REWARD_TOKEN = "<|Reward|>"
HEAD_FILE = "rm_head.safetensors"
HEAD_HIDDEN = (1024, 16)
HEAD_DROPOUT = 0.05
HEAD_OUTPUTS = 2  # (mu, sigma)
# HPSv3's INSTRUCTION (hpsv3/dataset/data_collator_qwen.py): the text the checkpoint was trained with.
HPSV3_INSTRUCTION = (
    "\nYou are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a "
    "overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst "
    "and 10 being the best. \n\n**Visual Quality:**  \nEvaluate the overall visual quality of the image. The "
    "following sub-dimensions should be considered:\n- **Reasonableness:** The image should not contain any "
    "significant biological or logical errors, such as abnormal body structures or nonsensical environmental "
    "setups.\n- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and "
    "easy to interpret, with no blurring or indistinct areas.\n- **Detail Richness:** Consider the level of detail "
    "in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).\n- **Aesthetic "
    "and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, "
    "atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and "
    "balance.\n- **Safety:** The image should not contain harmful or inappropriate content, such as political, "
    "violent, or adult material. If such content is present, the image quality and satisfaction score should be "
    "the lowest possible. \nTextual prompt - {text_prompt}\n\n\n"
)
HPSV3_RATING = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


def hpsv3_head(hidden: int) -> nn.Sequential:
    """HPSv3's "ranknet" head with its default sizes (module indices match ``rm_head.{0,3,5}``)."""
    return nn.Sequential(nn.Linear(hidden, HEAD_HIDDEN[0]), nn.ReLU(), nn.Dropout(HEAD_DROPOUT),
                         nn.Linear(HEAD_HIDDEN[0], HEAD_HIDDEN[1]), nn.ReLU(), nn.Linear(HEAD_HIDDEN[1], HEAD_OUTPUTS))


def hpsv3_to_hf(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """HPSv3 (transformers 4.45 names) -> (``Qwen2VLModel`` state, ``rm_head`` state); ``lm_head`` is dropped."""
    backbone, head = {}, {}
    for key, value in state.items():
        if key.startswith("rm_head."):
            head[key[len("rm_head."):]] = value
        elif key.startswith("model."):
            backbone["language_model." + key[len("model."):]] = value
        elif key.startswith("visual."):
            backbone[key] = value
    return backbone, head


class Hpsv3Reward(ZooReward):
    """HPSv3 preference score (mu) of (image, prompt)."""

    name = "hpsv3"
    needs = ("prompt",)
    default_checkpoint = "MizzenAI/HPSv3"

    def __init__(self, checkpoint: str | None = None, base: str = HPSV3_BASE, checkpoint_file: str = HPSV3_FILE,
                 pixels: int = HPSV3_PIXELS, instruction: str = HPSV3_INSTRUCTION, **common: Any):
        super().__init__(**common)
        if "{text_prompt}" not in instruction:
            raise RefrlError("reward 'hpsv3': instruction must contain {text_prompt}")
        self.instruction = instruction
        self.checkpoint = checkpoint or self.default_checkpoint
        folder = Path(self.checkpoint)
        if folder.is_dir() and (folder / HEAD_FILE).is_file():
            source = str(folder)
            self.tokenizer = load_tokenizer(source, self.name)
            self.backbone = load_transformers("Qwen2VLModel", source, self.name, self.device, self.dtype)
            head_state = load_file(folder / HEAD_FILE)
        else:
            source = base
            weights = resolve_file(self.checkpoint, checkpoint_file, self.name)
            self.tokenizer = load_tokenizer(base, self.name, "base")
            self.tokenizer.add_tokens([REWARD_TOKEN], special_tokens=True)
            self.backbone, head_state = self._from_original(weights, base)
        self.head = hpsv3_head(self.backbone.config.text_config.hidden_size)
        self.head.load_state_dict(head_state)
        self.head.to(self.device, torch.float32).eval()
        self.reward_id = self.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        if self.reward_id is None or self.reward_id == self.tokenizer.unk_token_id:
            raise RefrlError(f"reward 'hpsv3': the tokenizer of {source} has no {REWARD_TOKEN} token")
        self.prep = QwenImagePrep.from_config(read_json(source, "preprocessor_config.json", self.name),
                                              min_pixels=pixels, max_pixels=pixels)

    def _from_original(self, path: Path, base: str) -> tuple[Any, dict[str, torch.Tensor]]:
        from transformers import AutoConfig, Qwen2VLModel

        backbone_state, head_state = hpsv3_to_hf(load_file(path))
        config = load_pretrained(AutoConfig.from_pretrained, base, self.name, "base")
        rows = backbone_state["language_model.embed_tokens.weight"].shape[0]
        if len(self.tokenizer) > rows:
            raise RefrlError(f"reward 'hpsv3': {path} has {rows} token embeddings but the tokenizer of {base} "
                             f"plus {REWARD_TOKEN} has {len(self.tokenizer)}")
        config.text_config.vocab_size = rows
        model = Qwen2VLModel.from_pretrained(None, config=config, state_dict=backbone_state, dtype=self.dtype)
        return model.to(self.device).eval(), head_state

    def prompt_for(self, text: str) -> str:
        return chat_prompt([IMAGE, self.instruction.format(text_prompt=text) + HPSV3_RATING])

    def score(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        mu, sigma = [], []
        for i in range(0, images.shape[0], self.batch_size):
            chunk = images[i : i + self.batch_size].float().cpu()
            batch = encode_conversations(self.tokenizer, self.prep, [self.prompt_for(s.prompt) for s in samples[i : i + len(chunk)]],
                                         [[im] for im in chunk])
            batch = {k: v.to(self.device) for k, v in batch.items()}
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
            hidden = self.backbone(**batch).last_hidden_state
            at = batch["input_ids"] == self.reward_id
            if not bool((at.sum(dim=1) == 1).all()):
                raise RefrlError(f"reward 'hpsv3': each prompt must hold {REWARD_TOKEN} exactly once")
            out = self.head(hidden[at].float())
            mu.append(out[:, 0].cpu())
            sigma.append(out[:, 1].cpu())
        return RewardOutput(scores=torch.cat(mu), extras={"sigma": torch.cat(sigma)})

    def save_pretrained(self, folder: str | Path) -> None:
        """Backbone (transformers layout), tokenizer with ``<|Reward|>``, image settings and the head."""
        import json

        folder = Path(folder)
        self.backbone.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, folder / HEAD_FILE)
        p = self.prep
        atomic_write_text(folder / "preprocessor_config.json", json.dumps({
            "patch_size": p.patch_size, "merge_size": p.merge_size, "temporal_patch_size": p.temporal_patch_size,
            "min_pixels": p.min_pixels, "max_pixels": p.max_pixels, "image_mean": list(p.mean), "image_std": list(p.std)}))
