"""Builds the CUDA emulation driver: every csrc/*/*.cu compiled unchanged by g++ against
tests/emu/cuda_emulation.h, with AddressSanitizer and UndefinedBehaviorSanitizer.

The sources are copied into the build folder and two constructs no macro can express are
rewritten there, mechanically (comments and string literals are left alone):

* a launch ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
  ``::emu::launcher<&kernel>("kernel", kernel, grid, block, smem, stream)(args)`` (the
  template argument names the instantiation in the report: ``lanczos_kernel<float, true>``);
* ``__shared__ T name[dims];`` becomes ``auto& name = ::emu::static_shared<T[dims]>(...)`` and
  ``extern __shared__ T name[];`` becomes ``T* name = ::emu::dynamic_shared<T>()``: per-block
  storage of exactly the declared / launched size.

Any ``<<<`` or ``__shared__`` left after the rewrite is an error (the rewrite must be extended),
never silently compiled. Usage: ``python tests/emu/emu_build.py [--out DIR] [--no-sanitize]``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# MAT_EMU_CSRC: run the harness on another csrc/ tree (e.g. a deliberately broken copy).
CSRC = os.environ.get("MAT_EMU_CSRC") or os.path.join(ROOT, "csrc")
DRIVER_SOURCES = ["emu_runtime.cpp", "driver.cpp", "drive_optim.cpp", "drive_gram.cpp",
                  "drive_lanczos.cpp", "drive_misc.cpp"]
SELFTEST_KERNELS = os.path.join(HERE, "selftest_kernels.cu")
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
CXXFLAGS = ["-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer", "-Wall", "-Wno-unknown-pragmas",
            "-pthread"]


class RewriteError(RuntimeError):
    pass


def code_mask(src: str) -> str:
    """src with comments and string/char literals blanked (same length, newlines kept)."""
    out = list(src)
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            j += 1
        else:
            i += 1
            continue
        for k in range(i, min(j, n)):
            if out[k] != "\n":
                out[k] = " "
        i = j
    return "".join(out)


def _callee_start(code: str, end: int) -> int:
    """Start of the kernel expression that ends at `end` (identifiers, ::, template args)."""
    s = end
    if s > 0 and code[s - 1] == ">":
        depth, p = 0, s - 1
        while p >= 0:
            if code[p] == ">":
                depth += 1
            elif code[p] == "<":
                depth -= 1
                if depth == 0:
                    break
            p -= 1
        s = p
    while s > 0 and (code[s - 1].isalnum() or code[s - 1] in "_:"):
        s -= 1
    return s


_DYNAMIC = re.compile(r"extern\s+(?:__align__\s*\(\s*\d+\s*\)\s*)*__shared__\s+"
                      r"(?:__align__\s*\(\s*\d+\s*\)\s*)*([A-Za-z_][\w:<>\s\*]*?)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC = re.compile(r"__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)*([A-Za-z_][\w:<>\s\*]*?)\s+"
                     r"(\w+)\s*((?:\[[^\]\n]*\]\s*)*);")
_GLOBAL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")


def rewrite_source(src: str) -> tuple[str, int, int]:
    """Returns (rewritten source, launches rewritten, __shared__ declarations rewritten)."""
    edits = []  # (start, end, replacement) on the original text
    code = code_mask(src)
    pos = 0
    while True:
        j = code.find("<<<", pos)
        if j < 0:
            break
        k = code.find(">>>", j)
        if k < 0:
            raise RewriteError("unterminated <<< at offset %d" % j)
        e = j
        while e > 0 and code[e - 1].isspace():
            e -= 1
        s = _callee_start(code, e)
        callee = src[s:e]
        if not callee.strip():
            raise RewriteError("cannot find the kernel of the launch at offset %d" % j)
        name = re.sub(r"<.*", "", callee, flags=re.S).split("::")[-1].strip()
        edits.append((s, k + 3, '::emu::launcher<&%s>("%s", %s, %s)'
                      % (callee.strip(), name, callee, src[j + 3:k])))
        pos = k + 3
    launches = len(edits)
    shared = 0
    for m in _DYNAMIC.finditer(code):
        t = m.group(1).strip()
        edits.append((m.start(), m.end(), "%s* %s = ::emu::dynamic_shared<%s>();" % (t, m.group(2), t)))
        shared += 1
    taken = [(a, b) for a, b, _ in edits]
    for m in _STATIC.finditer(code):
        if any(a <= m.start() < b for a, b in taken):
            continue
        dims = re.sub(r"\s+", "", m.group(3))
        edits.append((m.start(), m.end(), "auto& %s = ::emu::static_shared<%s%s>(__FILE__, __LINE__);"
                      % (m.group(2), m.group(1).strip(), dims)))
        shared += 1
    edits.sort()
    out, last = [], 0
    for a, b, r in edits:
        if a < last:
            raise RewriteError("overlapping rewrites at offset %d" % a)
        out.append(src[last:a])
        out.append(r)
        last = b
    out.append(src[last:])
    result = "".join(out)
    left = code_mask(result)
    for token in ("<<<", "__shared__"):
        if token in left:
            line = result[: left.index(token)].count("\n") + 1
            raise RewriteError("%s left after the rewrite at line %d: extend tests/emu/emu_build.py"
                               % (token, line))
    return result, launches, shared


def global_kernels(csrc: str = CSRC) -> dict[str, list[str]]:
    """{relative .cu path: names of its __global__ functions}."""
    out = {}
    for path in sorted(cu_files(csrc)):
        with open(path) as f:
            out[os.path.relpath(path, csrc)] = _GLOBAL.findall(code_mask(f.read()))
    return out


def cu_files(csrc: str = CSRC) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(csrc) for f in fs if f.endswith(".cu")]


def source_hash(sanitize: bool, cudart_version: int | None = None) -> str:
    h = hashlib.sha256(("sanitize=%s cudart=%s" % (sanitize, cudart_version)).encode())
    for base in (CSRC, HERE):
        for d, _, fs in sorted(os.walk(base)):
            for f in sorted(fs):
                if f.endswith((".cu", ".cuh", ".h", ".cpp")) or f == "emu_build.py":
                    p = os.path.join(d, f)
                    h.update(p.encode())
                    with open(p, "rb") as fh:
                        h.update(fh.read())
    return h.hexdigest()[:16]


def prepare_tree(build: str) -> dict:
    """Copies csrc/ into build/csrc with the rewrite applied; returns what was rewritten."""
    dst_root = os.path.join(build, "csrc")
    if os.path.exists(dst_root):
        shutil.rmtree(dst_root)
    report = {}
    for d, _, fs in os.walk(CSRC):
        for f in fs:
            if not f.endswith((".cu", ".cuh", ".h")):
                continue
            src = os.path.join(d, f)
            rel = os.path.relpath(src, CSRC)
            dst = os.path.join(dst_root, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(src) as fh:
                text = fh.read()
            try:
                text, nl, ns = rewrite_source(text)
            except RewriteError as e:
                raise RewriteError("%s: %s" % (rel, e)) from None
            # Keep the original path in diagnostics (and __FILE__).
            with open(dst, "w") as fh:
                fh.write('#line 1 "%s"\n' % src + text)
            report[rel] = {"launches": nl, "shared": ns}
    with open(SELFTEST_KERNELS) as fh:
        text, nl, ns = rewrite_source(fh.read())
    with open(os.path.join(build, "selftest_kernels.cu"), "w") as fh:
        fh.write('#line 1 "%s"\n' % SELFTEST_KERNELS + text)
    return report


def build(out_dir: str | None = None, sanitize: bool = True, jobs: int = 2,
          cxx: str | None = None, cudart_version: int | None = None) -> str:
    """Builds (or reuses) the driver; returns its path. cudart_version: the CUDART_VERSION the
    sources see (default 13000, the toolkit on PATH; 12000 emulates the 4 KB parameter limit)."""
    cxx = cxx or os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    out_dir = out_dir or os.path.join(ROOT, "build", "emu")
    build_dir = os.path.join(out_dir, source_hash(sanitize, cudart_version))
    exe = os.path.join(build_dir, "emu_driver")
    if os.path.exists(exe):
        return exe
    if os.path.isdir(out_dir):  # drivers of older sources
        for old in os.listdir(out_dir):
            if re.fullmatch(r"[0-9a-f]{16}", old) and old != os.path.basename(build_dir):
                shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)
    os.makedirs(build_dir, exist_ok=True)
    prepare_tree(build_dir)
    flags = CXXFLAGS + (SANITIZE if sanitize else [])
    if cudart_version is not None:
        flags = flags + ["-DCUDART_VERSION=%d" % cudart_version]
    incs = ["-I", HERE, "-I", os.path.join(HERE, "include"), "-I", os.path.join(build_dir, "csrc")]
    units = []
    for path in cu_files(os.path.join(build_dir, "csrc")) + [os.path.join(build_dir, "selftest_kernels.cu")]:
        units.append((["-x", "c++", "-include", os.path.join(HERE, "cuda_emulation.h"), path],
                      path + ".o"))
    for f in DRIVER_SOURCES:
        units.append(([os.path.join(HERE, f)], os.path.join(build_dir, f + ".o")))

    def compile_one(unit):
        args, obj = unit
        cmd = [cxx] + flags + incs + ["-c"] + args + ["-o", obj]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError("compile failed: %s\n%s" % (" ".join(cmd), r.stderr[-6000:]))
        return obj

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        objs = list(ex.map(compile_one, units))
    tmp = exe + ".tmp"
    r = subprocess.run([cxx] + flags + objs + ["-o", tmp], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("link failed:\n" + r.stderr[-6000:])
    os.replace(tmp, exe)
    return exe


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="build folder (default build/emu)")
    ap.add_argument("--no-sanitize", action="store_true", help="build without ASan/UBSan")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cudart-version", type=int, default=None,
                    help="CUDART_VERSION the sources see (default 13000; 12000: 4 KB parameters)")
    a = ap.parse_args()
    print(build(a.out, sanitize=not a.no_sanitize, jobs=a.jobs, cudart_version=a.cudart_version))


if __name__ == "__main__":
    main()
