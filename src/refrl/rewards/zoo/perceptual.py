"""Perceptual similarity rewards: ``lpips`` (a pure-torch LPIPS) and ``dreamsim`` (the DreamSim package).

**LPIPS** (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as
a Perceptual Metric"): with unit-normalised backbone activations ``f_l`` at five
layers and learned non-negative channel weights ``w_l``,
``d(x, y) = Σ_l mean_hw Σ_c w_lc (f_l(x) - f_l(y))²_c``. Inputs are mapped to
[-1, 1] and shifted/scaled by the package's ``ScalingLayer``. The network here is
written in torch with the module names of torchvision's AlexNet/VGG16
(``features.N``) and of the ``lpips`` package's linear heads (``linK.model.1``), so
their published files load unchanged: the backbone from torchvision's
checkpoint (``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``), the heads from
the ``lpips`` package's ``weights/v0.1/{alex,vgg}.pth``. Neither package is needed.
Score: ``1 - d`` (identical images score 1); ``extras["lpips"]`` is ``d``.

**DreamSim** (Fu et al. 2023), used by OmniRefiner's patch reward: the
``dreamsim`` package's model embeds an image; score = cosine of the embeddings
(= 1 - DreamSim distance).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.rewards.base import RewardOutput
from refrl.rewards.zoo.base import SimilarityReward, check_choice, resize_center_crop
from refrl.rewards.zoo.loading import is_offline
from refrl.runfolder.files import atomic_write_text, save_safetensors

LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # lpips.ScalingLayer
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_EPS = 1e-10  # lpips.normalize_tensor
LPIPS_SIZE = 256
# (kind, *args) per torchvision ``features`` index; "R" ReLU, "M" max-pool (kernel, stride).
ALEX_LAYERS = [("C", 3, 64, 11, 4, 2), ("R",), ("M", 3, 2), ("C", 64, 192, 5, 1, 2), ("R",), ("M", 3, 2),
               ("C", 192, 384, 3, 1, 1), ("R",), ("C", 384, 256, 3, 1, 1), ("R",), ("C", 256, 256, 3, 1, 1), ("R",)]
VGG_CHANNELS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
LPIPS_NETS = {
    # net: (slice ends in ``features``, channels per slice, torchvision backbone file)
    "alex": ((2, 5, 8, 10, 12), (64, 192, 384, 256, 256), "alexnet-owt-7be5be79.pth"),
    "vgg": ((4, 9, 16, 23, 30), (64, 128, 256, 512, 512), "vgg16-397923af.pth"),
}
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def _vgg_layers() -> list[tuple]:
    layers: list[tuple] = []
    c_in = 3
    for v in VGG_CHANNELS:
        if v == "M":
            layers.append(("M", 2, 2))
        else:
            layers += [("C", c_in, v, 3, 1, 1), ("R",)]
            c_in = v
    return layers


def _make(spec: tuple) -> nn.Module:
    if spec[0] == "C":
        _, c_in, c_out, k, stride, pad = spec
        return nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad)
    if spec[0] == "R":
        return nn.ReLU(inplace=False)
    return nn.MaxPool2d(spec[1], spec[2])


class NetLinLayer(nn.Module):
    """The lpips package's per-layer head: dropout then a 1x1 conv to one channel, no bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LpipsNet(nn.Module):
    """LPIPS network: backbone ``features`` (torchvision names) + heads ``lin0..lin4`` (lpips names)."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        check_choice("lpips", "net", net, tuple(LPIPS_NETS))
        self.net = net
        ends, channels, _ = LPIPS_NETS[net]
        specs = ALEX_LAYERS if net == "alex" else _vgg_layers()
        self.features = nn.Sequential(*[_make(s) for s in specs[: ends[-1]]])
        self.ends = ends
        for k, c in enumerate(channels):
            setattr(self, f"lin{k}", NetLinLayer(c))
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def activations(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised (over channels) activations at the five layers, for images in [0, 1]."""
        x = (images * 2 - 1 - self.shift) / self.scale
        outs, start = [], 0
        for end in self.ends:
            x = self.features[start:end](x)
            start = end
            outs.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + LPIPS_EPS))
        return outs

    def distance_from_activations(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        """``d = Σ_l mean_hw lin_l((a_l - b_l)²)``, one value per batch row."""
        total = 0.0
        for k, (fa, fb) in enumerate(zip(a, b, strict=True)):
            head = getattr(self, f"lin{k}").model[1]
            total = total + head((fa - fb).pow(2)).mean(dim=(1, 2, 3))
        return total

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.distance_from_activations(self.activations(x), self.activations(y))


def save_lpips_net(model: LpipsNet, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, folder / WEIGHTS_FILE)
    atomic_write_text(folder / CONFIG_FILE, json.dumps({"net": model.net, "kind": "refrl.lpips"}))


def load_lpips_net(net: str, checkpoint: str | None, backbone_weights: str | None, lin_weights: str | None) -> LpipsNet:
    """An `LpipsNet` from a refrl folder (``save_pretrained``), or from the published backbone + head files."""
    model = LpipsNet(net)
    if checkpoint is not None:
        folder = Path(checkpoint)
        if not (folder / WEIGHTS_FILE).is_file():
            raise RefrlError(f"reward 'lpips': checkpoint={checkpoint} has no {WEIGHTS_FILE} (write one with "
                             f"LpipsReward.save_pretrained, or pass backbone_weights= and lin_weights=)")
        cfg = json.loads((folder / CONFIG_FILE).read_text()) if (folder / CONFIG_FILE).is_file() else {}
        if cfg.get("net", net) != net:
            model = LpipsNet(cfg["net"])
        model.load_state_dict(load_file(folder / WEIGHTS_FILE))
        return model
    backbone = Path(backbone_weights) if backbone_weights else _torch_hub_file(LPIPS_NETS[net][2])
    lin = Path(lin_weights) if lin_weights else _lpips_package_file(net)
    missing = [f"{opt}={p}" for opt, p in (("backbone_weights", backbone), ("lin_weights", lin)) if p is None or not p.is_file()]
    if missing:
        raise RefrlError(
            f"reward 'lpips': weights not found ({', '.join(map(str, missing))}). Provide torchvision's "
            f"{LPIPS_NETS[net][2]} (TORCH_HOME/hub/checkpoints) as backbone_weights= and the lpips package's "
            f"weights/v0.1/{net}.pth as lin_weights=, or a folder written by save_pretrained as checkpoint="
        )
    state = {k: v for k, v in torch.load(backbone, map_location="cpu", weights_only=True).items()
             if k.startswith("features.") and int(k.split(".")[1]) < len(model.features)}
    state.update(torch.load(lin, map_location="cpu", weights_only=True))
    model.load_state_dict(state)
    return model


def _torch_hub_file(filename: str) -> Path | None:
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    return path if path.is_file() else None


def _lpips_package_file(net: str) -> Path | None:
    try:
        import lpips  # noqa: F401  (only its shipped weight files are used)
    except ImportError:
        return None
    path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    return path if path.is_file() else None


class LpipsReward(SimilarityReward):
    """``1 - LPIPS`` between the output and the target (default) or the references of a type."""

    name = "lpips"

    def __init__(self, net: Literal["alex", "vgg"] = "alex", checkpoint: str | None = None,
                 backbone_weights: str | None = None, lin_weights: str | None = None, size: int = LPIPS_SIZE,
                 against: Literal["references", "target"] = "target", ref_type: str = "subject", **common: Any):
        super().__init__(against=against, ref_type=ref_type, **common)
        self.model = load_lpips_net(net, checkpoint, backbone_weights, lin_weights).to(self.device, self.dtype).eval()
        self.size = int(size)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Activations of all five layers, flattened and concatenated per image (so they cache as one tensor)."""
        acts = self.model.activations(resize_center_crop(images, self.size, crop=False))
        self._shapes = [a.shape[1:] for a in acts]
        return torch.cat([a.flatten(1) for a in acts], dim=1)

    def _unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        sizes = [int(torch.Size(s).numel()) for s in self._shapes]
        return [p.view(-1, *s) for p, s in zip(flat.split(sizes, dim=1), self._shapes, strict=True)]

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        head = next(self.model.parameters())
        d = self.model.distance_from_activations(self._unflatten(a.to(head)), self._unflatten(b.to(head)))
        return 1.0 - d.float().cpu()

    def score(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        out = super().score(images, samples)
        out.extras["lpips"] = 1.0 - out.scores  # the distance itself (mean over compared images)
        return out

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the network as ``model.safetensors`` + ``config.json`` (loadable with checkpoint=folder)."""
        save_lpips_net(self.model, folder)


class DreamSimReward(SimilarityReward):
    """DreamSim embedding cosine through the ``dreamsim`` package (OmniRefiner's perceptual reward).

    The package downloads its weights from a GitHub release into ``cache_dir`` on
    first use. Offline, unpack that release archive into ``cache_dir`` yourself;
    with ``HF_HUB_OFFLINE`` set, a ``cache_dir`` without unpacked weights fails at
    once instead of trying the network."""

    name = "dreamsim"
    default_cache_dir = os.path.join("~", ".cache", "dreamsim")
    input_size = 224

    def __init__(self, cache_dir: str | None = None, dreamsim_type: str = "ensemble",
                 against: Literal["references", "target"] = "target", ref_type: str = "subject", **common: Any):
        super().__init__(against=against, ref_type=ref_type, **common)
        self.model = self._load(os.path.expanduser(cache_dir or self.default_cache_dir), dreamsim_type)

    @classmethod
    def from_model(cls, model: nn.Module, **options: Any) -> DreamSimReward:
        """Wrap an already-built DreamSim-style model (anything with ``embed(images_224) -> (B, D)``)."""
        self = cls.__new__(cls)
        SimilarityReward.__init__(self, **{"against": "target", **options})
        self.model = model.to(self.device).eval()
        return self

    def _load(self, cache_dir: str, dreamsim_type: str) -> nn.Module:
        try:
            from dreamsim import dreamsim
        except ImportError:
            raise RefrlError("reward 'dreamsim' needs the dreamsim package: pip install dreamsim "
                             "(it has no version pins; see docs/guides/rewards.md)") from None
        has_weights = os.path.isdir(cache_dir) and any(p.endswith("_lora") for p in os.listdir(cache_dir))
        if is_offline() and not has_weights:
            raise RefrlError(f"reward 'dreamsim': no DreamSim weights in cache_dir={cache_dir} and HF_HUB_OFFLINE is "
                             f"set; unpack the DreamSim release archive there, or pass cache_dir=/path/to/weights")
        try:
            model, _ = dreamsim(pretrained=True, device=str(self.device), cache_dir=cache_dir,
                                dreamsim_type=dreamsim_type)
        except (OSError, RuntimeError, ValueError) as exc:
            raise RefrlError(f"reward 'dreamsim': cannot load weights into cache_dir={cache_dir}: "
                             f"{' '.join(str(exc).split())[:160]}") from exc
        return model

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        # DreamSim's own preprocessing: bicubic resize to 224x224, values in [0, 1] (it normalises inside).
        x = F.interpolate(images, size=(self.input_size, self.input_size), mode="bicubic", antialias=True,
                          align_corners=False).clamp(0, 1)
        return self.model.embed(x).reshape(images.shape[0], -1)
