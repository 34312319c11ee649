"""Issue 20 (adversarial testing) at the command line: reproducible seeds, numeric options and input files checked
before anything runs, changed data on --resume, non-finite adapters, and one-line errors (exit status 2 for a bad
option or input, 1 for a failure while running) with the traceback only behind --debug / LLADAPTER_DEBUG=1.

In-process calls of cli.main() on a tiny LLaMA in Hugging Face layout written without transformers (16 wide,
2 layers, mistral-common's 32000-token SentencePiece tokenizer), so each test takes well under a second.
"""
import io
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lladapter_ext import cli
from llama_helpers import tiny_llama_dir

WORDS = ["apple", "river", "stone", "cloud"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama"), adapter_len=2, adapter_layer=2)


def write_data(path, words=WORDS):
    with open(path, "w") as f:
        for w in words:
            f.write(json.dumps({"instruction": f"Repeat {w}.", "output": w}) + "\n")
    return str(path)


@pytest.fixture
def data(tmp_path):
    return write_data(tmp_path / "train.jsonl")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: conftest.one_torch_thread


def finetune_args(model_dir, data, out, *extra):
    return ["finetune", "--model", model_dir, "--data", data, "--out", str(out), "--max-steps", "2",
            "--batch-size", "2", "--lr", "1e-2", "--warmup-steps", "1", "--adapter-len", "2", "--adapter-layer", "2",
            "--max-seq-len", "64", "--no-progress", "--no-plot", "--device", "cpu", *extra]


def fails(capsys, argv, status=2):
    """Run main(argv), which must end with one line `lladapter: error: ...` on stderr, no traceback, and `status`;
    returns that line."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == status, (e.value.code, str(e.value))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lladapter: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------------ item 3: --seed
def test_finetune_same_seed_gives_bit_identical_adapters(model_dir, data, tmp_path, capsys):
    def run(name, seed):
        torch.seed()  # a fresh process: torch's RNG starts from a random seed (and the run must not depend on it)
        assert cli.main(finetune_args(model_dir, data, tmp_path / name, "--seed", str(seed))) == 0
        return load_file(str(tmp_path / name / "adapter.safetensors"))
    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# ------------------------------------------------------------------------------------ item 6: numeric options
@pytest.mark.parametrize("sub, option, value", [
    ("finetune", "--lr", "inf"), ("finetune", "--lr", "nan"), ("finetune", "--lr", "0"),
    ("finetune", "--weight-decay", "-1"), ("finetune", "--blr", "-inf"), ("finetune", "--min-lr", "-0.1"),
    ("finetune", "--epochs", "0"), ("finetune", "--max-steps", "0"), ("finetune", "--batch-size", "0"),
    ("finetune", "--grad-accum", "-2"), ("finetune", "--warmup-epochs", "nan"), ("finetune", "--warmup-steps", "-1"),
    ("finetune", "--clip-grad-norm", "0"), ("finetune", "--max-seq-len", "1"), ("finetune", "--save-every", "-1"),
    ("finetune", "--seed", "-1"), ("finetune", "--adapter-len", "0"), ("finetune", "--eval-limit", "0"),
    ("finetune", "--max-new-tokens", "0"), ("generate", "--temperature", "-1"), ("generate", "--top-p", "1.5"),
    ("generate", "--top-p", "0"), ("generate", "--max-new-tokens", "-5"), ("generate", "--seed", "x"),
    ("eval", "--limit", "0"), ("eval", "--show", "-1"), ("eval", "--max-seq-len", "0"),
    ("info", "--adapter-layer", "-3"),
])
def test_invalid_numeric_options_are_refused_before_anything_runs(sub, option, value, tmp_path, capsys):
    required = {"finetune": ["--data", "d.jsonl", "--out", str(tmp_path / "out")], "eval": ["--data", "d.jsonl"]}
    line = fails(capsys, [sub, *required.get(sub, []), f"{option}={value}"])
    assert f"argument {option}:" in line and repr(value) in line, line
    assert not (tmp_path / "out").exists()


def test_min_lr_above_the_lr_is_refused(model_dir, data, tmp_path, capsys):
    line = fails(capsys, finetune_args(model_dir, data, tmp_path / "out", "--min-lr", "0.5"))
    assert "--min-lr 0.5 is above the learning rate 0.01" in line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------- item 10: input files first
@pytest.mark.parametrize("option, value, message", [
    ("--eval-data", "missing.jsonl", "--eval-data file not found: missing.jsonl"),
    ("--data", "DIR", "is a directory"),
    ("--model", "no/such/model", "--model no/such/model: no such file or directory, and not a preset"),
    ("--tokenizer", "no/tokenizer.model", "--tokenizer no/tokenizer.model: no such file or directory"),
])
def test_finetune_checks_every_input_before_training(model_dir, data, tmp_path, capsys, option, value, message):
    value = str(tmp_path) if value == "DIR" else value
    line = fails(capsys, finetune_args(model_dir, data, tmp_path / "out", option, value))
    assert message in line, line
    assert not (tmp_path / "out").exists()  # nothing ran


def test_malformed_eval_data_fails_before_training(model_dir, data, tmp_path, capsys):
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{not json\n')
    line = fails(capsys, finetune_args(model_dir, data, tmp_path / "out", "--eval-data", str(bad)))
    assert f"{bad}:2: invalid JSON" in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- item 7: changed data on resume
def test_resume_on_changed_data_is_refused_unless_allowed(model_dir, tmp_path, capsys):
    data = write_data(tmp_path / "train.jsonl")
    out = tmp_path / "out"
    assert cli.main(finetune_args(model_dir, data, out)) == 0
    write_data(tmp_path / "train.jsonl", ["lemon", "tiger", "ocean", "maple"])  # same row count, other rows
    line = fails(capsys, finetune_args(model_dir, data, out, "--resume"))
    assert "training data changed" in line and "--allow-data-change" in line and "step-00000002" in line, line
    capsys.readouterr()
    assert cli.main(finetune_args(model_dir, data, out, "--resume", "--allow-data-change")) == 0


# ------------------------------------------------------------------------------------ item 8: non-finite adapter
def test_generate_refuses_a_nan_adapter_naming_tensor_and_file(model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(finetune_args(model_dir, data, out, "--max-steps", "1")) == 0
    path = str(out / "adapter.safetensors")
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tensors["layers.1.attention.adapter_prompt"][0, 3] = float("nan")
    save_file(tensors, path, metadata=meta)
    line = fails(capsys, ["generate", "--model", model_dir, "--adapter", path, "--prompt", "Repeat apple.",
                          "--temperature", "0", "--max-new-tokens", "2", "--device", "cpu"])
    assert f"tensor layers.1.attention.adapter_prompt in {path} is not finite (1 NaN" in line, line


# ------------------------------------------------------------------------------------------ item 11: smaller ones
def test_adapter_metadata_that_is_not_an_integer_names_file_and_key(model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(finetune_args(model_dir, data, out, "--max-steps", "1")) == 0
    path = str(out / "adapter.safetensors")
    save_file(load_file(path), path, metadata={"adapter_len": "ten", "adapter_layer": "2"})
    line = fails(capsys, ["generate", "--model", model_dir, "--adapter", path, "--prompt", "x", "--device", "cpu"])
    assert f"--adapter {path}: metadata adapter_len='ten' is not a non-negative integer" in line, line


def test_non_utf8_standard_input_is_a_clear_error(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"fine\nab\xff\xfecd\n"), encoding="utf-8"))
    line = fails(capsys, ["generate", "--model", model_dir, "--device", "cpu"])
    assert "standard input line 2 is not valid UTF-8 (byte 0xff at column 3)" in line, line
    # the same bytes smuggled in as surrogates (a C locale decodes stdin with surrogateescape)
    line = fails(capsys, ["generate", "--model", model_dir, "--device", "cpu", "--prompt", "ab\udcffcd"])
    assert "prompt 1 is not valid UTF-8" in line, line


def test_prompt_longer_than_the_context_is_refused_naming_lengths(model_dir, capsys):
    line = fails(capsys, ["generate", "--model", model_dir, "--device", "cpu", "--raw", "--prompt", "word " * 200,
                          "--max-new-tokens", "2"])
    assert "more than the model's context of 96 tokens" in line, line


def test_errors_are_one_line_and_the_traceback_only_behind_debug(model_dir, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert cli.main(finetune_args(model_dir, data, out, "--max-steps", "1")) == 0
    # a second run into the same directory: a usage error (status 2), one line
    line = fails(capsys, finetune_args(model_dir, data, out, "--max-steps", "1"))
    assert "already holds a checkpoint" in line
    # a model config with zero heads: refused when the config is read, naming the file and the fields
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "config.json").write_text(json.dumps({**json.load(open(broken / "config.json")),
                                                    "num_attention_heads": 0}))
    line = fails(capsys, finetune_args(str(broken), data, tmp_path / "o2"))
    assert "config.json: invalid model config" in line and "n_heads" in line, line
    monkeypatch.setattr(cli, "cmd_info", lambda args: {}["missing"])  # an unexpected bug: status 1, type named
    line = fails(capsys, ["info"], status=1)
    assert line == "lladapter: error: KeyError: 'missing' (--debug shows the traceback)"
    with pytest.raises(KeyError):
        cli.main(["--debug", "info"])
    with pytest.raises(KeyError):
        cli.main(["info", "--debug"])
    monkeypatch.setenv("LLADAPTER_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(["info"])


def test_resume_without_a_checkpoint_says_so(model_dir, data, tmp_path, capsys, caplog):
    assert cli.main(finetune_args(model_dir, data, tmp_path / "out", "--resume", "--max-steps", "1")) == 0
    assert any("resume: no checkpoint in" in r.getMessage() and "starting from step 0" in r.getMessage()
               for r in caplog.records)


def test_full_disk_is_one_line_naming_the_path_with_status_1(model_dir, data, tmp_path, capsys, monkeypatch):
    import errno

    from lladapter_ext import training

    def no_space(obj, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(training.torch, "save", no_space)
    line = fails(capsys, finetune_args(model_dir, data, tmp_path / "out"), status=1)
    assert "cannot write checkpoint step-00000002:" in line and "trainer_state.pt: no space left on device" in line
    assert not [n for n in os.listdir(tmp_path / "out" / "checkpoints") if n.startswith(".tmp")]
