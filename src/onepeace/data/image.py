"""Image loading and the official evaluation/API transform (spec §6.2, §7).

``preprocess_images`` = RGB -> resize to exactly ``size x size`` with PIL bicubic (what torchvision's
``Resize`` does on PIL images) -> ``/ 255`` -> normalise with the CLIP mean and std, all in float32.

RGB conversion (:func:`to_rgb`) scales high-bit-depth images to 8 bits instead of letting PIL clip them:
16-bit grey (``I;16`` in any byte order, and ``I`` read as 16-bit values) keeps its high byte, which is
what PIL itself keeps of a 16-bit RGB(A) PNG, so the same picture stored either way gives the same pixels;
``F`` is read on the [0, 1] scale when all values lie there, else on PIL's [0, 255] scale. Transparency is
dropped the way the official ``convert("RGB")`` drops the alpha of RGBA: the colour channels are kept
(palette images with transparency go through RGBA, which PIL asks for).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from onepeace.data import is_tensor
from onepeace.errors import InputError

if TYPE_CHECKING:
    import torch

    ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray | torch.Tensor

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def _check_pixels(img: Image.Image, name: str) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.width * img.height > limit:
        raise InputError(
            f"{name}: image is too large ({img.width}x{img.height} pixels, "
            f"limit Image.MAX_IMAGE_PIXELS={limit}); refusing a possible decompression bomb"
        )


def _high_bit_depth(img: Image.Image, name: str) -> np.ndarray:
    """8-bit grey ``[H, W]`` of an ``I;16*``, ``I`` or ``F`` image (see the module docstring for the scales)."""
    if img.mode != "F":
        values = np.asarray(img).astype(np.int64)
        return (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
    values = np.asarray(img, dtype=np.float32)
    if not np.isfinite(values).all():
        raise InputError(f"{name}: float image contains NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 255.0:
        raise InputError(f"{name}: float image values range [{low}, {high}], outside both [0, 1] and [0, 255]")
    return np.rint(values * np.float32(255) if high <= 1.0 else values).astype(np.uint8)


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """Any decoded PIL image -> RGB, with high bit depths scaled to 8 bits and transparency dropped (module doc)."""
    if img.mode == "F" or img.mode == "I" or img.mode.startswith("I;16"):
        return Image.fromarray(_high_bit_depth(img, name), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _open_pil(opener: Any, name: str) -> Image.Image:
    """Open and fully decode an image; every PIL failure becomes an :class:`InputError` naming ``name``."""
    try:
        with Image.open(opener) as img:
            _check_pixels(img, name)
            img.load()
            return to_rgb(img, name)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{name}: image is too large, refusing a possible decompression bomb ({exc})") from exc
    except PermissionError as exc:
        raise InputError(f"{name}: cannot read the file ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{name}: not a readable image (unknown or unsupported format)") from exc
    except Exception as exc:  # any decoder failure on user data is an input problem
        raise InputError(f"{name}: corrupt or truncated image data ({type(exc).__name__}: {exc})") from exc


def _from_path(path: Path, name: str) -> Image.Image:
    if not path.exists():
        raise InputError(f"{name}: image file not found")
    if not path.is_file():
        raise InputError(f"{name}: not a file")
    return _open_pil(path, name)


def _array_to_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    """``[H, W, 3]`` / ``[H, W, 1]`` / ``[H, W]`` uint8 or float in [0, 1] -> uint8 array, same shape."""
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3)):
        raise InputError(f"{name}: array must have shape [H, W, 3] or [H, W], got {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{name}: image is empty, shape {tuple(arr.shape)}")
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{name}: array dtype must be uint8 or float in [0, 1], got {arr.dtype}")
    if not np.isfinite(arr).all():
        raise InputError(f"{name}: array contains NaN or infinite values")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise InputError(
            f"{name}: float array values must lie in [0, 1], got range [{float(arr.min())}, {float(arr.max())}]"
        )
    return np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)


def _from_array(arr: np.ndarray, name: str) -> Image.Image:
    pixels = _array_to_uint8(arr, name)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    mode = "L" if pixels.ndim == 2 else "RGB"
    return Image.fromarray(np.ascontiguousarray(pixels), mode=mode).convert("RGB")


def _from_tensor(tensor: torch.Tensor, name: str) -> Image.Image:
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise InputError(f"{name}: tensor must have shape [3, H, W], got {tuple(tensor.shape)}")
    import torch

    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype != torch.float64:
        tensor = tensor.float()
    return _from_array(tensor.permute(1, 2, 0).numpy(), name)


def load_image(src: ImageInput, name: str | None = None) -> Image.Image:
    """Load one image as an RGB PIL image.

    Accepted: a file path (``str`` / ``os.PathLike``), encoded file ``bytes``, a PIL image, a numpy array
    ``[H, W, 3]`` or ``[H, W]`` (uint8, or float in [0, 1]), or a tensor ``[3, H, W]`` (uint8 or float in
    [0, 1]).
    Float pixels are rounded to the nearest of the 256 levels. ``name`` labels error messages.

    Raises :class:`InputError` for unreadable data (message names the input and the problem) and
    :class:`TypeError` for unsupported Python types.
    """
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        return _from_path(Path(path), f"{name} ({path!r})" if name else f"image {path!r}")
    label = name or "image"
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise InputError(f"{label}: image bytes are empty")
        return _open_pil(io.BytesIO(bytes(src)), label)
    if isinstance(src, Image.Image):
        try:
            src.load()
            return to_rgb(src, label)
        except InputError:
            raise
        except (OSError, ValueError) as exc:
            raise InputError(f"{label}: PIL image cannot be decoded ({exc})") from exc
    if isinstance(src, np.ndarray):
        return _from_array(src, label)
    if is_tensor(src):
        return _from_tensor(src, label)
    raise TypeError(
        f"{label}: unsupported image type {type(src).__name__}; "
        "expected a path, bytes, PIL image, numpy array or torch tensor"
    )


def image_array(img: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> float32 ``[3, size, size]``: bicubic resize, /255, CLIP normalisation (float32 steps)."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    pixels = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    mean = np.asarray(CLIP_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(CLIP_STD, dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((pixels.astype(np.float32) / np.float32(255) - mean) / std)


def _to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> ``FloatTensor [3, size, size]`` (:func:`image_array`)."""
    import torch

    return torch.from_numpy(image_array(img, size))


def preprocess_images(images: Sequence[ImageInput], size: int = 256) -> torch.FloatTensor:
    """Official API image transform on a batch: ``FloatTensor [B, 3, size, size]`` (:func:`image_arrays`)."""
    import torch

    return torch.from_numpy(image_arrays(images, size))


def image_arrays(images: Sequence[ImageInput], size: int = 256) -> np.ndarray:
    """Official API image transform on a batch: float32 ``[B, 3, size, size]``.

    Each image is converted to RGB, resized to exactly ``size x size`` (aspect ratio not kept) with
    PIL bicubic, scaled to [0, 1] and normalised with :data:`CLIP_MEAN` / :data:`CLIP_STD`. Errors
    name the failing input (its path, or ``image i`` for the ``i``-th element).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise InputError(f"size must be a positive int, got {size!r}")
    if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image)):
        raise TypeError(
            f"images must be a sequence of images (e.g. a list), got a single {type(images).__name__}; "
            "wrap it in a list"
        )
    try:
        items = list(images)
    except TypeError as exc:
        raise TypeError(f"images must be a sequence of images, got {type(images).__name__}") from exc
    if not items:
        raise InputError("images is empty: give at least one image")
    return np.stack([image_array(load_image(item, name=f"image {i}"), size) for i, item in enumerate(items)])
