"""Issue 16: one client cannot lock everyone out of ``serve`` (a real server on loopback)."""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.badfiles import many_scan_jpeg
from tests.conftest import draw_image, make_collection

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")

import uvicorn

from embedsearch import build_index
from embedsearch.serve import create_app
from embedsearch.serve.guard import server_config


def jpeg(cls: str = "red", seed: int = 1) -> bytes:
    buf = io.BytesIO()
    draw_image(cls, seed).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("guard")
    return build_index(make_collection(base / "images", per_class=4), out=base / "b",
                       model="test:tiny").path


@pytest.fixture(scope="module")
def server(bundle_dir: Path) -> Iterator[tuple[str, int]]:
    app = create_app(bundle_dir)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    srv = uvicorn.Server(server_config(app, host, port, header_timeout=1.0, body_timeout=2.0,
                                       log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield host, port
    srv.should_exit = True
    thread.join(10)


def request(addr: tuple[str, int], method: str, path: str, body: bytes | None = None,
            ctype: str | None = None, timeout: float = 30) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*addr, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": ctype} if ctype else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_a_normal_request_is_answered_while_idle_and_hostile_clients_wait(
        server: tuple[str, int]) -> None:
    idle = [socket.create_connection(server) for _ in range(64)]
    bad = many_scan_jpeg()
    hostile: list[tuple[int, dict]] = []
    threads = [threading.Thread(target=lambda: hostile.append(
        request(server, "POST", "/predict", bad, "image/jpeg"))) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        t0 = time.monotonic()
        status, body = request(server, "POST", "/predict", jpeg(), "image/jpeg")
        assert status == 200 and body["label"] == "red"
        assert time.monotonic() - t0 < 2.0
        for t in threads:
            t.join(10)
        assert [s for s, _ in hostile] == [413, 413]
        assert {b["error"] for _, b in hostile} == {"too_many_scans"}
        # Idle connections do not stay open: the head deadline (1 s here) closes them.
        assert all(closed_by_server(s, 4.0) for s in idle)
    finally:
        for s in idle:
            s.close()


def test_slow_head_and_slow_body_are_cut_off(server: tuple[str, int]) -> None:
    slow_head = socket.create_connection(server)
    slow_head.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
    slow_body = socket.create_connection(server)
    slow_body.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                      b"Content-Length: 100000\r\n\r\n" + b"\xff" * 10)
    t0 = time.monotonic()
    closed_head = closed_body = False
    while time.monotonic() - t0 < 6 and not (closed_head and closed_body):
        for s, kind in ((slow_head, "head"), (slow_body, "body")):
            try:
                s.sendall(b"X-A: b\r\n" if kind == "head" else b"\x00")
            except OSError:
                if kind == "head":
                    closed_head = True
                else:
                    closed_body = True
        time.sleep(0.2)
    assert closed_head and closed_body, "a trickling client kept its connection"
    assert request(server, "GET", "/health")[0] == 200


def test_thumbnails_share_the_decode_slots_and_are_cached(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from embedsearch.render import thumbnails as thumb_mod

    out = build_index(make_collection(tmp_path / "images", per_class=2), out=tmp_path / "b",
                      model="test:tiny").path
    svc = create_app(out).state.service
    svc.load()
    real, active, peak, calls = thumb_mod.load_image, [0], [0], []
    lock = threading.Lock()

    def counting(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            calls.append(args[0])
        time.sleep(0.2)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(thumb_mod, "load_image", counting)
    ids = list(svc._ids)[:5]
    threads = [threading.Thread(target=svc.thumbnail, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= 2 and len(calls) == 5
    svc.thumbnail(ids[0])
    assert len(calls) == 5, "a thumbnail was decoded twice"


@pytest.mark.parametrize("kwargs", [
    {"json": {"path": "x" * 100_000}},
    {"json": {"id": "x" * 100_000}},
    {"json": {"path": "a/" * 3000}},
    {"json": {"id": 5}},
    {"json": {"path": {"nested": ["x"]}}},
    {"data": {"path": "x" * 100_000}},
    {"content": b"[" * 100_000 + b"]" * 100_000,
     "headers": {"content-type": "application/json"}},
    {"content": b'{"id": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
     "headers": {"content-type": "application/json"}},
])
def test_huge_or_deeply_nested_requests_are_4xx_not_500(bundle_dir: Path, kwargs: dict
                                                        ) -> None:
    from fastapi.testclient import TestClient

    with TestClient(create_app(bundle_dir), raise_server_exceptions=False) as client:
        resp = client.post("/predict", **kwargs)
    assert 400 <= resp.status_code < 500, resp.text[:300]
    assert set(resp.json()) == {"error", "detail"} and len(resp.text) < 2000


def test_bodies_held_at_once_are_bounded(bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    from fastapi.testclient import TestClient

    from embedsearch.serve import app as app_mod

    monkeypatch.setattr(app_mod, "BODY_BUDGET_BYTES", 1000)
    with TestClient(create_app(bundle_dir), raise_server_exceptions=False) as client:
        resp = client.post("/predict", content=jpeg(), headers={"content-type": "image/jpeg"})
        assert resp.status_code == 503 and resp.json()["error"] == "busy"
        ok = client.post("/predict", json={"id": "red/red_000.jpg"})
        assert ok.status_code == 200, ok.text
