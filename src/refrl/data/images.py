"""Image files <-> float tensors.

Every image in refrl is a float32 tensor (3, H, W) in [0, 1]; masks are (1, H, W).
`from_pil` is the single place where PIL's many modes become that tensor:

* ``1``, ``L``, ``RGB`` (and ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX`` through
  PIL's own RGB conversion): 8-bit values / 255, grey replicated to 3 channels.
* ``I;16`` (all byte orders): values / 65535.
* ``I`` (32-bit int): values in [0, 65535] are read as 16-bit data (/ 65535) — this is
  how Pillow hands over 16-bit TIFF and PGM files; anything outside that range is
  min-max scaled to [0, 1] (a constant image becomes 0).
* ``F`` (32-bit float): values already in [0, 1] are kept; otherwise min-max scaled;
  NaN becomes 0.
* Alpha (``LA``, ``RGBA``, ``PA``, ``P`` with a transparency key, premultiplied
  ``La``/``RGBa``) is composited on a white background: a transparent reference
  image then looks like a cut-out on a plain page, not a black silhouette.

JPEG photos carry their rotation in EXIF; `load_image` applies it so the tensor
is the image a viewer shows.

Images larger than `max_image_pixels()` (default `DEFAULT_MAX_IMAGE_PIXELS`, 50
megapixels; the environment variable ``REFRL_MAX_IMAGE_PIXELS`` changes it) are refused
from their header, before any pixel is decoded: a 12000x12000 PNG can be a few hundred
KB on disk and needs gigabytes as a float tensor. `check_image_pixels` is the same check
for images that arrive some other way (e.g. over HTTP). Pillow's own decompression-bomb
guard is raised with that limit, so the variable really allows larger images.

Memory: `load_image` reduces an image of more than `MAX_LOADED_PIXELS` (4096 x 4096)
pixels by the smallest integer factor that brings it under that (a box filter, right
after decoding; JPEGs are decoded at the reduced scale directly), so the float tensor of
an image is at most 200 MB whatever the file. Every model and reward works at far lower
resolutions. The peak of loading the largest image the default allows is measured by
``benchmarks/image_memory.py`` and stated in docs/guides/reliability.md.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps

from refrl.errors import RefrlError
from refrl.runfolder.files import atomic_writer

# The colour transparent pixels are composited on (1.0 = white).
ALPHA_BACKGROUND = 1.0
# Full scale of the 8- and 16-bit integer modes.
UINT8_MAX = 255.0
UINT16_MAX = 65535.0
# Resampling for `size=`: bicubic with antialiasing for images, nearest for masks
# (a binary mask stays binary).
IMAGE_RESIZE_MODE = "bicubic"
MASK_RESIZE_MODE = "nearest"
# ITU-R 601-2 luma, the weights PIL uses for RGB -> L; masks stored as RGB use it.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# Modes PIL converts to RGB itself (no alpha, 8 bits per channel).
_PIL_TO_RGB_MODES = ("CMYK", "YCbCr", "LAB", "HSV", "RGBX")
# Exceptions PIL raises for missing, truncated, corrupt or oversized files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

Size = int | tuple[int, int]
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000  # 50 MP (e.g. 8660x5773) in a file; decoded, then reduced (see below)
# `load_image` reduces larger images to at most this many pixels: 4096x4096, 200 MB as a float32 RGB tensor.
MAX_LOADED_PIXELS = 4096 * 4096
# Pillow's decompression-bomb limit as Pillow ships it; `max_image_pixels` raises it to the refrl limit.
_PILLOW_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 0
MAX_IMAGE_PIXELS_ENV = "REFRL_MAX_IMAGE_PIXELS"
# ImageReadError.reason for a path with no file behind it.
MISSING_FILE = "file not found"


class ImageReadError(RefrlError):
    """An image file that is missing or cannot be decoded; ``reason`` is the short cause."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"image {self.path}: {reason}")


def max_image_pixels() -> int:
    """The largest width x height accepted: ``$REFRL_MAX_IMAGE_PIXELS`` or `DEFAULT_MAX_IMAGE_PIXELS`."""
    from refrl.config import env_int

    limit = env_int(MAX_IMAGE_PIXELS_ENV, DEFAULT_MAX_IMAGE_PIXELS)
    # Pillow refuses images over twice its MAX_IMAGE_PIXELS when opening them (and warns over it);
    # at least our limit, so that a raised limit is not undone by Pillow's 179 M-pixel default.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = max(limit, _PILLOW_MAX_IMAGE_PIXELS)
    return limit


def check_image_pixels(width: int, height: int, source: str | os.PathLike = "image") -> None:
    """Raise ImageReadError (a RefrlError) naming ``source`` when width x height exceeds
    `max_image_pixels()`; call it before decoding or allocating the pixels."""
    limit = max_image_pixels()
    if int(width) * int(height) > limit:
        raise ImageReadError(
            source, f"{width}x{height} = {width * height:,} pixels exceed the limit of {limit:,} pixels "
            f"(set {MAX_IMAGE_PIXELS_ENV} to allow larger images)")


def _min_max(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def _scale_int32(arr: np.ndarray) -> np.ndarray:
    """Mode ``I``: 16-bit data when it fits [0, 65535], else min-max (see module doc)."""
    if arr.size and arr.min() >= 0 and arr.max() <= UINT16_MAX:
        return (arr / UINT16_MAX).astype(np.float32)
    return _min_max(arr.astype(np.float64))


def _scale_float(arr: np.ndarray) -> np.ndarray:
    """Mode ``F``: kept when already in [0, 1], else min-max; NaN -> 0."""
    arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if arr.size == 0 or (arr.min() >= 0.0 and arr.max() <= 1.0):
        return arr
    return _min_max(arr)


def _composite(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``color * a + background * (1 - a)``, alpha compositing on `ALPHA_BACKGROUND`."""
    return color * alpha[..., None] + ALPHA_BACKGROUND * (1.0 - alpha[..., None])


def _from_8bit(arr: np.ndarray, mode: str) -> torch.Tensor:
    """Modes L, LA, RGB, RGBA as `from_pil` reads them: values / 255, alpha composited; float32
    throughout (the same values as via float64: x / 255 rounds alike for every 8-bit x)."""
    src = torch.from_numpy(arr if arr.ndim == 3 else arr[..., None]).permute(2, 0, 1)
    unit = torch.empty(src.shape, dtype=torch.float32).copy_(src).div_(UINT8_MAX)
    n_color = 3 if mode in ("RGB", "RGBA") else 1
    color = unit[:n_color]
    if mode in ("LA", "RGBA"):  # `_composite`, in place
        alpha = unit[n_color]
        color.mul_(alpha).add_((1.0 - alpha).mul_(ALPHA_BACKGROUND))
    color.clamp_(0.0, 1.0)
    if n_color == 1:
        return color.expand(3, -1, -1).contiguous()
    return color if n_color == unit.shape[0] else color.clone()


def from_pil(image: Image.Image) -> torch.Tensor:
    """A PIL image of any supported mode -> float32 tensor (3, H, W) in [0, 1].

    Raises ValueError naming the mode when PIL cannot convert it.
    """
    mode = image.mode
    if mode in ("RGBa", "PA"):
        image, mode = image.convert("RGBA"), "RGBA"
    elif mode == "La":
        image, mode = image.convert("LA"), "LA"
    elif mode == "P":
        mode = "RGBA" if "transparency" in image.info else "RGB"
        image = image.convert(mode)
    elif mode in _PIL_TO_RGB_MODES:
        image, mode = image.convert("RGB"), "RGB"

    if mode in ("L", "LA", "RGB", "RGBA"):  # the common 8-bit modes, in float32 only (no float64 copy)
        return _from_8bit(np.array(image), mode)
    arr = np.asarray(image)
    if mode == "1":
        rgb = np.repeat(arr.astype(np.float32)[..., None], 3, axis=-1)
    elif mode == "L":
        rgb = np.repeat((arr / UINT8_MAX).astype(np.float32)[..., None], 3, axis=-1)
    elif mode == "LA":
        gray = (arr[..., 0] / UINT8_MAX).astype(np.float32)
        alpha = (arr[..., 1] / UINT8_MAX).astype(np.float32)
        rgb = _composite(np.repeat(gray[..., None], 3, axis=-1), alpha)
    elif mode == "RGB":
        rgb = (arr / UINT8_MAX).astype(np.float32)
    elif mode == "RGBA":
        rgb = _composite((arr[..., :3] / UINT8_MAX).astype(np.float32), (arr[..., 3] / UINT8_MAX).astype(np.float32))
    elif mode.startswith("I;16"):
        rgb = np.repeat((arr.astype(np.float64) / UINT16_MAX).astype(np.float32)[..., None], 3, axis=-1)
    elif mode == "I":
        rgb = np.repeat(_scale_int32(arr)[..., None], 3, axis=-1)
    elif mode == "F":
        rgb = np.repeat(_scale_float(arr)[..., None], 3, axis=-1)
    else:
        try:
            return from_pil(image.convert("RGB"))
        except (ValueError, OSError) as e:
            raise ValueError(f"unsupported image mode {mode!r}: {e}") from e
    tensor = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)
    return tensor.clamp_(0.0, 1.0).contiguous()


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """Float tensor in [0, 1], (3, H, W) -> RGB or (1, H, W) / (H, W) -> L; rounds to 8 bits."""
    t = tensor.detach().to("cpu", torch.float32)
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == 2:
        arr = (t.clamp(0, 1) * UINT8_MAX).round().to(torch.uint8).numpy()
        return Image.fromarray(arr, mode="L")
    if t.dim() != 3 or t.shape[0] != 3:
        raise ValueError(f"expected an image tensor (3, H, W), (1, H, W) or (H, W); got shape {tuple(tensor.shape)}")
    arr = (t.clamp(0, 1) * UINT8_MAX).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr, mode="RGB")


def _target_hw(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        hw = (size, size)
    else:
        hw = tuple(int(s) for s in size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"size must be a positive int or (height, width); got {size!r}")
    return hw  # type: ignore[return-value]


def resize(image: torch.Tensor, size: Size, mode: str = IMAGE_RESIZE_MODE) -> torch.Tensor:
    """Resize a (C, H, W) tensor to ``size`` (int: square, or (H, W)); output clamped to [0, 1]."""
    hw = _target_hw(size)
    if tuple(image.shape[-2:]) == hw:
        return image
    kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
    out = F.interpolate(image[None], size=hw, mode=mode, **kwargs)[0]
    return out.clamp_(0.0, 1.0)


def _bomb_error(path: Path, error: Exception) -> ImageReadError:
    """Pillow's decompression-bomb refusal (an image over twice the limit), said as `check_image_pixels` says it."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{int(found.group(1)):,} pixels" if found else "its size"
    return ImageReadError(path, f"{size} exceed the limit of {max_image_pixels():,} pixels "
                                f"(set {MAX_IMAGE_PIXELS_ENV} to allow larger images)")


def reduce_factor(width: int, height: int, max_pixels: int = MAX_LOADED_PIXELS) -> int:
    """The smallest integer f with ceil(width / f) * ceil(height / f) <= ``max_pixels`` (1: keep)."""
    f = max(1, math.ceil(math.sqrt(width * height / max_pixels)))
    while math.ceil(width / f) * math.ceil(height / f) > max_pixels:
        f += 1
    return f


def _reduced(image: Image.Image, max_pixels: int, nearest: bool, file_size: tuple[int, int]) -> Image.Image:
    """``image`` (of ``file_size``, or less when a JPEG was drafted) reduced to ``file_size`` / `reduce_factor`
    (box filter; nearest for masks, so they stay binary)."""
    f = reduce_factor(*file_size, max_pixels)
    if f == 1:
        return image
    size = (math.ceil(file_size[0] / f), math.ceil(file_size[1] / f))
    if nearest or image.size != file_size:  # a drafted JPEG: from its decoded scale to the same final size
        return image.resize(size, Image.Resampling.NEAREST if nearest else Image.Resampling.BOX)
    # Averaging palette indices or bits is meaningless: such modes become the mode `from_pil` makes of them.
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode.startswith("I;16"):
        image = image.convert("I")
    return image.reduce(f)


# EXIF orientations that turn the image by 90 degrees (transpose, rotate 270, transverse, rotate 90).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def _open_decoded(path: Path, max_pixels: int | None = None, nearest: bool = False,
                  size_only: bool = False) -> Image.Image | tuple[int, int]:
    """Open and fully decode (``load()``) an image, EXIF rotation applied; refuses images
    over the pixel limit from the header, before decoding. With ``max_pixels``, a larger
    image is reduced to at most that many (`_reduced`); JPEGs decode at a reduced scale.
    With ``size_only``, the (width, height) a viewer shows, without the copy a rotation makes."""
    if not path.is_file():
        raise ImageReadError(path, MISSING_FILE)
    max_image_pixels()  # raises Pillow's guard to the limit
    try:
        with warnings.catch_warnings():
            # Pillow warns between its limit and twice it; `check_image_pixels` refuses such images itself.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            check_image_pixels(*im.size, source=path)
            file_size = im.size
            if max_pixels is not None and im.width * im.height > max_pixels and im.format == "JPEG":
                f = reduce_factor(*im.size, max_pixels)
                im.draft(None, (math.ceil(im.width / f), math.ceil(im.height / f)))  # scale 1/2, 1/4 or 1/8
            im.load()
            if size_only:
                turned = im.getexif().get(ExifTags.Base.Orientation) in _SWAPPING_ORIENTATIONS
                return (im.height, im.width) if turned else im.size
            if max_pixels is not None:
                return ImageOps.exif_transpose(_reduced(im, max_pixels, nearest, file_size))
            return ImageOps.exif_transpose(im)
    except Image.DecompressionBombError as e:
        raise _bomb_error(path, e) from None
    except _DECODE_ERRORS as e:
        raise ImageReadError(path, f"cannot decode ({type(e).__name__}: {e})") from e


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Fully decode an image file (catches truncated/corrupt files) and return (width, height).

    Raises ImageReadError (a RefrlError) when the file is missing or undecodable.
    """
    size = _open_decoded(Path(path), size_only=True)
    assert isinstance(size, tuple)
    return size


def load_image(path: str | os.PathLike, size: Size | None = None, nearest: bool = False) -> torch.Tensor:
    """Load an image file as float32 (3, H, W) in [0, 1], optionally resized (bicubic, antialiased).

    An image of more than `MAX_LOADED_PIXELS` is reduced first (module doc); ``nearest``
    reduces by nearest neighbour instead of averaging (masks). Raises ImageReadError (a
    RefrlError) naming the file when it is missing or corrupt.
    """
    path = Path(path)
    image = _open_decoded(path, MAX_LOADED_PIXELS, nearest)
    assert isinstance(image, Image.Image)
    try:
        tensor = from_pil(image)
    except ValueError as e:
        raise ImageReadError(path, str(e)) from e
    del image  # the decoded pixels, before a resize allocates more
    return tensor if size is None else resize(tensor, size)


def load_mask(path: str | os.PathLike, size: Size | None = None) -> torch.Tensor:
    """Load a mask as float32 (1, H, W) in [0, 1]: RGB masks reduce by luma; resize is nearest."""
    rgb = load_image(path, nearest=True)
    weights = torch.tensor(LUMA_WEIGHTS, dtype=rgb.dtype).view(3, 1, 1)
    mask = (rgb * weights).sum(0, keepdim=True).clamp_(0.0, 1.0)
    return mask if size is None else resize(mask, size, mode=MASK_RESIZE_MODE)


# Modes a PNG stores as they are; others are converted to RGB by `from_pil` first.
PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")


def _save_png_atomic(image: Image.Image, path: Path) -> Path:
    with atomic_writer(path, "wb") as f:
        image.save(f, format="PNG")
    return path


def save_image(tensor: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a [0, 1] tensor as an 8-bit PNG, atomically (`refrl.runfolder.files.atomic_writer`)."""
    return _save_png_atomic(to_pil(tensor), Path(path))


def save_pil_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write a PIL image as PNG, atomically; modes PNG holds (`PNG_MODES`, incl. 16-bit grey
    and alpha) are kept, others go through `from_pil` (e.g. CMYK -> RGB)."""
    if image.mode not in PNG_MODES:
        image = to_pil(from_pil(image))
    return _save_png_atomic(image, Path(path))
