"""Corpus sources. :func:`all_sources` lists them in build order."""

from __future__ import annotations

from pathlib import Path

from onepeace.corpus.items import Source


def all_sources(fsdd: Path | None = None, npm_dir: Path | None = None) -> list[Source]:
    """Every source the demo corpus knows, configured with optional locations of downloaded data."""
    from onepeace.corpus.sources.emoji import EmojiSource
    from onepeace.corpus.sources.fsdd import FsddSource
    from onepeace.corpus.sources.instruments import InstrumentSource
    from onepeace.corpus.sources.numerals import NumeralSource
    from onepeace.corpus.sources.spoken import SpokenDigitSource
    from onepeace.corpus.sources.tuxpaint import TuxPaintSource

    return [
        TuxPaintSource(),
        EmojiSource(npm_dir),
        NumeralSource(),
        FsddSource(fsdd),
        SpokenDigitSource(),
        InstrumentSource(),
    ]
