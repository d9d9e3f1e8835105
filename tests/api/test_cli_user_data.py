"""`lte train` / `lte eval` / `lte fit` on the user's own checkpoint and text (issue 12, part 3).

A tiny random Llama (hidden 64, 2 layers, FFN 128) and a WordLevel tokenizer trained on a few lines
are saved with `save_pretrained` into a temp dir; the CLI runs in-process except under torchrun.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lte_compile.training.cli import main_eval, main_fit, main_train
from lte_compile.training.data import load_token_data

WORDS = ("the quick brown fox jumps over a lazy dog to be or not to be that is the question "
         "all the world is a stage and all the men and women merely players").split()
TINY_RUN = ["--seq-len", "32", "--batch-size", "2", "--threads", "1", "--no-progress"]
TARGET = 0.5
# The driver's tolerance is 0.02 after hundreds of steps; a 3 + 2 step run on a random model is
# calibrated once on 2 held-out batches, so its held-out sparsity is allowed 0.05.
TINY_TOLERANCE = 0.05


def _lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(n)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A transformers checkpoint dir: tiny random LlamaForCausalLM + its PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("ckpt")
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(_lines(20, 0), trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="<unk>")
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(_lines(300, 1)))
    return path


def _run(main, argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _heldout_ppl(checkpoint: Path, lte_dir: Path, heldout: torch.Tensor) -> float:
    """Perplexity of a fresh model with the saved LTE state, measured here, not by the CLI."""
    from transformers import AutoModelForCausalLM

    import lte_compile as lte

    model = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True)
    lte.load(model, lte_dir)
    return lte.evaluate(model, heldout, mode="hard", max_batches=2, seq_len=32, batch_size=2)["ppl"]


def test_train_eval_reload_end_to_end(checkpoint, text_file, tmp_path, capsys):
    run = tmp_path / "run"
    rc, out, _ = _run(main_train, ["--model", checkpoint, "--data", text_file, "--steps1", 3, "--steps2", 2,
                                   "--target", TARGET, "--eval-batches", 2, "--out", run, *TINY_RUN], capsys)
    assert rc == 0
    summary = json.loads(out)
    assert abs(summary["sparsity"] - TARGET) <= TINY_TOLERANCE, summary["sparsity"]
    assert {p.name for p in run.iterdir()} >= {"lte", "log.jsonl", "sparsity.png", "losses.png"}
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 1, 2]
    data = summary["data"]  # one document: the tail of the stream is held out (default fraction 0.05)
    assert data["heldout_tokens"] == int((data["train_tokens"] + data["heldout_tokens"]) * 0.05) > 0

    rc, out, _ = _run(main_eval, ["--model", checkpoint, "--data", text_file, "--lte-dir", run / "lte",
                                  "--batches", 2, *TINY_RUN[:-1]], capsys)
    assert rc == 0
    ev = json.loads(out)
    assert ev["lte"]["ppl"] == pytest.approx(summary["eval_ppl"], rel=1e-6)
    assert ev["lte"]["sparsity"] == pytest.approx(summary["sparsity"], abs=1e-9)
    assert ev["dense"]["mode"] == "dense" and ev["dense"]["ppl"] != ev["lte"]["ppl"]  # trained vs the original

    _, heldout = load_token_data(text_file, _tokenizer(checkpoint))
    assert _heldout_ppl(checkpoint, run / "lte", heldout) == pytest.approx(summary["eval_ppl"], rel=1e-6)


def test_fit_takes_the_same_options(checkpoint, text_file, tmp_path, capsys):
    rc, out, _ = _run(main_fit, ["--model", checkpoint, "--data", text_file, "--target", TARGET, "--steps", 5,
                                 "--batches", 2, "--out", tmp_path / "fit", *TINY_RUN[:-1]], capsys)
    assert rc == 0
    summary = json.loads(out)
    assert abs(summary["sparsity"] - TARGET) <= TINY_TOLERANCE and (tmp_path / "fit" / "lte").is_dir()


def _tokenizer(checkpoint: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)


def test_jsonl_and_safetensors_give_the_tokens_of_the_txt(checkpoint, text_file, tmp_path):
    from safetensors.torch import save_file

    tok = _tokenizer(checkpoint)
    text = text_file.read_text()
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": text}) + "\n")
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.int32)
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    want = load_token_data(text_file, tok, heldout_fraction=0.1)
    assert torch.equal(torch.cat(want), ids.long())  # one document: no EOS, split at the stream's tail
    assert want[1].numel() == int(ids.numel() * 0.1)
    for path in (tmp_path / "one.jsonl", tmp_path / "ids.safetensors"):
        got = load_token_data(path, tok, heldout_fraction=0.1)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), path.name


def test_jsonl_documents_are_joined_by_eos_and_held_out_whole(checkpoint, tmp_path):
    tok = _tokenizer(checkpoint)
    docs = _lines(20, 2)
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    train, held = load_token_data(path, tok, heldout_fraction=0.1)
    per_doc = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    joined = lambda part: [t for i, d in enumerate(part) for t in ([tok.eos_token_id] if i else []) + d]  # noqa: E731
    assert held.tolist() == joined(per_doc[18:]) and train.tolist() == joined(per_doc[:18])


def _no_tokenizer_dir(checkpoint: Path, tmp_path: Path) -> Path:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).symlink_to(checkpoint / name)
    return bare


BAD_INPUTS = {
    # case: (files to write {name: text}, --model (None: the checkpoint), --data, words the error must contain)
    "missing model dir": ({}, "nowhere", "corpus.txt", ["nowhere", "no such directory"]),
    "no tokenizer": ({}, "bare", "corpus.txt", ["no tokenizer", "tokenizer.save_pretrained"]),
    "bad jsonl line": ({"d.jsonl": '{"text": "a b"}\n{"text": "a\n'}, None, "d.jsonl", ["line 2 is not JSON"]),
    "jsonl line without text": ({"d.jsonl": '{"text": "a b"}\n\n{"body": "a"}\n'}, None, "d.jsonl",
                                ["line 3 has no 'text' field"]),
    "pickle refused": ({"ids.pt": "x"}, None, "ids.pt", ["pickle", "safetensors"]),
    "too short": ({"short.txt": "the quick brown fox " * 20}, None, "short.txt", ["tokens to train on", "seq_len"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_are_one_line_errors_and_write_nothing(case, checkpoint, text_file, tmp_path, capsys):
    files, model, data, words = BAD_INPUTS[case]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    if model == "bare":
        model = _no_tokenizer_dir(checkpoint, tmp_path)
    (tmp_path / "corpus.txt").symlink_to(text_file)
    argv = ["--model", model if model is not None else checkpoint, "--data", tmp_path / data, "--out", tmp_path / "run",
            *TINY_RUN]
    rc, _, err = _run(main_train, argv, capsys)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("lte train: error:"), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "run").exists()


def test_token_ids_outside_the_vocabulary_are_refused(checkpoint, tmp_path, capsys):
    from safetensors.torch import save_file

    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    save_file({"input_ids": torch.arange(4000) % (vocab + 1)}, str(tmp_path / "ids.safetensors"))
    rc, _, err = _run(main_train, ["--model", checkpoint, "--data", tmp_path / "ids.safetensors", "--out",
                                   tmp_path / "run", *TINY_RUN], capsys)
    assert rc == 2 and f"token id {vocab}" in err and "vocab_size" in err and not (tmp_path / "run").exists()


def test_eval_refuses_torchrun_and_a_missing_lte_dir(checkpoint, text_file, tmp_path, capsys, monkeypatch):
    rc, _, err = _run(main_eval, ["--model", checkpoint, "--data", text_file, "--lte-dir", tmp_path / "none"], capsys)
    assert rc == 2 and "lte train" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc, _, err = _run(main_eval, ["--model", checkpoint, "--lte-dir", tmp_path], capsys)
    assert rc == 2 and "without torchrun" in err


def test_torchrun_two_processes(checkpoint, text_file, tmp_path):
    """2 ranks (gloo, CPU): one summary printed, the log written once, the state saved, sparsity on target."""
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lte_compile.cli", "train", "--model", str(checkpoint), "--data", str(text_file), "--steps1", "3",
           "--steps2", "2", "--target", str(TARGET), "--eval-batches", "2", "--out", str(run), "--no-plots", *TINY_RUN]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # exactly one JSON document: rank 1 prints nothing
    assert summary["world_size"] == 2
    assert abs(summary["sparsity"] - TARGET) <= TINY_TOLERANCE, summary["sparsity"]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "eval" for r in records) == 1  # one writer
    assert sorted(p.name for p in (run / "lte").iterdir()) == ["lte_config.json", "lte_state.safetensors",
                                                               "model.safetensors"]
