"""Released checkpoints by name (``onepeace.hub``) against a local HTTP server with Range support that serves the
fixture checkpoint in the official layout: full download, a cut then resumed transfer, server errors, truncated
or lying responses, offline mode, and ``onepeace.load("ONE-PEACE")`` from the cache."""

from __future__ import annotations

import http.server
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import official
import pytest
import torch

import onepeace
from onepeace import hub
from onepeace.cli import main
from onepeace.hub import transfer

PRETRAINED = "one-peace.pt"


@dataclass
class Behaviour:
    """What the server does; every field applies to each response until changed."""

    status: int | None = None  # answer with this error code
    cut_after: int | None = None  # close the connection after this many body bytes (headers stay honest)
    cuts_left: int = -1  # how many more responses to cut (-1: every one)
    claim_less: int = 0  # send this many bytes fewer and say so in Content-Length (a short file as a whole one)
    ignore_range: bool = False
    requests: list[str | None] = field(default_factory=list)  # the Range header of each request


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:
        b = self.server.behaviour
        b.requests.append(self.headers.get("Range"))
        data = self.server.files.get(urllib.parse.unquote(self.path))
        if b.status is not None or data is None:
            self.send_error(b.status or 404)
            return
        data = data[: len(data) - b.claim_less]
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(match.group(1)) if match and not b.ignore_range else 0
        if start >= len(data) and match:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if b.cut_after is not None and b.cuts_left != 0:
            body = body[: b.cut_after]
            b.cuts_left -= b.cuts_left > 0
        self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.behaviour = files, Behaviour()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return official.write_official_checkpoint(tmp_path_factory.mktemp("served") / PRETRAINED).read_bytes()


@pytest.fixture
def server(checkpoint_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    """A mirror at ``/mirror`` with the official relative paths; the environment points the cache and URL at it."""
    files = {f"/mirror/{PRETRAINED}": checkpoint_bytes, "/mirror/one_peace_checkpoints/finetune_refcoco+.pt": b"x"}
    srv = _Server(files)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("ONEPEACE_WEIGHTS_URL", srv.url + "/mirror/")
    monkeypatch.delenv("ONEPEACE_OFFLINE", raising=False)
    monkeypatch.setattr(transfer, "RETRY_WAIT", 0.0)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ONEPEACE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _left(cache: Path) -> dict[str, int]:
    """Every file in the cache and its size."""
    return {str(p.relative_to(cache)): p.stat().st_size for p in cache.rglob("*") if p.is_file()}


def test_full_download_is_byte_identical_and_leaves_no_part_file(server: _Server, cache: Path, checkpoint_bytes):
    path = hub.fetch("ONE-PEACE", progress=False)
    assert path == cache / PRETRAINED
    assert path.read_bytes() == checkpoint_bytes
    assert _left(cache) == {PRETRAINED: len(checkpoint_bytes)}
    assert server.behaviour.requests == [None]
    assert hub.fetch("ONE-PEACE", progress=False) == path  # cached: no second request
    assert server.behaviour.requests == [None]


def test_a_cut_transfer_resumes_with_a_range_request(server: _Server, cache: Path, checkpoint_bytes: bytes):
    half = len(checkpoint_bytes) // 2
    server.behaviour.cut_after, server.behaviour.cuts_left = half, 1
    path = hub.fetch("ONE-PEACE", progress=False)
    assert server.behaviour.requests == [None, f"bytes={half}-"]
    assert path.read_bytes() == checkpoint_bytes
    assert _left(cache) == {PRETRAINED: len(checkpoint_bytes)}


def test_cut_after_every_retry_fails_in_one_line_and_the_next_call_resumes(
    server, cache, checkpoint_bytes, monkeypatch
):
    monkeypatch.setattr(transfer, "RETRIES", 1)
    step = len(checkpoint_bytes) // 3
    server.behaviour.cut_after = step  # every response stops after `step` bytes
    with pytest.raises(hub.DownloadError) as err:
        hub.fetch("ONE-PEACE", progress=False)
    message = str(err.value)
    assert (
        "\n" not in message and f"cut after {2 * step:,} bytes" in message and "run the same command again" in message
    )
    assert server.behaviour.requests == [None, f"bytes={step}-"]
    assert _left(cache) == {PRETRAINED + ".part": 2 * step}  # only the part file, never the final name
    monkeypatch.setenv("ONEPEACE_OFFLINE", "1")
    with pytest.raises(hub.OfflineError, match="not in the cache"):
        onepeace.load("ONE-PEACE")
    monkeypatch.delenv("ONEPEACE_OFFLINE")
    server.behaviour.cut_after = None
    path = hub.fetch("ONE-PEACE", progress=False)
    assert server.behaviour.requests[-1] == f"bytes={2 * step}-"
    assert path.read_bytes() == checkpoint_bytes
    assert _left(cache) == {PRETRAINED: len(checkpoint_bytes)}


def test_a_server_that_ignores_range_sends_the_whole_file_again(server: _Server, cache: Path, checkpoint_bytes):
    server.behaviour.cut_after, server.behaviour.cuts_left = 1000, 1
    server.behaviour.ignore_range = True
    path = hub.fetch("ONE-PEACE", progress=False)
    assert server.behaviour.requests == [None, "bytes=1000-"]
    assert path.read_bytes() == checkpoint_bytes


def test_a_part_file_already_whole_is_finished_by_a_416_answer(server: _Server, cache: Path, checkpoint_bytes):
    (cache).mkdir(parents=True)
    (cache / (PRETRAINED + ".part")).write_bytes(checkpoint_bytes)
    path = hub.fetch("ONE-PEACE", progress=False)
    assert server.behaviour.requests == [f"bytes={len(checkpoint_bytes)}-"]
    assert path.read_bytes() == checkpoint_bytes and _left(cache) == {PRETRAINED: len(checkpoint_bytes)}


@pytest.mark.parametrize("status, text", [(500, "HTTP 500 Internal Server Error"), (404, "HTTP 404 Not Found")])
def test_server_errors_give_one_line_and_leave_nothing(server: _Server, cache: Path, status: int, text: str):
    server.behaviour.status = status
    with pytest.raises(hub.DownloadError) as err:
        hub.fetch("ONE-PEACE", progress=False)
    assert str(err.value) == f"cannot download {server.url}/mirror/{PRETRAINED}: {text}"
    assert _left(cache) == {}


def test_a_short_file_sent_as_whole_is_refused_and_removed(server: _Server, cache: Path, checkpoint_bytes: bytes):
    server.behaviour.claim_less = 100  # Content-Length agrees with the short body: only the archive check sees it
    with pytest.raises(hub.DownloadError) as err:
        hub.fetch("ONE-PEACE", progress=False)
    assert "\n" not in str(err.value) and "archive's directory is missing; nothing was kept" in str(err.value)
    assert _left(cache) == {}


def test_a_connection_refused_is_one_line(cache: Path, monkeypatch: pytest.MonkeyPatch):
    srv = _Server({})
    port = srv.server_address[1]
    srv.server_close()  # nothing listens on the port any more
    monkeypatch.setenv("ONEPEACE_WEIGHTS_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(hub.DownloadError) as err:
        hub.fetch("ONE-PEACE", progress=False)
    assert str(err.value) == f"cannot reach http://127.0.0.1:{port}/{PRETRAINED}: Connection refused"
    assert _left(cache) == {}


def test_offline_never_touches_the_network_and_says_what_to_place_where(server: _Server, cache: Path, monkeypatch):
    monkeypatch.setenv("ONEPEACE_OFFLINE", "1")
    with pytest.raises(hub.OfflineError) as err:
        hub.fetch("ONE-PEACE")
    assert str(err.value) == (
        f"ONEPEACE_OFFLINE is set and ONE-PEACE is not in the cache: download {server.url}/mirror/{PRETRAINED} "
        f"and save it as {cache / PRETRAINED}"
    )
    assert server.behaviour.requests == []
    monkeypatch.setenv("ONEPEACE_OFFLINE", "maybe")
    with pytest.raises(ValueError, match="ONEPEACE_OFFLINE must be 1 or 0"):
        hub.fetch("ONE-PEACE")


def test_load_by_name_then_offline_equals_loading_the_file(server, cache, checkpoint_bytes, monkeypatch, tmp_path):
    first = onepeace.load("ONE-PEACE")
    assert server.behaviour.requests == [None]
    monkeypatch.setenv("ONEPEACE_OFFLINE", "1")
    monkeypatch.setenv("ONEPEACE_WEIGHTS_URL", "http://127.0.0.1:9")  # would fail if it were used
    by_name = onepeace.load("ONE-PEACE")
    direct_file = tmp_path / "direct.pt"
    direct_file.write_bytes(checkpoint_bytes)
    direct = onepeace.load(direct_file)
    x = official.inputs()
    with torch.no_grad():
        for model in (first, by_name):
            assert torch.equal(model.encode_text(x["text.tokens"]), direct.encode_text(x["text.tokens"]))
            assert torch.equal(model.encode_image(x["image.pixels"]), direct.encode_image(x["image.pixels"]))
            audio = (x["audio.waveform"], x["audio.padding_mask"])
            assert torch.equal(model.encode_audio(*audio), direct.encode_audio(*audio))
    assert server.behaviour.requests == [None]


def test_names_that_are_not_embedding_models_are_refused_clearly(server: _Server):
    with pytest.raises(onepeace.errors.CheckpointError) as err:
        onepeace.load("ONE-PEACE_VGGSound")
    assert "give the file it prints as the model.init_from of a vggsound fine-tuning recipe" in str(err.value)
    with pytest.raises(ValueError, match="did you mean ONE-PEACE_COCO"):
        hub.fetch("ONE-PEACE_COC")
    with pytest.raises(ValueError, match="ImageNet-1k classification at 384 px.*cannot load it yet"):
        hub.fetch("onepeace_ft_21kto1k_384.pth")
    assert server.behaviour.requests == []


def test_release_paths_are_quoted_under_the_mirror(server: _Server, cache: Path):
    assert hub.weights_url("ONE-PEACE_RefCOCO+") == f"{server.url}/mirror/one_peace_checkpoints/finetune_refcoco%2B.pt"
    path = hub.fetch("ONE-PEACE_RefCOCO+", progress=False)
    assert path == cache / "one_peace_checkpoints" / "finetune_refcoco+.pt" and path.read_bytes() == b"x"


def test_every_release_is_a_pt_file_and_the_official_names_are_kept():
    assert {"ONE-PEACE", "ONE-PEACE_Grounding", "ONE-PEACE_VGGSound"} <= set(hub.RELEASES)
    assert hub.RELEASES["ONE-PEACE"].path == "one-peace.pt"
    assert hub.RELEASES["ONE-PEACE_VGGSound"].path == "one_peace_checkpoints/finetune_vggsound.pt"
    assert hub.RELEASES["ONE-PEACE_Grounding"].path == "one_peace_checkpoints/finetune_refcocog.pt"
    assert all(r.path.endswith(".pt") for r in hub.RELEASES.values())
    assert len(hub.RELEASES) + len(hub.NOT_LOADABLE) == 18  # every checkpoint the official checkpoints list links
    from onepeace.finetune.tasks import TASKS

    assert all(task in TASKS for r in hub.RELEASES.values() for task in r.tasks)


def test_cli_list_and_download(server: _Server, cache: Path, checkpoint_bytes: bytes, capsys):
    assert main(["download", "--list"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ONE-PEACE\s+onepeace\.load \(embeddings\)\s+one-peace\.pt$", out, re.M)
    assert re.search(
        r"^ONE-PEACE_VGGSound\s+model\.init_from \(vggsound\)\s+one_peace_checkpoints/finetune_vgg", out, re.M
    )
    assert "not loadable by onepeace yet" in out and "one-peace-vision.pkl" in out
    assert main(["download", "ONE-PEACE"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{cache / PRETRAINED}\n"
    assert "ONE-PEACE" in captured.err  # the progress bar
    assert (cache / PRETRAINED).read_bytes() == checkpoint_bytes
    assert main(["download", "--list"]) == 0
    assert re.search(r"^ONE-PEACE\s.*one-peace\.pt\s+in cache$", capsys.readouterr().out, re.M)
    assert main(["download"]) == 2
    assert capsys.readouterr().err == "onepeace: error: give a checkpoint name (see onepeace download --list)\n"
    server.behaviour.status = 404
    assert main(["download", "ONE-PEACE_COCO", "--quiet"]) == 2
    err = capsys.readouterr().err
    coco = f"{server.url}/mirror/one_peace_checkpoints/finetune_coco.pt"
    assert err == f"onepeace: error: cannot download {coco}: HTTP 404 Not Found\n"


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_cli_a_file_that_cannot_be_written_is_one_line(server: _Server, cache: Path, tmp_path: Path):
    """A real write failure (the file-size limit of the process) in a fresh ``onepeace download`` process."""
    env = {**os.environ, "ONEPEACE_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "onepeace", "download", "ONE-PEACE", "--quiet"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == f"onepeace: error: cannot write {cache / PRETRAINED}.part: File too large\n"
    assert not (cache / PRETRAINED).exists()  # at most a part file, which is resumed, never loaded
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    env["ONEPEACE_CACHE"] = str(blocker / "cache")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr == f"onepeace: error: cannot write {blocker}/cache/{PRETRAINED}.part: Not a directory\n"


def test_a_part_file_locked_by_another_download_is_left_alone(server: _Server, cache: Path):
    import fcntl

    cache.mkdir(parents=True)
    with open(cache / (PRETRAINED + ".part"), "ab") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(hub.DownloadError, match="another process is downloading into .*one-peace.pt.part"):
            hub.fetch("ONE-PEACE", progress=False)
    assert server.behaviour.requests == [] and _left(cache) == {PRETRAINED + ".part": 0}  # its empty file stays


def _per_layer(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` with a second relative-position table per modality (released fine-tuned files hold one per layer)."""
    out = dict(sd)
    for key in [k for k in sd if k.endswith("rel_pos_table_list.0.weight")]:
        out[key.replace(".0.weight", ".1.weight")] = sd[key] + 0.01
    return out


def test_a_retrieval_fine_tune_loads_by_name(server: _Server, tmp_path: Path):
    """Text and image branches only, one table per layer, projections kept: the layout of finetune_coco.pt."""
    sd = _per_layer({k: v for k, v in official.inference_state_dict().items() if "audio" not in k})
    file = official.write_official_checkpoint(tmp_path / "coco.pt", sd)
    server.files["/mirror/one_peace_checkpoints/finetune_coco.pt"] = file.read_bytes()
    by_name, direct = onepeace.load("ONE-PEACE_COCO"), onepeace.load(file)
    assert by_name.model.cfg.per_layer_rel_pos and [m.value for m in by_name.model.cfg.modalities] == ["text", "image"]
    x = official.inputs()
    with torch.no_grad():
        assert torch.equal(by_name.encode_text(x["text.tokens"]), direct.encode_text(x["text.tokens"]))
        assert torch.equal(by_name.encode_image(x["image.pixels"]), direct.encode_image(x["image.pixels"]))


def test_a_downloaded_classification_fine_tune_starts_a_task_model(server: _Server, tmp_path: Path):
    """The audio branch and a classify head, without projections: the layout of finetune_vggsound.pt."""
    import json

    from onepeace.finetune.build import build_task_model
    from onepeace.finetune.config import parse_finetune_recipe
    from onepeace.heads import ClassifyHead

    torch.manual_seed(0)
    head = ClassifyHead(64, 4, num_classes=5)
    sd = {k: v for k, v in official.inference_state_dict().items() if "text" not in k and "image" not in k}
    sd = _per_layer({k: v for k, v in sd.items() if not k.startswith(("audio_proj", "logit_scale"))})
    sd.update({f"classify_head.{k}": v.clone() for k, v in head.state_dict().items()})
    server.files["/mirror/one_peace_checkpoints/finetune_vggsound.pt"] = official.write_official_checkpoint(
        tmp_path / "vgg.pt", sd
    ).read_bytes()
    path = hub.fetch("ONE-PEACE_VGGSound", progress=False)
    overrides = [f"model.init_from={json.dumps(str(path))}", "model.num_classes=5"]
    task = build_task_model(parse_finetune_recipe("{}", overrides, task="vggsound")).eval()
    assert torch.equal(task.head.classifier[3].weight, head.classifier[3].weight)
    tables = task.model.adapters["audio"].rel_pos.tables
    assert torch.equal(tables[1].weight, sd["encoder_wrapper.audio_adapter.rel_pos_table_list.1.weight"])


def test_a_recipe_starts_from_a_released_name(server: _Server, checkpoint_bytes: bytes, tmp_path: Path):
    from onepeace.finetune.build import build_task_model
    from onepeace.finetune.config import parse_finetune_recipe

    task = build_task_model(parse_finetune_recipe("{}", ["model.init_from=ONE-PEACE"], task="coco_retrieval"))
    assert server.behaviour.requests == [None]
    direct_file = tmp_path / "direct.pt"
    direct_file.write_bytes(checkpoint_bytes)
    expected, got = onepeace.load(direct_file).model.state_dict(), task.model.state_dict()
    for key in ("adapters.text.token_embed.weight", "projections.image.weight", "encoder.layers.1.attn.q_proj.weight"):
        assert torch.equal(got[key], expected[key])
    with pytest.raises(onepeace.errors.CheckpointError, match="its name gives only the backbone"):
        build_task_model(parse_finetune_recipe("{}", ["model.init_from=ONE-PEACE_VGGSound"], task="vggsound"))
