"""setup.py's build checks, without compiling: the torch range (an older torch is refused, naming what works), the
explicit C++ standard, the build-isolation mismatch check, and that pyproject.toml states the same range."""
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_mod():
    spec = importlib.util.spec_from_file_location("lladapter_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # __name__ is not "__main__": defines the functions, builds nothing
    return mod


@pytest.mark.parametrize("version,release", [("2.11.0+cu130", (2, 11)), ("2.14.1", (2, 14)),
                                             ("2.11.0a0+git1234", (2, 11)), ("3.0.0", (3, 0)), ("2.9.1", (2, 9))])
def test_torch_release(setup_mod, version, release):
    assert setup_mod.torch_release(version) == release


@pytest.mark.parametrize("version", ["2.10.0+cu128", "2.4.1", "1.13.1"])
def test_older_torch_is_refused_naming_the_supported_range(setup_mod, monkeypatch, version):
    monkeypatch.setattr(setup_mod.torch, "__version__", version)
    with pytest.raises(SystemExit) as e:
        setup_mod.check_torch_version()
    msg = str(e.value.code)
    assert f"found torch {version}" in msg
    assert "2.11 or newer" in msg and setup_mod.TORCH_TESTED in msg


@pytest.mark.parametrize("version", ["2.11.0+cu130", "2.14.1", "2.15.0", "3.1.0"])
def test_supported_torch_is_accepted(setup_mod, monkeypatch, version):
    monkeypatch.setattr(setup_mod.torch, "__version__", version)
    setup_mod.check_torch_version()


def test_one_explicit_cxx_standard(setup_mod):
    assert setup_mod.std_flags() == ["-std=c++20"]
    cmake = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    # the CMake build has no CUDA sources; CMAKE_CUDA_STANDARD 20 breaks CMake 3.25's nvcc check (see the file)
    assert "set(CMAKE_CXX_STANDARD 20)" in cmake and "set(CMAKE_CUDA_STANDARD" not in cmake
    # the emulator build uses the same standard as the main extension
    assert "std_flags()" in open(os.path.join(ROOT, "setup.py")).read().split("def emulator_extension")[1]


def test_pyproject_and_cmake_state_the_same_minimum(setup_mod):
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    lo = "{}.{}".format(*setup_mod.TORCH_MIN)
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    assert f'"torch>={lo}"' in deps
    assert f'"torch>={lo}"' in re.search(r"^requires = \[(.*?)\]", text, re.M).group(1)
    assert f"set(LLADAPTER_TORCH_MIN {lo})" in open(os.path.join(ROOT, "CMakeLists.txt")).read()


class _Torch:
    def __init__(self, version, cuda, file):
        self.__version__, self.__file__ = version, file
        self.version = type("V", (), {"cuda": cuda})()


def _isolated(setup_mod, monkeypatch, target, build=("2.14.1+cu130", "13.0")):
    """setup.py as pip's isolated build runs it: torch from a throw-away dir, `target` in the environment."""
    monkeypatch.delenv("LLADAPTER_ALLOW_TORCH_MISMATCH", raising=False)
    monkeypatch.setattr(setup_mod, "torch", _Torch(*build, "/tmp/pip-build-env-x/overlay/torch/__init__.py"))
    monkeypatch.setattr(setup_mod, "target_env_torch", lambda: target)
    setup_mod.check_build_torch_is_installed_torch()


def test_isolated_build_against_another_torch_is_refused(setup_mod, monkeypatch):
    with pytest.raises(SystemExit) as e:
        _isolated(setup_mod, monkeypatch, ["2.11.0+cu130", "13.0", "/venv/lib/torch/__init__.py"])
    msg = str(e.value.code)
    assert "2.14.1+cu130" in msg and "2.11.0+cu130" in msg and "--no-build-isolation" in msg


@pytest.mark.parametrize("target", [
    None,                                                         # no torch there: pip installs the newest
    ["2.14.1", "13.0", "/venv/lib/torch/__init__.py"],            # the same release: ABI-compatible
    ["2.9.0+cu128", "12.8", "/venv/lib/torch/__init__.py"],       # unsupported: pip upgrades it
])
def test_isolated_build_accepted_when_the_result_loads(setup_mod, monkeypatch, target):
    _isolated(setup_mod, monkeypatch, target)


def test_isolated_build_cuda_flavour_mismatch_is_refused(setup_mod, monkeypatch):
    with pytest.raises(SystemExit):
        _isolated(setup_mod, monkeypatch, ["2.14.1+cpu", None, "/venv/lib/torch/__init__.py"])


def test_mismatch_check_can_be_overridden(setup_mod, monkeypatch):
    monkeypatch.setenv("LLADAPTER_ALLOW_TORCH_MISMATCH", "1")
    monkeypatch.setattr(setup_mod, "target_env_torch", lambda: pytest.fail("not consulted"))
    setup_mod.check_build_torch_is_installed_torch()


def test_target_env_torch_sees_this_environment(setup_mod):
    import torch

    version, cuda, path = setup_mod.target_env_torch()
    assert version == torch.__version__ and os.path.realpath(path) == os.path.realpath(torch.__file__)


def test_pip_cuda_headers_come_after_the_toolkit(setup_mod, monkeypatch):
    """The nvidia-* pip headers are -isystem (after every -I, so after CUDA_HOME/include): a torch built for a newer
    CUDA minor than nvcc's must not put its runtime headers ahead of the compiler's own."""
    monkeypatch.setattr(setup_mod, "pip_cuda_include_dirs", lambda: ["/site/nvidia/cu13/include", "/site/nvidia/x"])
    assert setup_mod.pip_cuda_include_flags() == ["-isystem", "/site/nvidia/cu13/include", "-isystem", "/site/nvidia/x"]


def test_compiler_without_shared_libstdcxx_is_refused(setup_mod, monkeypatch, tmp_path):
    # the GPU machine's CXX: a toolchain with only libstdc++.a. An extension it links segfaults on the first C++
    # exception torch raises through it, so the build refuses it and names a compiler that works.
    fake = tmp_path / "g++-static-only"
    fake.write_text('#!/bin/sh\n[ "$1" = "-print-file-name=libstdc++.so" ] && echo libstdc++.so\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with pytest.raises(SystemExit) as e:
        setup_mod.check_cxx_links_libstdcxx_dynamically()
    msg = str(e.value.code)
    assert "has no shared libstdc++" in msg and str(fake) in msg and "CXX=" in msg


def test_system_compiler_links_libstdcxx_dynamically(setup_mod, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    setup_mod.check_cxx_links_libstdcxx_dynamically()  # c++ here: /usr/lib/gcc/.../libstdc++.so exists
