"""Item 2: hostile file names, symlinks, hard links and unreadable files."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import pytest
from click.testing import CliRunner

from embedsearch import build_index, load_bundle
from embedsearch.cli import main
from embedsearch.data.scan import scan
from tests import badfiles, proc
from tests.conftest import draw_image

TINY = "test:tiny"
NFC = unicodedata.normalize("NFC", "café")
NFD = unicodedata.normalize("NFD", "café")


def write_jpeg(path: Path | bytes, seed: int, cls: str = "red") -> None:
    with open(path, "wb") as fh:
        draw_image(cls, seed).save(fh, "JPEG", quality=90)


def hostile_names(root: Path) -> dict[str, str]:
    """Write one image per hostile name; returns {expected id: colour}."""
    names = {
        "with space.jpg": "red",
        f"{NFC}.jpg": "green",
        f"{NFD}.jpg": "blue",  # a different file on Linux: same letters, other bytes
        "new\nline.jpg": "red",
        "-rf.jpg": "green",
        "--help.jpg": "blue",
        "tab\there.jpg": "red",
        "quote'\"s.jpg": "green",
        "日本語 ファイル.jpg": "blue",
        f"{NFC} dir/inner.jpg": "red",
    }
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, cls) in enumerate(names.items()):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_jpeg(root / name, 10 + i, cls)
    # A name that is not valid UTF-8 at all (common in old archives): bytes \xff\xfe.
    write_jpeg(os.fsencode(root) + b"/latin1-\xe9t\xe9.jpg", 99, "blue")
    names["latin1-\\xe9t\\xe9.jpg"] = "blue"
    return names


def test_hostile_names_are_all_embedded_with_distinct_ids(tmp_path: Path) -> None:
    root = tmp_path / "names"
    expected = hostile_names(root)
    res = build_index(root, out=tmp_path / "b", model=TINY)
    b = load_bundle(res.path)
    assert sorted(b.items["id"]) == sorted(expected)
    assert res.manifest["counts"]["failed"] == 0
    assert f"{NFC}.jpg" in set(b.items["id"]) and f"{NFD}.jpg" in set(b.items["id"])
    # Re-running finds every file again under the same id: nothing is re-encoded.
    assert build_index(root, out=tmp_path / "b", model=TINY).encoded == 0


def test_hostile_names_through_the_cli(tmp_path: Path) -> None:
    root = tmp_path / "-data"
    hostile_names(root)
    runner = CliRunner()
    # A data folder whose name starts with "-" is passed after "--".
    result = runner.invoke(main, ["-q", "build-index", "--out", str(tmp_path / "b"),
                                  "--model", TINY, "--", str(root)])
    assert result.exit_code == 0, result.output
    assert "11 embedded, 0 skipped" in result.output
    result = runner.invoke(main, ["-q", "predict", "--index", str(tmp_path / "b"), "--json",
                                  "--allow-self", "--", str(root / "-rf.jpg"),
                                  str(root / "new\nline.jpg"), str(root / f"{NFD}.jpg")])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 3
    # Each query finds itself as its nearest neighbour (a search: --allow-self).
    import json

    nearest = [json.loads(ln)["neighbours"][0]["id"] for ln in lines]
    assert nearest == ["-rf.jpg", "new\nline.jpg", f"{NFD}.jpg"]


def test_class_folders_in_nfc_and_nfd_are_one_class(tmp_path: Path) -> None:
    root = tmp_path / "labels"
    for i, spelling in enumerate((NFC, NFD)):
        (root / spelling).mkdir(parents=True)
        write_jpeg(root / spelling / f"{i}.jpg", i)
    coll = scan(root)
    assert coll.classes == [NFC]
    assert len(coll.records) == 2


def test_symlinks_are_not_followed_by_default(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    write_jpeg(outside / "secret.jpg", 1)
    root = tmp_path / "root"
    (root / "cls").mkdir(parents=True)
    write_jpeg(root / "cls" / "real.jpg", 2)
    (root / "cls" / "loop").symlink_to(root)  # a folder loop
    (root / "cls" / "self").symlink_to("self")  # a link to itself
    (root / "cls" / "out").symlink_to(outside)  # a folder outside the root
    (root / "cls" / "out.jpg").symlink_to(outside / "secret.jpg")  # a file outside the root
    (root / "cls" / "in.jpg").symlink_to(root / "cls" / "real.jpg")  # a file inside
    (root / "cls" / "gone.jpg").symlink_to(tmp_path / "nothing.jpg")  # dangling

    res = build_index(root, out=tmp_path / "b", model=TINY)
    assert list(load_bundle(res.path).items["id"]) == ["cls/real.jpg"]
    skipped = dict(zip(res.failures["id"], res.failures["reason"], strict=True))
    assert skipped == {f"cls/{n}": "symlink" for n in
                       ("loop", "self", "out", "out.jpg", "in.jpg", "gone.jpg")}

    # Asked to follow links, links to folders are followed wherever they point (issue 19:
    # split folders kept elsewhere); a link to a file outside the root still is not.
    followed = scan(root, follow_symlinks=True)
    reasons = {s.id: s.reason for s in followed.skipped}
    assert "cls/out" not in reasons
    assert reasons["cls/out.jpg"] == "symlink_outside_root"
    assert reasons["cls/self"] == "symlink_broken"
    assert reasons["cls/gone.jpg"] == "symlink_broken"
    assert reasons["cls/loop"] == "symlink_loop"
    ids = [r.id for r in followed.records]
    assert "cls/in.jpg" in ids and "cls/out/secret.jpg" in ids


def test_hard_links_are_counted_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    write_jpeg(root / "a" / "one.jpg", 1)
    os.link(root / "a" / "one.jpg", root / "b" / "same.jpg")
    os.link(root / "a" / "one.jpg", root / "a" / "zz.jpg")
    write_jpeg(root / "b" / "two.jpg", 2, "blue")
    res = build_index(root, out=tmp_path / "bundle", model=TINY)
    assert res.manifest["counts"]["embedded"] == 2
    assert sorted(load_bundle(res.path).items["id"]) == ["a/one.jpg", "b/two.jpg"]
    dup = res.failures.set_index("id")["reason"].to_dict()
    assert dup == {"a/zz.jpg": "hardlink_duplicate", "b/same.jpg": "hardlink_duplicate"}


def test_fifo_and_oversized_names_do_not_hang_or_crash(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    write_jpeg(root / "ok.jpg", 1)
    os.mkfifo(root / "pipe.jpg")
    (root / ("x" * 250 + ".jpg")).write_bytes(badfiles.good_jpeg(3))
    res = build_index(root, out=tmp_path / "b", model=TINY)
    assert res.manifest["counts"]["embedded"] == 2
    assert res.failures.set_index("id")["reason"].to_dict() == {"pipe.jpg": "not_a_regular_file"}


def test_unreadable_files_and_folders_are_reported(tmp_path: Path) -> None:
    prefix = proc.require_permission_bits()
    root = tmp_path / "root"
    (root / "cls").mkdir(parents=True)
    (root / "locked").mkdir()
    write_jpeg(root / "cls" / "ok.jpg", 1)
    write_jpeg(root / "cls" / "secret.jpg", 2)
    write_jpeg(root / "locked" / "hidden.jpg", 3)
    (root / "cls" / "secret.jpg").chmod(0)
    (root / "locked").chmod(0)
    try:
        r = proc.cli("-q", "build-index", str(root), "--out", str(tmp_path / "b"), "--model",
                     TINY, prefix=prefix)
    finally:
        (root / "locked").chmod(0o755)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "1 embedded, 2 skipped" in r.stdout
    assert "skipped cls/secret.jpg: unreadable Permission denied" in r.stderr
    assert "skipped locked: unreadable Permission denied" in r.stderr
    failures = load_bundle(tmp_path / "b").failures.set_index("id")["reason"].to_dict()
    assert failures == {"cls/secret.jpg": "unreadable", "locked": "unreadable"}


def test_unreadable_data_folder_is_a_clear_error(tmp_path: Path) -> None:
    prefix = proc.require_permission_bits()
    root = tmp_path / "root"
    root.mkdir()
    write_jpeg(root / "a.jpg", 1)
    root.chmod(0)
    try:
        r = proc.cli("build-index", str(root), "--out", str(tmp_path / "b"), "--model", TINY,
                     prefix=prefix)
    finally:
        root.chmod(0o755)
    assert r.returncode == 2, r.stderr
    assert "not readable" in r.stderr  # click checks the argument before we scan it
    assert "Traceback" not in r.stderr
    # The library says so too, for callers that skip the CLI.
    code = ("import sys\nfrom embedsearch.data.scan import scan\n"
            "try:\n    scan(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)")
    root.chmod(0)
    try:
        out, _ = proc.python(code, str(root), prefix=prefix).communicate(timeout=60)
    finally:
        root.chmod(0o755)
    assert out.startswith("InputError") and "cannot list the folder" in out, out
    assert "Permission denied" in out


@pytest.mark.parametrize("name", ["-rf.jpg", "new\nline.jpg"])
def test_predict_reports_an_unreadable_query_by_name(tmp_path: Path, name: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    write_jpeg(root / "a.jpg", 1)
    build_index(root, out=tmp_path / "b", model=TINY)
    bad = tmp_path / name
    bad.write_bytes(badfiles.HTML)
    result = CliRunner().invoke(main, ["-q", "predict", "--index", str(tmp_path / "b"), "--",
                                       str(bad), str(root / "a.jpg")])
    assert result.exit_code == 0, result.output
    assert f"{bad}\tSKIPPED not_an_image" in result.output
    assert "2 images, 1 predicted, 1 unreadable" in result.output
