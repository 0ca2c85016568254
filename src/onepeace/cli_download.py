"""``onepeace download NAME`` and ``onepeace download --list``: released checkpoints into the cache.

The file's path is the only thing printed on stdout, so ``FILE=$(onepeace download ONE-PEACE_VGGSound)`` works;
the progress bar goes to stderr.
"""

from __future__ import annotations

import argparse
from typing import Any


def _listing() -> str:
    """The ``--list`` text: every loadable release, where it comes from and goes, then the unreadable files."""
    from onepeace import hub

    rows = [("name", "use", "file", "")]
    for release in hub.RELEASES.values():
        use = "onepeace.load (embeddings)" if release.embed else f"model.init_from ({release.tasks[0]})"
        state = "in cache" if hub.cached_file(release.name).is_file() else ""
        rows.append((release.name, use, release.path, state))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["", f"cache: {hub.cache_dir()}   source: {hub.base_url()}", ""]
    lines.append("Also released, not loadable by onepeace yet (vision-task code layouts):")
    lines += [f"  {path}: {what}" for path, what in hub.NOT_LOADABLE.items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """The ``download`` command; prints the local path of the checkpoint."""
    from onepeace import hub

    if args.list:
        if args.name:
            raise ValueError("give either a checkpoint name or --list, not both")
        print(_listing())
        return 0
    if not args.name:
        raise ValueError("give a checkpoint name (see onepeace download --list)")
    print(hub.fetch(args.name, progress=not args.quiet))
    return 0


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "download",
        parents=parents,
        help="download a released checkpoint (ONE-PEACE, the fine-tuned models) into the cache",
        description="Fetch a released checkpoint by name into the cache (ONEPEACE_CACHE, default "
        "~/.cache/onepeace) and print its path. An interrupted download resumes; ONEPEACE_WEIGHTS_URL replaces "
        "the official host with a mirror of the same layout; ONEPEACE_OFFLINE=1 never uses the network.",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="checkpoint name, e.g. ONE-PEACE")
    p.add_argument("--list", action="store_true", help="list the released checkpoints and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)
