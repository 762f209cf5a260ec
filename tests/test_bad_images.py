"""Item 1: hostile image files are embedded correctly or skipped with a reason code."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageFile

from embedsearch import build_index, load_bundle
from embedsearch.cli import main
from embedsearch.data.images import LoadedImage, LoadFailure, load_image
from tests import badfiles
from tests.conftest import REPO

TINY = "test:tiny"


def loaded(data: bytes, **kw: object) -> LoadedImage:
    result = load_image(data, **kw)  # type: ignore[arg-type]
    assert isinstance(result, LoadedImage), result
    assert result.image.mode == "RGB"
    return result


def failed(data: bytes) -> LoadFailure:
    result = load_image(data)
    assert isinstance(result, LoadFailure), result
    return result


def pixels(data: bytes, **kw: object) -> np.ndarray:
    return np.asarray(loaded(data, **kw).image, np.int32)


@pytest.mark.parametrize(("data", "reason"), [
    (badfiles.truncated_jpeg(), "truncated"),
    (b"", "empty_file"),
    (b"hello, I am a text file\n", "not_an_image"),
    (badfiles.HTML, "not_an_image"),
    (badfiles.SVG, "unsupported_format"),
    (badfiles.png_bomb(), "too_many_pixels"),
    (badfiles.png_bomb(12000, 12000), "too_many_pixels"),  # under Pillow's own limit, over ours
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "unsupported_format"),
])
def test_unusable_files_get_a_reason_code(data: bytes, reason: str) -> None:
    assert failed(data).reason == reason


def test_truncated_jpeg_opens_but_fails_at_decode() -> None:
    # The trap this guards: Image.open() succeeds, only load() notices the missing data.
    Image.open(io.BytesIO(badfiles.truncated_jpeg()))
    assert failed(badfiles.truncated_jpeg()).reason == "truncated"


def test_bomb_is_refused_from_the_header_without_decoding(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    data = badfiles.png_bomb()
    assert len(data) == 68
    calls: list[str] = []

    def no_decode(self: ImageFile.ImageFile) -> None:
        calls.append("load")
        raise AssertionError("decoded a decompression bomb")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    for bomb in (data, badfiles.png_bomb(12000, 12000), badfiles.png_bomb(65535, 65535)):
        assert failed(bomb).reason == "too_many_pixels"
    assert calls == []


def test_bomb_peak_memory_stays_small(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(badfiles.png_bomb())
    code = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from embedsearch.data.images import load_image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "r = load_image(Path(sys.argv[1]), target_size=224)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(r.reason, after - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True,
                         text=True, check=True, cwd=REPO).stdout.split()
    # 30000×30000 RGB would be 2.7 GB; the peak must not grow by more than a few MB.
    assert out[0] == "too_many_pixels"
    assert int(out[1]) < 20_000, f"peak RSS grew by {out[1]} KiB"


def test_large_jpeg_is_accepted_and_decoded_at_reduced_size(tmp_path: Path) -> None:
    small = np.random.default_rng(0).integers(0, 255, (75, 100, 3), dtype=np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(small, "RGB").resize((8000, 6000), Image.Resampling.NEAREST).save(
        path, quality=85)
    code = (
        "import resource, sys, time\n"
        "from pathlib import Path\n"
        "from embedsearch.data.images import load_image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "t = time.perf_counter()\n"
        "r = load_image(Path(sys.argv[1]), target_size=224)\n"
        "dt = time.perf_counter() - t\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(r.width, r.height, *r.image.size, after - before, dt)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, check=True, cwd=REPO).stdout.split()
    width, height, dw, dh, grew_kib, seconds = (*map(int, out[:5]), float(out[5]))
    assert (width, height) == (8000, 6000)  # the true size is reported
    assert (dw, dh) == (1000, 750)  # decoded at 1/8 scale, still ≥ 224 on both sides
    assert grew_kib < 60_000, f"peak RSS grew by {grew_kib} KiB (full decode is 144 MB)"
    assert seconds < 30.0  # about 0.3 s here; generous for a loaded CI machine


def test_16bit_png_is_not_turned_white() -> None:
    arr = pixels(badfiles.grey16())
    # A 0..65535 ramp must come out as a 0..255 ramp, not saturated to 255.
    assert arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255
    assert 110 < arr.mean() < 145
    assert np.all(np.diff(arr[0, :, 0]) >= 0)
    grey = np.full((8, 8), 20000, np.uint16)
    for channels in (grey, np.stack([grey, np.full_like(grey, 65535)], -1),
                     np.stack([grey, grey // 2, grey * 3], -1),
                     np.stack([grey, grey, grey, np.full_like(grey, 65535)], -1)):
        value = pixels(badfiles.png16(channels))[0, 0]
        assert abs(int(value[0]) - 78) <= 1, value  # 20000 / 65535 × 255


def test_transparent_pixels_do_not_leak_their_hidden_colour() -> None:
    arr = pixels(badfiles.rgba_hidden_red())
    # Fully transparent red is composited onto white: it must look white, not red.
    assert (arr[:, :32] == 255).all()
    assert (arr[:, 32:] == (0, 0, 255)).all()


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt: str) -> None:
    arr = pixels(badfiles.palette_alpha(fmt))
    assert (arr[:, :16] == 255).all()  # transparent index → white background
    assert (arr[:, 16:] == (0, 200, 0)).all()


def test_cmyk_jpeg_colours() -> None:
    r, g, b = pixels(badfiles.cmyk_jpeg()).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60  # C=0 M=Y=255 is red


def test_animated_gif_first_frame() -> None:
    img = loaded(badfiles.animated_gif())
    assert (np.asarray(img.image, np.int32)[5, 5] == (200, 20, 20)).all()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_photo_embeds_like_the_physically_rotated_copy(orientation: int) -> None:
    from embedsearch.encoders import load_encoder

    enc = load_encoder(TINY)
    tagged, upright = badfiles.exif_rotated_jpeg(orientation)
    a = loaded(tagged, target_size=enc.preprocess.resize)
    b = loaded(upright, target_size=enc.preprocess.resize)
    assert a.image.size == b.image.size
    assert (a.width, a.height) == (b.width, b.height)  # size as displayed
    va, vb, raw = enc.encode_images([a.image, b.image, badfiles.asymmetric_photo()])
    assert float(va @ vb) > 0.99
    assert float(va @ raw) < 0.9  # ignoring the tag would have been caught


def test_corrupt_files_never_raise_from_load_image() -> None:
    """Byte-flipped and cut copies of every format come back as data, never as exceptions."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8))
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"):
        good = badfiles.encode(base, fmt)
        for _ in range(40):
            data = bytearray(good)
            for i in rng.integers(0, len(data), 4):
                data[i] = int(rng.integers(0, 256))
            if rng.random() < 0.3:
                data = data[: int(rng.integers(1, len(data)))]
            result = load_image(bytes(data), target_size=32)
            assert isinstance(result, LoadedImage | LoadFailure)


def test_fifo_named_like_an_image_is_not_read(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    result = load_image(fifo)  # opening a FIFO for reading would block forever
    assert isinstance(result, LoadFailure) and result.reason == "not_a_regular_file"


def test_build_over_the_bad_corpus_reports_every_skip(tmp_path: Path) -> None:
    expected = badfiles.bad_corpus(tmp_path / "bad")
    result = CliRunner().invoke(main, ["-q", "build-index", str(tmp_path / "bad"),
                                       "--out", str(tmp_path / "b"), "--model", TINY, "--json"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    manifest = json.loads(result.stdout.strip().splitlines()[-1])
    bundle = load_bundle(tmp_path / "b")
    ok = {n for n, s in expected.items() if s == "ok"}
    assert set(bundle.items["id"]) == ok
    reasons = dict(zip(bundle.failures["id"], bundle.failures["reason"], strict=True))
    assert reasons == {n: s for n, s in expected.items() if s != "ok"}
    counts = manifest["counts"]
    assert counts["embedded"] == len(ok)
    assert counts["failed"] + counts["skipped"] == len(expected) - len(ok)
    assert sum(counts["by_reason"].values()) == len(expected) - len(ok)
    # Every skipped file is named in the human-readable output too.
    human = CliRunner().invoke(main, ["-q", "build-index", str(tmp_path / "bad"),
                                      "--out", str(tmp_path / "b")])
    assert human.exit_code == 0
    for name in reasons:
        assert f"skipped {name}: {reasons[name]}" in human.output
    assert f"{len(ok)} embedded, {len(reasons)} skipped" in human.output


def test_every_image_in_a_folder_unreadable_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(badfiles.HTML)
    (folder / "b.png").write_bytes(b"")
    result = CliRunner().invoke(main, ["build-index", str(folder), "--out",
                                       str(tmp_path / "b"), "--model", TINY])
    assert result.exit_code == 4
    assert "none of the 2 images could be read" in result.output
    assert "Traceback" not in result.output


def test_skips_survive_a_python_api_build(tmp_path: Path) -> None:
    expected = badfiles.bad_corpus(tmp_path / "bad")
    res = build_index(tmp_path / "bad", out=tmp_path / "b", model=TINY, num_workers=1,
                      batch_size=2)  # decoding in a worker process
    assert res.manifest["counts"]["embedded"] == sum(s == "ok" for s in expected.values())
    t = time.perf_counter()
    assert build_index(tmp_path / "bad", out=tmp_path / "b", model=TINY).encoded == 0
    assert time.perf_counter() - t < 30


def test_extreme_aspect_ratio_is_no_memory_bomb(tmp_path: Path) -> None:
    # 300000×1 pixels: under the pixel limit and 1 KB on disk, but resizing its short side
    # to the encoder's size first would allocate gigabytes.
    path = tmp_path / "thin.png"
    Image.new("RGB", (300_000, 1), (200, 10, 10)).save(path)
    assert path.stat().st_size < 5_000
    code = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from embedsearch.data.images import load_image\n"
        "from embedsearch.encoders import load_encoder\n"
        "enc = load_encoder('test:tiny')\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "r = load_image(Path(sys.argv[1]), target_size=enc.preprocess.resize)\n"
        "v = enc.encode_tensors(enc.transform(r.image)[None])\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(r.width, r.height, *r.image.size, after - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, check=True, cwd=REPO).stdout.split()
    assert out[:4] == ["300000", "1", "10", "1"]
    assert int(out[4]) < 50_000, f"peak RSS grew by {out[4]} KiB"


def test_aspect_crop_keeps_what_the_encoder_sees() -> None:
    from embedsearch.encoders import load_encoder

    enc = load_encoder(TINY)
    arr = np.random.default_rng(1).integers(0, 255, (100, 2400, 3), dtype=np.uint8)
    wide = Image.fromarray(arr, "RGB")
    cropped = loaded(badfiles.encode(wide, "PNG")).image
    assert cropped.size == (1000, 100)
    a, b = enc.encode_images([wide, cropped])
    assert float(a @ b) > 0.999


@pytest.mark.parametrize("exif", [
    b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x63\x00\x00",
    b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",
    b"Exif\x00\x00garbage-garbage",
], ids=["orientation-99", "bad-offset", "garbage"])
def test_damaged_exif_does_not_cost_the_photo(exif: bytes) -> None:
    img = loaded(badfiles.encode(badfiles.asymmetric_photo(), "JPEG", exif=exif))
    assert img.image.size == (160, 120)
