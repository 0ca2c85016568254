"""The search page of ``onepeace serve`` in a real headless Chromium: text query, image upload, composed query.

The server is uvicorn on a free loopback port (in a thread of this process); the browser is Debian's chromium driven
by Playwright. A screenshot of the rendered results goes to the test's tmp folder and, when it can be created, to
``out/test-artifacts/serve_page.png`` under the repository root.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
pytest.importorskip("fastapi")
pytest.importorskip("faiss")

import onepeace  # noqa: E402
from onepeace.serve import ServeSettings, create_app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "tiny_pairs"
IMAGES = ["bear", "cow", "duck", "frog", "lion", "owl", "sheep", "tiger"]
CLIPS = ["duck", "frog", "owl", "lion", "cow", "bee"]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory):
    import uvicorn

    from onepeace.search.build import build_index

    model = onepeace.load("onepeace-small")
    gallery = tmp_path_factory.mktemp("gallery")
    for folder, names, ext in (("images", IMAGES, "png"), ("audio", CLIPS, "ogg")):
        (gallery / folder).mkdir()
        for name in names:
            shutil.copy(DATA / folder / f"{name}.{ext}", gallery / folder)
    (gallery / "captions.txt").write_text("".join(f"A photo of a {name}.\n" for name in IMAGES), encoding="utf-8")
    index = tmp_path_factory.mktemp("index") / "gallery"
    build_index(model, gallery, index, model_name="onepeace-small", progress=False)
    app = create_app(index, model=model, settings=ServeSettings(timeout_s=60))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(15)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _save_screenshot(page, tmp_path: Path) -> Path:
    shot = tmp_path / "serve_page.png"
    page.screenshot(path=str(shot), full_page=True)
    try:
        artifacts = REPO / "out" / "test-artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, artifacts / "serve_page.png")
    except OSError:
        pass  # a read-only checkout keeps the copy in tmp_path only
    return shot


def wait_until(page, predicate: str, timeout: float = 30.0) -> None:
    """Poll a JavaScript predicate from here: the page's CSP forbids the in-page eval of ``wait_for_function``."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(predicate):
        assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
        time.sleep(0.05)


def _search(page) -> None:
    with page.expect_response(lambda r: r.url.endswith("/v1/search")) as answer:
        page.click("#search-button")
    assert answer.value.status == 200
    wait_until(page, "() => document.querySelector('#summary').textContent.includes('results')")


def test_search_page_in_chromium(server_url: str, browser, tmp_path: Path) -> None:
    import httpx

    page = browser.new_page(viewport={"width": 1100, "height": 900})
    hosts, problems = set(), []
    page.on("request", lambda r: hosts.add(r.url.split("/")[2]) if "://" in r.url else None)
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(server_url + "/")
    wait_until(page, "() => document.querySelector('#status').textContent.includes('onepeace-small')")
    for field in ("q-text", "q-image", "q-audio", "q-k", "q-modality"):  # every control has a label
        assert page.locator(f"label[for='{field}']").count() == 1

    # a text query: as many hits as asked, in the API's order
    page.fill("#q-text", "a bird")
    page.select_option("#q-k", "10")
    _search(page)
    hits = page.locator("#results li.hit")
    assert hits.count() == 10
    api = httpx.post(server_url + "/v1/search", json={"text": "a bird", "k": 10}, timeout=30).json()
    assert hits.first.get_attribute("data-source") == api["hits"][0]["source"]
    assert [hits.nth(i).get_attribute("data-item-id") for i in range(10)] == [str(h["item_id"]) for h in api["hits"]]

    # an image upload alone: the same image of the gallery comes first, with its thumbnail
    page.fill("#q-text", "")
    page.set_input_files("#q-image", str(DATA / "images" / "owl.png"))
    assert page.locator("#image-preview").is_visible()
    page.select_option("#q-k", "50")
    _search(page)
    first = page.locator("#results li.hit").first
    assert first.get_attribute("data-modality") == "image"
    assert first.get_attribute("data-source").endswith("owl.png")
    wait_until(
        page,
        "() => Array.from(document.querySelectorAll('#results img.thumb')).every(i => i.complete && i.naturalWidth)",
    )
    assert page.locator("#results img.thumb").count() == len(IMAGES)
    assert first.locator("img.thumb").get_attribute("alt").endswith("owl.png")
    audio = page.locator("#results li.hit-audio audio")
    assert audio.count() == len(CLIPS)
    assert httpx.get(server_url + audio.first.get_attribute("src"), timeout=30).headers["content-type"] == "audio/ogg"

    # text + image + sound: one composed query, restricted to sounds
    page.fill("#q-text", "a bird")
    page.set_input_files("#q-audio", str(DATA / "audio" / "crow.ogg"))
    page.select_option("#q-modality", "audio")
    _search(page)
    assert "text + image + sound (composed query)" in page.inner_text("#summary")
    assert page.locator("#results li.hit").count() == len(CLIPS)
    assert page.locator("#results li.hit-audio").count() == len(CLIPS)

    # a bad file is reported on the page, and the page keeps working
    page.set_input_files("#q-image", {"name": "bad.png", "mimeType": "image/png", "buffer": b"not an image"})
    with page.expect_response(lambda r: r.url.endswith("/v1/search")) as answer:
        page.click("#search-button")
    assert answer.value.status == 400
    wait_until(page, "() => document.querySelector('#message').textContent.includes('Search failed')")
    page.click("#clear-image")
    page.select_option("#q-modality", "")
    _search(page)

    shot = _save_screenshot(page, tmp_path)
    assert shot.stat().st_size > 10_000
    assert hosts == {server_url.split("/")[2]}, hosts  # nothing fetched from anywhere else
    assert not [p for p in problems if "400" not in p], problems
    page.close()
