"""lte.save / lte.load: check everything before changing the model, refuse corrupt or mismatched
state with an error naming the file, see through torch.compile/DDP, and no double permutation after
a transformers save_pretrained round trip (issue 11, defects 3-6, and the fuzz test over saved state)."""
from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lte_compile as lte
from tests import models
from lte_compile.errors import LTEError, StateFileError, UnsupportedWrapperError
from lte_compile.plan.state import CONFIG_FILE, MODEL_FILE, STATE_FILE
from lte_compile.testing import examples
from tests.api.conftest import build, ids, run

FILES = (CONFIG_FILE, STATE_FILE, MODEL_FILE)


# ----------------------------------------------------------------------------- helpers
snapshot = models.snapshot


def assert_unchanged(model, before):
    models.assert_state_unchanged(model, before)
    assert not lte.is_prepared(model)
    assert not hasattr(model, "lte_config")


def prepared_llama(seed=0):
    """A prepared tiny Llama in hard mode whose routers switch some experts off."""
    model = lte.prepare(build("llama", seed=seed))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for r in lte.routers(model).values():
            r.linear.bias.copy_(torch.randn(r.linear.bias.shape, generator=gen))
    return lte.set_mode(model, "hard")


def logits(model, x):
    with torch.no_grad():
        return run(model, x)


def edit_json(directory, fn):
    path = Path(directory) / CONFIG_FILE
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def edit_state(directory, fn, *, fix_checksum=True):
    """Rewrite lte_state.safetensors through fn(dict); keep the JSON's checksum in step so that
    the check under test (not the checksum) is what refuses it."""
    import hashlib

    path = Path(directory) / STATE_FILE
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))
    if fix_checksum:
        edit_json(directory, lambda m: m.update(state_sha256=hashlib.sha256(path.read_bytes()).hexdigest()))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(prepared model, input, its hard-mode logits, dir with the model, dir without)."""
    model, x = prepared_llama(), ids()
    root = tmp_path_factory.mktemp("saved")
    lte.save(model, root / "full")
    lte.save(model, root / "state", include_model=False)
    return model, x, logits(model, x), root / "full", root / "state"


@pytest.fixture
def dirs(saved, tmp_path):
    """Fresh copies of the two saved directories (tests corrupt them)."""
    _, _, _, full, state = saved
    return shutil.copytree(full, tmp_path / "full"), shutil.copytree(state, tmp_path / "state")


# ----------------------------------------------------------------------------- round trips
def test_round_trip_with_and_without_model(saved):
    _, x, ref, full, state = saved
    for directory, seed in ((full, 5), (state, 0)):  # full: other weights are restored from the file
        model = lte.load(build("llama", seed=seed), directory)
        assert lte.get_mode(model) == "hard"
        assert torch.equal(logits(model, x), ref)


# ----------------------------------------------------------------------------- defect 3
def test_failed_load_changes_nothing_and_a_retry_works(saved, dirs):
    """More layers than saved (full save): refused before any change; a retry into the same model works."""
    _, x, ref, _, _ = saved
    full, _ = dirs
    import transformers as tf

    four = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2))
    before = snapshot(four)
    with pytest.raises(lte.StateMismatchError, match=r"model\.safetensors: missing keys \['model\.layers\.2"):
        lte.load(four, full)
    assert_unchanged(four, before)

    model = build("llama")
    before = snapshot(model)
    edit_json(full, lambda m: m.update(mode="turbo"))
    with pytest.raises(StateFileError, match=rf"{CONFIG_FILE}: mode 'turbo'"):
        lte.load(model, full)
    assert_unchanged(model, before)
    edit_json(full, lambda m: m.update(mode="hard", ffns=[]))
    with pytest.raises(StateFileError, match="FFN list is empty"):
        lte.load(model, full)
    assert_unchanged(model, before)
    shutil.copy(saved[3] / CONFIG_FILE, full / CONFIG_FILE)  # repaired: the same model now loads
    assert torch.equal(logits(lte.load(model, full), x), ref)


# ----------------------------------------------------------------------------- defect 4
def test_missing_model_file_is_an_error_naming_it(dirs):
    full, _ = dirs
    (full / MODEL_FILE).unlink()
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(StateFileError, match=rf"{full / MODEL_FILE} is missing.*includes_model"):
        lte.load(model, full)
    assert_unchanged(model, before)


@pytest.mark.parametrize("corrupt, message", [
    (lambda t: t["model.layers.0.mlp.permutation"].zero_(), "not a permutation of range\\(128\\)"),
    (lambda t: t["model.layers.1.mlp.permutation"].__setitem__(0, 5), "not a permutation"),
    (lambda t: t.update({"model.layers.0.mlp.bias": torch.zeros(1)}), r"bias in .*expected \[4\]"),
    (lambda t: t.update({"model.layers.0.mlp.weight": t["model.layers.0.mlp.weight"].half()}), "torch.float16"),
    (lambda t: t["model.layers.0.mlp.weight"].fill_(float("nan")), "NaN or Inf"),
    (lambda t: t.pop("model.layers.1.mlp.bias"), r"missing keys \['model.layers.1.mlp.bias'\]"),
])
def test_bad_router_state_is_refused(dirs, corrupt, message):
    for directory in dirs:
        edit_state(directory, corrupt)
        model = build("llama")
        before = snapshot(model)
        with pytest.raises(lte.StateMismatchError, match=message) as e:
            lte.load(model, directory)
        assert STATE_FILE in str(e.value)
        assert_unchanged(model, before)


def test_state_file_changed_after_save_is_refused_by_its_checksum(dirs):
    _, state = dirs
    edit_state(state, lambda t: t["model.layers.0.mlp.bias"].add_(1.0), fix_checksum=False)
    with pytest.raises(StateFileError, match=rf"{STATE_FILE}: its SHA-256 differs"):
        lte.load(build("llama"), state)


def test_d_model_is_checked_against_the_model(dirs):
    import transformers as tf

    narrow = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    before = snapshot(narrow)
    for directory in dirs:
        with pytest.raises(lte.StateMismatchError, match="saved d_model=64"):
            lte.load(narrow, directory)
        assert_unchanged(narrow, before)


def test_layers_beyond_the_saved_ones_warn(tmp_path, caplog):
    """Policy: the saved FFNs load, the model's extra layers stay dense (the original function) with a
    warning naming them. A state-only save is needed: a full save is refused (keys missing)."""
    import transformers as tf

    def llama(layers):
        torch.manual_seed(0)
        return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=layers, num_attention_heads=4,
                                                  num_key_value_heads=2)).eval()

    def two_of_four():  # a 2-layer model with the first two layers of the 4-layer one
        two = llama(2)
        two.load_state_dict(llama(4).state_dict(), strict=False)
        return two

    four = llama(4)
    lte.save(lte.prepare(two_of_four()), tmp_path, include_model=False)
    with caplog.at_level(logging.WARNING, logger="lte_compile.plan.state"):
        lte.load(four, tmp_path)
    assert "model.layers.2.mlp, model.layers.3.mlp" in caplog.text and "stay dense" in caplog.text
    assert list(lte.routers(four)) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lte_compile.plan.state"):
        lte.load(two_of_four(), tmp_path)
    assert "stay dense" not in caplog.text


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format=1), "format 1"),
    (lambda m: m.update(includes_model="yes"), "'includes_model'"),
    (lambda m: m["config"].update(kmeans_iters="x"), "invalid config"),
    (lambda m: m["config"].update(seed="x"), "invalid config"),
    (lambda m: m["ffns"][0].update(d_model=True), "d_model"),
    (lambda m: m["ffns"][0]["up"].update(rows=[0, 5]), "malformed up projection"),
    (lambda m: m["fingerprints"].pop("model.layers.1.mlp"), "fingerprints cover"),
])
def test_bad_json_fields_are_refused_naming_the_file(dirs, edit, message):
    for directory in dirs:
        edit_json(directory, edit)
        with pytest.raises(StateFileError, match=message) as e:
            lte.load(build("llama"), directory)
        assert str(directory / CONFIG_FILE) in str(e.value)


@pytest.mark.parametrize("name", FILES)
def test_corrupt_files_give_errors_naming_them(dirs, name):
    full, _ = dirs
    path = full / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(StateFileError) as e:
        lte.load(model, full)
    assert str(path) in str(e.value)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------- defect 5
def test_save_and_load_see_through_torch_compile(saved, tmp_path):
    model, x, ref, _, _ = saved
    compiled = torch.compile(model, backend="lte", options={"lte.inner": "eager"})
    lte.save(compiled, tmp_path)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert meta["model_class"] == "LlamaForCausalLM"
    assert not any(k.startswith("_orig_mod.") for k in load_file(str(tmp_path / MODEL_FILE)))
    target = torch.compile(build("llama", seed=5), backend="lte", options={"lte.inner": "eager"})
    assert lte.load(target, tmp_path) is target
    assert lte.is_prepared(target._orig_mod)
    with torch.no_grad():
        torch.testing.assert_close(run(target, x), ref)  # compiled: the sparse op, not bit-exact


def test_save_sees_through_ddp_and_load_into_ddp_is_refused(saved, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    model, x, ref, _, _ = saved
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        lte.save(DistributedDataParallel(copy.deepcopy(model)), tmp_path / "ddp")
        fresh = build("llama")
        before = snapshot(fresh)
        wrapped = DistributedDataParallel(fresh)
        with pytest.raises(UnsupportedWrapperError, match="load into a DistributedDataParallel"):
            lte.load(wrapped, tmp_path / "ddp")
        assert_unchanged(fresh, before)
    finally:
        dist.destroy_process_group()
    assert not any(k.startswith("module.") for k in load_file(str(tmp_path / "ddp" / MODEL_FILE)))
    assert json.loads((tmp_path / "ddp" / CONFIG_FILE).read_text())["model_class"] == "LlamaForCausalLM"
    dp = lte.load(DataParallel(build("llama", seed=5)), tmp_path / "ddp")
    assert torch.equal(logits(dp.module, x), ref)


# ----------------------------------------------------------------------------- defect 6
def test_no_double_permutation_after_save_pretrained(saved, tmp_path):
    import transformers as tf

    model, x, ref, _, state = saved
    model.save_pretrained(tmp_path / "hf")  # already permuted FFN weights
    reloaded = tf.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    lte.load(reloaded, state)
    assert torch.equal(logits(reloaded, x), ref)
    # the original weights still get the permutation, also after a bf16 cast (fingerprint tolerance)
    assert torch.equal(logits(lte.load(build("llama"), state), x), ref)
    half = lte.load(build("llama").to(torch.bfloat16), state)
    assert torch.equal(logits(half, x), logits(copy.deepcopy(model).to(torch.bfloat16), x))


def test_weights_neither_original_nor_permuted_are_refused(saved):
    other = build("llama", seed=7)
    before = snapshot(other)
    with pytest.raises(lte.StateMismatchError,
                       match=r"model\.layers\.0\.mlp: the model's up weights .* neither the original") as e:
        lte.load(other, saved[4])
    assert "include_model=True" in str(e.value) and CONFIG_FILE in str(e.value)
    assert_unchanged(other, before)


# ----------------------------------------------------------------------------- fuzz
WRONG_VALUES = (None, True, -1, 0, 1.5, float("nan"), "x", "", [], [1], {}, {"a": 1})
JSON_FIELDS = ("format", "model_class", "mode", "config", "ffns", "includes_model", "state_sha256",
               "fingerprints", "layer_lists")
# (path into the JSON, invalid values of the right type); valid edits (tau 0.5 -> 0.3) change the
# function and are the user's to make: the fuzz corrupts, it does not re-configure.
JSON_BAD = [
    (("format",), (1, 99)), (("mode",), ("turbo", "HARD")), (("ffns",), ([],)),
    (("config", "expert_size"), (0, 48, -32)), (("config", "tau"), (1.5, 0.0)), (("config", "version"), (2,)),
    (("config", "bogus"), (1,)), (("state_sha256",), ("0" * 64, "abc")),
    (("ffns", 0, "d_model"), (65, 0)), (("ffns", 0, "d_ff"), (256, 64)), (("ffns", 1, "d_out"), (63,)),
    (("ffns", 0, "name"), ("model.layers.9.mlp", "model.layers.1.mlp")),
    (("ffns", 1, "up", "weight"), ("model.layers.1.mlp.nope.weight", "model.layers.0.mlp.up_proj.weight")),
    (("ffns", 0, "down", "down"), (False,)), (("ffns", 0, "gate"), (None,)),
    (("ffns", 0, "up", "bias"), ("model.layers.0.mlp.up_proj.weight",)),
    (("fingerprints", "model.layers.0.mlp", "up", "sum", 0), (1.0, -1.0)),
    (("fingerprints", "model.layers.1.mlp", "rows"), ([999], [0, 0, 0, 0, 0, 0, 0, 0, 0])),
    (("layer_lists", "model.layers"), (-1,)),
]


@st.composite
def corruptions(draw, files):
    kind = draw(st.sampled_from(["truncate", "delete", "tensors", "json", "json_type", "benign"]))
    name = draw(st.sampled_from(files))
    if kind in ("truncate", "delete"):
        return kind, name, draw(st.floats(0, 0.999))
    if kind == "tensors":
        return kind, draw(st.sampled_from([f for f in files if f.endswith(".safetensors")])), draw(st.data())
    if kind == "json":
        path, values = draw(st.sampled_from(JSON_BAD))
        return kind, CONFIG_FILE, (path, draw(st.sampled_from(values)))
    if kind == "json_type":
        return kind, CONFIG_FILE, (draw(st.sampled_from(JSON_FIELDS)), draw(st.sampled_from(("drop", *WRONG_VALUES))))
    return kind, CONFIG_FILE, draw(st.sampled_from(["model_class", "extra_key", "config_extra"]))


def corrupt_tensors(path: Path, data) -> None:
    t = load_file(str(path))
    keys = sorted(t)
    key = data.draw(st.sampled_from(keys), label="key")
    ops = ["drop", "add", "shape", "dtype", "same"]
    if "permutation" in key or "lte_router" in key or path.name == STATE_FILE:
        # values are edited only in LTE tensors (checksummed / cross-checked); the model's own
        # weights in model.safetensors carry no checksum (hashing GBs on every load) by choice
        ops += ["shuffle", "duplicate", "swap", "zeros"]
    op = data.draw(st.sampled_from(ops), label="op")
    v = t[key]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    if op == "drop":
        del t[key]
    elif op == "add":
        t[data.draw(st.sampled_from([key + "_x", "extra", "model.layers.0.mlp.lte_router.extra"]))] = torch.zeros(3)
    elif op == "shape":
        flat = v.flatten()
        t[key] = data.draw(st.sampled_from([flat, flat[:-1], torch.cat([flat, flat[:1]]), v.unsqueeze(0)]))
    elif op == "dtype":
        t[key] = v.to(data.draw(st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int32,
                                                 torch.int64, torch.float32])))
    elif op in ("shuffle", "duplicate", "swap", "zeros"):
        if v.dim() == 0 or v.numel() < 2:
            return
        w = v.clone().flatten()
        i, j = torch.randint(0, w.numel(), (2,), generator=g).tolist()
        if op == "shuffle":
            w = w[torch.randperm(w.numel(), generator=g)]
        elif op == "duplicate":
            w[i] = w[j]
        elif op == "swap":
            w[i], w[j] = w[j].clone(), w[i].clone()
        else:
            w.zero_()
        t[key] = w.view(v.shape)
    save_file(t, str(path))


def _set(meta, path, value):
    node = meta
    for p in path[:-1]:
        node = node[p]
    if isinstance(node, list) and path[-1] >= len(node):
        return
    node[path[-1]] = value


def apply(corruption, directory: Path) -> None:
    kind, name, arg = corruption
    path = directory / name
    if kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * arg)])
    elif kind == "delete":
        path.unlink()
    elif kind == "tensors":
        corrupt_tensors(path, arg)
    else:
        meta = json.loads(path.read_text())
        if kind == "json":
            _set(meta, *arg)
        elif kind == "json_type":
            field, value = arg
            if value == "drop":
                del meta[field]
            elif type(value) is not type(meta[field]):  # wrong type only (same-type edits: "json")
                meta[field] = value
        elif arg == "model_class":
            meta["model_class"] = "SomethingElse"  # informational: a warning, not an error
        elif arg == "extra_key":
            meta["note"] = "added by hand"
        else:
            meta["config"]["extra"] = {"who": "me"}
        path.write_text(json.dumps(meta))


class Target:
    """A fresh unprepared model, replaced only after a load succeeded (a failed load leaves it as
    it was, which each trial checks); building per trial would dominate the runtime."""

    def __init__(self):
        self.template = build("llama")
        self.renew()

    def renew(self):
        self.model = copy.deepcopy(self.template)
        self.before = snapshot(self.model)


@pytest.fixture(scope="module")
def fuzz_env(saved, tmp_path_factory):
    model, x, ref, _, state = saved
    trained = copy.deepcopy(model)
    with torch.no_grad():  # weights the fresh model does not have: only model.safetensors restores them
        trained.model.embed_tokens.weight.add_(0.01 * torch.randn(trained.model.embed_tokens.weight.shape,
                                                                  generator=torch.Generator().manual_seed(1)))
    full = tmp_path_factory.mktemp("fuzz") / "full"
    lte.save(trained, full)
    return {"full": (full, logits(trained, x)), "state": (state, ref)}, x, Target(), tmp_path_factory.mktemp("trials")


@pytest.mark.parametrize("which", ["full", "state"])
def test_fuzz_saved_state(fuzz_env, which):
    """Each corrupted directory either loads and gives the original outputs bit for bit, or raises an
    LTEError naming a file of the directory, leaving the model's state and preparedness unchanged."""
    dirs, x, target, trials = fuzz_env
    src, ref = dirs[which]
    files = [f for f in FILES if (src / f).exists()]
    outcome = {"loaded": 0, "refused": 0}

    @settings(max_examples=examples(100), deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(corruption=corruptions(files))
    def trial(corruption):
        directory = Path(tempfile.mkdtemp(dir=trials))
        try:
            shutil.copytree(src, directory, dirs_exist_ok=True)
            apply(corruption, directory)
            try:
                lte.load(target.model, directory)
            except LTEError as e:
                msg = str(e)
                assert any(str(directory / f) in msg for f in FILES) or (
                    str(directory) in msg and any(f in msg for f in FILES)), msg
                assert_unchanged(target.model, target.before)
                outcome["refused"] += 1
                return
            loaded = target.model
            target.renew()
            assert lte.get_mode(loaded) == "hard"
            assert torch.equal(logits(loaded, x), ref), f"{corruption}: loaded, but the outputs differ"
            outcome["loaded"] += 1
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    trial()
    assert outcome["refused"] > 0 and outcome["loaded"] > 0, outcome
