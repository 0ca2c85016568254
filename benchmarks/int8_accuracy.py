"""Cosine between int8 and float32 embeddings of real images, sounds and sentences, per model and modality.

Each model is loaded once in float32 and converted with ``onepeace.quantize.quantize_int8`` (what
``onepeace.load(name, dtype="int8")`` does; converting the same instance keeps a randomly initialised variant's
weights); both embed the same files and sentences with ``OnePeace.embed`` (the official preprocessing, batches of
``--batch-size``), and the script prints the lowest, median and mean cosine over the items of each modality.

Example (Tux Paint stamps give photos-like drawings and sound effects; any folders of images and audio work)::

    python benchmarks/int8_accuracy.py --images /usr/share/tuxpaint/stamps --audio /usr/share/tuxpaint/stamps \\
        --models onepeace-small onepeace-base --threads 2
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

import onepeace

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
AUDIO_SUFFIXES = {".ogg", ".wav", ".flac", ".mp3"}
SENTENCES = (
    "A frog sitting on a leaf.",
    "two dogs playing in the snow",
    "the sound of a church bell",
    "a red sports car parked by the road",
    "someone is playing the piano",
    "a spoonful of sugar",
    "rain falling on a tin roof",
    "an astronaut floating in space",
    "A bowl of fresh fruit on a wooden table.",
    "children laughing in a playground",
    "a helicopter flying overhead",
    "the number seven",
    "thunder and lightning at night",
    "a cat asleep on a sofa",
    "a man speaking into a microphone",
    "waves crashing on the beach",
)


def pick(roots: Sequence[Path], suffixes: set[str], count: int, seed: int) -> list[str]:
    """``count`` files with one of ``suffixes`` under ``roots`` (files or folders), drawn with ``seed``."""
    found = sorted(
        {str(p) for root in roots for p in ([root] if root.is_file() else root.rglob("*")) if p.suffix in suffixes}
    )
    return random.Random(seed).sample(found, min(count, len(found)))


def cosines(name: str, inputs: dict[str, list[str]], batch_size: int) -> dict[str, list[float]]:
    """Per modality, the cosine of each item's int8 embedding to its float32 embedding."""
    from onepeace.quantize import quantize_int8

    fp32 = onepeace.load(name)
    int8 = quantize_int8(fp32)
    out = {}
    for modality, items in inputs.items():
        a = getattr(fp32.embed(**{modality: items}, batch_size=batch_size), modality)
        b = getattr(int8.embed(**{modality: items}, batch_size=batch_size), modality)
        out[modality] = torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Print one markdown row per (model, modality)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", nargs="+", type=Path, default=[], help="image files or folders")
    p.add_argument("--audio", nargs="+", type=Path, default=[], help="audio files or folders")
    p.add_argument("--texts", type=Path, default=None, help="UTF-8 file, one sentence per line (default: built in)")
    p.add_argument("--count", type=int, default=32, help="images and clips drawn from the folders")
    p.add_argument("--models", nargs="+", default=["onepeace-small", "onepeace-base"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    texts = args.texts.read_text().split("\n") if args.texts else list(SENTENCES)
    inputs = {
        "image": pick(args.images, IMAGE_SUFFIXES, args.count, args.seed),
        "audio": pick(args.audio, AUDIO_SUFFIXES, args.count, args.seed),
        "text": [t for t in texts if t.strip()],
    }
    inputs = {m: items for m, items in inputs.items() if items}
    print("| model | modality | items | cosine min | cosine median | cosine mean |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.models:
        for modality, values in cosines(name, inputs, args.batch_size).items():
            print(
                f"| {name} | {modality} | {len(values)} | {min(values):.5f} | {statistics.median(values):.5f} "
                f"| {statistics.fmean(values):.5f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
