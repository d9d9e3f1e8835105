"""`lte compare` (training/compare.py): the smoke sweep and its table, plot and JSON."""
from __future__ import annotations

import json
import math

import pytest

from lte_compile import cli
from lte_compile.errors import ConfigError
from lte_compile.kernels.cpu import cpu_name, isa
from lte_compile.training.compare import BASE_METHODS, QUICK, SweepSettings, ffn_flops_per_token

from .helpers import tiny_llama


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One smoke sweep through the `lte` command line (every method, 2 targets, no decode)."""
    out = tmp_path_factory.mktemp("quality")
    assert cli.main(["compare", "--quick", "--no-decode", "--threads", "1", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_smoke_sweep_has_every_method_and_target(quick_run):
    out, results = quick_run
    rows = {(r["method"], r["target"]): r for r in results["rows"]}
    expected = {("dense", None), ("dense_ft", None)} | {
        (m, t) for t in QUICK["targets"] for base in BASE_METHODS
        for m in (("lte_s1", "lte") if base == "lte" else (base, f"{base}+S2"))}
    assert set(rows) == expected and len(results["rows"]) == len(expected)
    for (method, target), r in rows.items():
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1 and math.isfinite(r["flops_per_token"]), r
        if target is None:
            continue
        assert r["flops_per_token"] < rows[("dense", None)]["flops_per_token"], r
        tolerance = 1 / 16 if method.startswith("oracle_topk") else 0.02  # top-k: k rounds to whole experts
        assert abs(r["sparsity"] - target) <= tolerance, r
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == len(expected) + 1  # header row + one per (method, target)
    assert cpu_name() in table and f"ISA {isa()[0]}" in table
    assert (out / "ppl_vs_sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sparser_means_fewer_flops_and_dense_ft_is_the_reference(quick_run):
    _, results = quick_run
    lte = {r["target"]: r for r in results["rows"] if r["method"] == "lte"}
    assert lte[0.8]["flops_per_token"] < lte[0.5]["flops_per_token"]
    fair = next(r for r in results["rows"] if r["method"] == "dense_ft")
    assert fair["steps"] == QUICK["steps1"] + QUICK["steps2"]
    assert results["settings"]["steps2"] == QUICK["steps2"] and results["header"]["machine"]["cpu"]


def test_flops_per_token_follow_the_cost_model():
    """Dense: 3 d d_ff per SwiGLU FFN, 2 FLOPs each; at sparsity s: (1 - s) of that plus the router's 2 d E."""
    model = tiny_llama()  # d 64, d_ff 256, E 16, 2 layers
    dense = 2 * 2 * 3 * 64 * 256
    assert ffn_flops_per_token(model, None) == pytest.approx(dense)
    half = {name: 0.5 for name in ("model.layers.0.mlp", "model.layers.1.mlp")}
    assert ffn_flops_per_token(model, half) == pytest.approx(dense / 2 + 2 * 2 * 64 * 16)


def test_bad_settings_are_one_line_errors(capsys):
    assert cli.main(["compare", "--quick", "--targets", "0.5,1.2"]) == 2
    assert "targets" in capsys.readouterr().err
    assert cli.main(["compare", "--quick", "--methods", "lte,magic"]) == 2
    assert "methods" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="steps2"):
        SweepSettings(steps2=0)


def test_merge_combines_parallel_sweeps_of_disjoint_targets(quick_run, tmp_path, capsys):
    """Two halves of the smoke sweep (split by target) merge back into one complete table; sweeps of
    different settings or overlapping targets are refused in one line."""
    _, results = quick_run
    dirs = []
    for i, targets in enumerate(([QUICK["targets"][0]], list(QUICK["targets"][1:]))):
        part = json.loads(json.dumps(results))
        part["settings"]["targets"] = targets
        part["rows"] = [r for r in part["rows"] if r["target"] is None or r["target"] in targets]
        part["header"]["wall_s"], part["header"]["cpu_s"] = 10.0 * (i + 1), 7.0
        (tmp_path / f"p{i}").mkdir()
        (tmp_path / f"p{i}" / "results.json").write_text(json.dumps(part))
        dirs.append(str(tmp_path / f"p{i}"))
    out = tmp_path / "merged"
    assert cli.main(["compare", "--merge", *dirs, "--out", str(out)]) == 0
    merged = json.loads((out / "results.json").read_text())
    key = lambda r: (r["method"], r["target"])  # noqa: E731
    assert sorted(map(key, merged["rows"]), key=str) == sorted(map(key, results["rows"]), key=str)
    assert merged["header"]["wall_s"] == 20.0 and merged["header"]["cpu_s"] == 14.0
    assert (out / "ppl_vs_sparsity.png").stat().st_size > 0
    capsys.readouterr()
    assert cli.main(["compare", "--merge", dirs[0], dirs[0], "--out", str(tmp_path / "bad")]) == 2
    assert "disjoint targets" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_kd_stages_reaches_every_training_run_of_the_sweep():
    """`--kd-stages stage1`: LTE's soft stage distils, stage 2 (LTE's and every +S2 run) does not."""
    from lte_compile.training.compare import parser, settings_from

    st = settings_from(parser().parse_args(["--kd-weight", "1", "--kd-stages", "stage1"]))
    cfg = st.train_config()
    assert cfg.kd_weight == 1.0 and cfg.kd_in("stage1") and not cfg.kd_in("stage2")
    assert settings_from(parser().parse_args([])).train_config().kd_stages == "both"
