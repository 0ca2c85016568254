"""Released ONE-PEACE checkpoints by name: the registry, the cache and the download (standard library only).

``onepeace.load("ONE-PEACE")`` and ``onepeace download NAME`` use :func:`fetch`; see :mod:`onepeace.hub.cache`
for ``ONEPEACE_CACHE``, ``ONEPEACE_WEIGHTS_URL`` and ``ONEPEACE_OFFLINE``.
"""

from __future__ import annotations

from onepeace.hub.cache import (
    OfflineError,
    base_url,
    cache_dir,
    cached_file,
    embedding_checkpoint,
    fetch,
    offline,
    weights_url,
)
from onepeace.hub.releases import NOT_LOADABLE, OFFICIAL_BASE_URL, RELEASES, Release, get_release, is_release
from onepeace.hub.transfer import DownloadError, download, part_file

__all__ = [
    "NOT_LOADABLE",
    "OFFICIAL_BASE_URL",
    "RELEASES",
    "DownloadError",
    "OfflineError",
    "Release",
    "base_url",
    "cache_dir",
    "cached_file",
    "download",
    "embedding_checkpoint",
    "fetch",
    "get_release",
    "is_release",
    "offline",
    "part_file",
    "weights_url",
]
