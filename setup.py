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
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


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
    flags += ["-std=c++20", "-g0", "-fvisibility=hidden", "-pthread", "-Wno-unknown-pragmas", "-DLLADAPTER_EMU"]
    return cpp_extension.CppExtension(
        "lladapter_ext._emu", sources, include_dirs=[os.path.join(ROOT, "csrc"), include],
        extra_compile_args={"cxx": flags}, extra_link_args=["-pthread"],
        undef_macros=["NDEBUG"] if debug else [])


def main():
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
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # at::parallel_for is header code: without OpenMP in this compile it runs on one thread.
    cxx += ["-fvisibility=hidden", "-fopenmp"]
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
                    archs = ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                                             for i in range(torch.cuda.device_count())}))
            except Exception:  # noqa: BLE001 - no driver is the normal case on build machines
                archs = None
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs or DEFAULT_ARCHS
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        log(f"CUDA build: CUDA_HOME={cuda_home}, archs {archs}, torch {torch.__version__}")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += pip_cuda_include_dirs()
        defines += ["-DLLADAPTER_WITH_CUDA", f'-DLLADAPTER_CUDA_ARCHS="{archs}"']
        extra["cxx"] = cxx + defines
        extra["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]) + [
            "--expt-relaxed-constexpr"] + defines
        ext_cls = cpp_extension.CUDAExtension
    else:
        archs = ""
        why = "forced by LLADAPTER_BUILD_CUDA=0" if force == "0" else (
            "torch has no CUDA" if not torch_cuda else "no CUDA toolkit found")
        log(f"CPU-only build ({why}), torch {torch.__version__}")
        ext_cls = cpp_extension.CppExtension
    with open(os.path.join(ROOT, "lladapter_ext", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_CUDA = {torch.version.cuda!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_ARCHS = {archs!r}\n")
        f.write(f"CPU_ISA = {isa!r}\n")
        f.write(f"DEBUG = {debug!r}\n")

    ext = ext_cls("lladapter_ext._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
                  extra_link_args=["-fopenmp"],
                  undef_macros=["NDEBUG"] if debug else [])
    emu = emulator_extension(cuda_home, debug)
    setup(
        packages=find_packages(include=["lladapter_ext", "lladapter_ext.*"]),
        ext_modules=[ext] + ([emu] if emu is not None else []),
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )


main()
