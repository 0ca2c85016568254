"""Instrument notes synthesised with fluidsynth and a General MIDI sound font (Debian ``fluidsynth`` and
``timgm6mb-soundfont``): real sampled instruments, each at low, middle and high pitch."""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from onepeace.corpus.items import SourceItem, ZeroShotTask
from onepeace.corpus.media import read_clip
from onepeace.errors import require

SOUND_FONT_DIR = Path("/usr/share/sounds/sf2")
SOUND_FONTS = ("TimGM6mb.sf2", "default-GM.sf2", "FluidR3_GM.sf2")
# General MIDI program numbers (0-based) and the names used in captions and zero-shot labels.
INSTRUMENTS = (
    (0, "piano"), (6, "harpsichord"), (9, "glockenspiel"), (10, "music box"), (11, "vibraphone"),
    (12, "marimba"), (13, "xylophone"), (14, "tubular bells"), (19, "church organ"), (21, "accordion"),
    (22, "harmonica"), (24, "guitar"), (30, "distorted electric guitar"), (32, "double bass"), (40, "violin"),
    (42, "cello"), (46, "harp"), (47, "timpani"), (52, "choir"), (56, "trumpet"), (57, "trombone"), (58, "tuba"),
    (60, "french horn"), (65, "saxophone"), (68, "oboe"), (70, "bassoon"), (71, "clarinet"), (72, "piccolo"),
    (73, "flute"), (75, "pan flute"), (79, "ocarina"), (104, "sitar"), (105, "banjo"), (108, "kalimba"),
    (109, "bagpipe"), (114, "steel drums"),
)  # fmt: skip
REGISTERS = (("low", (43, 48)), ("middle", (60, 64)), ("high", (76, 81)))
VELOCITIES = (70, 110)
NOTE_SECONDS, TAIL_SECONDS, RATE = 1.2, 0.6, 16000


def write_midi(path: Path, program: int, note: int, velocity: int) -> None:
    """A one-note MIDI file: ``program`` plays ``note`` for ``NOTE_SECONDS``, then ``TAIL_SECONDS`` of release."""
    mido = require("mido", "demo")
    midi = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack()
    beat = 0.5  # seconds per beat at mido's default tempo
    track.append(mido.Message("program_change", program=program, time=0))
    track.append(mido.Message("note_on", note=note, velocity=velocity, time=0))
    track.append(mido.Message("note_off", note=note, velocity=0, time=round(NOTE_SECONDS / beat * 480)))
    track.append(mido.MetaMessage("end_of_track", time=round(TAIL_SECONDS / beat * 480)))
    midi.tracks.append(track)
    midi.save(str(path))


def render_note(sound_font: Path, program: int, note: int, velocity: int) -> tuple[np.ndarray, float]:
    """Render one note with fluidsynth: (samples ``[N, 2]``, sample rate)."""
    with tempfile.TemporaryDirectory() as tmp:
        mid, wav = Path(tmp) / "note.mid", Path(tmp) / "note.wav"
        write_midi(mid, program, note, velocity)
        cmd = ["fluidsynth", "-ni", "-q", "-g", "1.0", "-r", str(RATE), "-F", str(wav), str(sound_font), str(mid)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        return read_clip(wav)


class InstrumentSource:
    """One item per (instrument, note, velocity): 36 instruments x 6 notes x 2 velocities = 432 notes."""

    name = "instruments"
    licence = "generated here with fluidsynth (LGPL-2.1) and the TimGM6mb sound font (GPL-2.0)"
    origin = "Debian packages fluidsynth and timgm6mb-soundfont; MIDI written with mido"
    description = "single notes of 36 General MIDI instruments at low, middle and high pitch"

    def __init__(self, sound_font_dir: Path = SOUND_FONT_DIR) -> None:
        self.sound_font_dir = Path(sound_font_dir)
        self.sound_font: Path | None = None

    def prepare(self) -> str | None:
        if shutil.which("fluidsynth") is None:
            return "fluidsynth not found; install it with: apt-get install fluidsynth timgm6mb-soundfont"
        fonts = [self.sound_font_dir / f for f in SOUND_FONTS if (self.sound_font_dir / f).is_file()]
        if not fonts:
            return f"no General MIDI sound font in {self.sound_font_dir}; apt-get install timgm6mb-soundfont"
        try:
            require("mido", "demo")
        except ImportError as exc:
            return str(exc)
        self.sound_font = fonts[0]
        return None

    def items(self) -> Iterator[SourceItem]:
        if self.sound_font is None:
            raise RuntimeError("InstrumentSource.prepare() must succeed before items()")
        for program, instrument in INSTRUMENTS:
            for register, notes in REGISTERS:
                for note in notes:
                    for velocity in VELOCITIES:
                        loud = "softly" if velocity < 90 else "loudly"
                        article = "an" if instrument[0] in "aeiou" else "a"
                        yield SourceItem(
                            key=f"{self.name}/{instrument.replace(' ', '-')}_{note}_{velocity}",
                            caption=f"{article} {instrument} playing a {register} note {loud}",
                            audio=functools.partial(render_note, self.sound_font, program, note, velocity),
                            concept=instrument,
                            labels={"instruments": instrument},
                        )

    def tasks(self) -> list[ZeroShotTask]:
        labels = tuple(name for _, name in INSTRUMENTS)
        return [ZeroShotTask(name="instruments", modality="audio", prompt="the sound of a {}", labels=labels)]
