"""The local cache of released checkpoints and the environment variables that steer it.

* ``ONEPEACE_CACHE``: the cache folder (default ``~/.cache/onepeace``); files keep their official relative paths,
  e.g. ``one-peace.pt`` and ``one_peace_checkpoints/finetune_vggsound.pt``.
* ``ONEPEACE_WEIGHTS_URL``: a base URL that replaces the official host (a mirror with the same relative paths).
* ``ONEPEACE_OFFLINE=1``: never use the network; a file missing from the cache is an error that says which
  file to place where.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

from onepeace.errors import CheckpointError, OnePeaceError
from onepeace.hub.releases import OFFICIAL_BASE_URL, Release, get_release
from onepeace.hub.transfer import download

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}


class OfflineError(OnePeaceError):
    """``ONEPEACE_OFFLINE`` is set and the file is not in the cache; the message says what to place where."""


def cache_dir() -> Path:
    """The cache folder: ``ONEPEACE_CACHE`` or ``~/.cache/onepeace``."""
    return Path(os.environ.get("ONEPEACE_CACHE") or "~/.cache/onepeace").expanduser()


def base_url() -> str:
    """``ONEPEACE_WEIGHTS_URL`` (without a trailing slash) or the official host."""
    url = os.environ.get("ONEPEACE_WEIGHTS_URL", "").strip() or OFFICIAL_BASE_URL
    if urllib.parse.urlsplit(url).scheme not in ("http", "https", "file"):
        raise ValueError(f"ONEPEACE_WEIGHTS_URL must start with http://, https:// or file://, got {url!r}")
    return url.rstrip("/")


def offline() -> bool:
    """Whether ``ONEPEACE_OFFLINE`` forbids the network."""
    value = os.environ.get("ONEPEACE_OFFLINE", "").strip().lower()
    if value not in _TRUE | _FALSE:
        raise ValueError(f"ONEPEACE_OFFLINE must be 1 or 0, got {value!r}")
    return value in _TRUE


def weights_url(name: str) -> str:
    """The URL of release ``name`` under :func:`base_url`."""
    return f"{base_url()}/{urllib.parse.quote(get_release(name).path)}"


def cached_file(name: str) -> Path:
    """Where release ``name`` is (or will be) in the cache."""
    return cache_dir() / get_release(name).path


def fetch(name: str, *, progress: bool = True) -> Path:
    """The local file of release ``name``, downloaded into the cache on first use.

    Raises :class:`OfflineError` when ``ONEPEACE_OFFLINE`` is set and the file is absent, and
    :class:`~onepeace.hub.transfer.DownloadError` when the download fails (nothing is then left under the final
    name; a partial ``.part`` file is resumed by the next call).
    """
    target = cached_file(name)
    if target.is_file():
        return target
    if offline():
        raise OfflineError(
            f"ONEPEACE_OFFLINE is set and {name} is not in the cache: download {weights_url(name)} "
            f"and save it as {target}"
        )
    return download(weights_url(name), target, progress=progress, label=name)


def embedding_checkpoint(name: str) -> Path:
    """:func:`fetch` for ``onepeace.load``: only a release that is an embedding model; a task model is refused
    with the command that uses it."""
    release: Release = get_release(name)
    if not release.embed:
        raise CheckpointError(
            f"{name} is a fine-tuned {release.description} model without embedding projections, and its name "
            f"gives only the backbone: run `onepeace download {name}` and give the file it prints as the "
            f"model.init_from of a {release.tasks[0]} fine-tuning recipe"
        )
    return fetch(name)
