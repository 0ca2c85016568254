"""Emoji images with their Unicode names, from the npm packages ``emoji-datasource-google`` (Noto Emoji) and
``emoji-datasource-twitter`` (Twemoji): two renderings of each emoji, 64 x 64 PNG."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from onepeace.corpus.items import SourceItem, ZeroShotTask, cache_dir, concept_of

PACKAGES = ("emoji-datasource-google", "emoji-datasource-twitter")
STYLES = ("google", "twitter")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CONCEPT_ALIASES = {"musical keyboard": "piano"}
SKIPPED_CATEGORIES = {"Component"}


def default_npm_dir() -> Path:
    """Where the builder installs the npm packages when none are found."""
    return cache_dir() / "npm"


def describe(name: str, category: str) -> tuple[str, str]:
    """Caption and concept of an emoji from its Unicode name.

    "KEYCAP 7" gives ("an emoji of the digit seven", "seven").
    """
    words = name.lower()
    if words.startswith("keycap ") and words[7:].isdigit():
        digit = DIGITS[int(words[7:])]
        return f"an emoji of the digit {digit} on a key", digit
    if category == "Flags" and words.endswith(" flag"):
        return f"an emoji of the flag of {words[:-5]}", f"flag of {words[:-5]}"
    concept = concept_of(words)
    return f"an emoji of {words}", CONCEPT_ALIASES.get(concept, concept)


class EmojiSource:
    """One item per emoji (skin-tone components excluded), with its Noto and Twemoji images."""

    name = "emoji"
    licence = "images: Apache-2.0 (Noto Emoji), CC-BY-4.0 (Twemoji); names and data: MIT (emoji-datasource)"
    origin = "npm packages emoji-datasource-google and emoji-datasource-twitter"
    description = "emoji renderings captioned with their Unicode names"

    def __init__(self, npm_dir: Path | None = None) -> None:
        self.npm_dir = Path(npm_dir) if npm_dir else None
        self.modules: Path | None = None

    def _candidates(self) -> list[Path]:
        dirs = [self.npm_dir] if self.npm_dir else []
        if os.environ.get("ONEPEACE_NPM_DIR"):
            dirs.append(Path(os.environ["ONEPEACE_NPM_DIR"]))
        dirs += [default_npm_dir(), Path.cwd()]
        return [d / "node_modules" for d in dirs]

    def _find(self) -> Path | None:
        for modules in self._candidates():
            if all((modules / p / "emoji.json").is_file() for p in PACKAGES):
                return modules
        return None

    def prepare(self) -> str | None:
        self.modules = self._find()
        if self.modules is not None:
            return None
        npm = shutil.which("npm")
        if npm is None:
            return "npm packages not found and npm is not installed (apt-get install npm)"
        target = self.npm_dir or default_npm_dir()
        target.mkdir(parents=True, exist_ok=True)
        print(f"emoji: installing {' '.join(PACKAGES)} into {target} with npm", flush=True)
        cmd = [npm, "install", "--no-audit", "--no-fund", "--prefix", str(target), *PACKAGES]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            return f"npm install failed: {done.stderr.strip()[-300:]}"
        self.modules = self._find()
        return None if self.modules is not None else f"npm installed nothing usable into {target}"

    def items(self) -> Iterator[SourceItem]:
        if self.modules is None:
            raise RuntimeError("EmojiSource.prepare() must succeed before items()")
        table = json.loads((self.modules / PACKAGES[0] / "emoji.json").read_text(encoding="utf-8"))
        for entry in sorted(table, key=lambda e: e["unified"]):
            if entry.get("category") in SKIPPED_CATEGORIES or not entry.get("name"):
                continue
            images = tuple(
                path
                for package, style in zip(PACKAGES, STYLES)
                if (path := self.modules / package / "img" / style / "64" / entry["image"]).is_file()
            )
            if not images:
                continue
            caption, concept = describe(entry["name"], entry.get("category", ""))
            yield SourceItem(
                key=f"{self.name}/{entry['unified'].lower()}", caption=caption, images=images, concept=concept
            )

    def tasks(self) -> list[ZeroShotTask]:
        return []
