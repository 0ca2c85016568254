"""``onepeace embed``: embed files, folders and texts into ``OUT.npy`` + ``OUT.jsonl``.

Heavy modules (numpy, torch, the model) are imported only when the command runs. The default ``--model`` is
``onepeace-small``, the small pretrained model shipped with the package; ``--model`` takes an official ``.pt``, a
converted folder or another variant name.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".oga", ".mp3"})
TEXT_EXTENSIONS = frozenset({".txt"})
DEFAULT_MODEL = "onepeace-small"
MODALITY_ORDER = ("text", "image", "audio")


@dataclass(frozen=True)
class Item:
    """One thing to embed: ``payload`` is the text or the file path handed to the model."""

    modality: str
    payload: str
    source: str
    line: int | None = None


@dataclass
class Collected:
    """Items in output order, plus what was left out before embedding."""

    items: list[Item]
    ignored: int = 0
    skipped: int = 0


def classify(path: Path) -> str | None:
    """``"image"``, ``"audio"``, ``"text"`` (a ``.txt`` file) or ``None`` for an unsupported extension."""
    ext = path.suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in AUDIO_EXTENSIONS:
        return "audio"
    return "text" if ext in TEXT_EXTENSIONS else None


@dataclass(frozen=True)
class Walked:
    """A name found in a folder; ``problem`` says why it cannot be read as a file (``None`` for a regular file)."""

    path: Path
    problem: str | None = None


_SPECIAL_FILES = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_problem(path: Path) -> str | None:
    """Why ``path`` (symbolic links followed) cannot be read as a regular file, or ``None`` when it can.

    Only ``stat`` is called, never ``open``: opening a FIFO blocks and a device such as ``/dev/zero`` never ends.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop"
        if exc.errno == errno.ENOENT:
            return "a broken symbolic link" if os.path.islink(path) else "no such file or folder"
        return f"cannot read it: {exc.strerror or exc}"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "a special file")
    return f"not a regular file ({kind})"


def walk(root: Path) -> list[Walked]:
    """Every name below ``root`` other than folders, sorted by path, with what keeps it from being read.

    Symbolic links to folders are not followed; a link to a file is checked through to its target, so FIFOs,
    devices, broken links and link loops come back with their ``problem`` instead of being opened.
    """
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            found.append(Walked(path, file_problem(path)))
    return sorted(found, key=lambda w: w.path.parts)


def input_error(name: str) -> OSError | ValueError:
    """The error for a named input that is neither a folder nor a regular file."""
    if not os.path.lexists(name):
        return FileNotFoundError(f"no such file or folder: {name}")
    return ValueError(f"{name}: {file_problem(Path(name))}")


def _text_lines(path: Path, out: Collected, strict: bool) -> None:
    """Append one text item per non-empty line; an undecodable file is skipped (or raises if ``strict``)."""
    try:
        content = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        reason = f"not a UTF-8 text file ({exc.reason})" if isinstance(exc, UnicodeDecodeError) else str(exc)
        if strict:
            raise ValueError(f"{path}: {reason}") from None
        warn(f"skipped {path}: {reason}")
        out.skipped += 1
        return
    for number, line in enumerate(content.splitlines(), start=1):
        if line.strip():
            out.items.append(Item("text", line.strip(), str(path), number))


def _add_file(path: Path, out: Collected, explicit: bool, problem: str | None = None) -> None:
    modality = classify(path)
    if modality is None:
        if explicit:
            supported = sorted(IMAGE_EXTENSIONS | AUDIO_EXTENSIONS | TEXT_EXTENSIONS)
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; supported: {' '.join(supported)}")
        out.ignored += 1
    elif problem is not None:
        warn(f"skipped {path}: {problem}")
        out.skipped += 1
    elif modality == "text":
        _text_lines(path, out, strict=False)
    else:
        out.items.append(Item(modality, str(path), str(path)))


def collect(inputs: list[str], texts: list[str], text_files: list[str]) -> Collected:
    """Items from positional inputs (folders walked, sorted), then ``--text`` values, then ``--text-file`` lines."""
    out = Collected(items=[])
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            for found in walk(path):
                _add_file(found.path, out, explicit=False, problem=found.problem)
        elif path.is_file():
            _add_file(path, out, explicit=True)
        else:
            raise input_error(name)
    for i, text in enumerate(texts):
        if not text.strip():
            raise ValueError(f"--text value {i + 1} is empty")
        out.items.append(Item("text", text, "text"))
    for name in text_files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no such text file: {name}")
        _text_lines(path, out, strict=True)
    return out


def warn(message: str) -> None:
    """One warning line on stderr that does not break a progress bar."""
    from tqdm import tqdm

    tqdm.write(f"onepeace: warning: {message}", file=sys.stderr)


def failure_reason(item: Item, exc: BaseException) -> str:
    """The error message without the ``"image 0 ('path'): "`` label the preprocessing puts in front."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    for prefix in (f"{item.modality} 0 ({item.payload!r}): ", f"{item.modality} 0: "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def embed_batch(model: Any, modality: str, payloads: list[str]) -> Any:
    """``[B, D]`` float32 numpy embeddings of a single-modality batch (re-normalised if computed in low precision)."""
    import torch
    import torch.nn.functional as F

    out = getattr(model.embed(**{modality: payloads}), modality).detach()
    if out.dtype != torch.float32:
        out = F.normalize(out.float(), dim=-1)
    return out.cpu().numpy()


def embed_items(model: Any, items: list[Item], batch_size: int, quiet: bool, debug: bool) -> tuple[dict, int]:
    """Embed ``items`` batch by batch (one modality per batch): ``({item index: vector}, number skipped)``.

    A failing batch is retried item by item; an item that still fails is skipped with a warning.
    """
    import traceback

    from tqdm import tqdm

    vectors: dict[int, Any] = {}
    skipped = 0
    disable = quiet or not sys.stderr.isatty()
    with tqdm(total=len(items), file=sys.stderr, disable=disable, unit="item", desc="embedding") as bar:
        for modality in MODALITY_ORDER:
            indices = [i for i, item in enumerate(items) if item.modality == modality]
            for start in range(0, len(indices), batch_size):
                batch = indices[start : start + batch_size]
                try:
                    vectors.update(zip(batch, embed_batch(model, modality, [items[i].payload for i in batch])))
                except Exception:
                    for i in batch:
                        try:
                            vectors[i] = embed_batch(model, modality, [items[i].payload])[0]
                        except Exception as exc:  # one bad input never stops the run
                            if debug:
                                traceback.print_exc()
                            warn(f"skipped {items[i].source}: {failure_reason(items[i], exc)}")
                            skipped += 1
                bar.update(len(batch))
    return vectors, skipped


def output_paths(prefix: str) -> tuple[Path, Path]:
    """``(PREFIX.npy, PREFIX.jsonl)``; a prefix given with one of those suffixes is used without it."""
    for suffix in (".npy", ".jsonl"):
        if prefix.endswith(suffix) and len(prefix) > len(suffix):
            prefix = prefix[: -len(suffix)]
            break
    npy, jsonl = Path(prefix + ".npy"), Path(prefix + ".jsonl")
    try:
        npy.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create the output folder {npy.parent}: {exc.strerror or exc}") from None
    return npy, jsonl


def write_outputs(items: list[Item], vectors: dict[int, Any], npy: Path, jsonl: Path) -> tuple[int, int]:
    """Write the embedded rows (in item order) and their records; returns the array shape."""
    import numpy as np

    order = sorted(vectors)
    array = np.stack([vectors[i] for i in order]).astype(np.float32)
    with open(npy, "wb") as f:
        np.save(f, array)
    with open(jsonl, "w", encoding="utf-8") as f:
        for row, i in enumerate(order):
            item = items[i]
            record: dict[str, Any] = {"index": row, "modality": item.modality, "source": item.source}
            if item.modality == "text":
                record["text"] = item.payload
            if item.line is not None:
                record["line"] = item.line
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return array.shape


def load_model(name: str, device: str | None, dtype: str | None, image_size: int | None) -> Any:
    """``onepeace.load`` plus a move to ``device``; a device torch cannot use becomes a ``ValueError``."""
    import torch

    import onepeace
    from onepeace.pretrained import SHIPPED
    from onepeace.quantize import check_int8_device, is_int8_dtype
    from onepeace.variants import VARIANTS

    if device is not None:
        try:
            torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"cannot use device {device!r}: {' '.join(str(exc).split())}") from None
        if dtype is not None and is_int8_dtype(dtype):
            check_int8_device(device)  # before the load, which may take minutes
    model = onepeace.load(name, image_size=image_size, dtype=dtype)
    if name in VARIANTS and name not in SHIPPED:  # onepeace.load warns about a shipped variant without its weights
        warn(f"{name} is a randomly initialised variant: its embeddings carry no meaning")
    if device is not None:
        try:
            model = model.to(device)
        except (RuntimeError, AssertionError) as exc:
            raise ValueError(f"cannot use device {device!r}: {' '.join(str(exc).split())}") from None
    return model


def run(args: argparse.Namespace) -> int:
    """The ``embed`` command; returns the exit code (1 when nothing could be embedded)."""
    if not (args.inputs or args.text or args.text_file):
        raise ValueError("nothing to embed: give files, folders, --text or --text-file")
    npy, jsonl = output_paths(args.out)
    found = collect(args.inputs, args.text or [], args.text_file or [])
    model = load_model(args.model, args.device, args.dtype, args.image_size) if found.items else None
    if model is not None:
        model.long_audio = args.long_audio
    vectors, failed = embed_items(model, found.items, args.batch_size, args.quiet, args.debug)
    skipped = found.skipped + failed
    if not vectors:
        print(
            f"onepeace: error: nothing could be embedded ({skipped} skipped, {found.ignored} ignored)", file=sys.stderr
        )
        return 1
    shape = write_outputs(found.items, vectors, npy, jsonl)
    counts = {m: sum(1 for i in vectors if found.items[i].modality == m) for m in MODALITY_ORDER}
    per_modality = ", ".join(f"{m} {n}" for m, n in counts.items())
    print(
        f"embedded {shape[0]} ({per_modality}); skipped {skipped}; ignored {found.ignored} unsupported "
        f"file(s); wrote {npy} [{shape[0]} x {shape[1]}] and {jsonl}"
    )
    return 0


def add_long_audio_argument(p: argparse.ArgumentParser) -> None:
    """``--long-audio first|windows`` (see :meth:`onepeace.OnePeace.embed`)."""
    p.add_argument(
        "--long-audio",
        choices=("first", "windows"),
        default="first",
        help="clips longer than the model's maximum (15 s for the released model): embed the first part, as the "
        "official code does (first, the default), or every window of that length, pooled (windows)",
    )


def _positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``embed`` subcommand."""
    p = subparsers.add_parser(
        "embed",
        parents=parents,
        help="embed images, audio and texts into OUT.npy + OUT.jsonl",
        description="Embed files, folders and texts. Folders are walked recursively in sorted order; files are "
        "classified by extension (images: "
        + " ".join(sorted(IMAGE_EXTENSIONS))
        + "; audio: "
        + " ".join(sorted(AUDIO_EXTENSIONS))
        + "; .txt: one text per non-empty line). Rows follow the order: "
        "positional inputs, then --text values, then --text-file lines. Unreadable files are skipped with a "
        "warning; files with other extensions inside folders are ignored.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image, audio or .txt files, or folders")
    p.add_argument("--text", action="append", metavar="STR", help="a text to embed (repeatable)")
    p.add_argument("--text-file", action="append", metavar="FILE", help="UTF-8 file, one text per line")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="PATH_OR_VARIANT",
        help=f"official .pt, converted folder or variant name (default: {DEFAULT_MODEL}, the small "
        "pretrained model shipped with the package)",
    )
    p.add_argument(
        "--out",
        default="embeddings",
        metavar="OUT_PREFIX",
        help="writes OUT_PREFIX.npy (float32 [N, D]) and OUT_PREFIX.jsonl (default: embeddings)",
    )
    p.add_argument("--batch-size", type=_positive, default=16, metavar="N", help="items per batch (default: 16)")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument("--dtype", help="parameter dtype: float32, bfloat16, float16 or int8 (CPU only; default: as stored)")
    p.add_argument(
        "--image-size",
        type=_positive,
        metavar="PIXELS",
        help="input image side, a multiple of 16 (default: the model's)",
    )
    add_long_audio_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)
