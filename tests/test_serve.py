"""``onepeace serve``: embeddings and search over HTTP agree with the Python API and the CLI; bad requests get 4xx.

A small gallery (images, clips and captions of tests/data/tiny_pairs) is indexed with the shipped onepeace-small
model; most tests go through FastAPI's TestClient, the socket-level ones through a real uvicorn server on a free
loopback port.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
pytest.importorskip("soundfile")
from fastapi.testclient import TestClient  # noqa: E402

import onepeace  # noqa: E402
from onepeace.serve import ServeSettings, create_app  # noqa: E402
from onepeace.serve.batcher import Batcher, QueueFull  # noqa: E402
from onepeace.serve.schemas import EmbeddingsResponse, SearchResponse  # noqa: E402

DATA = Path(__file__).parent / "data" / "tiny_pairs"
IMAGES = ["bear", "cow", "duck", "frog", "lion", "owl", "sheep", "tiger"]
CLIPS = ["drake", "xanthia", "frog", "owl", "duck", "bee", "lion", "cow"]  # 0.56 s to 2 s
LIMIT = 1024 * 1024


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def image_bytes(name: str) -> bytes:
    return (DATA / "images" / f"{name}.png").read_bytes()


def clip_bytes(name: str) -> bytes:
    return (DATA / "audio" / f"{name}.ogg").read_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving ``app`` on a free loopback port in a daemon thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", timeout_keep_alive=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


class SlowModel:
    """The model with ``delay`` seconds added to every ``embed`` call (for timeouts and overload)."""

    def __init__(self, model, delay: float) -> None:
        self._model, self._delay = model, delay

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def embed(self, **kwargs):
        time.sleep(self._delay)
        return self._model.embed(**kwargs)


@pytest.fixture(scope="module")
def model():
    return onepeace.load("onepeace-small")


@pytest.fixture(scope="module")
def index_dir(model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from onepeace.search.build import build_index

    gallery = tmp_path_factory.mktemp("gallery")
    (gallery / "images").mkdir()
    (gallery / "audio").mkdir()
    for name in IMAGES:
        shutil.copy(DATA / "images" / f"{name}.png", gallery / "images")
    for name in CLIPS:
        shutil.copy(DATA / "audio" / f"{name}.ogg", gallery / "audio")
    (gallery / "captions.txt").write_text("".join(f"A photo of a {name}.\n" for name in IMAGES), encoding="utf-8")
    out = tmp_path_factory.mktemp("index") / "gallery"
    report = build_index(model, gallery, out, model_name="onepeace-small", progress=False)
    assert report.size == len(IMAGES) + len(CLIPS) + len(IMAGES)
    return out


@pytest.fixture(scope="module")
def index(index_dir: Path):
    from onepeace.search.index import EmbeddingIndex

    with EmbeddingIndex.open(index_dir) as opened:
        yield opened


@pytest.fixture(scope="module")
def client(model, index_dir: Path):
    settings = ServeSettings(max_body_bytes=LIMIT, timeout_s=60, batch_wait_ms=20)
    with TestClient(create_app(index_dir, model=model, settings=settings)) as c:
        yield c


def search_ids(index, query, k: int, modality: str | None = None) -> list[tuple[int, float]]:
    return [(h.item_id, h.score) for h in index.search(np.asarray(query, dtype=np.float32), k, modality=modality)]


def http_ids(answer: dict) -> list[tuple[int, float]]:
    return [(h["item_id"], h["score"]) for h in answer["hits"]]


def assert_same_hits(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-5)


def assert_serving(client: TestClient) -> None:
    r = client.post("/v1/search", json={"text": "a bird", "k": 3})
    assert r.status_code == 200 and len(r.json()["hits"]) == 3


# ----------------------------------------------------------------------------------------------- health, page
def test_healthz_and_page(client: TestClient, index) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == "onepeace-small"
    assert health["index_size"] == len(index) and health["dim"] == index.dim and health["uptime_s"] >= 0
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        r = client.get(asset)
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert "http://" not in r.text and "https://" not in r.text  # nothing loaded from elsewhere
    assert "http://" not in page.text and "https://" not in page.text
    assert '<label for="q-text">' in page.text and '<label for="q-image">' in page.text


# ----------------------------------------------------------------------------------------------- embeddings
def test_text_embeddings_match_the_model(client: TestClient, model) -> None:
    texts = ["a dog barking", "A photo of a bear.", "rain on a roof"]
    r = client.post("/v1/embeddings", json={"input": texts, "model": "onepeace-small"})
    assert r.status_code == 200, r.text
    answer = EmbeddingsResponse.model_validate(r.json())
    assert answer.object == "list" and answer.model == "onepeace-small"
    assert [d.index for d in answer.data] == [0, 1, 2]
    got = np.array([d.embedding for d in answer.data])
    np.testing.assert_allclose(got, model.embed(text=texts).text.numpy(), atol=1e-5)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > len(texts)
    single = client.post("/v1/embeddings", json={"input": "rain on a roof"}).json()
    np.testing.assert_allclose(single["data"][0]["embedding"], got[2], atol=1e-5)
    packed = client.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"}).json()
    unpacked = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in packed["data"]]
    np.testing.assert_allclose(np.stack(unpacked), got, atol=1e-6)


def test_media_embeddings_match_the_model(client: TestClient, model) -> None:
    images = [image_bytes("owl"), image_bytes("crow")]
    r = client.post("/v1/embeddings", json={"input": [b64(x) for x in images], "modality": "image"})
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]])
    np.testing.assert_allclose(got, model.embed(image=images).image.numpy(), atol=1e-5)
    clips = [clip_bytes("crow"), clip_bytes("drake")]  # different lengths: each is embedded as if alone
    r = client.post("/v1/embeddings", json={"input": [b64(x) for x in clips], "modality": "audio"})
    got = np.array([d["embedding"] for d in r.json()["data"]])
    want = np.concatenate([model.embed(audio=[clip]).audio.numpy() for clip in clips])
    np.testing.assert_allclose(got, want, atol=1e-5)
    mixed = [{"audio": b64(clips[1])}, {"text": "an owl"}, {"image": "data:image/png;base64," + b64(images[0])}]
    r = client.post("/v1/embeddings", json={"input": mixed})
    got = np.array([d["embedding"] for d in r.json()["data"]])
    np.testing.assert_allclose(got[0], want[1], atol=1e-5)
    np.testing.assert_allclose(got[1], model.embed(text="an owl").text[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(got[2], model.embed(image=images[0]).image[0].numpy(), atol=1e-5)


def test_multipart_embeddings_keep_the_part_order(client: TestClient, model) -> None:
    files = [
        ("image", ("owl.png", image_bytes("owl"), "image/png")),
        ("input", (None, "an owl")),
        ("audio", ("owl.ogg", clip_bytes("owl"), "audio/ogg")),
    ]
    r = client.post("/v1/embeddings", files=files)
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]])
    np.testing.assert_allclose(got[0], model.embed(image=image_bytes("owl")).image[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(got[1], model.embed(text="an owl").text[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(got[2], model.embed(audio=clip_bytes("owl")).audio[0].numpy(), atol=1e-5)


# ----------------------------------------------------------------------------------------------- search
def test_search_matches_the_index(client: TestClient, model, index) -> None:
    r = client.post("/v1/search", json={"text": "a bird", "k": 5})
    assert r.status_code == 200, r.text
    answer = SearchResponse.model_validate(r.json())
    assert answer.query == ["text"] and answer.k == 5 and [h.rank for h in answer.hits] == [1, 2, 3, 4, 5]
    assert_same_hits(http_ids(r.json()), search_ids(index, model.embed(text="a bird").text[0], 5))
    for hit in answer.hits:
        assert (hit.url is None) == (hit.modality == "text")
    r = client.post("/v1/search", json={"image": b64(image_bytes("crow")), "k": 4, "modality": "image"})
    want = search_ids(index, model.embed(image=image_bytes("crow")).image[0], 4, "image")
    assert_same_hits(http_ids(r.json()), want)
    assert {h["modality"] for h in r.json()["hits"]} == {"image"}
    files = {"audio": ("q.ogg", clip_bytes("crow"), "audio/ogg")}
    r = client.post("/v1/search", files=files, data={"k": "6"})
    assert_same_hits(http_ids(r.json()), search_ids(index, model.embed(audio=clip_bytes("crow")).audio[0], 6))
    r = client.post("/v1/search", json={"text": "a bird", "k": 100})
    assert len(r.json()["hits"]) == len(index)  # k above the index size gives every item


def test_composed_queries_match_compose(client: TestClient, model, index) -> None:
    r = client.post("/v1/search", json={"text": "a bird", "image": b64(image_bytes("crow")), "k": 5})
    assert r.json()["query"] == ["text", "image"]
    want = search_ids(index, model.compose(text="a bird", image=image_bytes("crow")), 5)
    assert_same_hits(http_ids(r.json()), want)
    files = {"image": ("q.png", image_bytes("owl"), "image/png"), "audio": ("q.ogg", clip_bytes("bee"), "audio/ogg")}
    r = client.post("/v1/search", files=files, data={"text": "an animal", "k": "7", "modality": "audio"})
    assert r.json()["query"] == ["text", "image", "audio"]
    query = model.compose(text="an animal", image=image_bytes("owl"), audio=clip_bytes("bee"))
    assert_same_hits(http_ids(r.json()), search_ids(index, query, 7, "audio"))


def test_search_agrees_with_the_cli(client: TestClient, index_dir: Path, capsys: pytest.CaptureFixture) -> None:
    import argparse

    from onepeace import cli

    args = ["index", "search", str(index_dir), "--text", "a bird", "--image", str(DATA / "images" / "crow.png")]
    args += ["--k", "5", "--json"]
    registered = cli.main(["index", "--help"]) == 0
    capsys.readouterr()
    if registered:
        assert cli.main(args) == 0
    else:  # the same command through its own parser, until it is registered in onepeace.cli
        from onepeace import cli_index

        parser = argparse.ArgumentParser()
        cli_index.add_parser(parser.add_subparsers(), [])
        parsed = parser.parse_args(args)
        assert parsed.handler(parsed) == 0
    printed = json.loads(capsys.readouterr().out)
    r = client.post("/v1/search", json={"text": "a bird", "image": b64(image_bytes("crow")), "k": 5})
    assert_same_hits(http_ids(r.json()), [(h["item_id"], h["score"]) for h in printed["hits"]])
    assert [h["source"] for h in r.json()["hits"]] == [h["source"] for h in printed["hits"]]


def test_media_route_serves_only_indexed_files(client: TestClient, index) -> None:
    hits = client.post("/v1/search", json={"text": "a bird", "k": 100}).json()["hits"]
    image = next(h for h in hits if h["modality"] == "image")
    clip = next(h for h in hits if h["modality"] == "audio")
    text = next(h for h in hits if h["modality"] == "text")
    r = client.get(image["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == Path(image["source"]).read_bytes()
    r = client.get(clip["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "audio/ogg"
    assert client.head(clip["url"]).status_code == 200
    assert client.get(f"/v1/items/{image['item_id']}").json()["source"] == image["source"]
    for url in (f"/v1/items/{text['item_id']}/media", "/v1/items/987654/media", "/v1/items/..%2F..%2Fetc/media"):
        r = client.get(url)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    assert client.get("/v1/items/-1/media").status_code == 404
    assert client.get("/v1/items/abc").status_code == 404


# ----------------------------------------------------------------------------------------------- bad requests
def _multipart(fields: list[tuple[str, str, bytes | None]], boundary: str = "b0undary") -> bytes:
    out = io.BytesIO()
    for name, value, data in fields:
        out.write(f"--{boundary}\r\n".encode())
        if data is None:
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        else:
            out.write(f'Content-Disposition: form-data; name="{name}"; filename="{value}"\r\n'.encode())
            out.write(b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


MULTIPART = "multipart/form-data; boundary=b0undary"
PNG = image_bytes("owl")
OGG = clip_bytes("owl")
S, E, REQ, MEDIA = "/v1/search", "/v1/embeddings", "invalid_request_error", "invalid_media"


def raw(content, content_type: str | None = "application/json") -> dict:
    return {"content": content, "headers": {"content-type": content_type} if content_type else {}}


def form(*fields: tuple[str, str, bytes | None]) -> dict:
    return raw(_multipart(list(fields)), MULTIPART)


BAD_REQUESTS = {  # name: (path, request, status, error type)
    "empty text": (S, {"json": {"text": "  "}}, 400, REQ),
    "empty embeddings text": (E, {"json": {"input": ["ok", ""]}}, 400, REQ),
    "empty input list": (E, {"json": {"input": []}}, 400, REQ),
    "no query": (S, {"json": {"k": 3}}, 400, REQ),
    "wrong base64": (S, {"json": {"image": "not base64 at all!"}}, 400, MEDIA),
    "wrong base64 embeddings": (E, {"json": {"input": ["%%%"], "modality": "audio"}}, 400, MEDIA),
    "corrupt image": (S, {"json": {"image": b64(b"\x89PNG\r\n\x1a\nnot really")}}, 400, MEDIA),
    "truncated image": (S, {"json": {"image": b64(PNG[: len(PNG) // 2])}}, 400, MEDIA),
    "corrupt audio": (S, {"json": {"audio": b64(b"OggS" + bytes(200))}}, 400, MEDIA),
    "truncated audio": (S, {"json": {"audio": b64(OGG[:300])}}, 400, MEDIA),
    "half an audio file": (E, {"json": {"input": [{"audio": b64(OGG[: len(OGG) // 2])}]}}, 400, MEDIA),
    "truncated multipart": (S, raw(_multipart([("image", "q.png", PNG)])[:-300], MULTIPART), 400, REQ),
    "multipart unknown field": (S, form(("text", "x", None), ("q", "1", None)), 400, REQ),
    "multipart k not a number": (S, form(("text", "x", None), ("k", "many", None)), 400, REQ),
    "multipart empty file": (S, form(("image", "q.png", b"")), 400, MEDIA),
    "multipart without boundary": (S, raw(b"x", "multipart/form-data"), 400, REQ),
    "wrong content type": (S, raw(b"text=a", "text/plain"), 415, "unsupported_media_type"),
    "form-urlencoded": (S, {"data": {"text": "a bird"}}, 415, "unsupported_media_type"),
    "no content type": (E, raw(b'{"input": "a"}', None), 415, "unsupported_media_type"),
    "malformed JSON": (S, raw(b'{"text": "a'), 400, "invalid_json"),
    "JSON not an object": (E, {"json": ["a"]}, 400, "invalid_json"),
    "unknown JSON key": (S, {"json": {"text": "a", "query": "b"}}, 400, REQ),
    "unknown embeddings key": (E, {"json": {"input": "a", "foo": 1}}, 400, REQ),
    "unknown input item key": (E, {"json": {"input": [{"video": "x"}]}}, 400, REQ),
    "two keys in an input item": (E, {"json": {"input": [{"text": "a", "image": "b"}]}}, 400, REQ),
    "token ids as input": (E, {"json": {"input": [[101, 102]]}}, 400, REQ),
    "input of a wrong type": (E, {"json": {"input": 12}}, 400, REQ),
    "k=0": (S, {"json": {"text": "a", "k": 0}}, 400, REQ),
    "k=10**9": (S, {"json": {"text": "a", "k": 10**9}}, 400, REQ),
    "k='x'": (S, {"json": {"text": "a", "k": "x"}}, 400, REQ),
    "k='5'": (S, {"json": {"text": "a", "k": "5"}}, 400, REQ),
    "k=2.5": (S, {"json": {"text": "a", "k": 2.5}}, 400, REQ),
    "k=true": (S, {"json": {"text": "a", "k": True}}, 400, REQ),
    "unknown modality": (S, {"json": {"text": "a", "modality": "video"}}, 400, REQ),
    "wrong dimensions": (E, {"json": {"input": "a", "dimensions": 3}}, 400, REQ),
    "oversized body": (S, {"json": {"text": "a" * (LIMIT + 10)}}, 413, "request_too_large"),
    "oversized stream": (S, raw(iter([b'{"text": "', b"a" * LIMIT, b'"}'])), 413, "request_too_large"),
    "unknown route": ("/v1/nothing", {"json": {}}, 404, "not_found"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_a_clear_4xx(client: TestClient, case: str) -> None:
    path, kwargs, status, kind = BAD_REQUESTS[case]
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == kind and isinstance(error["message"], str) and error["message"]
    assert_serving(client)


def test_method_not_allowed_is_json(client: TestClient) -> None:
    r = client.get("/v1/search")
    assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"


def test_metrics_count_requests_and_batches(client: TestClient) -> None:
    before = client.get("/metrics").json()
    client.post("/v1/search", json={"text": "a cow", "k": 2})
    client.post("/v1/search", json={"text": "", "k": 2})
    after = client.get("/metrics").json()
    route = after["requests"]["POST /v1/search"]
    old = before["requests"].get("POST /v1/search", {})
    assert route.get("200", 0) == old.get("200", 0) + 1 and route.get("400", 0) == old.get("400", 0) + 1
    assert after["errors"]["client_4xx"] == before["errors"]["client_4xx"] + 1
    assert after["errors"]["server_5xx"] == 0
    batching = after["batching"]
    assert batching["batches_run"] > before["batching"]["batches_run"] and batching["mean_batch_size"] >= 1


# ----------------------------------------------------------------------------------------------- batching, limits
def test_concurrent_requests_share_batches(model, index_dir: Path) -> None:
    settings = ServeSettings(batch_wait_ms=200, timeout_s=60)
    texts = [f"a photo of animal number {i}" for i in range(8)]
    with TestClient(create_app(index_dir, model=model, settings=settings)) as c:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda t: c.post("/v1/embeddings", json={"input": t}), texts))
        stats = c.get("/metrics").json()["batching"]
    assert all(r.status_code == 200 for r in answers)
    got = np.array([r.json()["data"][0]["embedding"] for r in answers])
    np.testing.assert_allclose(got, model.embed(text=texts).text.numpy(), atol=1e-5)
    assert stats["max_batch_size"] > 1 and stats["batches_run"] < len(texts) + 1


def test_batcher_queue_is_bounded() -> None:
    release = threading.Event()

    def embed(modality: str, inputs: list) -> np.ndarray:
        release.wait(10)
        return np.ones((len(inputs), 4), dtype=np.float32)

    batcher = Batcher(embed, max_batch=1, max_wait_ms=0, max_queue=2)
    batcher.start()
    try:
        first = batcher.submit("text", ["a"])
        deadline = time.monotonic() + 5
        while batcher.stats()["queue_depth"] and time.monotonic() < deadline:  # the worker takes the first job
            time.sleep(0.01)
        queued = [batcher.submit("text", ["b"]), batcher.submit("text", ["c"])]
        with pytest.raises(QueueFull):
            batcher.submit("text", ["d"])
        queued[0].cancel()
        release.set()
        assert first.result(10).shape == (1, 4) and queued[1].result(10).shape == (1, 4)
        stats = batcher.stats()
        assert stats["jobs_rejected_queue_full"] == 1 and stats["jobs_cancelled"] == 1
    finally:
        release.set()
        batcher.stop()


def test_overload_gives_503_and_timeouts_504(model, index_dir: Path) -> None:
    slow = SlowModel(model, delay=0.4)
    settings = ServeSettings(max_queue=1, max_batch=1, batch_wait_ms=0, timeout_s=30)
    with TestClient(create_app(index_dir, model=slow, settings=settings)) as c:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: c.post("/v1/search", json={"text": f"a bird {i}"}), range(6)))
        codes = sorted(r.status_code for r in answers)
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
        busy = next(r for r in answers if r.status_code == 503)
        assert busy.json()["error"]["type"] == "overloaded" and busy.headers["retry-after"] == "1"
        assert c.post("/v1/search", json={"text": "a bird"}).status_code == 200
    settings = ServeSettings(timeout_s=0.2)
    with TestClient(create_app(index_dir, model=slow, settings=settings)) as c:
        r = c.post("/v1/search", json={"text": "a bird"})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        assert c.get("/healthz").json()["status"] == "ok"
        assert c.get("/metrics").json()["requests"]["POST /v1/search"] == {"504": 1}


def test_decoded_media_is_bounded(model, index_dir: Path) -> None:
    import soundfile

    silence = io.BytesIO()  # ten minutes of silence compress to a small file: refused from its header
    soundfile.write(silence, np.zeros(16000 * 600, dtype=np.float32), 16000, format="FLAC")
    assert len(silence.getvalue()) < LIMIT
    settings = ServeSettings(max_image_pixels=64 * 64 + 1, max_audio_seconds=60)
    with TestClient(create_app(index_dir, model=model, settings=settings)) as c:
        r = c.post("/v1/search", json={"audio": b64(silence.getvalue())})
        assert r.status_code == 400 and "600.0 s of audio" in r.json()["error"]["message"]
        r = c.post("/v1/embeddings", json={"input": [b64(PNG), b64(PNG)], "modality": "image"})
        assert r.status_code == 400 and "pixels per request" in r.json()["error"]["message"]
        assert c.post("/v1/embeddings", json={"input": [b64(PNG)], "modality": "image"}).status_code == 200


# ----------------------------------------------------------------------------------------------- real sockets
def _raw_request(port: int, head: str, body_chunks: list[bytes], close_early: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode("latin-1"))
        with contextlib.suppress(OSError):  # the server may answer and close before it has read everything
            for chunk in body_chunks:
                sock.sendall(chunk)
        if close_early:
            return b""
        data = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in data:
                more = sock.recv(65536)
                if not more:
                    break
                data += more
        return data


def test_real_server_limits(model, index_dir: Path) -> None:
    settings = ServeSettings(max_body_bytes=LIMIT, timeout_s=30)
    with ServerThread(create_app(index_dir, model=model, settings=settings)) as server:
        started = time.monotonic()
        head = (
            "POST /v1/search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            "Content-Length: 500000000\r\n\r\n"
        )
        answer = _raw_request(server.port, head, [b'{"text": "'])  # refused from the header alone
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert time.monotonic() - started < 10
        head = "POST /v1/search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        head += "Transfer-Encoding: chunked\r\n\r\n"
        piece = b"a" * 65536
        chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * (2 * LIMIT // len(piece)) + [b"0\r\n\r\n"]
        answer = _raw_request(server.port, head, chunks)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        body = _multipart([("image", "q.png", PNG)])
        head = f"POST /v1/search HTTP/1.1\r\nHost: localhost\r\nContent-Type: {MULTIPART}\r\n"
        head += f"Content-Length: {len(body) + 5000}\r\n\r\n"
        _raw_request(server.port, head, [body], close_early=True)  # a client that gives up mid-upload
        import httpx

        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/healthz").json()["status"] == "ok"
            r = http.post("/v1/search", files={"image": ("q.png", PNG, "image/png")}, data={"k": "3"})
            assert r.status_code == 200 and len(r.json()["hits"]) == 3
            time.sleep(0.2)
            metrics = http.get("/metrics").json()
            assert metrics["requests"]["POST /v1/search"]["413"] == 2
            assert metrics["errors"]["server_5xx"] == 0


# ----------------------------------------------------------------------------------------------- command line
def test_serve_command_line() -> None:
    import argparse

    from onepeace import cli_serve

    parser = argparse.ArgumentParser()
    cli_serve.add_parser(parser.add_subparsers(), [])
    args = parser.parse_args(["serve", "--index", "idx"])
    assert (args.host, args.port, args.max_body_mb, args.timeout_s, args.model) == ("127.0.0.1", 8000, 10.0, 30.0, None)
    assert args.handler is cli_serve._serve
    args = parser.parse_args(["serve", "--index", "i", "--port", "9", "--max-body-mb", "2", "--timeout-s", "5"])
    assert (args.port, args.max_body_mb, args.timeout_s) == (9, 2.0, 5.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--index", "i", "--max-body-mb", "0"])
    assert cli_serve.is_loopback("127.0.0.1") and cli_serve.is_loopback("::1") and cli_serve.is_loopback("localhost")
    assert not cli_serve.is_loopback("0.0.0.0")
