"""Precomputed text embeddings: text-encoder outputs kept in memory and, optionally, on disk.

The text encoders of the real backends are large (Qwen2.5-VL 7B for Qwen-Image-Edit,
Qwen3 for FLUX.2 [klein], T5-XXL for Kontext) and frozen, so their outputs can be
computed once (``policy.precompute_text(samples)``) and the encoders left unloaded
(``model.diffusers.load_text_encoder=false``). One file per sample condition:
``<sha256>.safetensors`` holding that sample's tensors, un-padded. The key hashes
everything the output depends on (the adapter's text settings, the prompt and, for
Qwen-Image-Edit-Plus, the reference images shown to the vision-language encoder).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file

from refrl.runfolder.files import save_safetensors

DEFAULT_MEMORY_ITEMS = 512  # samples kept in memory (RefWorld prompts rarely repeat)


def text_key(*parts: str | bytes) -> str:
    """Stable hex key of the parts (strings and raw bytes), order-sensitive."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else bytes(part)
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class TextEmbeddingCache:
    """A bounded in-memory LRU in front of an optional folder of ``<key>.safetensors`` files."""

    def __init__(self, folder: str | Path | None = None, memory_items: int = DEFAULT_MEMORY_ITEMS):
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.memory_items = memory_items
        self._memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        if self.folder is not None and self._path(key).is_file():
            value = load_file(str(self._path(key)))
            self._remember(key, value)
            return value
        return None

    def put(self, key: str, value: dict[str, torch.Tensor]) -> None:
        value = {k: v.detach().to("cpu").contiguous() for k, v in value.items()}
        self._remember(key, value)
        if self.folder is not None and not self._path(key).is_file():
            save_safetensors(value, self._path(key))  # atomic: a reader never sees half a file

    def _remember(self, key: str, value: dict[str, torch.Tensor]) -> None:
        self._memory[key] = value
        self._memory.move_to_end(key)
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)
