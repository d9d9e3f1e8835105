"""Smoke tests of the demo and of the `lte train` / `lte eval` command lines on the shipped small LM."""
from __future__ import annotations

import json

from lte_compile.small_lm import demo
from lte_compile.training import cli as train_cli


def test_demo_runs_end_to_end_without_compile(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--steps1", "2", "--steps2", "1", "--batch-size", "2", "--seq-len", "64", "--skip-compile",
                      "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 < summary["sparsity"] < 1.0 and summary["dense_ppl"] < 1000 and summary["lte_ppl"] < 10_000
    assert set(summary["sparsity_per_layer"]) == {f"model.layers.{i}.mlp" for i in range(4)}
    printed = capsys.readouterr().out
    assert "validation perplexity" in printed and "ROMEO." in printed
    assert (out / "sparsity.png").exists() and (out / "lte" / "lte_config.json").exists()


def test_train_then_eval_command_lines(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli.main_train(["--steps1", "2", "--steps2", "1", "--target", "0.5", "--batch-size", "2",
                                 "--seq-len", "64", "--out", str(out), "--threads", "1"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert abs(trained["sparsity"] - 0.5) <= 0.02
    assert train_cli.main_eval(["--lte-dir", str(out / "lte"), "--batches", "1", "--seq-len", "64",
                                "--threads", "1"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["lte"]["mode"] == "hard" and 0.0 < evaluated["lte"]["sparsity"] < 1.0
    assert evaluated["dense"]["ppl"] < 1000


def test_fit_command_line(tmp_path, capsys):
    """`lte fit`: training-free routers on the shipped LM, saved and reloadable."""
    out = tmp_path / "fit"
    assert train_cli.main_fit(["--target", "0.6", "--batches", "1", "--seq-len", "64", "--batch-size", "2",
                               "--steps", "20", "--out", str(out), "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert abs(report["sparsity"] - 0.6) <= 0.02 and (out / "lte" / "lte_config.json").exists()
