"""Load test of ``onepeace serve``: many concurrent clients, valid and bad requests mixed, latency and memory.

The script indexes a small gallery of tests/data/tiny_pairs (images, clips, captions) with onepeace-small, starts the
server with its default limits as a separate process on a free loopback port, and sends ``--requests`` requests
from ``--clients`` threads (one keep-alive httpx client each): text, image, audio and composed searches, text and
image embeddings, media and health reads, and every kind of bad request (empty text, wrong base64, corrupt image,
truncated audio, truncated multipart, wrong content type, malformed JSON, JSON nested 5,000 deep, unknown keys, k
out of range or not a number, an oversized body, an unknown media id, a non-ASCII digit id, a foreign Host header,
a cross-origin POST). Among the clients, ``--slow-clients`` send their bodies at 1 byte/s (each request is
answered 408 at the body deadline) and ``--long-text-clients`` search with a 9 MB one-word text (a valid request).
It checks that every valid request got a 2xx, every bad one the expected 4xx, and that the server process is still
alive, and reports p50/p99 latency per kind, requests per second, the 5xx and 503 answers to valid requests and the
server's resident memory (VmRSS, and the peak VmHWM) at the start and the end.

Example::

    python benchmarks/serve_load.py --requests 1000 --clients 32 --slow-clients 4 --long-text-clients 4 \\
        --json serve_load.json
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "tiny_pairs"
MAX_BODY_MB = 10.0
"""The server's default body limit (``--max-body-mb``)."""
BOUNDARY = "loadtestboundary"
SLOW_BODY_BYTES = 64
LONG_TEXT_BYTES = 9 * 1024 * 1024


@dataclass(frozen=True)
class Kind:
    """A kind of request: ``make(rng)`` gives ``(method, path, httpx keyword arguments)``; ``expect`` the status.

    A ``make`` giving the method ``"SLOW"`` asks for a request whose body is sent at 1 byte/s on a raw socket.
    """

    name: str
    valid: bool
    expect: int
    make: Callable[[random.Random], tuple[str, str, dict[str, Any]]]


@dataclass
class Outcome:
    kind: str
    status: int | None
    seconds: float
    error: str | None = None


# ----------------------------------------------------------------------------------------------- gallery, server
def make_gallery(folder: Path, per_modality: int = 12) -> tuple[list[str], list[str]]:
    """Copy ``per_modality`` images and clips of tiny_pairs into ``folder`` plus a captions file; returns names."""
    images = sorted(p.stem for p in (DATA / "images").glob("*.png"))[:per_modality]
    clips = sorted(p.stem for p in (DATA / "audio").glob("*.ogg"))[:per_modality]
    for sub, names, ext in (("images", images, "png"), ("audio", clips, "ogg")):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(DATA / sub / f"{name}.{ext}", folder / sub)
    (folder / "captions.txt").write_text("".join(f"A photo of a {n}.\n" for n in images), encoding="utf-8")
    return images, clips


def build_gallery_index(gallery: Path, index: Path, model: str = "onepeace-small") -> None:
    """Index ``gallery`` in a child process (so this process never holds the model)."""
    code = (
        "import sys; from onepeace.search.build import build_index; "
        "build_index(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)"
    )
    subprocess.run([sys.executable, "-c", code, model, str(gallery), str(index)], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, port: int, log: Path, extra: list[str] | None = None) -> subprocess.Popen:
    """``python -m onepeace.cli_serve`` on 127.0.0.1:``port``; returns once ``/healthz`` answers."""
    args = [sys.executable, "-m", "onepeace.cli_serve", "--index", str(index), "--port", str(port)]
    args += ["--log-level", "warning", "--no-access-log", *(extra or [])]
    proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError("the server did not answer /healthz within 180 s")


def memory_kb(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak resident set) of process ``pid`` in kB, from /proc."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


# ----------------------------------------------------------------------------------------------- request kinds
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _multipart(name: str, filename: str, data: bytes) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n\r\n'
    return head.encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def request_kinds(images: list[str], clips: list[str], item_ids: list[int]) -> list[Kind]:
    """Every valid and bad request the load test sends."""
    pngs = [(DATA / "images" / f"{n}.png").read_bytes() for n in images]
    oggs = [(DATA / "audio" / f"{n}.ogg").read_bytes() for n in clips]
    words = ["a bird", "a large animal", "an insect buzzing", "a farm animal", "a wild cat", "water"]
    json_type = {"content-type": "application/json"}
    oversized = b'{"text": "' + b"a" * int(MAX_BODY_MB * 1024 * 1024) + b'"}'
    deep = b'{"text": "a", "k": ' + b"[" * 5000 + b"]" * 5000 + b"}"

    def post(path: str, **kw: Any) -> tuple[str, str, dict[str, Any]]:
        return "POST", path, kw

    return [
        Kind("search_text", True, 200, lambda r: post("/v1/search", json={"text": r.choice(words), "k": 5})),
        Kind("search_image", True, 200, lambda r: post(
            "/v1/search", files={"image": ("q.png", r.choice(pngs), "image/png")}, data={"k": "5"})),
        Kind("search_audio", True, 200, lambda r: post("/v1/search", json={"audio": _b64(r.choice(oggs)), "k": 5})),
        Kind("search_composed", True, 200, lambda r: post(
            "/v1/search", json={"text": r.choice(words), "image": _b64(r.choice(pngs)), "k": 5})),
        Kind("embed_text", True, 200, lambda r: post("/v1/embeddings", json={"input": r.sample(words, 2)})),
        Kind("embed_image", True, 200, lambda r: post(
            "/v1/embeddings", json={"input": [_b64(r.choice(pngs))], "modality": "image"})),
        Kind("media", True, 200, lambda r: ("GET", f"/v1/items/{r.choice(item_ids)}/media", {})),
        Kind("healthz", True, 200, lambda r: ("GET", "/healthz", {})),
        Kind("bad_empty_text", False, 400, lambda r: post("/v1/search", json={"text": " "})),
        Kind("bad_base64", False, 400, lambda r: post("/v1/search", json={"image": "@@not base64@@"})),
        Kind("bad_corrupt_image", False, 400, lambda r: post(
            "/v1/search", json={"image": _b64(r.choice(pngs)[:200])})),
        Kind("bad_truncated_audio", False, 400, lambda r: post(
            "/v1/search", json={"audio": _b64(r.choice(oggs)[:300])})),
        Kind("bad_truncated_multipart", False, 400, lambda r: post(
            "/v1/search", content=_multipart("image", "q.png", r.choice(pngs))[:-200],
            headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})),
        Kind("bad_content_type", False, 415, lambda r: post(
            "/v1/search", content=b"text=a", headers={"content-type": "text/plain"})),
        Kind("bad_json", False, 400, lambda r: post("/v1/search", content=b'{"text": ', headers=json_type)),
        Kind("bad_unknown_key", False, 400, lambda r: post("/v1/search", json={"text": "a", "query": "b"})),
        Kind("bad_k_zero", False, 400, lambda r: post("/v1/search", json={"text": "a", "k": 0})),
        Kind("bad_k_huge", False, 400, lambda r: post("/v1/search", json={"text": "a", "k": 10**9})),
        Kind("bad_k_string", False, 400, lambda r: post("/v1/search", json={"text": "a", "k": "x"})),
        Kind("bad_oversized", False, 413, lambda r: post("/v1/search", content=oversized, headers=json_type)),
        Kind("bad_media_id", False, 404, lambda r: ("GET", f"/v1/items/{10**6 + r.randrange(1000)}/media", {})),
        Kind("bad_deep_json", False, 400, lambda r: post("/v1/search", content=deep, headers=json_type)),
        Kind("bad_digit_id", False, 404, lambda r: ("GET", "/v1/items/%C2%B2", {})),
        Kind("bad_host", False, 400, lambda r: ("GET", "/healthz", {"headers": {"host": "rebound.example"}})),
        Kind("bad_cross_origin", False, 403, lambda r: post(
            "/v1/search", json={"text": "a"}, headers={"origin": "http://elsewhere.example"})),
    ]  # fmt: skip


def special_kinds() -> dict[str, Kind]:
    """The kinds only the dedicated clients send: slow bodies (answered 408) and 9 MB one-word texts (valid)."""
    long_text = b'{"k": 5, "text": "' + b"ab" * (LONG_TEXT_BYTES // 2) + b'"}'
    return {
        "slow": Kind("slow_body", False, 408, lambda r: ("SLOW", "/v1/search", {})),
        "long": Kind("search_long_text", True, 200, lambda r: (
            "POST", "/v1/search", {"content": long_text, "headers": {"content-type": "application/json"}})),
    }  # fmt: skip


def slow_body_request(base: str, path: str) -> int | None:
    """POST ``path`` announcing a small JSON body and sending it at 1 byte/s; the answer's status (None if none)."""
    host, port = base.removeprefix("http://").split(":")
    body = b'{"text": "slow sender", "k": 3}'.ljust(SLOW_BODY_BYTES)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    answer = b""
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall(head.encode("latin-1"))
        sock.settimeout(1.0)
        for i in range(len(body)):
            try:
                sock.sendall(body[i : i + 1])
                answer += sock.recv(4096)  # waits up to 1 s: the pace of the sender
            except TimeoutError:
                continue
            except OSError:
                break
            if b"\r\n" in answer or not answer:
                break
    line = answer.split(b"\r\n")[0].split()
    return int(line[1]) if len(line) > 1 and line[1].isdigit() else None


def schedule(kinds: list[Kind], total: int, seed: int) -> list[Kind]:
    """``total`` requests in random order: about 70% valid ones, every bad kind about equally often."""
    rng = random.Random(seed)
    valid = [k for k in kinds if k.valid]
    bad = [k for k in kinds if not k.valid]
    n_bad = max(len(bad), int(total * 0.3))
    plan = [bad[i % len(bad)] for i in range(n_bad)] + [valid[i % len(valid)] for i in range(total - n_bad)]
    rng.shuffle(plan)
    return plan


# ----------------------------------------------------------------------------------------------- running
def _client_loop(base: str, jobs: queue.Queue, out: list[Outcome], deadline: float, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=60) as client:
        while time.monotonic() < deadline:
            try:
                kind = jobs.get_nowait()
            except queue.Empty:
                return
            method, path, kwargs = kind.make(rng)
            started = time.perf_counter()
            try:
                if method == "SLOW":
                    status = slow_body_request(base, path)
                    out.append(Outcome(kind.name, status, time.perf_counter() - started))
                    continue
                response = client.request(method, path, **kwargs)
                out.append(Outcome(kind.name, response.status_code, time.perf_counter() - started))
            except (httpx.HTTPError, OSError) as exc:
                out.append(Outcome(kind.name, None, time.perf_counter() - started, f"{type(exc).__name__}: {exc}"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def _client_queues(
    kinds: list[Kind],
    total: int,
    clients: int,
    seed: int,
    slow_clients: int,
    long_text_clients: int,
    slow_each: int,
    long_each: int,
) -> list[queue.Queue]:
    """One job queue per client: the dedicated slow-body and long-text clients' own, then one shared by the rest."""
    special = special_kinds()
    queues: list[queue.Queue] = []
    for count, per_client, kind in (
        (slow_clients, slow_each, special["slow"]),
        (long_text_clients, long_each, special["long"]),
    ):
        for _ in range(count):
            own: queue.Queue = queue.Queue()
            for _ in range(per_client):
                own.put(kind)
            queues.append(own)
    shared: queue.Queue = queue.Queue()
    for kind in schedule(kinds, total - sum(q.qsize() for q in queues), seed):
        shared.put(kind)
    return queues + [shared] * (clients - len(queues))  # fmt: skip


def run_load(
    base: str,
    kinds: list[Kind],
    total: int,
    clients: int,
    max_seconds: float,
    seed: int = 0,
    slow_clients: int = 0,
    long_text_clients: int = 0,
    slow_each: int = 3,
    long_each: int = 10,
) -> dict:
    """Send the scheduled requests from ``clients`` threads; per-kind latency and the failures found.

    ``slow_clients`` of the threads send ``slow_each`` slow-body requests each, ``long_text_clients`` send
    ``long_each`` 9 MB-text searches each, the others share the rest of the ``total``.
    """  # fmt: skip
    queues = _client_queues(kinds, total, clients, seed, slow_clients, long_text_clients, slow_each, long_each)
    if slow_clients or long_text_clients:
        kinds = [*kinds, *special_kinds().values()]
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + max_seconds
    started = time.perf_counter()
    threads = [
        threading.Thread(target=_client_loop, args=(base, jobs, outcomes, deadline, seed + i + 1), daemon=True)
        for i, jobs in enumerate(queues)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max_seconds + 120)
    elapsed = time.perf_counter() - started
    expected = {k.name: k for k in kinds}
    failures = [
        o for o in outcomes
        if o.status is None or (o.status != expected[o.kind].expect if not expected[o.kind].valid
                                else not 200 <= o.status < 300)
    ]  # fmt: skip
    per_kind = {}
    for kind in kinds:
        mine = [o for o in outcomes if o.kind == kind.name]
        times = [o.seconds * 1000 for o in mine]
        statuses: dict[str, int] = {}
        for o in mine:
            statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
        per_kind[kind.name] = {
            "valid": kind.valid, "count": len(mine), "statuses": statuses,
            "p50_ms": round(percentile(times, 50), 2), "p99_ms": round(percentile(times, 99), 2),
        }  # fmt: skip
    valid_answers = [o for o in outcomes if expected[o.kind].valid]
    return {
        "valid_5xx": sum(o.status is not None and o.status >= 500 for o in valid_answers),
        "valid_503": sum(o.status == 503 for o in valid_answers),
        "sent": len(outcomes),
        "planned": total,
        "clients": clients,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(outcomes) / elapsed, 2) if elapsed else 0.0,
        "kinds": per_kind,
        "failures": [vars(o) for o in failures[:50]],
        "failure_count": len(failures),
    }


def run_benchmark(
    requests: int,
    clients: int,
    max_seconds: float,
    workdir: Path,
    seed: int = 0,
    slow_clients: int = 0,
    long_text_clients: int = 0,
) -> dict:
    """Gallery, index, server process, load; returns the report (the server is stopped at the end)."""  # fmt: skip
    gallery, index = workdir / "gallery", workdir / "index"
    images, clips = make_gallery(gallery)
    build_gallery_index(gallery, index)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(index, port, workdir / "server.log")
    try:
        memory_start = memory_kb(proc.pid)
        hits = httpx.post(base + "/v1/search", json={"text": "an animal", "k": 100}, timeout=60).json()["hits"]
        media_ids = [h["item_id"] for h in hits if h["url"]]
        kinds = request_kinds(images, clips, media_ids)
        report = run_load(base, kinds, requests, clients, max_seconds, seed, slow_clients, long_text_clients)
        alive = proc.poll() is None
        report["server_alive"] = alive and httpx.get(base + "/healthz", timeout=30).status_code == 200
        report["memory_kb"] = {"start": memory_start, "end": memory_kb(proc.pid) if alive else {}}
        report["server_metrics"] = httpx.get(base + "/metrics", timeout=30).json() if alive else {}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return report


def format_report(report: dict) -> str:
    """The per-kind latency table and the totals."""
    lines = [f"{'kind':<24} {'valid':>5} {'count':>6} {'p50 ms':>9} {'p99 ms':>9}  statuses"]
    for name, row in report["kinds"].items():
        statuses = " ".join(f"{s}x{n}" for s, n in sorted(row["statuses"].items()))
        valid = "yes" if row["valid"] else "no"
        lines.append(f"{name:<24} {valid:>5} {row['count']:>6} {row['p50_ms']:>9.1f} {row['p99_ms']:>9.1f}  {statuses}")
    mem = report["memory_kb"]
    batching = report.get("server_metrics", {}).get("batching", {})
    lines += [
        f"sent {report['sent']} of {report['planned']} requests from {report['clients']} clients in "
        f"{report['seconds']:.1f} s: {report['requests_per_s']:.1f} requests/s",
        f"server RSS start {mem['start'].get('VmRSS', 0) / 1024:.0f} MB (peak {mem['start'].get('VmHWM', 0) / 1024:.0f}"
        f" MB); end {mem['end'].get('VmRSS', 0) / 1024:.0f} MB (peak {mem['end'].get('VmHWM', 0) / 1024:.0f} MB)",
        f"batches run {batching.get('batches_run', '?')}, mean batch size {batching.get('mean_batch_size', '?')}",
        f"valid requests answered 5xx: {report['valid_5xx']}, 503: {report['valid_503']}",
        f"unexpected answers: {report['failure_count']}; server alive: {report['server_alive']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests to send (default 1000)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--slow-clients", type=int, default=4, help="clients sending bodies at 1 byte/s (4)")
    parser.add_argument("--long-text-clients", type=int, default=4, help="clients searching with 9 MB texts (4)")
    parser.add_argument("--max-seconds", type=float, default=900, help="stop sending after this long (default 900)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the request mix")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the report as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="onepeace-serve-load-") as tmp:
        report = run_benchmark(
            args.requests, args.clients, args.max_seconds, Path(tmp), args.seed, args.slow_clients,
            args.long_text_clients,
        )  # fmt: skip
    report["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    report["cpus"] = os.cpu_count()
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    ok = report["failure_count"] == 0 and report["server_alive"] and report["sent"] == report["planned"]
    ok = ok and report["valid_5xx"] == 0 and report["valid_503"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
