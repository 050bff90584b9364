"""Build mat_cuda._C: CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

Environment:
  MAT_CUDA_BUILD=auto|cpu|cuda   auto (default) builds CUDA when possible; cuda fails loudly
                                 when it cannot; cpu never compiles .cu files.
  TORCH_CUDA_ARCH_LIST           GPU architectures, default "8.0;9.0+PTX" (never the local GPU).
  CUDA_HOME / CUDA_PATH          the CUDA toolkit; when unset it is asked from nvcc itself.
  MAX_JOBS                       parallel compile jobs (ninja).

Source layout (globbed, so a new kernel file needs no edit here):
  csrc/ops.cpp, csrc/*/*_cpu.cpp     always compiled (g++)
  csrc/*/*.cu, csrc/*/*_cuda.cpp     compiled only in a CUDA build (nvcc / g++ with CUDA headers)
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _fail(msg):
    sys.stderr.write(f"\nmat_cuda setup: error: {msg}\n\n")
    sys.exit(1)


def _cuda_home_from_nvcc():
    """Ask nvcc where its toolkit is.

    nvcc on PATH may be a wrapper script (as on our build machines), so the folder above it is
    not the toolkit. `nvcc --dryrun` prints `#$ TOP=<toolkit>/bin/..`, which is.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if not m:
        return None
    top = os.path.realpath(m.group(1).strip())
    return top if os.path.isdir(os.path.join(top, "include")) else None


def _resolve_cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    home = _cuda_home_from_nvcc()
    if home:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first.
        os.environ["CUDA_HOME"] = home
    return home


def _nvidia_pip_include_dirs():
    """Include folders of the `nvidia-*` pip packages a CUDA torch depends on.

    torch's CUDA headers include cusparse.h, cublas_v2.h, ...; a minimal toolkit lacks some of
    them, and the pip packages ship them.
    """
    try:
        import nvidia  # namespace package installed with CUDA builds of torch
    except ImportError:
        return []
    dirs = []
    for base in list(nvidia.__path__):
        dirs += glob.glob(os.path.join(base, "include"))
        dirs += glob.glob(os.path.join(base, "*", "include"))
    return sorted(d for d in set(dirs) if os.path.isdir(d))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _extensions():
    mode = os.environ.get("MAT_CUDA_BUILD", "auto").lower()
    if mode not in ("auto", "cpu", "cuda"):
        _fail(f"MAT_CUDA_BUILD must be auto, cpu or cuda, got {mode!r}")

    cuda_home = _resolve_cuda_home() if mode != "cpu" else None

    import torch
    from torch.utils import cpp_extension

    want_cuda = mode == "cuda" or (mode == "auto" and torch.version.cuda is not None and cuda_home)
    if want_cuda:
        if torch.version.cuda is None:
            _fail("MAT_CUDA_BUILD=cuda but the installed torch has no CUDA "
                  f"(torch {torch.__version__}). Install a CUDA build of torch or use MAT_CUDA_BUILD=cpu.")
        if not cuda_home or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
            _fail("MAT_CUDA_BUILD=cuda but no CUDA toolkit was found: put nvcc on PATH or set CUDA_HOME "
                  f"(resolved CUDA_HOME={cuda_home!r}).")
        if cpp_extension.CUDA_HOME != cuda_home:
            cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

    cpu_sources = [os.path.join(ROOT, "csrc", "ops.cpp")]
    cpu_sources += glob.glob(os.path.join(ROOT, "csrc", "*", "*_cpu.cpp"))
    cuda_sources = glob.glob(os.path.join(ROOT, "csrc", "*", "*.cu"))
    cuda_sources += glob.glob(os.path.join(ROOT, "csrc", "*", "*_cuda.cpp"))

    openmp = torch.backends.openmp.is_available()
    cxx_flags = ["-O3"]
    link_flags = []
    if openmp:
        # at::parallel_for is inlined from headers: without -fopenmp it silently runs serially.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    define_macros = [("MAT_CUDA_TORCH_VERSION", f'"{torch.__version__}"'),
                     ("MAT_CUDA_OPENMP", "1" if openmp else "0")]
    include_dirs = [os.path.join(ROOT, "csrc")]

    if want_cuda:
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        define_macros += [("MAT_CUDA_WITH_CUDA", "1"),
                          ("MAT_CUDA_ARCH_LIST", f'"{arch_list}"'),
                          ("MAT_CUDA_CUDA_VERSION", f'"{torch.version.cuda}"')]
        include_dirs += _nvidia_pip_include_dirs()
        nvcc_flags = ["-O3", "-lineinfo",
                      "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC"]
        print(f"mat_cuda setup: CUDA build, CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={arch_list}")
        ext = cpp_extension.CUDAExtension(
            name="mat_cuda._C",
            sources=_rel(cpu_sources + cuda_sources),
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        print("mat_cuda setup: CPU-only build")
        ext = cpp_extension.CppExtension(
            name="mat_cuda._C",
            sources=_rel(cpu_sources),
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], cpp_extension.BuildExtension.with_options(use_ninja=True)


ext_modules, build_ext = _extensions()

setup(
    name="mat_cuda",
    version="0.1.0",
    description="Modular Adaptive Training (MAT) for PyTorch: fused masked optimizers, "
                "batched Lanczos and per-module NTK Gram kernels in C++/CUDA.",
    packages=find_packages(include=["mat_cuda", "mat_cuda.*", "benchmarks", "benchmarks.*"]),
    package_data={"mat_cuda": ["data/*.txt"]},
    python_requires=">=3.9",
    install_requires=["numpy"],
    extras_require={"test": ["pytest", "matplotlib", "tqdm", "scikit-learn", "tokenizers", "transformers"],
                    "bench": ["tqdm", "matplotlib", "scikit-learn", "tokenizers"],
                    "hf": ["transformers"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    entry_points={"console_scripts": ["mat-bench=benchmarks.__main__:main"]},
    zip_safe=False,
)
