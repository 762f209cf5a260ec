"""Issue 16: reliability and security, round 2 (each test is one reproduction of the issue)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from embedsearch import build_index
from embedsearch.cli import main
from tests.conftest import draw_image, make_collection

TINY = "test:tiny"


def run_cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, ["-q", *args])
    assert result.exit_code == code, (result.output, result.exception)
    assert "Traceback" not in result.output
    return result.output


# -- 1. an action never removes the last copy ------------------------------------------------
def test_delete_never_removes_a_file_that_is_also_its_kept_image_via_a_symlink(
        tmp_path: Path) -> None:
    images = make_collection(tmp_path / "images", per_class=3)
    real = images / "red" / "zz_unique.jpg"
    draw_image("blue", 999).save(real)
    (images / "red" / "aa_alias.jpg").symlink_to("zz_unique.jpg")
    build_index(images, out=tmp_path / "b", model=TINY, follow_symlinks=True)
    run_cli("dedupe", "--index", str(tmp_path / "b"), "-t", "0.999", "--out",
            str(tmp_path / "rep"), "--delete")
    assert real.is_file(), "the only copy was deleted"
    assert (images / "red" / "aa_alias.jpg").is_file(), "the kept image is a dangling link"


def test_delete_from_a_csv_listing_one_file_under_two_names(tmp_path: Path) -> None:
    imgs = tmp_path / "data" / "imgs"
    imgs.mkdir(parents=True)
    for i, cls in enumerate(["red", "green", "blue"]):
        draw_image(cls, i).save(imgs / f"{cls}.jpg")
    draw_image("red", 77).save(imgs / "u.jpg")
    (tmp_path / "data" / "alias").symlink_to("imgs")
    rows = ["path,label", *(f"imgs/{c}.jpg,{c}" for c in ["red", "green", "blue"]),
            "imgs/u.jpg,red", "alias/u.jpg,red"]
    csv = tmp_path / "data" / "list.csv"
    csv.write_text("\n".join(rows) + "\n")
    build_index(csv, out=tmp_path / "b", model=TINY)
    for action in (["--delete"], ["--move-to", str(tmp_path / "moved")]):
        run_cli("dedupe", "--index", str(tmp_path / "b"), "-t", "0.999", "--out",
                str(tmp_path / "rep"), *action)
        assert (imgs / "u.jpg").is_file(), f"{action}: the only copy left its place"
