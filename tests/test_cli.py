"""The CLI's shape: every option has help, one concept has one name, --json is JSON lines in
every command, renamed options keep working for a release with a note on stderr."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from embedsearch.cli import main, options
from embedsearch.cli.options import deprecation_note, rename_args
from tests.conftest import make_collection

TINY = "test:tiny"
COMMANDS = dict(main.commands)


@pytest.fixture(autouse=True)
def _fresh_notes() -> None:
    """Deprecation notes are printed once per process: each test starts afresh."""
    options._noted.clear()


def invoke(*args: str, code: int = 0) -> Result:
    r = CliRunner().invoke(main, ["-q", *args])
    assert r.exit_code == code, r.output + repr(r.exception)
    return r


def json_lines(r: Result) -> list[dict]:
    """stdout as strict JSON lines: one object per line (no NaN), nothing else."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    lines = r.stdout.splitlines()
    assert lines, "no JSON lines on stdout"
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    assert all(isinstance(rec, dict) for rec in records)
    return records


def test_every_command_and_option_has_help() -> None:
    missing = [f"{name} (command)" for name, cmd in COMMANDS.items() if not cmd.help]
    for cmd_name, cmd in [("embedsearch", main), *COMMANDS.items()]:
        for p in cmd.params:
            if isinstance(p, click.Option) and not (p.help or "").strip():
                missing.append(f"{cmd_name} {'/'.join(p.opts)}")
    assert not missing, f"options without help text: {missing}"


def _options(flag: str) -> dict[str, click.Option]:
    return {name: p for name, cmd in COMMANDS.items() for p in cmd.params
            if isinstance(p, click.Option) and flag in p.opts}


def test_one_concept_has_one_name() -> None:
    opts = {o for cmd in COMMANDS.values() for p in cmd.params for o in p.opts}
    for old in ("--threshold", "--dedupe-threshold", "--near-threshold", "--num-workers",
                "--worker-cpus", "--worker-gpus"):
        assert old not in opts, f"{old} is still an option: one name per concept"
    # The near-duplicate threshold: one name in every command that groups duplicates.
    thresholds = _options("--dup-threshold")
    assert set(thresholds) == {"build-index", "benchmark", "dedupe", "leakage", "audit"}
    assert {tuple(sorted(p.opts)) for p in thresholds.values()} == {("--dup-threshold", "-t")}
    assert all(p.type == click.FLOAT for p in thresholds.values())
    # k is an integer everywhere (benchmark: several of them).
    ks = _options("--k")
    assert set(ks) == {"predict", "serve", "train", "audit", "benchmark"}
    assert all("-k" in p.opts for p in ks.values())
    for name, p in ks.items():
        assert isinstance(p.type, click.IntRange) or (name == "benchmark" and p.multiple)
    # The bundle is --index everywhere; decoding workers are --workers, one help text.
    assert {n for n, c in COMMANDS.items() for p in c.params if "index" in (p.name or "")
            and "--index" not in p.opts and p.name != "index_type"} == set()
    assert len({p.help for p in _options("--workers").values()}) == 1
    assert len({p.help for p in _options("--device").values()
                if p.metavar}) == 1  # finetune's --device trains: its own choices
    jsons = _options("--json")
    assert all(p.is_flag and p.help.startswith("JSON lines") for p in jsons.values())


def test_rename_args_maps_old_names_and_notes_each_once(capsys: pytest.CaptureFixture
                                                        ) -> None:
    renamed = {"--near-threshold": "--dup-threshold", "--no-dedupe": "--no-group-duplicates"}
    args = ["DATA", "--near-threshold", "0.9", "--no-dedupe", "--near-threshold=0.8",
            "--near", "--", "--no-dedupe"]
    assert rename_args(args, renamed, "benchmark ") == [
        "DATA", "--dup-threshold", "0.9", "--no-group-duplicates", "--dup-threshold=0.8",
        "--near", "--", "--no-dedupe"]
    err = capsys.readouterr().err
    assert err.count("benchmark --near-threshold is deprecated") == 1
    assert "use benchmark --dup-threshold" in err and "--no-group-duplicates" in err
    deprecation_note("benchmark --near-threshold", "benchmark --dup-threshold")
    assert capsys.readouterr().err == ""  # once per process
    assert rename_args(["--near-threshold"], {}) == ["--near-threshold"]


def test_renamed_options_work_and_say_so(tmp_path: Path) -> None:
    data = make_collection(tmp_path / "images", splits={"train": 3, "test": 2})
    shutil.copy(data / "train" / "red" / "red_000.jpg", data / "test" / "red" / "copy.jpg")
    bundle = str(tmp_path / "b")
    r = invoke("build-index", str(data), "--out", bundle, "--model", TINY, "--dedupe",
               "--dedupe-threshold", "0.999", "--json")
    assert "--dedupe-threshold is deprecated" in r.stderr and "--dup-threshold" in r.stderr
    (manifest,) = json_lines(r)
    assert manifest["dedupe"]["settings"]["threshold"] == 0.999
    new = invoke("dedupe", "--index", bundle, "--out", str(tmp_path / "r1"), "-t", "0.99",
                 "--json")
    old = invoke("dedupe", "--index", bundle, "--out", str(tmp_path / "r2"), "--threshold",
                 "0.99", "--json")
    assert "deprecated" not in new.stderr and "dedupe --threshold is deprecated" in old.stderr
    assert json_lines(old)[:-1] == json_lines(new)[:-1]  # the same groups
    # info NAME -> info --index NAME
    positional = invoke("info", bundle, "--json")
    assert "info NAME is deprecated" in positional.stderr
    assert json_lines(positional) == json_lines(invoke("info", "--index", bundle, "--json"))
    both = invoke("info", bundle, "--index", bundle, code=2)
    assert "give the bundle once" in both.output
    assert "--index NAME" in invoke("info", code=2).output
    # dedupe --leakage -> the leakage command, same pairs.
    leak = invoke("dedupe", "--index", bundle, "--leakage", "--out", str(tmp_path / "l1"),
                  "--json")
    assert "dedupe --leakage is deprecated" in leak.stderr and "leakage --index" in leak.stderr
    pairs = json_lines(leak)
    assert pairs == json_lines(invoke("leakage", "--index", bundle, "--out",
                                      str(tmp_path / "l2"), "--json"))
    assert {p["split_a"] for p in pairs} | {p["split_b"] for p in pairs} == {"train", "test"}
    # the help lists the old names
    assert "--dedupe-threshold -> --dup-threshold" in invoke("build-index", "--help").output


def test_every_json_output_is_json_lines(tmp_path: Path) -> None:
    """Each command with --json, run for real: stdout is JSON lines and only that."""
    covered: set[str] = set()

    def run(*args: str) -> list[dict]:
        covered.add(args[0])
        return json_lines(invoke(*args, "--json"))

    data = make_collection(tmp_path / "images", splits={"train": 4, "val": 2, "test": 2})
    shutil.copy(data / "train" / "red" / "red_000.jpg", data / "test" / "red" / "leak.jpg")
    bundle = str(tmp_path / "b")
    assert {r["spec"] for r in run("models")} >= {"efficientnet-lite0"}
    (manifest,) = run("build-index", str(data), "--out", bundle, "--model", TINY)
    assert run("info", "--index", bundle) == [manifest]
    preds = run("predict", str(data / "test"), "--index", bundle, "-k", "3")
    assert len(preds) == 7 and {"id", "status", "label", "true_label"} <= set(preds[0])
    (summary,) = run("train", "--index", bundle, "--head", "linear")
    assert summary["name"] == "linear"
    pairs = run("leakage", "--index", bundle)
    assert any(p["exact"] for p in pairs) and {"id_a", "split_a", "similarity"} <= set(pairs[0])
    *groups, last = run("dedupe", "--index", bundle, "--out", str(tmp_path / "r"),
                        "--move-to", str(tmp_path / "moved"))
    assert groups and all("kept" in g or "members" in g for g in groups)
    assert set(last) == {"summary", "files", "action"}
    assert run("dedupe", "--index", bundle, "--sweep")[0]["threshold"] > 0
    (undone,) = run("dedupe-undo", str(next((tmp_path / "moved").glob("embedsearch-undo-*"))))
    assert undone
    assert run("audit", "--index", bundle, "--out", str(tmp_path / "a"), "--folds", "2",
               "--all")
    data = make_collection(tmp_path / "study", splits={"train": 6, "val": 2, "test": 3})
    rows = run("benchmark", str(data), "--model", TINY, "--out", str(tmp_path / "bench"),
               "--k", "1,3", "--no-heads", "--no-zero-shot", "--workers", "0")
    assert {"encoder", "method", "accuracy", "accuracy_ci"} <= set(rows[0])
    (ft,) = run("finetune", str(data), "--model", TINY, "--out", str(tmp_path / "ft"),
                "--blocks", "all", "--epochs", "1", "--device", "cpu", "--batch-size", "8")
    assert ft["epochs_run"] >= 1
    with_json = {n for n, c in COMMANDS.items() if any("--json" in p.opts for p in c.params)}
    assert covered == with_json


def test_readme_lists_every_renamed_option() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    renames = readme.split("**Renamed options.**", 1)[1].split("\n\n", 2)[1]
    for name, cmd in COMMANDS.items():
        for old, new in getattr(cmd, "renamed", {}).items():
            assert any(name in line and f"{old}`" in line and new in line
                       for line in renames.splitlines()), f"README: {name} {old} -> {new}"
