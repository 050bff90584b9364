"""docs/troubleshooting.md lists every error message the package raises.

The raise sites are found by scanning the source, not by a hand-kept list: every
``raise SomeError("...")`` / ``raise SomeError(f"...")`` in mat_cuda/ and benchmarks/, every
``parser.error("...")`` of the benchmark CLI, every ``_fail("...")`` of setup.py (build errors),
and every ``MAT_CHECK(cond, "...", ...)`` in csrc/.
Each message is identified by a stable fragment: its longest literal piece (the text between
the ``{...}`` of an f-string), whitespace collapsed, cut to at most 60 characters at a word
boundary. The page must contain that fragment (backticks and line breaks ignored).

Run ``python tests/test_troubleshooting.py`` to print the fragments the page lacks, one per
line with its source location, to paste into the page.
"""
from __future__ import annotations

import ast
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "troubleshooting.md")
PY_DIRS = ("mat_cuda", "benchmarks")
MAX_FRAGMENT = 60
MIN_FRAGMENT = 8  # shorter literal pieces ("{a}: {b}") identify nothing; such sites are listed apart


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("`", "")).strip()


def _fragment(pieces: list[str]) -> str:
    piece = max((_normalize(p) for p in pieces), key=len, default="")
    piece = piece.strip(" :;,.(")
    if len(piece) > MAX_FRAGMENT:
        cut = piece[:MAX_FRAGMENT]
        piece = cut[:cut.rfind(" ")] if " " in cut else cut
    return piece.strip(" :;,.(")


def _template(node: ast.AST) -> str:
    """The message as written, with {expression} where an f-string formats a value."""
    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}"
                       for v in node.values)
    if isinstance(node, ast.BinOp):
        return _template(node.left) + _template(node.right)
    return "{" + ast.unparse(node) + "}"


def _literal_pieces(node: ast.AST) -> list[str] | None:
    """The literal text of a message expression (str, f-string, "a" + f"b"), or None when the
    message is computed elsewhere (a variable, a call)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal_pieces(node.left), _literal_pieces(node.right)
        if left is not None and right is not None:
            # adjacent literal pieces join into one piece
            return left + right
    return None


def python_messages() -> list[tuple[str, str, str]]:
    """(location, fragment, template) of every raise site and CLI error with a literal message."""
    paths = [os.path.join(ROOT, "setup.py")]
    for top in PY_DIRS:
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            paths += [os.path.join(dirpath, n) for n in sorted(files) if n.endswith(".py")]
    found = []
    for path in paths:
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in ast.walk(tree):
            call = None
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                call = node.exc
            elif isinstance(node, ast.Call) and (
                    (isinstance(node.func, ast.Attribute) and node.func.attr == "error"
                     and isinstance(node.func.value, ast.Name) and node.func.value.id == "parser")
                    or (isinstance(node.func, ast.Name) and node.func.id == "_fail")):
                call = node
            if call is None or not call.args:
                continue
            pieces = _literal_pieces(call.args[0])
            if pieces is None:
                continue
            where = f"{os.path.relpath(path, ROOT)}:{node.lineno}"
            found.append((where, _fragment(pieces), _template(call.args[0])))
    return found


def _split_args(text: str, start: int) -> list[str]:
    """Top-level comma-separated arguments of the call whose '(' is at text[start - 1]."""
    args, depth, current, i = [], 0, "", start
    while i < len(text):
        c = text[i]
        if c == '"':
            j = i + 1
            while text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            current += text[i:j + 1]
            i = j + 1
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                args.append(current)
                return args
            depth -= 1
        elif c == "," and depth == 0:
            args.append(current)
            current = ""
            i += 1
            continue
        current += c
        i += 1
    return args


def cpp_messages() -> list[tuple[str, str, str]]:
    """(location, fragment, template) of every MAT_CHECK in csrc/ (the macro prefixes
    "mat_cuda: ")."""
    found = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "csrc")):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            text = open(path, encoding="utf-8").read()
            for m in re.finditer(r"\bMAT_CHECK\(", text):
                args = _split_args(text, m.end())
                pieces, template = [], "mat_cuda: "
                for arg in args[1:]:
                    lits = re.findall(r'"((?:[^"\\]|\\.)*)"', arg)
                    if lits:
                        pieces.append("".join(lits))
                        template += "".join(lits)
                    else:
                        template += "{" + " ".join(arg.split()) + "}"
                if not pieces:
                    continue
                line = text.count("\n", 0, m.start()) + 1
                found.append((f"{os.path.relpath(path, ROOT)}:{line}", _fragment(pieces), template))
    return found


def missing() -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(missing from the page, too short to identify) among all scanned messages."""
    page = _normalize(open(PAGE, encoding="utf-8").read()) if os.path.exists(PAGE) else ""
    absent, short = [], []
    for where, frag, template in python_messages() + cpp_messages():
        if len(frag) < MIN_FRAGMENT:
            short.append((where, frag, template))
        elif frag not in page:
            absent.append((where, frag, template))
    return absent, short


def test_scanner_finds_raise_sites():
    # The scan itself must see the package: a broken scan would pass the check below vacuously.
    py, cpp = python_messages(), cpp_messages()
    assert len(py) > 100 and len(cpp) > 20
    assert any("compiled extension (mat_cuda._C) could not be loaded" in t for _, _, t in py)


def test_every_error_message_is_in_troubleshooting():
    absent, _ = missing()
    listing = "\n".join(f"  {where}: {frag}" for where, frag, _ in absent)
    if absent:
        pytest.fail(f"{len(absent)} error message(s) are missing from docs/troubleshooting.md (add "
                    f"each fragment verbatim with what to do about it; `python "
                    f"tests/test_troubleshooting.py` prints them as bullets):\n{listing}",
                    pytrace=False)


if __name__ == "__main__":
    # Prints the missing messages as markdown bullets (message as written, then its source), to
    # paste under the right heading of the page with what to do about each.
    absent, short = missing()
    for where, frag, template in absent:
        print(f"- `` {_normalize(template)} `` ({where})")
    if short:
        print(f"\n# {len(short)} site(s) with no literal piece of {MIN_FRAGMENT}+ characters "
              "(not checked):", file=sys.stderr)
        for where, frag, template in short:
            print(f"#   {where}\t{template!r}", file=sys.stderr)
    sys.exit(1 if absent else 0)
