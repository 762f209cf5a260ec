"""Item 4: disk full and read-only output: a clear error, the previous bundle intact."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedsearch import build_index, load_bundle
from embedsearch.cli import main
from tests import proc
from tests.conftest import draw_image, make_collection

TINY = "test:tiny"


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, Path, tuple[list[str], np.ndarray]]:
    """A committed bundle, then new images added so that a rebuild has writing to do."""
    images = make_collection(tmp_path / "images", per_class=4)
    out = tmp_path / "bundle"
    build_index(images, out=out, model=TINY)
    b = load_bundle(out)
    before = (list(b.items["id"]), np.array(b.embeddings))
    for i in range(6):
        draw_image("red", 800 + i).save(images / "red" / f"new_{i}.jpg")
    return images, out, before


def assert_previous_intact(out: Path, before: tuple[list[str], np.ndarray]) -> None:
    b = load_bundle(out)  # verifies every file's size and sha256
    assert list(b.items["id"]) == before[0]
    np.testing.assert_array_equal(np.asarray(b.embeddings), before[1])
    assert b.index.ntotal == len(before[0])
    assert list(out.rglob(".tmp-*")) == []


# The 8 atomic writes of that rebuild: shard .npy, shard .parquet, cache.json, embeddings,
# items, failures, index, manifest. Running out of space at any of them must be clean.
@pytest.mark.parametrize("fail_at", range(1, 9))
def test_disk_full_at_any_write_is_a_clear_error(built, monkeypatch: pytest.MonkeyPatch,
                                                 fail_at: int) -> None:
    images, out, before = built
    real_fsync = os.fsync
    calls = {"n": 0}

    def fsync(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".tmp-"):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    r = CliRunner().invoke(main, ["-q", "build-index", str(images), "--out", str(out)])
    assert r.exit_code == 4, r.output + repr(r.exception)
    assert "error: cannot write" in r.output and "no space left on" in r.output
    assert str(out) in r.output  # names the file
    assert "free disk space" in r.output and "Traceback" not in r.output
    monkeypatch.undo()
    assert_previous_intact(out, before)
    # With space again the same command finishes, re-using what was committed.
    res = build_index(images, out=out)
    assert res.manifest["counts"]["embedded"] == 18
    assert res.encoded == (6 if fail_at <= 3 else 0)


def test_read_only_bundle_folder(built) -> None:
    prefix = proc.require_permission_bits()
    images, out, before = built
    folders = [out, out / "data", out / "cache"]
    for f in folders:
        f.chmod(0o555)
    try:
        r = proc.cli("-q", "build-index", str(images), "--out", str(out), prefix=prefix)
    finally:
        for f in folders:
            f.chmod(0o755)
    assert r.returncode == 4, r.stderr
    assert "cannot write" in r.stderr and "Permission denied" in r.stderr
    assert "Traceback" not in r.stderr
    assert_previous_intact(out, before)


def test_read_only_parent_for_a_new_bundle(tmp_path: Path) -> None:
    prefix = proc.require_permission_bits()
    images = make_collection(tmp_path / "images", per_class=2)
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        r = proc.cli("-q", "build-index", str(images), "--out", str(parent / "new"),
                     "--model", TINY, prefix=prefix)
    finally:
        parent.chmod(0o755)
    assert r.returncode == 4, r.stderr
    assert f"cannot write {parent / 'new'}" in r.stderr and "Permission denied" in r.stderr
    assert "Traceback" not in r.stderr


REAL_FS_SCRIPT = r"""
set -u
mount -t tmpfs -o size=1m tmpfs "$MNT" || exit 99
run() { "$PY" -m embedsearch.cli "$@"; }
run -q build-index "$IMAGES" --out "$MNT/b" --model test:tiny > "$LOG/1.out" 2>&1
echo $? > "$LOG/1.rc"
cp -r "$EXTRA"/* "$IMAGES/red/"
dd if=/dev/zero of="$MNT/filler" bs=4k 2>/dev/null
run -q build-index "$IMAGES" --out "$MNT/b" > "$LOG/2.out" 2>&1; echo $? > "$LOG/2.rc"
run info --index "$MNT/b" --json > "$LOG/3.out" 2>&1; echo $? > "$LOG/3.rc"
find "$MNT/b" -name '.tmp-*' > "$LOG/tmp.txt"
rm "$MNT/filler"
mount --bind "$MNT/b" "$MNT/b" && mount -o remount,bind,ro "$MNT/b" || exit 98
run -q build-index "$IMAGES" --out "$MNT/b" > "$LOG/4.out" 2>&1; echo $? > "$LOG/4.rc"
run info --index "$MNT/b" --json > "$LOG/5.out" 2>&1; echo $? > "$LOG/5.rc"
"""


def _can_mount() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt && umount /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow  # five CLI processes (about 20 s); the monkeypatched test above is quick
def test_real_full_and_read_only_file_systems(tmp_path: Path) -> None:
    """The same on a real 1 MB tmpfs filled up, then remounted read-only (needs a private
    mount namespace: root with CAP_SYS_ADMIN, as in CI containers; skipped elsewhere)."""
    if not _can_mount():
        pytest.skip("cannot mount a private tmpfs here (needs unshare -m as root)")
    images = make_collection(tmp_path / "images", per_class=4)
    extra = tmp_path / "extra"
    extra.mkdir()
    for i in range(30):
        draw_image("red", 600 + i).save(extra / f"extra_{i}.jpg")
    mnt, log = tmp_path / "mnt", tmp_path / "log"
    mnt.mkdir()
    log.mkdir()
    env = {**proc.env(), "MNT": str(mnt), "LOG": str(log), "IMAGES": str(images),
           "EXTRA": str(extra), "PY": sys.executable}
    r = subprocess.run(["unshare", "-m", "sh", "-c", REAL_FS_SCRIPT], env=env,
                       capture_output=True, text=True, timeout=300, cwd=proc.REPO)
    assert r.returncode == 0, r.stderr

    def step(n: int) -> tuple[int, str]:
        return int((log / f"{n}.rc").read_text()), (log / f"{n}.out").read_text()

    rc, text = step(1)
    assert rc == 0, text
    rc, text = step(2)  # disk full
    assert rc == 4, text
    assert "cannot write" in text and "no space left on" in text
    assert "Traceback" not in text
    rc, text = step(3)  # the previous bundle still verifies
    assert rc == 0, text
    assert json.loads(text)["counts"]["embedded"] == 12
    assert (log / "tmp.txt").read_text() == ""
    rc, text = step(4)  # read-only file system
    assert rc == 4, text
    assert "Read-only file system" in text and "Traceback" not in text
    rc, text = step(5)
    assert rc == 0 and json.loads(text)["counts"]["embedded"] == 12, text
