"""Imports point one way: the core never imports mat_cuda.integrations, and importing mat_cuda
(or mat_cuda.integrations) loads no training framework."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "mat_cuda")


def _imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield ("." * node.level) + (node.module or "")


def test_core_never_imports_integrations():
    offenders = []
    for dirpath, _, files in os.walk(PKG):
        if os.path.join(PKG, "integrations") in dirpath:
            continue
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                offenders += [(os.path.relpath(path, ROOT), m) for m in _imports(path)
                              if "integrations" in m]
    assert offenders == []


def test_importing_mat_cuda_loads_no_framework():
    code = ("import sys, mat_cuda, mat_cuda.integrations; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('transformers', 'accelerate', 'lightning', 'pytorch_lightning')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
