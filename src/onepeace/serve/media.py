"""``GET /v1/items/{id}/media`` serves a file only while it is the file that was indexed.

The index stores the sha256 of every media file's bytes. Before a file is served it must be a regular file reached
without a symlink as its last component (a symlink swapped in for an indexed file is refused, whatever it points
to: indexed sources are stored resolved, so none of them is a symlink), and its bytes must hash to the stored
digest. The hash is computed once per file version: a file whose device, inode, size and modification time are
those of a version already checked is not read again.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path

MEDIA_TYPES = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp",
    ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff", ".wav": "audio/wav", ".flac": "audio/flac",
    ".ogg": "audio/ogg", ".oga": "audio/ogg", ".mp3": "audio/mpeg",
}  # fmt: skip
MAX_REMEMBERED = 4096
BLOCK = 1024 * 1024


class MediaChecker:
    """Tells whether a path is still the indexed file with a given sha256 (thread-safe; remembers checked files)."""

    def __init__(self) -> None:
        self._checked: dict[str, tuple[int, int, int, int, str]] = {}
        self._lock = threading.Lock()

    def is_indexed_file(self, path: Path, digest: str) -> bool:
        """True if ``path`` has a media suffix, is a regular file (not a symlink) and its bytes hash to ``digest``."""
        if path.suffix.lower() not in MEDIA_TYPES:
            return False
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:  # missing, unreadable, or a symlink (ELOOP)
            return False
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return False
            version = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, digest)
            with self._lock:
                if self._checked.get(str(path)) == version:
                    return True
            if _sha256(fd) != digest:
                return False
        finally:
            os.close(fd)
        with self._lock:
            if len(self._checked) >= MAX_REMEMBERED:
                self._checked.clear()
            self._checked[str(path)] = version
        return True


def _sha256(fd: int) -> str:
    digest = hashlib.sha256()
    while block := os.read(fd, BLOCK):
        digest.update(block)
    return digest.hexdigest()
