"""The README's quick start runs on a fresh clone: its main-job commands, verbatim, on the
committed example collection, with the real default encoder."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from embedsearch.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "clothing-mini"


def _main_job() -> list[list[str]]:
    """The quick start's `embedsearch` commands that run on the example data."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", text, flags=re.S)
    assert block, "README has no quick-start block"
    lines = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    return [shlex.split(line) for line in lines
            if line.startswith("embedsearch ") and "examples/clothing-mini" in line]


def test_example_data_is_small_and_licensed() -> None:
    files = [p for p in EXAMPLE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 5_000_000
    images = [p for p in files if p.suffix == ".jpg"]
    splits = {p.relative_to(EXAMPLE).parts[0] for p in images}
    classes = {p.parent.name for p in images}
    assert splits == {"train", "validation", "test"} and len(classes) == 10
    assert "freely used for any purpose" in (EXAMPLE / "README.md").read_text(encoding="utf-8")


def test_quick_start_shows_build_and_predict_on_the_example() -> None:
    assert [argv[1] for argv in _main_job()] == ["build-index", "predict"]


@pytest.mark.slow
def test_quick_start_main_job_runs_on_the_example(tmp_path: Path) -> None:
    """17 s on 2 cores (real weights, hence slow): 220 images embedded, 40 classified."""
    (tmp_path / "examples").symlink_to(REPO / "examples")  # the commands' relative paths
    outputs = []
    for argv in _main_job():
        result = CliRunner().invoke(main, argv[1:])
        assert result.exit_code == 0, (argv, result.output)
        outputs.append(result.output)
    assert "220 embedded, 0 skipped" in outputs[0]
    found = re.search(r"accuracy (\d\.\d+) .* on 40 images", outputs[1])
    assert found, outputs[1]
    # Measured 0.775 (10-NN, 18 reference images per class); chance is 0.1.
    assert float(found.group(1)) >= 0.7
