"""Honest evaluation by default (issue 19): no self-votes, split layouts, one embedding cache
for every command, evaluation output and report permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from embedsearch.dedupe.report import write_leakage
from embedsearch.store.io import default_file_mode


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_report_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        assert default_file_mode() == 0o666 & ~umask
        files = write_leakage(pd.DataFrame({"id_a": [], "id_b": []}), tmp_path / "leak",
                              html_page=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(files["leakage_csv"].stat().st_mode) == 0o666 & ~umask
