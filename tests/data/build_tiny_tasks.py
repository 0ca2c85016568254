"""Rebuild ``tests/data/tiny_tasks`` from ``tests/data/tiny_pairs``: one TSV per downstream task in the official
layout (spec §6.1), media paths relative to ``tiny_tasks/``. Deterministic (fixed seed); run from anywhere:
``python tests/data/build_tiny_tasks.py``. See ``tiny_tasks/README.md`` for the class lists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).parent
PAIRS = HERE / "tiny_pairs"
OUT = HERE / "tiny_tasks"
SEED = 20240601

GROUPS = ("bird", "insect", "water animal", "land animal")
"""VGGSound-style classes 0..3 (ImageNet-style labels 1..4)."""
_BIRDS = "blackbird crow cuckoo drake duck gander hen heron_greatblue_flying lark nandou owl penguin quetzal rooster"
_BIRDS += " seagull tucan turkey vulture"
_INSECTS = "bee grasshopper hornet xanthia"
_WATER = "frog dolphin orca sea_lion whale"
GROUP_OF = {s: g for g, names in enumerate((_BIRDS, _INSECTS, _WATER)) for s in names.split()}

TAGS = ("bird", "insect", "mammal", "aquatic", "farm animal", "reptile or amphibian")
"""FSD50K-style multi-label classes 0..5."""
_AQUATIC = set("drake duck gander heron_greatblue_flying penguin seagull frog dolphin orca sea_lion whale".split())
_FARM = set("drake duck gander hen rooster turkey bull cow cow_white goat ram sheep sheep_lamb".split())
_COLD = {"frog", "iguana"}

ESC50 = {
    "chirping birds": "blackbird cuckoo lark",
    "cow": "bull cow cow_white",
    "crow": "crow",
    "frog": "frog",
    "hen": "hen",
    "insects": "bee grasshopper hornet xanthia",
    "rooster": "rooster",
    "sheep": "ram sheep sheep_lamb",
}
"""ESC-50 class name -> the clips of that class."""

VQA_ANSWERS = ("bird", "insect", "mammal", "reptile", "amphibian", "yes", "no", "fish")
"""VQA answer vocabulary: answer id = position."""
_NO_FLY = {"nandou", "penguin"}
_SHORT_FLY = {"hen", "rooster", "turkey"}


def read_pairs(name: str) -> list[list[str]]:
    lines = (PAIRS / name).read_text(encoding="utf-8").splitlines()
    return [line.split("\t") for line in lines[1:] if line]


def stem(path: str) -> str:
    return Path(path).stem


def animal(caption: str) -> str:
    """``"A brown hen."`` -> ``"brown hen"``."""
    text = caption.rstrip(".")
    for article in ("A ", "An "):
        if text.startswith(article):
            return text[len(article) :]
    return text


def article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def group(name: str) -> int:
    return GROUP_OF.get(name, 3)


def tags(name: str) -> list[int]:
    out = {0 if group(name) == 0 else 1 if group(name) == 1 else 2}
    if name in ("frog", "iguana"):
        out.discard(2)
    out |= {3} if name in _AQUATIC else set()
    out |= {4} if name in _FARM else set()
    out |= {5} if name in _COLD else set()
    return sorted(out)


def write_tsv(name: str, header: list[str], rows: list[list[object]]) -> None:
    lines = ["\t".join(header)] + ["\t".join(str(v) for v in row) for row in rows]
    (OUT / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def audio_tasks(audio: list[list[str]], rng: np.random.Generator) -> None:
    header = ["uniq_id", "audio", "text", "duration"]
    clips = [(uid, f"../tiny_pairs/{path}", stem(path), caption, dur) for uid, path, caption, dur in audio]
    write_tsv("vggsound.tsv", header, [[u, p, group(s), d] for u, p, s, _, d in clips])
    write_tsv(
        "fsd50k.tsv",
        ["uniq_id", "audio", "refs", "duration"],
        [[u, p, ",".join(str(t) for t in tags(s)), d] for u, p, s, _, d in clips],
    )
    esc = {s: name for name, stems in ESC50.items() for s in stems.split()}
    write_tsv("esc50.tsv", header, [[u, p, esc[s], d] for u, p, s, _, d in clips if s in esc])
    names = [animal(c) for *_, c, _ in clips]
    rows = []
    for i, (u, p, _, caption, d) in enumerate(clips):
        if i % 2 == 0:
            others = [n for n in dict.fromkeys(names) if n != animal(caption)]
            picks = [others[k] for k in rng.choice(len(others), size=3, replace=False)]
            answers = [animal(caption), *picks]
            question = "What animal makes this sound?"
        else:
            answers, question = list(GROUPS), "Which kind of animal is heard?"
        order = rng.permutation(4)
        answers = [answers[k] for k in order]
        correct = int(np.flatnonzero(order == 0)[0])
        choice = str(correct) if i % 2 == 0 else answers[correct]
        rows.append([u, p, "&&&".join([question, *answers, choice]), d])
    write_tsv("aqa.tsv", header, rows)


def vqa_refs(name: str, question: int) -> dict[str, float]:
    if question == 0:
        kind = {0: "bird", 1: "insect", 2: "mammal"}.get(group(name), "mammal")
        if name == "frog":
            return {"amphibian": 1.0, "reptile": 0.3}
        if name == "iguana":
            return {"reptile": 1.0}
        return {kind: 1.0, "fish": 0.3} if name in ("dolphin", "orca", "whale") else {kind: 1.0}
    if question == 1:
        if name in _SHORT_FLY:
            return {"no": 0.6, "yes": 0.6}
        return {"yes": 1.0} if group(name) in (0, 1) and name not in _NO_FLY else {"no": 1.0}
    return {"yes": 1.0} if name in _AQUATIC else {"no": 1.0}


def image_tasks(images: list[list[str]], rng: np.random.Generator) -> None:
    items = [(uid, f"../tiny_pairs/{path}", stem(path), caption) for uid, path, caption in images]
    write_tsv("imagenet.tsv", ["image", "label"], [[p, group(s) + 1] for _, p, s, _ in items])
    questions = ("What kind of animal is this?", "Can this animal fly?", "Does this animal live in water?")
    rows = []
    for i, (u, p, s, _) in enumerate(items):
        refs = vqa_refs(s, i % 3)
        text = "&&".join(f"{a}|!+{VQA_ANSWERS.index(a)}|!+{c:.1f}" for a, c in refs.items())
        rows.append([u, p, questions[i % 3], text])
    write_tsv("vqa.tsv", ["uniq_id", "image", "question", "refs"], rows)
    rows = []
    for i in range(24):
        a, b = rng.choice(len(items), size=2, replace=False)
        ga, gb = group(items[a][2]), group(items[b][2])
        template = i % 3
        g = int(rng.integers(0, 4)) if rng.random() < 0.5 else (ga, gb, ga)[template]
        noun = GROUPS[g]
        if template == 0:
            text, label = f"The left image shows {article(noun)}.", ga == g
        elif template == 1:
            text, label = f"The right image shows {article(noun)}.", gb == g
        else:
            text, label = f"Both images show {article(noun)}.", ga == g and gb == g
        rows.append([i, text, items[a][1], items[b][1], label])
    write_tsv("nlvr2.tsv", ["uniq_id", "text", "image1", "image2", "label"], rows)
    grounding(items, rng)


def grounding(items: list[tuple[str, str, str, str]], rng: np.random.Generator) -> None:
    """Paste every second stamp at a random place and scale into a white canvas of random size."""
    (OUT / "grounding").mkdir(parents=True, exist_ok=True)
    rows = []
    for *_, name, caption in items[::2]:
        width, height = (int(v) for v in rng.integers(96, 161, size=2))
        side = int(rng.integers(32, 65))
        x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        stamp = Image.open(PAIRS / "images" / f"{name}.png").convert("RGB").resize((side, side), Image.BICUBIC)
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        canvas.paste(stamp, (x, y))
        canvas.save(OUT / "grounding" / f"{name}.png", optimize=True)
        rows.append([f"grounding/{name}.png", caption, f"{x},{y},{x + side},{y + side}"])
    write_tsv("refcoco.tsv", ["image", "text", "region_coord"], rows)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    rng = np.random.default_rng(SEED)
    audio_tasks(read_pairs("audio_text.tsv"), rng)
    image_tasks(read_pairs("image_text.tsv"), rng)


if __name__ == "__main__":
    main()
