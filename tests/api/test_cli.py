"""`lte inspect` on a config directory, a config.json and a module:callable."""
import pytest

from lte_compile.cli import main
from tests.api.conftest import build


def test_inspect_model_directory(tmp_path, capsys):
    build("llama").config.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--sparsity", "0.75", "--bytes-per-param", "4"]) == 0
    out = capsys.readouterr().out
    assert "2 FFN(s) found" in out
    rows = [line for line in out.splitlines() if line.startswith("model.layers.")]
    assert len(rows) == 2
    cells = rows[0].split()
    assert cells[:7] == ["model.layers.0.mlp", cells[1], "silu", "yes", "64", "128", "4x32"]
    # 3 projections of 64x128 fp32 weights = 98304 bytes dense; s=0.75 at T=1 reads a quarter of
    # them plus the 64x4 router: 4 * (6144 + 256) = 25600 bytes.
    assert cells[9] == "98.30K" and cells[10] == "25.60K"


def test_inspect_config_json_and_callable(tmp_path, capsys):
    build("gpt2").config.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path / "config.json")]) == 0
    assert "transformer.h.1.mlp" in capsys.readouterr().out
    assert main(["inspect", "tests.api.conftest:tiny_mlp"]) == 0
    out = capsys.readouterr().out
    assert "1 FFN(s) found" in out and "relu" in out


def test_inspect_missing_target_says_what_to_give(tmp_path):
    with pytest.raises(SystemExit, match="no config.json found"):
        main(["inspect", str(tmp_path / "nope")])
