"""Image transforms of the downstream tasks (spec §6.2), with PIL, numpy and torch only.

Every random draw comes from the ``numpy.random.Generator`` passed in, so a transform is a pure function of its
inputs and the generator state. Every tensor is CLIP-normalised float32 ``[3, S, S]`` (batches ``[B, 3, S, S]``).

* Plain resize to ``S x S`` (bicubic, aspect not kept): every evaluation, retrieval training, VQA.
* NLVR2 training (:func:`nlvr2_train`): resize, ColorJitter(0.4, 0.4, 0.4, 0) with p 0.5, Gaussian blur with p 0.5
  (radius U(0.1, 2)), horizontal flip with p 0.5, RandAugment (2 ops, magnitude 7). As in the official code each
  image is flipped on its own and the statement is left unchanged: NLVR2's "left"/"right" words mostly name the
  first/second image of the pair, which a flip does not move, so swapping them would corrupt more statements than
  it fixes.
* RefCOCO (:func:`grounding_transform`): resize to ``S x S`` (training adds Gaussian blur with p 0.5); the box is
  scaled by the same factors and divided by ``S`` -> normalised corners in [0, 1].
* ImageNet: training (:func:`imagenet_train`) random resized crop (scale (0.08, 1), ratio (3/4, 4/3), bicubic),
  horizontal flip p 0.5, RandAugment (2 ops, magnitude 9), random erasing p 0.25 (per-pixel normal noise);
  evaluation (:func:`imagenet_eval`) resize the short side to ``S`` and take the centre ``S x S`` crop. Batches may
  then be mixed (:func:`mix_batch`).

RandAugment (:func:`rand_augment`): ``num_ops`` ops drawn uniformly with replacement from :data:`RAND_AUGMENT_OPS`,
each applied with probability 0.5 at level ``m = magnitude / 10`` and a random sign: brightness and sharpness
factor ``1 +- 0.9 m``, shear ``+- 0.3 m``, translation ``+- 0.45 m`` of the image side, rotation ``+- 30 m``
degrees; geometric ops use bilinear sampling and fill with grey (128, 128, 128).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from onepeace.data.image import CLIP_MEAN, CLIP_STD, _to_tensor
from onepeace.data.pretrain_examples import sample_crop_box

RAND_AUGMENT_OPS: tuple[str, ...] = (
    "identity",
    "equalize",
    "brightness",
    "sharpness",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
)
FILL = (128, 128, 128)
BLUR_RADIUS = (0.1, 2.0)
IMAGENET_SCALE = (0.08, 1.0)
IMAGENET_RATIO = (3 / 4, 4 / 3)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> CLIP-normalised ``float32 [3, H, W]`` (no resize)."""
    pixels = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (pixels.float().div(255) - mean) / std


def resize_square(img: Image.Image, size: int) -> torch.Tensor:
    """Plain evaluation transform: bicubic resize to ``size x size`` -> ``float32 [3, size, size]``."""
    return _to_tensor(img, size)


def color_jitter(
    img: Image.Image, rng: np.random.Generator, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4
) -> Image.Image:
    """Brightness, contrast and saturation factors drawn from ``U(1 - s, 1 + s)``, applied in random order."""
    ops = (
        (ImageEnhance.Brightness, brightness),
        (ImageEnhance.Contrast, contrast),
        (ImageEnhance.Color, saturation),
    )
    for k in rng.permutation(len(ops)):
        enhancer, strength = ops[int(k)]
        factor = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength)
        img = enhancer(img).enhance(float(factor))
    return img


def gaussian_blur(img: Image.Image, rng: np.random.Generator, radius: tuple[float, float] = BLUR_RADIUS) -> Image.Image:
    """PIL Gaussian blur with a radius drawn from ``U(radius)``."""
    return img.filter(ImageFilter.GaussianBlur(float(rng.uniform(radius[0], radius[1]))))


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=FILL)


def apply_op(img: Image.Image, name: str, level: float, sign: float) -> Image.Image:
    """One RandAugment op of :data:`RAND_AUGMENT_OPS` at ``level`` in [0, 1] with ``sign`` +-1."""
    w, h = img.size
    if name == "identity":
        return img
    if name == "equalize":
        return ImageOps.equalize(img)
    if name == "brightness":
        return ImageEnhance.Brightness(img).enhance(1.0 + sign * 0.9 * level)
    if name == "sharpness":
        return ImageEnhance.Sharpness(img).enhance(1.0 + sign * 0.9 * level)
    if name == "shear_x":
        return _affine(img, (1.0, sign * 0.3 * level, 0.0, 0.0, 1.0, 0.0))
    if name == "shear_y":
        return _affine(img, (1.0, 0.0, 0.0, sign * 0.3 * level, 1.0, 0.0))
    if name == "translate_x":
        return _affine(img, (1.0, 0.0, sign * 0.45 * level * w, 0.0, 1.0, 0.0))
    if name == "translate_y":
        return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, sign * 0.45 * level * h))
    if name == "rotate":
        return img.rotate(sign * 30.0 * level, resample=Image.BILINEAR, fillcolor=FILL)
    raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(RAND_AUGMENT_OPS)}")


def rand_augment(
    img: Image.Image, rng: np.random.Generator, num_ops: int = 2, magnitude: float = 7, prob: float = 0.5
) -> Image.Image:
    """RandAugment as described in the module docstring; ``magnitude`` is out of 10."""
    for k in rng.integers(0, len(RAND_AUGMENT_OPS), size=num_ops):
        apply, sign = rng.random() < prob, 1.0 if rng.random() < 0.5 else -1.0
        if apply:
            img = apply_op(img, RAND_AUGMENT_OPS[int(k)], magnitude / 10.0, sign)
    return img


def nlvr2_train(img: Image.Image, size: int, rng: np.random.Generator) -> torch.Tensor:
    """NLVR2 training transform of one image -> ``float32 [3, size, size]`` (see the module docstring)."""
    img = img.resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        img = color_jitter(img, rng)
    if rng.random() < 0.5:
        img = gaussian_blur(img, rng)
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    return to_tensor(rand_augment(img, rng, num_ops=2, magnitude=7))


def scale_box(box: tuple[float, float, float, float], width: int, height: int, size: int) -> tuple[float, ...]:
    """Pixel box ``(x0, y0, x1, y1)`` of a ``width x height`` image -> its corners after the resize to
    ``size x size`` divided by ``size``, clamped to [0, 1]."""
    sx, sy = size / width, size / height
    x0, y0, x1, y1 = box
    scaled = (x0 * sx / size, y0 * sy / size, x1 * sx / size, y1 * sy / size)
    return tuple(min(1.0, max(0.0, v)) for v in scaled)


def grounding_transform(
    img: Image.Image, box: tuple[float, float, float, float], size: int, train: bool, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """RefCOCO transform -> ``(image float32 [3, size, size], box float32 [4] normalised (x0, y0, x1, y1),
    original (width, height))``; training adds a Gaussian blur with p 0.5."""
    width, height = img.size
    img = img.resize((size, size), Image.BICUBIC)
    if train and rng.random() < 0.5:
        img = gaussian_blur(img, rng)
    target = torch.tensor(scale_box(box, width, height, size), dtype=torch.float32)
    return to_tensor(img), target, (width, height)


def random_erasing(
    x: torch.Tensor,
    rng: np.random.Generator,
    prob: float = 0.25,
    scale: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """With probability ``prob`` replace one random rectangle of ``x`` ``[C, H, W]`` (area fraction ``U(scale)``,
    log-uniform aspect in ``ratio``, up to 10 tries) by standard normal noise; returns a new tensor ``[C, H, W]``."""
    if rng.random() >= prob:
        return x
    c, h, w = x.shape
    for _ in range(10):
        area = h * w * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        eh, ew = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < eh < h and 0 < ew < w:
            top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            out = x.clone()
            noise = rng.standard_normal((c, eh, ew)).astype(np.float32)
            out[:, top : top + eh, left : left + ew] = torch.from_numpy(noise)
            return out
    return x


def imagenet_train(img: Image.Image, size: int, rng: np.random.Generator, magnitude: float = 9) -> torch.Tensor:
    """ImageNet training transform -> ``float32 [3, size, size]`` (see the module docstring)."""
    left, top, w, h = sample_crop_box(img.width, img.height, IMAGENET_SCALE, IMAGENET_RATIO, rng)
    img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img = rand_augment(img, rng, num_ops=2, magnitude=magnitude)
    return random_erasing(to_tensor(img), rng, prob=0.25)


def imagenet_eval(img: Image.Image, size: int) -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic), centre crop ``size x size`` -> ``float32 [3, size, size]``."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, max(size, int(size * h / w))
    else:
        new_w, new_h = max(size, int(size * w / h)), size
    img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)
    return to_tensor(img.crop((left, top, left + size, top + size)))


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """``labels`` int64 ``[B]`` -> float32 ``[B, C]``: ``1 - smoothing + smoothing / C`` at the label,
    ``smoothing / C`` elsewhere (rows sum to 1)."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32)
    return out.scatter_(1, labels.view(-1, 1).long(), 1.0 - smoothing + off)


def _cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of a box covering about ``1 - lam`` of the image, centred at a uniform pixel."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = min(max(cy - ch // 2, 0), height), min(max(cy + ch // 2, 0), height)
    x0, x1 = min(max(cx - cw // 2, 0), width), min(max(cx + cw // 2, 0), width)
    return y0, y1, x0, x1


def mix_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    alphas: tuple[float, float],
    label_smoothing: float,
    rng: np.random.Generator,
    switch_prob: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mixup / cutmix: ``images [B, 3, S, S]``, ``labels`` int64 ``[B]`` -> ``(images [B, 3, S, S],
    soft targets float32 [B, C])``; every target row sums to 1.

    ``alphas = (mixup, cutmix)``; 0 disables one. With both on, cutmix is chosen with probability
    ``switch_prob``. ``lam ~ Beta(alpha, alpha)``; example ``b`` is mixed with example ``B - 1 - b`` (the flipped
    batch). Mixup: ``lam * x + (1 - lam) * x_flipped``. Cutmix: a box of about ``1 - lam`` of the area is pasted
    from the flipped batch and ``lam`` becomes the exact kept area fraction. Targets are
    ``lam * t + (1 - lam) * t_flipped`` with ``t`` the label-smoothed one-hot rows (:func:`smooth_one_hot`).
    With both alphas 0 the images are returned unchanged with the smoothed one-hot targets.
    """
    mixup_alpha, cutmix_alpha = alphas
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    flipped = images.flip(0)
    if use_cutmix:
        height, width = images.shape[-2:]
        y0, y1, x0, x1 = _cutmix_box(height, width, lam, rng)
        mixed = images.clone()
        mixed[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    else:
        mixed = images * lam + flipped * (1.0 - lam)
    return mixed, targets * lam + targets.flip(0) * (1.0 - lam)
