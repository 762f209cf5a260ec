"""The fine-tuned baseline: trains, respects its budget, saves pickle-free, loads verified."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedsearch.cli import main
from embedsearch.errors import BundleError, EmbedsearchError
from embedsearch.finetune import META_FILE, WEIGHTS_FILE, finetune, load_finetuned, set_trainable

TINY = "test:tiny"
REPO = Path(__file__).resolve().parents[1]


def test_finetune_trains_saves_and_reloads(split_collection: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    res = finetune(split_collection, out=out, model=TINY, blocks="all", epochs=6, lr=0.03,
                   batch_size=8)
    info = json.loads((out / META_FILE).read_text())
    assert info["base_encoder"]["spec"] == TINY and info["classes"] == ["blue", "green", "red"]
    assert info["stopped_by"] == "epochs" and len(info["history"]) == 6
    assert info["counts"]["train"] == {"blue": 6, "green": 6, "red": 6}
    assert info["files"][WEIGHTS_FILE]["bytes"] == (out / WEIGHTS_FILE).stat().st_size \
        == info["model_bytes"]
    assert info["timings"]["train_cpu_seconds"] > 0 and info["timings"]["train_gpu_seconds"] \
        is None
    # Colour classes are separable by the tiny encoder's colour features.
    assert res.test["accuracy"] >= 0.8 and res.test["n"] == 9
    model = load_finetuned(out)
    test_paths = sorted((split_collection / "test").rglob("*.jpg"))
    proba = model.predict_proba(test_paths)
    assert np.allclose(proba, res.test_proba, atol=1e-5)
    assert (model.classes_[proba.argmax(1)] == res.test_pred).all()

    w = out / WEIGHTS_FILE
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match"):
        load_finetuned(out)


def test_budget_stops_training(split_collection: Path) -> None:
    res = finetune(split_collection, model=TINY, blocks="all", epochs=1000, batch_size=2,
                   budget_minutes=0.02)
    assert res.info["stopped_by"] == "budget" and res.info["steps"] < 1000 * 9
    assert res.info["timings"]["train_wall_seconds"] < 10 and res.path is None


def test_last_blocks_are_the_trunks_last_stages() -> None:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    trainable, total = set_trainable(model, "last")
    expect = sum(p.numel() for m in (*model.blocks[-2:], model.conv_head, model.bn2)
                 for p in m.parameters())
    assert trainable == expect and 0 < trainable < total
    assert not any(p.requires_grad for p in model.blocks[-3].parameters())
    assert set_trainable(model, "all") == (total, total)
    with pytest.raises(EmbedsearchError, match="cannot find the stages"):
        set_trainable(__import__("torch").nn.Identity(), "last")


@pytest.mark.slow
def test_cli_finetune_real_backbone_on_the_example(tmp_path: Path) -> None:
    """5-30 s on 2 cores: the default encoder's last stages, one epoch of 150 images."""
    out = tmp_path / "ft"
    result = CliRunner().invoke(main, ["finetune", str(REPO / "examples" / "clothing-mini"),
                                       "--out", str(out), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / META_FILE).read_text())
    assert info["settings"]["blocks"] == "last" and info["test"]["n"] == 40
    assert info["test"]["accuracy"] > 0.3  # chance: 0.1
    assert "CPU-s" in result.output and "test      accuracy" in result.output


def test_benchmark_finetune_row_and_verdict(tmp_path: Path) -> None:
    from tests.test_report import make_data

    data = make_data(tmp_path / "d", {"train": 6, "val": 2, "test": 3})
    out = tmp_path / "rep"
    r = CliRunner().invoke(main, ["-q", "benchmark", str(data), "--model", "test:tiny",
                                  "--out", str(out), "--k", "1,3", "--no-zero-shot",
                                  "--workers", "0", "--finetune", "--finetune-blocks", "all",
                                  "--finetune-epochs", "2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "fine-tuned backbone" in r.output
    res = json.loads((out / "results.json").read_text())
    (enc,) = res["encoders"]
    ft = enc["methods"]["finetune"]
    assert ft["metrics"]["n"] == len(res["predictions"]["ids"]) and ft["params"]["blocks"] == "all"
    assert ft["model_bytes"] > 0 and len(res["predictions"][enc["slug"]]["finetune"]["y_pred"]) \
        == ft["metrics"]["n"]
    tm = res["timings"]["encoders"][enc["slug"]]["methods"]["finetune"]
    assert tm["train_cpu_seconds"] > 0 and tm["epochs_run"] == 2 and tm["stopped_by"] == "epochs"
    report = (out / "report.md").read_text()
    assert "of the fine-tuned accuracy at" in report and "fine-tuned backbone" in report


def test_budget_plan_grows_back_after_a_slow_start() -> None:
    """The plan follows the measured step time both ways, never past the full schedule."""
    from embedsearch.finetune import _Schedule

    plan = _Schedule(1000)
    plan.fit_budget(5, elapsed=50.0, budget=600.0)  # 10 s/step at start-up
    assert plan.planned == 51
    plan.fit_budget(50, elapsed=60.0, budget=600.0)  # then 1.2 s/step
    assert plan.planned == 425
    plan.fit_budget(200, elapsed=80.0, budget=600.0)  # 0.4 s/step: more than the plan
    assert plan.planned == 1000
