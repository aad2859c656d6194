"""``refrl weights``: the weights a config needs, whether they are in the local cache, and
fetching them ahead (on a login node with internet, for compute nodes without it).

`config_sources` reads a config (a preset name or a file, with overrides; training or
eval) and names every weight folder it will load: the generator's pipeline parts (those
its backend loads, `refrl.models.diffusers.common.DiffusersPolicy.from_config`), the
checkpoint it starts from, and every zoo reward's backbones with their default hub ids
(`refrl.rewards.zoo`). `status` looks them up in the Hugging Face cache without any
network; `download` fetches them with ``huggingface_hub.snapshot_download`` into the cache
or a ``--to`` folder (a cache of its own: point ``HF_HUB_CACHE`` at it). A failed download
removes what it had started writing. docs/guides/offline-weights.md.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refrl.errors import RefrlError, RunFailure

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# Files of a transformers model folder (weights, configs, tokenizers, preprocessors).
TRANSFORMERS_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken")
# Weights that are not on the Hugging Face hub: where they come from (docs/guides/rewards.md).
NOT_ON_HUB = {
    "dreamsim": "the dreamsim package downloads its GitHub release into cache_dir (default ~/.cache/dreamsim)",
    "lpips": "torchvision's AlexNet/VGG weights and the lpips package's heads (options backbone_weights, lin_weights)",
}


@dataclass
class Source:
    """One weight folder: a hub repo (``repo_id`` at ``revision``, the files matching
    ``patterns``) or a local path named by the config."""

    role: str
    repo_id: str | None = None
    revision: str = "main"
    patterns: tuple[str, ...] = ()
    local: str | None = None
    note: str = ""
    components: tuple[str, ...] = field(default=())  # a diffusers pipeline: the parts that must be complete

    @property
    def name(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.repo_id else (self.local or "-")


def _is_local(value: str) -> bool:
    from refrl.rewards.zoo.loading import looks_like_path

    return Path(value).expanduser().exists() or looks_like_path(value)


def _hub_or_local(role: str, value: str, patterns: tuple[str, ...], revision: str = "main") -> Source:
    if _is_local(value):
        return Source(role, local=value)
    return Source(role, repo_id=value, revision=revision, patterns=patterns)


def generator_sources(model: dict[str, Any]) -> list[Source]:
    """The pipeline parts a diffusers ``model:`` section loads, and the checkpoint it starts from."""
    out: list[Source] = []
    kind = model.get("kind", "tiny-dit")
    init = model.get("init")
    if init and init != "tiny-sft":
        out.append(Source("start checkpoint (model.init)", local=str(init)))
    pretrained = model.get("pretrained")
    if kind == "tiny-dit" or not pretrained:
        return out
    from refrl.models.diffusers.registry import backend

    cls = backend(kind)
    text = (model.get("diffusers") or {}).get("load_text_encoder", True)
    parts = ("transformer", "vae", "scheduler", *(cls.text_components if text else ()))
    patterns = ("model_index.json", *(f"{p}/*" for p in parts))
    src = _hub_or_local(f"generator {kind}", str(pretrained), patterns)
    src.components = parts
    return [src, *out]


def reward_sources(name: str, options: dict[str, Any], role: str | None = None) -> list[Source]:
    """The weight folders zoo reward ``name`` loads with ``options`` (defaults: its hub ids)."""
    from refrl.rewards.zoo import ZOO, zoo_class

    role = role or f"reward {name}"
    if name not in ZOO:
        return []  # embedded rewards, plain functions and remote:NAME servers load no weights here
    if name in NOT_ON_HUB:
        return [Source(role, note=NOT_ON_HUB[name])]
    if name == "csd":
        from refrl.rewards.zoo.style import CSD_BASE, CSD_HUB, CSD_HUB_FILE

        return [_hub_or_local(role, str(options.get("checkpoint") or CSD_HUB), (CSD_HUB_FILE,)),
                _hub_or_local(f"{role} (base config)", str(options.get("base") or CSD_BASE), ("config.json",))]
    if name == "dino_seg":
        from refrl.rewards.zoo.segment import DEFAULT_SEGMENTER_CHECKPOINT, ENCODERS

        encoder = ENCODERS[options.get("encoder", "dinov2")]
        out = [_hub_or_local(f"{role} (encoder)", str(options.get("checkpoint") or encoder.default_checkpoint),
                             TRANSFORMERS_FILES)]
        if options.get("segmenter", "clipseg") == "clipseg":
            out.append(_hub_or_local(f"{role} (segmenter)",
                                     str(options.get("segmenter_checkpoint") or DEFAULT_SEGMENTER_CHECKPOINT),
                                     TRANSFORMERS_FILES))
        return out
    cls = zoo_class(name)
    checkpoint = str(options.get("checkpoint") or getattr(cls, "default_checkpoint", "") or "")
    if not checkpoint:
        return []
    out = [_hub_or_local(role, checkpoint, (*TRANSFORMERS_FILES, *_extra_files(name)))]
    extra = {"processor": getattr(cls, "default_processor", None), "tokenizer": getattr(cls, "default_tokenizer", None),
             "base": _default_base(name)}
    for key, default in extra.items():
        value = options.get(key) or default
        if value:
            out.append(_hub_or_local(f"{role} ({key})", str(value), TRANSFORMERS_FILES))
    return out


def _extra_files(name: str) -> tuple[str, ...]:
    if name == "hpsv2":
        from refrl.rewards.zoo.preference import HPSV2_FILE

        return (HPSV2_FILE,)
    if name == "image_reward":
        from refrl.rewards.zoo.preference import IMAGE_REWARD_FILE

        return (IMAGE_REWARD_FILE,)
    return ()


def _default_base(name: str) -> str | None:
    if name == "hpsv2":
        from refrl.rewards.zoo.preference import LAION_CLIP_H

        return LAION_CLIP_H
    if name == "hpsv3":
        from refrl.rewards.zoo.hpsv3 import HPSV3_BASE

        return HPSV3_BASE
    return None


def config_sources(data: dict[str, Any]) -> list[Source]:
    """Every weight folder a config mapping (training or eval) needs, in load order, without repeats."""
    out: list[Source] = []
    if isinstance(data.get("model"), dict):
        out += generator_sources(data["model"])
    ckpt = data.get("ckpt")
    if ckpt and ckpt != "tiny-sft":  # eval: the checkpoint, and the base pipeline its config.json names
        out.append(Source("checkpoint (ckpt)", local=str(ckpt)))
        out += _checkpoint_base(str(ckpt))
    rewards = data.get("rewards")
    if isinstance(rewards, list) and all(isinstance(r, dict) for r in rewards):
        for spec in rewards:
            out += reward_sources(str(spec.get("name")), dict(spec.get("options") or {}))
    elif rewards:
        per_metric = data.get("reward_options") or {}
        for item in ",".join([rewards] if isinstance(rewards, str) else map(str, rewards)).split(","):
            metric, _, reward = (p.strip() for p in item.partition("="))
            if metric:
                out += reward_sources(reward or metric, dict(per_metric.get(metric) or {}), f"metric {metric}")
    seen: set[tuple] = set()
    unique = []
    for src in out:
        key = (src.repo_id, src.revision, src.patterns, src.local, src.note)
        if key not in seen:
            seen.add(key)
            unique.append(src)
    return unique


def _checkpoint_base(ckpt: str) -> list[Source]:
    """A saved diffusers adapter names its base pipeline in config.json (``pretrained``)."""
    import json

    from refrl.runfolder.layout import resolve_checkpoint

    try:
        info = json.loads((resolve_checkpoint(ckpt) / "config.json").read_text())
    except (RefrlError, OSError, ValueError):
        return []
    if not isinstance(info, dict) or not info.get("pretrained"):
        return []
    return generator_sources({**(info.get("model") or {}), "kind": info.get("kind"), "pretrained": info["pretrained"]})


# --------------------------------------------------------------------------- the cache


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _snapshot(src: Source, cache_dir: str | os.PathLike | None) -> Path | None:
    """The cached snapshot folder of a hub source at its revision, or None (no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(src.repo_id, revision=src.revision, cache_dir=cache_dir, local_files_only=True,
                                      allow_patterns=list(src.patterns) or None))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _matching(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return [p for p in files if any(fnmatch.fnmatch(str(p.relative_to(folder)), pat) for pat in patterns)]


def status(src: Source, cache_dir: str | os.PathLike | None = None) -> tuple[str, int | None]:
    """``("present" | "missing" | "not found" | "not on the hub", size in bytes or None)``, offline."""
    if src.note:
        return "not on the hub", None
    folder = Path(src.local).expanduser() if src.local else _snapshot(src, cache_dir)
    if folder is None or not folder.exists():
        return ("not found" if src.local else "missing"), None  # a local path is the user's to provide
    if folder.is_file():
        return "present", folder.stat().st_size
    files = _matching(folder, src.patterns) if src.patterns else [p for p in folder.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    if src.components:
        from refrl.models.diffusers.loading import missing_files

        return ("missing" if missing_files(folder, src.components) else "present"), size
    explicit = [p for p in src.patterns if not any(c in p for c in "*?[")]
    names = {str(p.relative_to(folder)) for p in files}
    globbed = len(explicit) < len(src.patterns)  # a model folder by globs: it must hold weights too
    complete = all(p in names for p in explicit) and (not globbed or any(p.suffix in WEIGHT_SUFFIXES for p in files))
    return ("present" if complete else "missing"), size


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def download(src: Source, cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch one hub source into the cache (``cache_dir`` or the default); on failure, remove
    every file and folder of that repo it had created, and raise RunFailure (one line)."""
    from huggingface_hub import snapshot_download

    root = Path(cache_dir) if cache_dir is not None else hub_cache()
    folder = f"models--{src.repo_id.replace('/', '--')}"
    watched = [root / folder, root / ".locks" / folder]  # what snapshot_download writes for this repo
    before = {p for w in watched for p in [w, *w.rglob("*")] if p.exists()}
    try:
        return Path(snapshot_download(src.repo_id, revision=src.revision, allow_patterns=list(src.patterns) or None,
                                      cache_dir=cache_dir))
    except Exception as exc:  # network, HTTP, disk: whatever it was, nothing half-written stays
        after = {p for w in watched for p in [w, *w.rglob("*")] if p.exists() or p.is_symlink()}
        for path in sorted(after - before, key=lambda p: len(p.parts), reverse=True):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        why = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise RunFailure(f"cannot download {src.name} ({src.role}) from {_endpoint()}: {why}") from None


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


# --------------------------------------------------------------------------- the commands


def _sources(config: str, overrides: list[str]) -> list[Source]:
    """The config's sources, after validating it as what it is (eval, RL or SFT), so a bad
    value is the same one-line error as the command that runs it would give."""
    import copy

    from refrl.config import read_config, validate_config

    data = read_config(config, overrides)
    checked = copy.deepcopy(data)
    if "suite" in data or "ckpt" in data:
        from refrl.eval.config import EvalConfig as cls

        checked.setdefault("ckpt", "tiny-sft")  # an eval preset leaves the checkpoint to the command
    elif any(k in data for k in ("iterations", "rewards", "objective", "advantage")):
        from refrl.train.grpo_config import GRPOConfig as cls
    else:
        from refrl.train.sft import SFTConfig as cls
    validate_config(cls, checked, source=str(config))
    return config_sources(data)


def list_rows(config: str, overrides: list[str], cache_dir: str | os.PathLike | None = None) -> list[tuple[str, ...]]:
    """``refrl weights list``: (role, source, files, size, status) per weight folder of the config."""
    rows = []
    for src in _sources(config, overrides):
        state, size = status(src, cache_dir)
        files = src.note or (" ".join(p.removesuffix("/*") + ("/" if p.endswith("/*") else "") for p in src.patterns)
                             if src.repo_id else "local")
        rows.append((src.role, src.name, files, human_size(size), state))
    return rows


def download_all(config: str, overrides: list[str], to: str | os.PathLike | None = None,
                 echo: Any = print) -> list[Path]:
    """``refrl weights download``: fetch every hub source of the config that is not present yet."""
    from refrl.models.diffusers.loading import is_offline

    sources = _sources(config, overrides)
    if is_offline() and any(s.repo_id and status(s, to)[0] != "present" for s in sources):
        raise RefrlError("HF_HUB_OFFLINE is set, so nothing can be downloaded: run `HF_HUB_OFFLINE=0 refrl weights "
                         f"download --config {config}` on a machine with internet")
    done = []
    for src in sources:
        if src.repo_id is None:
            echo(f"skip {src.role}: {src.note or f'local {src.local} (copy it yourself)'}")
            continue
        if status(src, to)[0] == "present":
            echo(f"present {src.name} ({src.role})")
            continue
        echo(f"downloading {src.name} ({src.role}) ...")
        done.append(download(src, to))
        echo(f"  {human_size(status(src, to)[1])} in {done[-1]}")
    return done
