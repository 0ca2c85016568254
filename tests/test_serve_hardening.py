"""Hostile and broken requests against ``onepeace serve`` (issue 16, the HTTP rows): one test per item.

Item 1 slow-body clients, 2 long texts, 3 deep JSON and strict ids, 11 the concurrency limit, 12 audio samples,
13 media integrity, API key, allowed hosts and cross-origin posts, 19 a readable 413. The socket-level tests run a
real uvicorn server on a free loopback port; the rest go through FastAPI's TestClient.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
pytest.importorskip("soundfile")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from test_serve import ServerThread, SlowModel  # noqa: E402

import onepeace  # noqa: E402
from onepeace.data.tokenizer import MAX_TOKENS, default_tokenizer  # noqa: E402
from onepeace.serve import ServeSettings, create_app  # noqa: E402

DATA = Path(__file__).parent / "data" / "tiny_pairs"
LIMIT = 1024 * 1024


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def build_gallery_index(model, folder: Path) -> Path:
    from onepeace.search.build import build_index

    (folder / "images").mkdir(parents=True)
    (folder / "audio").mkdir()
    for name in ("owl", "cow"):
        shutil.copy(DATA / "images" / f"{name}.png", folder / "images")
    shutil.copy(DATA / "audio" / "owl.ogg", folder / "audio")
    (folder / "captions.txt").write_text("A photo of an owl.\nA photo of a cow.\n", encoding="utf-8")
    out = folder.parent / f"{folder.name}-index"
    build_index(model, folder, out, model_name="onepeace-small", progress=False)
    return out


@pytest.fixture(scope="module")
def model():
    return onepeace.load("onepeace-small")


@pytest.fixture(scope="module")
def index_dir(model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gallery_index(model, tmp_path_factory.mktemp("hardening") / "gallery")


def raw_socket(port: int, head: str, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head.encode("latin-1") + body)
    return sock


def read_status(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(OSError):
        while b"\r\n" not in data:
            more = sock.recv(4096)
            if not more:
                break
            data += more
    return data.split(b"\r\n")[0]


# ----------------------------------------------------------------------------------------------- item 1
def test_item1_slow_body_clients_do_not_starve_others(model, index_dir: Path) -> None:
    """Item 1: connections that send their body at 1 byte/s take no slot; they get 408 at the body deadline."""
    settings = ServeSettings(max_concurrency=4, body_timeout_s=3.0, timeout_s=30)
    with ServerThread(create_app(index_dir, model=model, settings=settings)) as server:
        head = (
            "POST /v1/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n"
        )
        slow = [raw_socket(server.port, head, b"{") for _ in range(12)]
        time.sleep(0.5)
        with httpx.Client(base_url=server.url, timeout=30) as http, ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: http.post("/v1/search", json={"text": f"an owl {i}"}), range(6)))
            assert [r.status_code for r in answers] == [200] * 6, [r.text for r in answers]
        started = time.monotonic()
        statuses = [read_status(sock) for sock in slow]
        assert time.monotonic() - started < 6
        assert all(s.startswith(b"HTTP/1.1 408") for s in statuses), statuses
        for sock in slow:
            sock.close()


# ----------------------------------------------------------------------------------------------- item 2
def test_item2_long_text_is_cut_before_tokenisation(model, index_dir: Path) -> None:
    """Item 2: a 9 MB one-word text costs a bounded tokenisation and gives the same ids as the first 70."""
    tok = default_tokenizer()
    word = "abcdefghij" * 900_000
    started = time.perf_counter()
    ids = tok.encode(word)
    assert time.perf_counter() - started < 1.0
    reference = tok.bpe_ids(word[:300_000])  # whole tokenisation of a prefix long enough for 70 tokens
    assert ids == tok.encode_batch([word[:300_000]])[0].tolist()
    assert ids[:-1] == [int(i) for i in tok._gpt2_to_dict[reference[:MAX_TOKENS]]] and ids[-1] == tok.eos_id
    settings = ServeSettings(max_body_bytes=10 * 1024 * 1024, timeout_s=10)
    with TestClient(create_app(index_dir, model=model, settings=settings)) as client:
        started = time.perf_counter()
        r = client.post("/v1/embeddings", json={"input": [word, "an owl"]})
        assert r.status_code == 200, r.text[:300]
        assert time.perf_counter() - started < 8
        want = model.embed(text=[word[:300_000], "an owl"]).text.numpy()
        np.testing.assert_allclose(np.array([d["embedding"] for d in r.json()["data"]]), want, atol=1e-5)


_PIECES = st.sampled_from(
    ["a", "ab", "aab", "the ", "  ", "\n", "é", "ß", "İ", "σ", "Σ'", "1", "12", "!!", "'s", "中", "😀"]
)


@settings(max_examples=100, deadline=None)
@given(head=st.lists(_PIECES, max_size=40), unit=st.lists(_PIECES, min_size=1, max_size=6),
       repeat=st.integers(1, 12_000), tail=st.text(max_size=50))  # fmt: skip
def test_item2_cut_keeps_the_first_70_ids(head: list[str], unit: list[str], repeat: int, tail: str) -> None:
    """Item 2: on texts up to 150k characters the bounded cut gives exactly the full tokenisation's first ids."""
    tok = default_tokenizer()
    text = "".join(head) + "".join(unit) * repeat + tail
    full = tok._gpt2_to_dict[np.asarray(tok.bpe_ids(text), dtype=np.int64)][:MAX_TOKENS].tolist()
    assert tok.encode(text) == full + [tok.eos_id]


def test_item2_longest_token_bound_matches_the_vocabulary() -> None:
    """Item 2: the cut's bound on the bytes of one token is the vocabulary's longest token."""
    import json

    from onepeace.data import tokenizer

    vocab = json.loads(tokenizer._read_asset("encoder.json"))
    assert max(len(symbol) for symbol in vocab) == tokenizer.LONGEST_TOKEN_BYTES


# ----------------------------------------------------------------------------------------------- item 3
def test_item3_deep_json_and_strict_ids_are_4xx(model, index_dir: Path) -> None:
    """Item 3: JSON nested 5,000 deep is a 400; ids like '²' are 404, never a 500."""
    with TestClient(create_app(index_dir, model=model)) as client:
        deep = b'{"text": "a", "k": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        r = client.post("/v1/search", content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_json", r.text
        assert "deeper than" in r.json()["error"]["message"]
        nested: object = "a"
        for _ in range(40):
            nested = [nested]
        nested = {"input": [{"text": "a"}, nested]}
        assert client.post("/v1/embeddings", json=nested).status_code == 400
        texts = {"input": ["[[[{{{ not JSON structure ]]]", "a" * 100]}  # brackets inside strings do not count
        assert client.post("/v1/embeddings", json=texts).status_code == 200
        for bad in ("%C2%B2", "%D9%A3", "1%0A", "+1", "0x1", "1_0", "%EF%BC%91"):
            for suffix in ("", "/media"):
                r = client.get(f"/v1/items/{bad}{suffix}")
                assert r.status_code == 404 and r.json()["error"]["type"] == "not_found", (bad, suffix, r.text)
        assert client.get("/metrics").json()["errors"]["server_5xx"] == 0


# ----------------------------------------------------------------------------------------------- item 11
def test_item11_health_and_metrics_never_wait_for_a_slot(model, index_dir: Path) -> None:
    """Item 11: with every slot busy, /healthz and /metrics still answer 200."""
    settings = ServeSettings(max_concurrency=2, timeout_s=30)
    with TestClient(create_app(index_dir, model=SlowModel(model, 1.5), settings=settings)) as client:
        with ThreadPoolExecutor(2) as pool:
            busy = [pool.submit(client.post, "/v1/search", json={"text": f"owl {i}"}) for i in range(2)]
            time.sleep(0.5)
            assert client.get("/healthz").status_code == 200
            assert client.get("/metrics").status_code == 200
            assert [f.result().status_code for f in busy] == [200, 200]


def test_item11_a_32_client_burst_fits_the_default_limits(model, index_dir: Path) -> None:
    """Item 11: 32 clients at the default limits (searches, media, health): no request gets a 503."""
    png = (DATA / "images" / "owl.png").read_bytes()
    with ServerThread(create_app(index_dir, model=model)) as server:
        hits = httpx.post(server.url + "/v1/search", json={"text": "an owl", "k": 10}).json()["hits"]
        media = [h["url"] for h in hits if h["url"]]

        def client_loop(i: int) -> list[int]:
            codes = []
            with httpx.Client(base_url=server.url, timeout=60) as http:
                for j in range(8):
                    if j % 4 == 0:
                        r = http.post("/v1/search", json={"text": f"animal {i} {j}", "k": 2})
                    elif j % 4 == 1:
                        r = http.get(media[(i + j) % len(media)])
                    elif j % 4 == 2:
                        r = http.get("/healthz")
                    else:
                        r = http.post("/v1/search", files={"image": ("q.png", png, "image/png")}, data={"k": "2"})
                    codes.append(r.status_code)
            return codes

        with ThreadPoolExecutor(32) as pool:
            codes = [c for got in pool.map(client_loop, range(32)) for c in got]
    assert len(codes) == 256 and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}


# ----------------------------------------------------------------------------------------------- item 12
def test_item12_audio_limit_counts_samples(model, index_dir: Path) -> None:
    """Item 12: a short clip of many channels at a high rate is refused from its header (rate x channels x s)."""
    import soundfile

    clip = io.BytesIO()  # 10 s at 96 kHz x 8 channels: 7.68 M samples in a small FLAC of silence
    soundfile.write(clip, np.zeros((96_000 * 10, 8), dtype=np.int16), 96_000, format="FLAC")
    assert len(clip.getvalue()) < LIMIT
    settings = ServeSettings(max_audio_samples=16_000 * 60)
    with TestClient(create_app(index_dir, model=model, settings=settings)) as client:
        r = client.post("/v1/search", json={"audio": b64(clip.getvalue())})
        assert r.status_code == 400, r.text[:300]
        message = r.json()["error"]["message"]
        assert "7,680,000 samples" in message and "960,000 samples" in message
        owl = b64((DATA / "audio" / "owl.ogg").read_bytes())
        assert client.post("/v1/search", json={"audio": owl}).status_code == 200
    assert ServeSettings().max_audio_samples < 655_000 * 8 * 120  # the probe's 120 s x 655 kHz x 8 channels


# ----------------------------------------------------------------------------------------------- item 13
def test_item13_media_served_only_while_it_is_the_indexed_file(model, tmp_path: Path) -> None:
    """Item 13: a file replaced (other bytes, or a symlink swapped in) after indexing is not served."""
    index = build_gallery_index(model, tmp_path / "gallery")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for the web")
    with TestClient(create_app(index, model=model)) as client:
        hits = client.post("/v1/search", json={"text": "an owl", "k": 10, "modality": "image"}).json()["hits"]
        hit = next(h for h in hits if Path(h["source"]).name == "owl.png")
        path = Path(hit["source"])
        original = path.read_bytes()
        assert client.get(hit["url"]).content == original
        path.unlink()
        os.symlink(secret, path)
        assert client.get(hit["url"]).status_code == 404
        path.unlink()
        os.symlink(tmp_path / "gallery" / "images" / "cow.png", path)
        assert client.get(hit["url"]).status_code == 404  # even a symlink to another indexed file
        path.unlink()
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        assert client.get(hit["url"]).status_code == 404
        assert client.head(hit["url"]).status_code == 404
        path.write_bytes(original)
        r = client.get(hit["url"])
        assert r.status_code == 200 and r.content == original and r.headers["content-type"] == "image/png"


def test_item13_api_key_hosts_and_cross_origin_posts(model, index_dir: Path, monkeypatch) -> None:
    """Item 13: an optional API key, the Host header checked, cross-origin POSTs refused without a CORS list."""
    settings = ServeSettings(api_key="s3cret-key")
    with TestClient(create_app(index_dir, model=model, settings=settings)) as client:
        query = {"text": "an owl", "k": 2}
        r = client.post("/v1/search", json=query)
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        assert client.post("/v1/search", json=query, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/v1/search", json=query, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        assert client.get("/metrics").status_code == 401
        assert client.get("/healthz").status_code == 200  # health checkers need no key
    with TestClient(create_app(index_dir, model=model)) as client:
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
            r = client.get("/healthz", headers={"Host": host})
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_host", host
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "testserver"):
            assert client.get("/healthz", headers={"Host": host}).status_code == 200, host
        form = {"image": ("q.png", (DATA / "images" / "owl.png").read_bytes(), "image/png")}
        r = client.post("/v1/search", files=form, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "cross_origin"
        same = client.post("/v1/search", files=form, headers={"Origin": "http://testserver"})
        assert same.status_code == 200
    settings = ServeSettings(cors_origins=("http://app.example",), allowed_hosts=("search.example",))
    with TestClient(create_app(index_dir, model=model, settings=settings), base_url="http://search.example") as client:
        r = client.post("/v1/search", json={"text": "an owl"}, headers={"Origin": "http://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        pre = client.options("/v1/search", headers={"Origin": "http://app.example",
                                                    "Access-Control-Request-Method": "POST"})  # fmt: skip
        assert pre.status_code == 204 and "POST" in pre.headers["access-control-allow-methods"]
        assert client.post("/v1/search", json={"text": "a"}, headers={"Origin": "http://b.example"}).status_code == 403
        assert client.get("/healthz", headers={"Host": "localhost"}).status_code == 400  # the list replaces the default
    from onepeace import cli_serve

    monkeypatch.setenv("ONEPEACE_API_KEY", "from-env")
    args = cli_serve.build_parser().parse_args(["--index", "i", "--allowed-host", "a.example", "--cors-origin", "x"])
    got = cli_serve.settings_from_args(args)
    assert got.api_key == "from-env" and got.allowed_hosts == ("a.example",) and got.cors_origins == ("x",)
    args = cli_serve.build_parser().parse_args(["--index", "i", "--api-key", "flag"])
    got = cli_serve.settings_from_args(args)
    assert got.api_key == "flag" and got.allowed_hosts is None
    monkeypatch.setenv("ONEPEACE_API_KEY", "")
    assert cli_serve.settings_from_args(cli_serve.build_parser().parse_args(["--index", "i"])).api_key is None


# ----------------------------------------------------------------------------------------------- item 19
def _send_whole_body(port: int, body: bytes, chunked: bool) -> bytes:
    """Write the whole request before reading, as simple clients do; the status line, or the socket error."""
    head = "POST /v1/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if chunked:
        piece = 65536
        body = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + piece]), body[i : i + piece])
                        for i in range(0, len(body), piece)) + b"0\r\n\r\n"  # fmt: skip
        head += "Transfer-Encoding: chunked\r\n\r\n"
    else:
        head += f"Content-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(head.encode("latin-1") + body)
            return read_status(sock)
        except OSError as exc:
            return type(exc).__name__.encode()


def test_item19_a_body_over_the_limit_gets_a_readable_413(model, index_dir: Path) -> None:
    """Item 19 (first half): a client writing 8 MB to a 1 MB limit reads the 413 instead of a connection reset."""
    settings = ServeSettings(max_body_bytes=LIMIT)
    with ServerThread(create_app(index_dir, model=model, settings=settings)) as server:
        big = b'{"text": "' + b"a" * (8 * LIMIT) + b'"}'
        for chunked in (False, True, False):
            status = _send_whole_body(server.port, big, chunked)
            assert status.startswith(b"HTTP/1.1 413"), (chunked, status)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            r = http.post("/v1/search", content=big, headers={"content-type": "application/json"})
            assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
            assert http.post("/v1/search", json={"text": "an owl"}).status_code == 200


# ----------------------------------------------------------------------------------------------- the burst
@pytest.mark.slow
def test_burst_of_1000_mixed_requests_from_32_clients(tmp_path: Path) -> None:
    """Done-when of issue 16: 1,000 mixed requests from 32 clients, 4 of them sending bodies at 1 byte/s and 4
    searching with 9 MB texts, against a real server at its default limits: no 5xx, no 503 for a valid request.
    """
    import importlib.util
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", script)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    report = bench.run_benchmark(1000, 32, 600, tmp_path, slow_clients=4, long_text_clients=4)
    print(bench.format_report(report))
    assert report["sent"] == 1000 and report["server_alive"]
    assert report["valid_5xx"] == 0 and report["valid_503"] == 0
    assert report["failure_count"] == 0, report["failures"]
    assert report["kinds"]["slow_body"]["statuses"] == {"408": 12}
    assert report["kinds"]["search_long_text"]["statuses"] == {"200": 40}
    assert report["server_metrics"]["errors"]["server_5xx"] == 0
