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


@pytest.mark.parametrize("flag,value", [("--sparsity", "2"), ("--sparsity", "-0.1"), ("--sparsity", "nan"),
                                        ("--tokens", "-5"), ("--tokens", "0"), ("--expert-size", "0"),
                                        ("--bytes-per-param", "0"), ("--tokens", "1.5")])
def test_inspect_out_of_range_options_are_one_line_usage_errors(tmp_path, capsys, flag, value):
    """Issue 11 defect 9: no negative FLOPs, no sympy crash: argparse's one-line error, exit 2."""
    with pytest.raises(SystemExit) as e:
        main(["inspect", "tests.api.conftest:tiny_mlp", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in err and "Traceback" not in err


@pytest.mark.parametrize("argv,field", [(["train", "--target", "2"], "target_sparsity"),
                                        (["train", "--expert-size", "0"], "expert_size"),
                                        (["train", "--steps1", "-1"], "stage1_steps")])
def test_train_user_errors_print_one_line_with_the_fix(tmp_path, capsys, argv, field):
    """Issue 11 defect 9: `lte train`/`lte eval` user errors (LTEError): one line, exit code 2."""
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lte train: error:") and field in err


def test_eval_user_error_is_one_line(monkeypatch, capsys):
    import lte_compile.training.cli as tcli
    from lte_compile.errors import StateMismatchError

    def refuse(name):
        raise StateMismatchError("runs/x/lte: saved for another model; train with `lte train` first")

    monkeypatch.setattr(tcli, "_model", refuse)
    assert main(["eval", "--lte-dir", "runs/x/lte"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lte eval: error: runs/x/lte: saved for another model; train with `lte train` first"
