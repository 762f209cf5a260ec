"""Encoder plugins: the ``embedsearch.encoders`` entry-point group.

The test encoder ``test:tiny`` itself is a plugin (tests/plugins/), so every test that uses
it goes through this mechanism; here: what a plugin's spec resolves to, how it is listed,
and that broken plugins give clear errors naming their distribution while the built-in
families keep working.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from embedsearch.cli import main
from embedsearch.encoders import load_encoder, plugin_entries, resolve
from embedsearch.errors import EncoderError
from tests import proc

TEST_DIST = "embedsearch-test-encoders 1.0"


def test_the_test_encoder_is_a_plugin_found_by_its_entry_point() -> None:
    entry, name = resolve("test:tiny")
    assert (entry.key, name, entry.distribution) == ("test:", "tiny", TEST_DIST)
    assert entry.builder == "embedsearch_test_encoders:build_tiny"
    enc = load_encoder("test:tiny")
    assert type(enc).__module__ == "embedsearch_test_encoders" and enc.dim == 64
    assert enc.identity()["spec"] == "test:tiny"
    import embedsearch.encoders.families as families

    assert not hasattr(families, "TinyEncoder")  # no test code in the package


def test_a_cli_subprocess_finds_the_plugin_and_lists_it() -> None:
    out = proc.cli("models", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["spec"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert "test:" in rows and TEST_DIST in rows["test:"]["description"]
    assert rows["test:"]["example"] == "test:NAME"
    assert "timm:" in rows and "efficientnet-lite0" in rows  # built-ins first, unchanged


def _dist(root: Path, name: str, entry_points: str, module: str | None = None,
          code: str = "") -> None:
    """An installed distribution as importlib.metadata sees it: NAME-0.1.dist-info/."""
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[embedsearch.encoders]\n" + entry_points)
    if module:
        (root / f"{module}.py").write_text(code)


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A site folder of third-party plugins, good and bad, on sys.path for one test."""
    site = tmp_path / "site"
    _dist(site, "broken-import", "broken = broken_plugin:factory\n", "broken_plugin",
          "raise RuntimeError('this plugin is broken')\n")
    _dist(site, "missing-attr", "noattr = fine_module:no_such_factory\n", "fine_module", "")
    _dist(site, "crashy", "crashy = crashy_plugin:factory\n", "crashy_plugin",
          "def factory(spec, name, weights):\n    raise ValueError('no GPU driver')\n")
    _dist(site, "not-an-encoder", "notenc = notenc_plugin:factory\n", "notenc_plugin",
          "def factory(spec, name, weights):\n    return object()\n")
    _dist(site, "shadow-timm", "timm = fine_module:factory\nbad:name = fine_module:f\n")
    _dist(site, "dup-one", "dup = fine_module:factory\n")
    _dist(site, "dup-two", "dup = fine_module:factory\n")
    _dist(site, "good-plugin", "good = good_plugin:factory\n", "good_plugin",
          "from embedsearch_test_encoders import build_tiny\n\n"
          "def factory(spec, name, weights):\n"
          "    return build_tiny(spec, 'tiny', weights)\n")
    monkeypatch.syspath_prepend(str(site))
    plugin_entries.cache_clear()
    yield site
    monkeypatch.undo()
    plugin_entries.cache_clear()


def test_a_plugin_family_builds_through_its_factory(plugins: Path) -> None:
    enc = load_encoder("good:anything")
    assert enc.spec == "good:anything" and enc.dim == 64
    assert resolve("good:x")[0].distribution == "good-plugin 0.1"


@pytest.mark.parametrize(("spec", "says"), [
    ("broken:x", "cannot be loaded: RuntimeError: this plugin is broken"),
    ("noattr:x", "cannot be loaded: AttributeError"),
    ("crashy:x", "failed to build crashy:x: ValueError: no GPU driver"),
    ("notenc:x", "returned object for notenc:x, not an embedsearch Encoder"),
])
def test_a_broken_plugin_is_a_clear_error_naming_its_distribution(
        plugins: Path, spec: str, says: str) -> None:
    dist = {"broken": "broken-import", "noattr": "missing-attr", "crashy": "crashy",
            "notenc": "not-an-encoder"}[spec.split(":")[0]]
    with pytest.raises(EncoderError) as err:
        load_encoder(spec)
    assert f"of the distribution {dist} 0.1" in str(err.value) and says in str(err.value)
    assert "uninstall it; the built-in encoders do not depend on it" in err.value.hint
    # ... and the built-in families and the other plugins are unaffected.
    assert resolve("timm:resnet50")[0].distribution is None
    assert resolve("efficientnet-lite0")[0].distribution is None
    assert load_encoder("test:tiny").dim == 64


def test_the_cli_reports_a_broken_plugin_without_a_traceback(plugins: Path,
                                                             collection: Path) -> None:
    r = CliRunner().invoke(main, ["build-index", str(collection), "--out", "b",
                                  "--model", "broken:x"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "broken-import 0.1" in r.output and "this plugin is broken" in r.output


def test_a_plugin_never_replaces_a_built_in_and_a_shared_name_is_refused(
        plugins: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="embedsearch.encoders"):
        found = plugin_entries()
    assert "timm:" not in found and "bad:name:" not in found
    assert "ignored the encoder plugin 'timm' of shadow-timm 0.1: a built-in encoder has " \
           "that name" in caplog.text
    assert "'bad:name' of shadow-timm 0.1: not a family name" in caplog.text
    assert resolve("timm:resnet50")[0].builder == "embedsearch.encoders.families:build_timm"
    with pytest.raises(EncoderError, match="registered by several installed distributions"
                       ) as err:
        resolve("dup:x")
    assert "dup-one 0.1" in str(err.value) and "dup-two 0.1" in str(err.value)
    assert "uninstall all but one" in err.value.hint
    # An unknown family names the plugins' families among the known ones.
    with pytest.raises(EncoderError, match="unknown encoder") as err:
        resolve("nope:x")
    assert "good:NAME" in err.value.hint and "test:NAME" in err.value.hint
