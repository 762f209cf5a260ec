"""Engine selection without a Ray cluster: the local default needs no Ray, and a missing Ray
is a clear error rather than an ImportError traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from embedsearch import build_index
from embedsearch.errors import EmbedsearchError


def test_importing_the_pipeline_and_cli_imports_no_ray() -> None:
    code = ("import sys, embedsearch.cli, embedsearch.pipeline, embedsearch.engines.ray_engine; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_engine_ray_without_ray_installed_says_how_to_install(
        collection: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    with pytest.raises(EmbedsearchError) as err:
        build_index(collection, name="c", model="test:tiny", engine="ray")
    assert "embedsearch[ray]" in (err.value.hint or "")
    # Nothing was committed: the local engine builds the same bundle from scratch afterwards.
    monkeypatch.delitem(sys.modules, "ray")
    res = build_index(collection, name="c", model="test:tiny")
    assert res.encoded == 24 and res.reused == 0


def test_unknown_engine_is_refused(collection: Path) -> None:
    with pytest.raises(EmbedsearchError, match="unknown engine"):
        build_index(collection, name="c", model="test:tiny", engine="spark")
