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

The declarative part (name, version, extras, the mat-bench script) is in pyproject.toml. This
file holds what must be code: the extension, the package list (the repository's benchmarks/
folder installs as mat_cuda.benchmarks), and the one dependency that depends on the build: a
C++ extension is bound to the exact torch it was compiled against, so the runtime requirement
is pinned to that torch (torch==<version of the build's torch>), and an isolated build whose
torch differs from the one already installed in the target environment stops.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _fail(msg):
    sys.stderr.write(f"\nmat_cuda setup: error: {msg}\n\n")
    sys.exit(1)


def _refuse_legacy_develop():
    """pip older than 21.3 (or any pip with setuptools older than 64) has no PEP 660 editable
    install and runs `setup.py develop`, which current setuptools turns into an isolated build
    without torch: stop with one line."""
    if "develop" in sys.argv[1:]:
        _fail("`setup.py develop` is not supported (pip older than 21.3 or setuptools older than "
              "64 calls it for `pip install -e`): upgrade them with `python -m pip install -U pip "
              "setuptools` and install again.")


def _import_torch():
    try:
        import torch
    except ImportError:
        _fail("torch is not installed in this environment; the build compiles against it: "
              "`pip install torch`, then `pip install --no-build-isolation ...` again.")
    return torch


def _torch_dist_version(torch, paths=None):
    """The version pip knows torch by (its dist-info), e.g. 2.14.1 where torch.__version__ says
    2.14.1+cu130; None when no distribution metadata is found."""
    from importlib import metadata

    try:
        if paths is None:
            return metadata.version("torch")
        for dist in metadata.distributions(name="torch", path=paths):
            return dist.version
    except metadata.PackageNotFoundError:
        pass
    return None


def _target_site_dirs():
    """Where this install puts packages (the environment pip runs in, also under isolation:
    pip runs the build with the target environment's interpreter)."""
    paths = sysconfig.get_paths()
    return sorted({os.path.realpath(paths["purelib"]), os.path.realpath(paths["platlib"])})


def _check_isolated_torch(torch):
    """Stop an isolated build whose torch differs from the target environment's torch.

    pip's build isolation installs the newest torch into a temporary environment; an extension
    compiled there loads only with that same torch. When the target environment has no torch,
    the pinned requirement makes pip install the same one; when it has another, stop.
    """
    torch_site = os.path.realpath(os.path.dirname(os.path.dirname(torch.__file__)))
    target = _target_site_dirs()
    if torch_site in target:
        return  # --no-build-isolation (or an in-place build): the build's torch is the target's
    installed = _torch_dist_version(torch, paths=target)
    built = _torch_dist_version(torch)
    if installed is not None and installed != built:
        _fail(f"pip's isolated build environment has torch {built} but this environment has torch "
              f"{installed}, and the extension only loads with the torch it was compiled against: "
              "install with `pip install --no-build-isolation ...` (torch, setuptools, wheel and "
              "ninja installed first).")


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


def _nvcc_release(cuda_home):
    """The toolkit's release as nvcc states it, e.g. "13.0, V13.0.88" (recorded in build_info)."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    m = re.search(r"release (\S+ V\S+)", out)
    return m.group(1) if m else "unknown"


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


def _build_ext_class(cpp_extension):
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        """torch's BuildExtension (ninja). setuptools compiles an editable install in a fresh
        temporary folder, so every `pip install -e .` would recompile everything (minutes for the
        CUDA kernels); here it compiles in build/ instead, and ninja recompiles only what changed
        (a changed source, flag, torch or MAT_CUDA_BUILD changes the command, so it rebuilds)."""

        def finalize_options(self):
            super().finalize_options()
            if getattr(self, "editable_mode", False):
                self.build_temp = os.path.join(
                    ROOT, "build", f"temp-editable-{sys.implementation.cache_tag}")

    return BuildExt


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _extensions():
    mode = os.environ.get("MAT_CUDA_BUILD", "auto").lower()
    if mode not in ("auto", "cpu", "cuda"):
        _fail(f"MAT_CUDA_BUILD must be auto, cpu or cuda, got {mode!r}")

    cuda_home = _resolve_cuda_home() if mode != "cpu" else None

    torch = _import_torch()
    _check_isolated_torch(torch)
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
                          ("MAT_CUDA_CUDA_VERSION", f'"{torch.version.cuda}"'),
                          ("MAT_CUDA_NVCC_VERSION", f'"{_nvcc_release(cuda_home)}"'),
                          ("MAT_CUDA_CUDA_HOME", f'"{cuda_home}"')]
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
    # Pinned to the build's torch (see the module docstring); a torch without dist-info (built
    # from source) is pinned by its own version string.
    pin = _torch_dist_version(torch) or torch.__version__.split("+")[0]
    return [ext], _build_ext_class(cpp_extension), f"torch=={pin}"


def _packages():
    """mat_cuda and its subpackages, and the repository's benchmarks/ as mat_cuda.benchmarks
    (never as a top-level `benchmarks`, which would clash with other projects')."""
    core = find_packages(where=ROOT, include=["mat_cuda", "mat_cuda.*"])
    bench = find_packages(where=os.path.join(ROOT, "benchmarks"))
    return core + ["mat_cuda.benchmarks"] + [f"mat_cuda.benchmarks.{p}" for p in bench]


_refuse_legacy_develop()
ext_modules, build_ext, torch_requirement = _extensions()

setup(
    packages=_packages(),
    package_dir={"mat_cuda.benchmarks": "benchmarks"},
    # pyproject.toml declares dependencies dynamic: torch's pin is known only at build time.
    install_requires=[torch_requirement, "numpy"],
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
