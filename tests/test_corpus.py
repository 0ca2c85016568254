"""The demo corpus builder: split rule, captions, media conversion, idempotence, bad items, the real sources."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from onepeace.cli import main
from onepeace.corpus.build import BuildOptions, build_demo_corpus
from onepeace.corpus.items import SourceItem, ZeroShotTask, concept_of, is_heldout
from onepeace.corpus.media import trim_silence, write_clip, write_image
from onepeace.corpus.sources.emoji import describe

PAIRS = Path(__file__).parent / "data" / "tiny_pairs"


def test_split_rule_is_a_function_of_the_key_with_the_asked_fraction() -> None:
    keys = [f"src/item{i}" for i in range(20000)]
    held = [k for k in keys if is_heldout(k, 0.15)]
    assert 0.14 < len(held) / len(keys) < 0.16
    assert held == [k for k in keys if is_heldout(k, 0.15)]  # deterministic
    assert set(k for k in keys if is_heldout(k, 0.05)) <= set(held)  # a smaller fraction only removes items
    # sha1("a")[:8] = 86f7e437 = 2264392759 -> held out once the threshold passes 2264392759 / 2**32 = 0.5272
    assert not is_heldout("a", 0.527) and is_heldout("a", 0.528)
    with pytest.raises(ValueError, match="heldout_fraction"):
        is_heldout("a", 1.0)


@pytest.mark.parametrize(
    ("text", "concept"),
    [
        ("A frog.", "frog"),
        ("An old Chinese sailing ship.", "old chinese sailing ship"),
        ("A pair of blue jeans.", "blue jeans"),
        ("Adenium (Desert Rose)", "adenium desert rose"),
        ("the number seven", "number seven"),
    ],
)
def test_concept_names(text: str, concept: str) -> None:
    assert concept_of(text) == concept


def test_emoji_captions_and_concepts() -> None:
    assert describe("KEYCAP 7", "Symbols") == ("an emoji of the digit seven on a key", "seven")
    assert describe("Egypt Flag", "Flags") == ("an emoji of the flag of egypt", "flag of egypt")
    assert describe("FROG FACE", "Animals & Nature") == ("an emoji of frog face", "frog face")
    assert describe("MUSICAL KEYBOARD", "Objects")[1] == "piano"


@pytest.mark.slow
def test_numerals_are_drawn_reproducibly_with_their_digit(tmp_path: Path) -> None:
    from onepeace.corpus.sources.numerals import FONT_DIR, NumeralSource

    assert FONT_DIR.is_dir(), "apt-get install fonts-dejavu-core"
    source = NumeralSource(render_dir=tmp_path / "a")
    assert source.prepare() is None
    items = list(source.items())
    assert len(items) == len({i.key for i in items}) == 960
    seven = next(i for i in items if i.key == "numerals/seven_number_DejaVuSerif_red")
    assert (seven.caption, seven.concept, dict(seven.labels)) == ("the number seven", "seven", {"numerals": "seven"})
    again = next(i for i in NumeralSource(render_dir=tmp_path / "b").items() if i.key == seven.key)
    assert seven.images[0].read_bytes() == again.images[0].read_bytes()
    pixels = np.asarray(Image.open(seven.images[0]).convert("RGB"), dtype=np.int32)
    inked = np.abs(pixels - np.array([200, 30, 30])).sum(axis=-1) < 60  # the red ink
    assert pixels.shape == (128, 128, 3) and 200 < inked.sum() < 128 * 128 // 3
    assert "fonts-dejavu-core" in NumeralSource(font_dir=tmp_path).prepare()


def test_trim_silence_keeps_the_sound_in_whole_frames() -> None:
    wave = np.zeros(1000, dtype=np.float32)
    wave[330:500] = 0.5
    wave[10] = 0.5 * 10 ** (-60 / 20)  # 60 dB under the peak: silence
    out = trim_silence(wave, below_peak_db=50.0, frame=100)
    assert len(out) == 200 and np.array_equal(out, wave[300:500])  # frames 3 and 4
    assert trim_silence(np.zeros(5, dtype=np.float32)).size == 5


def test_media_conversion(tmp_path: Path) -> None:
    src = tmp_path / "wide.png"
    Image.new("RGBA", (40, 20), (255, 0, 0, 255)).save(src)
    write_image(src, tmp_path / "out" / "wide.png", side=32)
    img = np.asarray(Image.open(tmp_path / "out" / "wide.png"))
    assert img.shape == (32, 32, 3)
    assert tuple(img[0, 16]) == (255, 255, 255) and tuple(img[16, 16]) == (255, 0, 0)  # padded on white, centred
    stereo = np.stack([np.sin(np.arange(8000) / 5), np.zeros(8000)], axis=1).astype(np.float32)
    duration = write_clip(stereo, 8000, tmp_path / "clip.flac", max_seconds=0.5)
    data, rate = sf.read(tmp_path / "clip.flac")
    assert rate == 16000 and data.ndim == 1 and duration == 0.5 and len(data) == 8000


class FakeSource:
    """Items made from the test pairs: images, real clips, a rendered tone, and one corrupt image."""

    name, licence, origin, description = "fake", "test-licence", "tests", "test items"

    def __init__(self, root: Path, ready: bool = True) -> None:
        self.root, self.ready = root, ready

    def prepare(self) -> str | None:
        return None if self.ready else "not installed (apt-get install fake)"

    def items(self) -> Iterator[SourceItem]:
        for png in sorted((PAIRS / "images").glob("*.png"))[:12]:
            ogg = PAIRS / "audio" / f"{png.stem}.ogg"
            yield SourceItem(key=f"fake/{png.stem}", caption=f"A {png.stem}.\tcut", images=(png,), audio=ogg)
        tone = (np.sin(np.arange(4000) / 3).astype(np.float32), 8000.0)
        yield SourceItem(key="fake/tone", caption="a tone", audio=lambda: tone, labels={"tones": "sine"})
        yield SourceItem(key="fake/broken", caption="broken", images=(self.root / "broken.png",))

    def tasks(self) -> list[ZeroShotTask]:
        return [ZeroShotTask("tones", "audio", "a {} tone", ("sine", "square"))]


def _rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_build_writes_split_corpus_and_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "corpus"
    sources = [FakeSource(tmp_path), FakeSource(tmp_path, ready=False)]
    sources[1].name = "missing"
    options = BuildOptions(heldout_fraction=0.3, progress=False)
    reports = build_demo_corpus(out, sources, options)
    assert reports[0].failed == 1 and reports[1].status.startswith("skipped: not installed")
    assert "left out fake/broken" in capsys.readouterr().err
    items = {
        s: [json.loads(x) for x in (out / f"items_{s}.jsonl").read_text().splitlines()] for s in ("train", "heldout")
    }
    assert sum(map(len, items.values())) == 13
    for split, records in items.items():
        assert all(is_heldout(r["item"], 0.3) == (split == "heldout") for r in records)
        images = [row[1] for row in _rows(out / f"image_text_{split}.tsv")[1:]]
        assert sorted(images) == sorted(
            i for r in records for i in r["images"]
        )  # nothing of an item in the other split
    train_rows = _rows(out / "image_text_train.tsv")
    assert train_rows[0] == ["image_id", "image", "caption"] and all(len(r) == 3 for r in train_rows)
    assert all("\t" not in r["caption"] for rs in items.values() for r in rs)
    audio_rows = _rows(out / "audio_text_train.tsv") + _rows(out / "audio_text_heldout.tsv")[1:]
    assert all(0.0 < float(r[3]) <= 4.0 for r in audio_rows[1:])
    assert json.loads((out / "tasks.json").read_text())["tones"]["labels"] == ["sine", "square"]
    assert "| fake | ok (1 unreadable left out) | test-licence |" in (out / "SOURCES.md").read_text()
    media = sorted(p for p in (out / "media").rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in media}
    build_demo_corpus(out, sources, options)  # second run: nothing converted again, same files
    assert {p: p.stat().st_mtime_ns for p in media} == stamps
    assert [json.loads(x) for x in (out / "items_train.jsonl").read_text().splitlines()] == items["train"]


def test_heldout_only_and_limit(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"")
    build_demo_corpus(tmp_path / "c", [FakeSource(tmp_path)], BuildOptions(0.5, ("heldout",), limit=2, progress=False))
    assert not (tmp_path / "c" / "items_train.jsonl").exists()
    assert len((tmp_path / "c" / "items_heldout.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="splits"):
        BuildOptions(splits=("test",))


def test_heldout_only_rebuild_keeps_the_train_split_and_its_counts(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"")
    out = tmp_path / "c"
    full = build_demo_corpus(out, [FakeSource(tmp_path)], BuildOptions(0.3, progress=False))[0]
    train = (out / "items_train.jsonl").read_text()
    again = build_demo_corpus(out, [FakeSource(tmp_path)], BuildOptions(0.3, ("heldout",), progress=False))[0]
    assert (out / "items_train.jsonl").read_text() == train
    assert (again.items, again.images, again.clips) == (full.items, full.images, full.clips) and full.items["train"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"][0]["items"] == full.items
    assert f"| {full.items['train']} / {full.items['heldout']} |" in (out / "SOURCES.md").read_text()


def test_no_available_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no source gave any item"):
        build_demo_corpus(tmp_path, [FakeSource(tmp_path, ready=False)], BuildOptions(progress=False))


@pytest.mark.slow
def test_cli_builds_from_the_real_sources(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The installable sources (README command 2 installs them), a few items each."""
    for tool in ("espeak-ng", "fluidsynth"):
        assert shutil.which(tool), f"{tool} missing: apt-get install espeak-ng fluidsynth timgm6mb-soundfont"
    out = tmp_path / "demo"
    sources = "tuxpaint,numerals,espeak,instruments"
    assert main(["data", "build-demo", str(out), "--limit", "3", "--sources", sources]) == 0
    printed = capsys.readouterr().out
    for name in sources.split(","):
        assert f"{name}" in printed and "3 train / 3 held-out items" in printed.split(name, 1)[1].splitlines()[0]
    items = [json.loads(x) for x in (out / "items_heldout.jsonl").read_text().splitlines()]
    digits = [r for r in items if r["source"] == "espeak"]
    assert all(r["labels"]["digits"] in r["audio_text"] for r in digits)
    data, rate = sf.read(out / digits[0]["audio"])
    assert rate == 16000 and 0.2 < len(data) / rate < 2.0 and np.abs(data).max() > 0.05
    assert main(["data", "build-demo", str(out), "--sources", "nope"]) == 2
