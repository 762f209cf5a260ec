"""Shared fixtures: generated image collections with known structure, and the shared assets.

Nothing binary is committed: every image is drawn at test time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EMBEDSEARCH_SHARED", REPO.parent / "shared"))
CLOTHING = SHARED / "datasets" / "clothing-small"
MOBILENET = SHARED / "models" / "mobilenet_v2_imagenet1k.safetensors"

#: The test encoder ``test:tiny`` is an encoder plugin (tests/plugins/): on the path of this
#: process and of every process the tests start, its entry point registers it exactly as an
#: installed third-party package's would.
PLUGINS = Path(__file__).resolve().parent / "plugins"
sys.path.insert(0, str(PLUGINS))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(PLUGINS), os.environ.get("PYTHONPATH")) if p)

#: Classes of the generated collection: a dominant colour and a shape.
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}


def draw_image(cls: str, seed: int, size: int = 96) -> Image.Image:
    """A noisy picture whose class is its dominant colour; position and size vary."""
    rng = np.random.default_rng(seed)
    base = np.array(COLOURS[cls], np.float32)
    arr = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    x, y = rng.integers(5, size // 2, 2)
    r = int(rng.integers(10, size // 3))
    d.ellipse([x, y, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img


def make_collection(root: Path, per_class: int = 8, splits: dict[str, int] | None = None,
                    classes: tuple[str, ...] = tuple(COLOURS), fmt: str = "jpg") -> Path:
    """Write ``root/[split/]class/class_i.jpg``; returns root."""
    seed = 0
    layout = splits or {"": per_class}
    for split, n in layout.items():
        for cls in classes:
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed += 1
                draw_image(cls, seed).save(folder / f"{cls}_{i:03d}.{fmt}", quality=90)
    return root


@pytest.fixture
def collection(tmp_path: Path) -> Path:
    """24 labelled JPEGs: 3 colour classes × 8."""
    return make_collection(tmp_path / "images")


@pytest.fixture
def split_collection(tmp_path: Path) -> Path:
    """train/val/test folders of the 3 colour classes."""
    return make_collection(tmp_path / "images", splits={"train": 6, "val": 2, "test": 3})


@pytest.fixture
def queries(tmp_path: Path) -> dict[str, Path]:
    """One unseen image per class, outside any collection."""
    out = tmp_path / "queries"
    out.mkdir()
    paths = {}
    for i, cls in enumerate(COLOURS):
        p = out / f"query_{cls}.jpg"
        draw_image(cls, 10_000 + i).save(p, quality=90)
        paths[cls] = p
    return paths


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Bundles named without a path go to ./indexes; keep each test's in its own folder.
    monkeypatch.chdir(tmp_path)
    # The shared embedding cache too: never the user's ~/.cache, never another test's
    # (a context of its own, so that a test's monkeypatch.undo() keeps it).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBEDSEARCH_CACHE_DIR", str(tmp_path / "embedding-cache"))
        yield


@pytest.fixture(autouse=True, scope="session")
def _isolated_embedding_cache(tmp_path_factory: pytest.TempPathFactory):
    """Session fixtures (clothing_bundle) get a private shared embedding cache as well."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBEDSEARCH_CACHE_DIR", str(tmp_path_factory.mktemp("embedding-cache")))
        yield


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared assets live beside the repository as "
                    "../shared (see ../shared/README.md); a fresh clone does not have them")
    return path


@pytest.fixture(scope="session")
def clothing_bundle(tmp_path_factory: pytest.TempPathFactory):
    """clothing-small (train+validation as reference, test held out) embedded once per
    session with the real default encoder (about 2-3 minutes on 2 cores)."""
    require_shared(CLOTHING)
    from embedsearch import build_index, load_bundle

    out = tmp_path_factory.mktemp("bundles") / "clothing"
    build_index(CLOTHING, out=out)
    return load_bundle(out)



_BACKEND_TESTS = "tests/test_backends.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The OpenVINO backend tests run last, and every other test runs on torch
    (:func:`_torch_backend`): with OpenVINO's thread pool in the test process, a later
    subprocess spawn after torch's DataLoader workers crashed the whole pytest process
    (SIGSEGV). Users' processes do not combine the two: exported runtimes run on the CPU
    path, decode processes only on an accelerator. test_backends checks that the runtimes
    agree with torch."""
    items.sort(key=lambda item: item.nodeid.startswith(_BACKEND_TESTS))


@pytest.fixture(autouse=True, scope="session")
def _torch_backend_for_session_fixtures():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBEDSEARCH_BACKEND", "torch")
        yield


@pytest.fixture(autouse=True)
def _torch_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.nodeid.startswith(_BACKEND_TESTS):
        monkeypatch.delenv("EMBEDSEARCH_BACKEND", raising=False)
    else:
        monkeypatch.setenv("EMBEDSEARCH_BACKEND", "torch")


@pytest.fixture(autouse=True)
def _reset_default_backend():
    """`embedsearch --backend X` sets a process-wide default; CliRunner tests run in this
    process, so put it back after each test."""
    yield
    import sys

    backends = sys.modules.get("embedsearch.encoders.backends")
    if backends is not None:
        backends.set_default_backend(None)
