"""Build lladapter_ext._C: a CUDAExtension when the installed torch has CUDA and nvcc is found, else a
CppExtension with the CPU kernels only.

Environment knobs:
  LLADAPTER_BUILD_CUDA=0/1   force the CPU-only or the CUDA build (1 fails loudly if CUDA cannot be built)
  TORCH_CUDA_ARCH_LIST       CUDA archs (default: the visible GPU's, else "8.0;9.0")
  LLADAPTER_CPU_ISA          auto (default: AVX2+FMA when this machine has them) | avx2 | default
  LLADAPTER_DEBUG=1          -O0 -g (device code -G) instead of release flags
  LLADAPTER_BUILD_EMU=0/1    skip / require lladapter_ext._emu, the CUDA kernels compiled for the CPU emulator
                             (default: built when the CUDA toolkit's headers are found; no GPU or nvcc needed)
  MAX_JOBS                   parallel compile jobs (ninja)
  LLADAPTER_ALLOW_TORCH_MISMATCH=1  build even when the interpreter's own environment has another torch than the
                             one this build compiles against (e.g. a wheel meant for another environment)

Supported torch: 2.11 and newer (tested 2.11.0 to 2.15.0); an older torch is refused before anything compiles.
The C++ standard is chosen here (C++20, host compiler and nvcc alike), not inherited from torch's default
(torch 2.11's cpp_extension defaults to C++17, 2.14's to C++20).
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"
# The torch range: the oldest release we build and test against (the GPU machine's) and the newest tested one.
TORCH_MIN = (2, 11)
TORCH_TESTED = "2.11.0 to 2.15.0"
# One C++ standard for every compiler: torch 2.14's headers need C++20, and 2.11's compile under it too.
CXX_STD = "c++20"


def log(msg):
    print(f"[lladapter setup] {msg}", file=sys.stderr)


def is_cuda_root(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    """The CUDA toolkit root. /usr/local/bin/nvcc may be a wrapper script, so a candidate only counts when it
    holds both bin/nvcc and include/cuda_runtime.h."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"` names the real one
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for tok in head.decode(errors="ignore").split():
                    if tok.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if is_cuda_root(c):
            return os.path.realpath(c)
    return None


def pip_cuda_include_dirs():
    """Headers shipped by the nvidia-* pip packages (e.g. cusparse.h, which ATen/cuda/CUDAContext.h includes)."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(d))


def pip_cuda_include_flags():
    """-isystem for the pip CUDA headers: searched after every -I, so the toolkit's own headers (CUDA_HOME/include,
    which torch adds with -I) win and the pip ones only supply what the toolkit lacks. Given with -I ahead of the
    toolkit, a torch built for a newer CUDA minor than nvcc's (torch 2.15: CUDA 13.2 headers, nvcc 13.0) mixes its
    runtime headers with the compiler's and fails: "CUDA compiler and CUDA toolkit headers are incompatible"."""
    return [f for d in pip_cuda_include_dirs() for f in ("-isystem", d)]


def torch_release(version):
    """(major, minor) of a torch version string: '2.11.0+cu130' -> (2, 11); dev builds count as their release."""
    m = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def check_torch_version():
    """Refuse a torch older than TORCH_MIN before anything compiles, naming the versions that work."""
    if torch_release(torch.__version__) < TORCH_MIN:
        raise SystemExit(
            f"lladapter_ext needs torch {TORCH_MIN[0]}.{TORCH_MIN[1]} or newer (tested: {TORCH_TESTED}), but this "
            f"build found torch {torch.__version__} ({os.path.dirname(torch.__file__)}). Install a supported one, "
            f"e.g. pip install 'torch>={TORCH_MIN[0]}.{TORCH_MIN[1]}', then build again.")


def target_env_torch():
    """(version, cuda, path) of the torch installed in this interpreter's own environment, or None.

    pip's isolated build runs this script with the target environment's interpreter, but with the build
    requirements (torch included) on a separate path; `python -I` ignores that path and sees the environment
    the package will be installed into."""
    code = ("import importlib.util, json\n"
            "if importlib.util.find_spec('torch') is None: print('null')\n"
            "else:\n"
            "    import torch; print(json.dumps([torch.__version__, torch.version.cuda, torch.__file__]))\n")
    try:
        out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def check_build_torch_is_installed_torch():
    """A build against another torch than the one installed where the package goes cannot be imported there.

    That is what `pip install .` (build isolation on) gives a user whose environment already holds a torch other
    than the newest: pip builds against the newest torch in an isolated environment, keeps the user's torch (it
    satisfies torch>=2.11), and the result refuses to import. Fail before compiling instead, and say what to do."""
    if os.environ.get("LLADAPTER_ALLOW_TORCH_MISMATCH") == "1":
        return
    if os.path.realpath(torch.__file__).startswith(os.path.realpath(sys.prefix) + os.sep):
        return  # torch comes from this interpreter's own environment: nothing else to compare with
    target = target_env_torch()
    if not target:
        return  # no torch there yet: pip installs one that satisfies the requirement (see the README caveat)
    version, cuda, path = target
    if os.path.realpath(path) == os.path.realpath(torch.__file__):
        return
    if torch_release(version) < TORCH_MIN:
        return  # unsupported there: pip replaces it with the newest torch (what isolation builds against)
    if version.split("+")[0] == torch.__version__.split("+")[0] and (cuda or None) == (torch.version.cuda or None):
        return  # the same release and CUDA flavour: ABI-compatible
    raise SystemExit(
        f"lladapter_ext would be built against torch {torch.__version__} (CUDA {torch.version.cuda}) from "
        f"{os.path.dirname(torch.__file__)} (pip's isolated build environment, for a plain `pip install .`), but "
        f"the environment it installs into keeps its torch {version} (CUDA {cuda}), and the compiled extension "
        "only loads with the torch release it was built against. Build against your torch instead:\n"
        "    pip install setuptools wheel ninja && pip install --no-build-isolation .\n"
        "(LLADAPTER_ALLOW_TORCH_MISMATCH=1 builds anyway, e.g. a wheel meant for another environment)")


def std_flags():
    """The C++ standard for the host compiler and nvcc (nvcc passes it on to its host compiler). Given explicitly,
    torch's cpp_extension adds no -std flag of its own."""
    return [f"-std={CXX_STD}"]


def build_info_source(with_cuda, archs, isa, debug):
    return ("# Written by setup.py at build time.\n"
            f"TORCH_VERSION = {torch.__version__!r}\n"
            f"TORCH_CUDA = {torch.version.cuda!r}\n"
            f"WITH_CUDA = {with_cuda!r}\n"
            f"CUDA_ARCHS = {archs!r}\n"
            f"CPU_ISA = {isa!r}\n"
            f"DEBUG = {debug!r}\n"
            f"CXX_STD = {CXX_STD!r}\n")


def build_ext_writing_build_info(info_source):
    """BuildExtension that writes lladapter_ext/_build_info.py next to the compiled extension: into the source
    tree for in-place and editable builds, into build_lib otherwise (wheels, out-of-tree builds such as the build
    matrix), so that an out-of-tree build never overwrites what the in-place build recorded."""
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        def run(self):
            if getattr(self, "editable_mode", False):
                # setuptools compiles editable installs in a throw-away directory; keep the objects where in-place
                # builds and wheel builds (--no-build-isolation) find them, so that the next build recompiles only
                # what changed
                self.build_temp = os.path.join(ROOT, "build", f"temp.{sysconfig.get_platform()}-"
                                                              f"{sys.implementation.cache_tag}")
            pkg = os.path.join(ROOT, "lladapter_ext") if self.inplace else os.path.join(self.build_lib, "lladapter_ext")
            os.makedirs(pkg, exist_ok=True)
            with open(os.path.join(pkg, "_build_info.py"), "w") as f:
                f.write(info_source)
            super().run()

    return BuildExt


def check_cxx_links_libstdcxx_dynamically():
    """Refuses a C++ compiler whose toolchain has no shared libstdc++ (only libstdc++.a). An extension it links
    carries its own static copy of libstdc++, and every C++ exception torch throws through it (any TORCH_CHECK
    in our argument checks) then crashes the process with a segfault. Seen on the GPU machine, whose CXX is a
    wrapper around a private GCC 13 (2026-11-29). The system compiler links libstdc++.so.6, as torch does."""
    if not sys.platform.startswith("linux"):
        return
    cxx = os.environ.get("CXX", "c++")
    try:
        found = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return  # no such compiler: the build itself will say so
    if found and os.path.isabs(found) and os.path.exists(found):
        return
    hint = " e.g. CXX=/usr/bin/g++ CC=/usr/bin/gcc" if os.path.exists("/usr/bin/g++") else " set CXX and CC"
    raise SystemExit(
        f"The C++ compiler {cxx!r} (CXX) has no shared libstdc++ (it would link libstdc++.a into the extension, and "
        "every C++ exception torch raises through the extension would then crash the process). Build with a "
        f"compiler that links the system's libstdc++.so.6, as torch does:{hint}")


def cpu_isa():
    want = os.environ.get("LLADAPTER_CPU_ISA", "auto").lower()
    if want in ("default", "none", "generic"):
        return "default"
    if want == "avx2":
        return "avx2"
    if want != "auto":
        raise SystemExit(f"LLADAPTER_CPU_ISA must be auto, avx2 or default, got {want!r}")
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((l for l in f if l.startswith("flags")), "").split())
    except OSError:
        return "default"
    return "avx2" if {"avx2", "fma", "f16c"} <= flags else "default"


def cuda_include_dir(cuda_home):
    """The CUDA toolkit's include dir (cuda_fp16.h and friends), which the emulator build needs; nvcc is not."""
    for root in [cuda_home, os.environ.get("CUDA_HOME"), "/usr/local/cuda"]:
        if root and os.path.isfile(os.path.join(root, "include", "cuda_fp16.h")):
            return os.path.join(root, "include")
    return None


def emulator_extension(cuda_home, debug):
    """lladapter_ext._emu: csrc/cuda compiled by the host compiler against the SIMT emulator (csrc/emu), registered
    as torch.ops.lladapter_emu on CPU tensors (docs/emulator.md). None when it is not to be built."""
    want = os.environ.get("LLADAPTER_BUILD_EMU", "")
    if want not in ("", "0", "1"):
        raise SystemExit(f"LLADAPTER_BUILD_EMU must be 0 or 1, got {want!r}")
    if want == "0":
        log("emulator (lladapter_ext._emu): skipped, LLADAPTER_BUILD_EMU=0")
        return None
    include = cuda_include_dir(cuda_home)
    if include is None:
        if want == "1":
            raise SystemExit("LLADAPTER_BUILD_EMU=1 but the CUDA toolkit's headers (include/cuda_fp16.h) were not "
                             "found; set CUDA_HOME")
        log("emulator (lladapter_ext._emu): skipped, no CUDA toolkit headers found (set CUDA_HOME)")
        return None
    log(f"emulator (lladapter_ext._emu): CUDA headers from {include}")
    sources = (sorted(glob.glob("csrc/emu/*.cpp")) + sorted(glob.glob("csrc/emu_kernels/*.cpp")))
    flags = ["-O0", "-g"] if debug else ["-O2"]
    # -g0: no debug info (the interpreter's CFLAGS add -g), a third off the compile time
    flags += std_flags() + ["-g0", "-fvisibility=hidden", "-pthread", "-Wno-unknown-pragmas", "-DLLADAPTER_EMU"]
    return cpp_extension.CppExtension(
        "lladapter_ext._emu", sources, include_dirs=[os.path.join(ROOT, "csrc"), include],
        extra_compile_args={"cxx": flags}, extra_link_args=["-pthread"],
        undef_macros=["NDEBUG"] if debug else [])


def main():
    check_torch_version()
    check_build_torch_is_installed_torch()
    force = os.environ.get("LLADAPTER_BUILD_CUDA")
    debug = os.environ.get("LLADAPTER_DEBUG", "0") == "1"
    cuda_home = find_cuda_home()
    torch_cuda = torch.version.cuda is not None
    if force == "1":
        if not torch_cuda:
            raise SystemExit("LLADAPTER_BUILD_CUDA=1 but the installed torch has no CUDA "
                             f"(torch {torch.__version__}); install a CUDA build of torch")
        if cuda_home is None:
            raise SystemExit("LLADAPTER_BUILD_CUDA=1 but no CUDA toolkit (bin/nvcc + include/cuda_runtime.h) was "
                             "found; set CUDA_HOME")
        with_cuda = True
    elif force == "0":
        with_cuda = False
    elif force not in (None, ""):
        raise SystemExit(f"LLADAPTER_BUILD_CUDA must be 0 or 1, got {force!r}")
    else:
        with_cuda = torch_cuda and cuda_home is not None

    check_cxx_links_libstdcxx_dynamically()
    isa = cpu_isa()
    sources = ["csrc/ops.cpp", "csrc/python_module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # Release: -g1 (line tables only) after the -g that Python's CFLAGS carry: full debug info of the torch headers
    # doubles the compile time of every C++ file and serves no one; backtraces keep their line numbers.
    cxx = ["-O0", "-g"] if debug else ["-O3", "-g1"]
    # at::parallel_for is header code: without OpenMP in this compile it runs on one thread.
    cxx += std_flags() + ["-fvisibility=hidden", "-fopenmp"]
    defines = [f'-DLLADAPTER_CPU_ISA="{isa}"']
    if isa == "avx2":
        # at::vec picks its 256-bit implementation from these macros, as ATen's own AVX2 kernels do.
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra = {"cxx": cxx + defines}
    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home
        os.environ["CUDA_HOME"] = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            archs = None
            try:
                if torch.cuda.is_available():
                    archs = ";".join(sorted({"{}.{}".format(*torch.cuda.get_device_capability(i))
                                             for i in range(torch.cuda.device_count())}))
            except Exception:  # noqa: BLE001 - no driver is the normal case on build machines
                archs = None
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs or DEFAULT_ARCHS
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        log(f"CUDA build: CUDA_HOME={cuda_home}, archs {archs}, torch {torch.__version__}, {CXX_STD}")
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/cuda/registration.cpp"]
        defines += ["-DLLADAPTER_WITH_CUDA", f'-DLLADAPTER_CUDA_ARCHS="{archs}"']
        extra["cxx"] = cxx + defines + pip_cuda_include_flags()
        extra["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]) + [
            "--expt-relaxed-constexpr"] + std_flags() + defines + pip_cuda_include_flags()
        ext_cls = cpp_extension.CUDAExtension
    else:
        archs = ""
        why = "forced by LLADAPTER_BUILD_CUDA=0" if force == "0" else (
            "torch has no CUDA" if not torch_cuda else "no CUDA toolkit found")
        log(f"CPU-only build ({why}), torch {torch.__version__}, {CXX_STD}")
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls("lladapter_ext._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
                  extra_link_args=["-fopenmp"],
                  undef_macros=["NDEBUG"] if debug else [])
    emu = emulator_extension(cuda_home, debug)
    setup(
        packages=find_packages(include=["lladapter_ext", "lladapter_ext.*"]),
        ext_modules=[ext] + ([emu] if emu is not None else []),
        cmdclass={"build_ext": build_ext_writing_build_info(build_info_source(with_cuda, archs, isa, debug))},
    )


# setuptools (build_meta, pip, `python setup.py`) runs this file as __main__; tests import it for its checks
if __name__ == "__main__":
    main()
