"""HTTP API of ``embedsearch serve``, through FastAPI's test client (no network, no port)."""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import COLOURS, draw_image, make_collection

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")

from fastapi.testclient import TestClient

from embedsearch import build_index, load_bundle
from embedsearch.serve import create_app


def jpeg(cls: str, seed: int, size: int = 96) -> bytes:
    buf = io.BytesIO()
    draw_image(cls, seed, size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_bomb_header(width: int = 30000, height: int = 30000) -> bytes:
    """A 68-byte PNG whose header claims width × height pixels (nothing to decode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 8)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("serve")
    root = make_collection(base / "images")
    out = base / "bundle"
    build_index(root, out=out, model="test:tiny")
    return out


@pytest.fixture(scope="module")
def client(bundle_dir: Path):
    with TestClient(create_app(bundle_dir, max_upload_bytes=200_000)) as c:
        yield c


def upload(client: TestClient, data: bytes, ctype: str = "image/jpeg", name: str = "q.jpg",
           **params: object):
    return client.post("/predict", files={"file": (name, data, ctype)}, params=params)


def assert_error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text[:300]
    body = resp.json()
    assert set(body) == {"error", "detail"}, body
    assert "Traceback" not in body["detail"]
    if code:
        assert body["error"] == code, body
    return body


# -- service endpoints ----------------------------------------------------------------
def test_health_info_and_openapi(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok", "ready": True}
    info = client.get("/info").json()
    assert info["encoder"]["spec"] == "test:tiny" and info["encoder"]["dim"] == 64
    assert info["images"] == 24 and info["classes"] == sorted(COLOURS)
    assert info["counts"]["by_class"] == {c: 8 for c in COLOURS}
    assert "knn" in info["methods"]
    assert info["limits"]["max_upload_bytes"] == 200_000
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/health", "/info", "/images/{image_id}"} <= set(schema["paths"])
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)


def test_page_and_static_files(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="file-input"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (("app.js", "javascript"), ("app.css", "css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    assert_error(client.get("/static/..%2Fapp.py"), 404)
    assert_error(client.get("/static/index.html.bak"), 404)


def test_health_is_503_until_the_model_is_loaded(bundle_dir: Path) -> None:
    app = create_app(bundle_dir)
    c = TestClient(app)  # not entered: the lifespan (model loading) has not run
    assert c.get("/health").status_code == 503
    assert_error(c.post("/predict", json={"id": "red/red_000.jpg"}), 503, "not_ready")
    with c:
        assert c.get("/health").status_code == 200
        assert app.state.service.ready


# -- predictions ----------------------------------------------------------------------
@pytest.mark.parametrize("cls", sorted(COLOURS))
def test_upload_predicts_its_class_with_neighbours(client: TestClient, cls: str) -> None:
    resp = upload(client, jpeg(cls, 50_000 + len(cls)))
    assert resp.status_code == 200, resp.text
    r = resp.json()
    assert r["label"] == cls
    knn = r["methods"]["knn"]
    assert knn["label"] == cls and set(knn["probabilities"]) == set(COLOURS)
    assert abs(sum(knn["probabilities"].values()) - 1) < 1e-3
    assert next(iter(knn["probabilities"])) == cls  # highest first
    neigh = r["neighbours"]
    assert len(neigh) == 12
    sims = [n["similarity"] for n in neigh]
    assert sims == sorted(sims, reverse=True)
    assert all(n["label"] == cls for n in neigh[:5])
    assert all(n["image"] == f"/images/{n['id']}" for n in neigh)
    assert r["query"]["kind"] == "upload" and r["query"]["width"] == 96


def test_neighbour_count_and_raw_body_upload(client: TestClient) -> None:
    data = jpeg("red", 77)
    r = client.post("/predict?neighbours=3&k=5", content=data,
                    headers={"content-type": "image/jpeg"}).json()
    assert r["label"] == "red" and len(r["neighbours"]) == 3
    assert r["method"] == "knn(k=5, similarity)"
    assert_error(upload(client, data, neighbours=0), 422, "invalid_request")
    assert_error(upload(client, data, k=1000), 422, "invalid_request")


def test_search_from_an_indexed_id_reuses_its_embedding(client: TestClient,
                                                       bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    r = client.post("/predict", json={"id": "green/green_003.jpg"})
    assert r.status_code == 200, r.text
    r = r.json()
    assert r["label"] == "green"
    assert r["query"] == {"kind": "id", "id": "green/green_003.jpg", "label": "green",
                          "split": None, "image": "/images/green/green_003.jpg"}
    ids = [n["id"] for n in r["neighbours"]]
    assert "green/green_003.jpg" not in ids and len(ids) == 12
    assert all(n["label"] == "green" for n in r["neighbours"][:7])
    # The image votes neither for itself by id nor as an upload of the same bytes; both
    # say so. Same neighbours as re-encoding the file: the cached row is its embedding.
    assert r["in_index"] == {"id": "green/green_003.jpg", "split": None, "excluded": 1}
    again = upload(client, (bundle_dir.parent / "images/green/green_003.jpg").read_bytes())
    assert [n["id"] for n in again.json()["neighbours"]][:5] == ids[:5]
    assert again.json()["in_index"]["id"] == "green/green_003.jpg"
    assert bundle.items["id"].tolist().count("green/green_003.jpg") == 1
    # The same through a form field, as a plain HTML form would send it.
    form = client.post("/predict", data={"id": "green/green_003.jpg"}).json()
    assert [n["id"] for n in form["neighbours"]] == ids


def test_search_from_a_path_inside_the_indexed_folder(client: TestClient,
                                                     bundle_dir: Path) -> None:
    root = bundle_dir.parent / "images"
    rel = client.post("/predict", json={"path": "blue/blue_001.jpg"}).json()
    absolute = client.post("/predict", json={"path": str(root / "blue/blue_001.jpg")}).json()
    assert rel["query"]["id"] == absolute["query"]["id"] == "blue/blue_001.jpg"
    assert rel["neighbours"] == absolute["neighbours"]


def test_path_outside_the_indexed_folder_is_refused(tmp_path: Path, bundle_dir: Path) -> None:
    # A private bundle: this test adds files to the indexed folder.
    root = make_collection(tmp_path / "images", per_class=3)
    out = tmp_path / "bundle"
    build_index(root, out=out, model="test:tiny")
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg("red", 5))
    (root / "red" / "escape.jpg").symlink_to(secret)
    new = root / "green" / "added_later.jpg"
    new.write_bytes(jpeg("green", 6))
    with TestClient(create_app(out)) as c:
        for bad in ("../secret.jpg", "red/../../secret.jpg", str(secret), "/etc/passwd",
                    "red/escape.jpg"):
            assert_error(c.post("/predict", json={"path": bad}), 403, "outside_index")
        assert_error(c.post("/predict", json={"path": "red/nope.jpg"}), 404, "not_found")
        assert_error(c.post("/predict", json={"id": "red/escape.jpg"}), 404, "unknown_id")
        # A file inside the folder that is not indexed yet is encoded from disk.
        r = c.post("/predict", json={"path": "green/added_later.jpg"})
        assert r.status_code == 200, r.text
        assert r.json()["label"] == "green" and r.json()["query"]["kind"] == "path"
        # ... but it is not served: only indexed images are.
        assert_error(c.get("/images/green/added_later.jpg"), 404)
        # An indexed file swapped for a symlink that leaves the folder is not served either.
        victim = root / "blue" / "blue_000.jpg"
        victim.unlink()
        victim.symlink_to(secret)
        assert_error(c.get("/images/blue/blue_000.jpg"), 404)
        assert_error(c.post("/predict", json={"path": "blue/blue_000.jpg"}), 403)


def test_unlabelled_bundle_is_a_similar_image_search(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    root.mkdir()
    for i, cls in enumerate(["red", "red", "blue", "blue", "green"]):
        draw_image(cls, 300 + i).save(root / f"img_{i}.jpg")
    build_index(root, out=tmp_path / "flat-bundle", model="test:tiny")
    with TestClient(create_app(tmp_path / "flat-bundle")) as c:
        assert c.get("/info").json()["methods"] == []
        r = upload(c, jpeg("blue", 999)).json()
        assert r["label"] is None and r["methods"] == {}
        assert len(r["neighbours"]) == 5
        assert {n["id"] for n in r["neighbours"][:2]} == {"img_2.jpg", "img_3.jpg"}


def test_every_method_the_bundle_offers_is_returned(bundle_dir: Path, tmp_path: Path
                                                     ) -> None:
    # A real trained head beside kNN: /info lists both, /predict answers with both.
    import shutil

    from embedsearch.training import fit_head

    copy = tmp_path / "with-head"
    shutil.copytree(bundle_dir, copy)
    fit_head(copy, "linear", name="lin")
    with TestClient(create_app(load_bundle(copy))) as c:
        methods = c.get("/info").json()["methods"]
        r = upload(c, jpeg("red", 4242)).json()
    assert "knn" in methods and len(methods) == 2, methods
    head = next(m for m in methods if m != "knn")
    assert r["methods"]["knn"]["label"] == "red"
    assert r["methods"][head]["label"] == "red"
    probs = r["methods"][head]["probabilities"]
    assert max(probs, key=probs.get) == "red" and abs(sum(probs.values()) - 1) < 0.01


# -- thumbnails -----------------------------------------------------------------------
def test_thumbnails_of_indexed_images_only(client: TestClient, bundle_dir: Path) -> None:
    r = client.get("/images/red/red_002.jpg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "JPEG" and max(im.size) <= 256
    assert client.get("/images/red/red_002.jpg",
                      headers={"if-none-match": r.headers["etag"]}).status_code == 304
    (bundle_dir.parent / "images" / "manifest.txt").write_text("not indexed")
    for bad in ("red/nope.jpg", "manifest.txt", "..%2F..%2F..%2Fetc%2Fpasswd",
                "%2E%2E/%2E%2E/etc/passwd", "%2Fetc%2Fpasswd", "/etc/passwd",
                "red%2F..%2Fred%2Fred_002.jpg", str(bundle_dir / "manifest.json")):
        assert_error(client.get(f"/images/{bad}"), 404)


# -- bad uploads ----------------------------------------------------------------------
def test_oversized_upload_is_413(client: TestClient) -> None:
    big = os.urandom(300_000)
    assert_error(upload(client, big), 413, "upload_too_large")
    assert_error(client.post("/predict", content=big, headers={"content-type": "image/jpeg"}),
                 413, "upload_too_large")

    def chunks():  # no Content-Length: the limit must hold while streaming
        for _ in range(40):
            yield b"\xff" * 10_000

    assert_error(client.post("/predict", content=chunks(),
                             headers={"content-type": "image/jpeg"}), 413, "upload_too_large")


def test_pixel_limit_and_decompression_bomb(client: TestClient, bundle_dir: Path) -> None:
    bomb = png_bomb_header()
    assert len(bomb) < 100
    body = assert_error(upload(client, bomb, "image/png", "bomb.png"), 413, "too_many_pixels")
    assert "pixels" in body["detail"]
    with TestClient(create_app(bundle_dir, max_pixels=5000)) as c:
        assert_error(upload(c, jpeg("red", 1, size=96)), 413, "too_many_pixels")
        assert upload(c, jpeg("red", 1, size=64)).status_code == 200


@pytest.mark.parametrize(("data", "ctype", "status", "code"), [
    (b"hello, not an image", "image/jpeg", 422, "not_an_image"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "image/png", 415, "unsupported_format"),
    (b"", "image/jpeg", 400, "empty_file"),
    (b"GIF89a", "text/plain", 415, "unsupported_media_type"),
    (b"{}", "application/pdf", 415, "unsupported_media_type"),
])
def test_bad_uploads_are_4xx_with_a_reason(client: TestClient, data: bytes, ctype: str,
                                           status: int, code: str) -> None:
    assert_error(upload(client, data, ctype), status, code)


def test_truncated_jpeg_is_422(client: TestClient) -> None:
    data = jpeg("red", 3, size=200)
    assert_error(upload(client, data[: len(data) // 2]), 422, "truncated")


@pytest.mark.parametrize(("kwargs", "status", "code"), [
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "bad_json"),
    ({"json": ["red/red_000.jpg"]}, 400, "bad_json"),
    ({"json": {}}, 400, "missing_image"),
    ({"json": {"id": "red/missing.jpg"}}, 404, "unknown_id"),
    ({"content": b"raw", "headers": {"content-type": "text/plain"}}, 415,
     "unsupported_media_type"),
    ({"content": b"", "headers": {}}, 415, "unsupported_media_type"),
    ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data"}}, 400,
     None),
    ({"data": {"note": "no file"}}, 400, "missing_image"),
])
def test_malformed_requests_are_4xx(client: TestClient, kwargs: dict, status: int,
                                    code: str | None) -> None:
    assert_error(client.post("/predict", **kwargs), status, code)


def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/predict"), 405, "method_not_allowed")


def test_unexpected_error_is_a_500_without_traceback(bundle_dir: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(bundle_dir)
    with TestClient(app, raise_server_exceptions=False) as c:
        def boom(*args: object, **kwargs: object) -> None:
            raise RuntimeError("secret internal state")

        app.state.service.predict_id = boom
        r = c.post("/predict", json={"id": "red/red_000.jpg"})
    body = assert_error(r, 500, "internal_error")
    assert "secret" not in r.text
    assert "secret internal state" in caplog.text  # the operator still sees it
    assert body["detail"]


# -- concurrency ----------------------------------------------------------------------
def test_concurrent_requests_agree_with_serial_ones(client: TestClient) -> None:
    queries = [jpeg(cls, 900 + i) for i, cls in enumerate(sorted(COLOURS) * 2)]

    def key(resp) -> tuple:
        r = resp.json()
        return r["label"], r["methods"]["knn"]["probabilities"], [
            (n["id"], n["similarity"]) for n in r["neighbours"]]

    expected = [key(upload(client, q)) for q in queries]
    results: dict[tuple[int, int], tuple] = {}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for j in range(len(queries)):
                i = (t + j) % len(queries)
                if j % 3 == 2:  # mix in id searches and thumbnails
                    assert client.post("/predict", json={"id": "red/red_004.jpg"}).json()[
                        "label"] == "red"
                    assert client.get("/images/blue/blue_001.jpg").status_code == 200
                results[(t, i)] = key(upload(client, queries[i]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert len(results) == 8 * len(queries)
    for (_, i), got in results.items():
        assert got == expected[i]
