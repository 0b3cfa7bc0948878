"""Build lusscore and its C++/CUDA extension lusscore._C.

LUSSCORE_BUILD_CUDA = auto (default) | 0 | 1
  auto: compile the CUDA kernels when torch is a CUDA build and a CUDA toolkit is found,
        even with no GPU visible (then TORCH_CUDA_ARCH_LIST defaults to 8.0;9.0);
  1:    the same, but fail loudly when CUDA can't be built;
  0:    CPU kernels only.
"""
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;9.0"


def resolve_cuda_home():
    """The CUDA toolkit root, following an `nvcc` on PATH that is a wrapper script."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        fallback = Path("/usr/local/cuda")
        return str(fallback) if (fallback / "bin" / "nvcc").exists() else None
    path = Path(nvcc).resolve()
    try:
        head = path.read_bytes()[:8192]
    except OSError:
        head = b""
    if head.startswith(b"#!"):
        # A wrapper script: find the real nvcc it execs.
        for match in re.finditer(rb"(/[^\s'\"]*/bin/nvcc)(?![\w.])", head):
            real = Path(match.group(1).decode()).resolve()
            if real.is_file() and real != path:
                return str(real.parent.parent)
        return None
    return str(path.parent.parent)


def library_header_dirs(cuda_home):
    """Folders with the CUDA library headers ATen includes (cusparse.h, cublas_v2.h...) when
    the toolkit lacks them: the ones the pip nvidia-* wheels installed beside torch carry."""
    needed = ("cusparse.h", "cublas_v2.h", "cusolverDn.h")
    if all((Path(cuda_home) / "include" / h).exists() for h in needed):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in getattr(nvidia, "__path__", []):
        for inc in sorted(Path(base).glob("*/include")):
            if any((inc / h).exists() for h in needed):
                found.append(str(inc))
    return found


mode = os.environ.get("LUSSCORE_BUILD_CUDA", "auto").strip().lower()
if mode not in ("auto", "0", "1"):
    sys.exit(f"LUSSCORE_BUILD_CUDA must be auto, 0 or 1, not {mode!r}")
cuda_home = resolve_cuda_home() if mode != "0" else None
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
import torch.utils.cpp_extension as cpp_ext  # noqa: E402

if cuda_home:
    cpp_ext.CUDA_HOME = cuda_home
torch_has_cuda = torch.version.cuda is not None
build_cuda = mode != "0" and torch_has_cuda and cuda_home is not None
if mode == "1" and not build_cuda:
    sys.exit("LUSSCORE_BUILD_CUDA=1 but CUDA can't be built: "
             + ("torch is a CPU-only build" if not torch_has_cuda else "no CUDA toolkit found "
                "(set CUDA_HOME or put nvcc on PATH)"))
if build_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    # The visible GPUs' archs (what torch would pick, written down so that build_info() and
    # the tests know them), else the default list for a machine without a GPU.
    visible = sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                      for i in range(torch.cuda.device_count())}) if torch.cuda.is_available() else []
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(visible) or DEFAULT_ARCHS
archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native GPU") if build_cuda else ""

print(f"lusscore build: torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"LUSSCORE_BUILD_CUDA={mode} -> CUDA kernels {'ON' if build_cuda else 'OFF'}"
      + (f", CUDA_HOME={cuda_home}, archs {archs}" if build_cuda else ""), file=sys.stderr)

csrc = ROOT / "csrc"
sources = sorted(str(p.relative_to(ROOT)) for p in csrc.rglob("*.cpp") if "tests" not in p.parts)
if build_cuda:
    sources += sorted(str(p.relative_to(ROOT)) for p in csrc.rglob("*.cu") if "tests" not in p.parts)

# Archs as one preprocessor token (8.0_9.0): a ';' would not survive the build's shell.
arch_token = "_".join(re.findall(r"\d+\.\d+", archs)) or "none"
macros = [("LUSSCORE_WITH_CUDA", "1" if build_cuda else "0"), ("LUSSCORE_CUDA_ARCHS", arch_token)]
# -fno-trapping-math: lets GCC turn the float clamps and selects of the CPU row kernels into
# vector selects (no IEEE result changes; only FP exception flags, which nothing reads).
extra = {"cxx": ["-O3", "-fopenmp", "-fno-trapping-math"]}
if build_cuda:
    extra["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "--use_fast_math"]
    # -isystem: searched after the toolkit's own -I folders, so it only fills gaps.
    for inc in library_header_dirs(cuda_home):
        print(f"lusscore build: CUDA library headers from {inc}", file=sys.stderr)
        extra["cxx"] += ["-isystem", inc]
        extra["nvcc"] += ["-isystem", inc]
Extension = cpp_ext.CUDAExtension if build_cuda else cpp_ext.CppExtension
ext = Extension(
    name="lusscore._C",
    sources=sources,
    include_dirs=[str(csrc)],
    define_macros=macros,
    extra_compile_args=extra,
    extra_link_args=["-fopenmp"],
)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_ext.BuildExtension.with_options(use_ninja=True)},
)
