"""Property-based fuzzing of the command line's numeric options (hypothesis): every numeric option of every
subcommand, given any text (non-finite and huge numbers, signs, garbage), is either parsed to a finite value in its
documented range or refused with one line `lladapter: error: <subcommand>: argument --opt: ...` and status 2,
before anything runs. Profiles as in test_fuzz_ops.py (`make fuzz` runs it longer)."""
import argparse
import contextlib
import io
import math
import os

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lladapter_ext import cli  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=int(os.environ.get("LLADAPTER_FUZZ_EXAMPLES", "2000")), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("LLADAPTER_FUZZ_PROFILE", "ci"))

# the minimal valid command line of each subcommand, to which one numeric option is added
BASE = {"finetune": ["--data", "d.jsonl", "--out", "o"], "generate": ["--prompt", "hi"], "eval": ["--data", "d.jsonl"],
        "info": [], "convert": ["in.safetensors", "out", "--to", "peft"], "serve": [],
        "encoder-finetune": ["--task", "ner", "--data", "train.txt", "--out", "o"],
        "encoder-eval": ["--adapter", "run", "--data", "eval.txt"]}


def numeric_options():
    """(subcommand, option string) for every option parsed by cli._number's types (int or finite float)."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = []
    for name, p in sub.choices.items():
        for action in p._actions:
            if callable(action.type) and getattr(action.type, "__qualname__", "").startswith("_number."):
                found.append((name, action.option_strings[-1]))
    return found


OPTIONS = numeric_options()

number_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(2**80), 2**80).map(str),
    st.sampled_from(["nan", "inf", "-inf", "+inf", "1e400", "-0", "0", "1_000", "0x10", " 3", "", "ten", "1e-400"]),
    st.text(max_size=6),
)


def test_every_numeric_option_is_covered():
    # the fuzz below would pass vacuously if the introspection found nothing
    assert {("finetune", "--lr"), ("finetune", "--weight-decay"), ("finetune", "--seed"),
            ("generate", "--temperature"), ("serve", "--port"), ("serve", "--request-timeout"),
            ("encoder-finetune", "--warmup"), ("encoder-eval", "--batch-size")} <= set(OPTIONS), OPTIONS


@given(st.sampled_from(OPTIONS), number_text)
def test_fuzz_numeric_options(option, text):
    command, opt = option
    assert command in BASE, f"a new subcommand {command}: give it a base command line in BASE"
    argv = [command] + BASE[command] + [f"{opt}={text}"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = cli.build_parser().parse_args(argv)
        except SystemExit as e:
            assert e.code == 2, (argv, e.code)
            lines = err.getvalue().strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"lladapter: error: {command}: argument {opt}"), lines
            assert "Traceback" not in err.getvalue()
            return
    value = getattr(args, opt.lstrip("-").replace("-", "_"))
    assert isinstance(value, (int, float)) and math.isfinite(value), (argv, value)
