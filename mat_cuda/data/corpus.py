"""Text corpora for the masked-language-model benchmarks: embedded by default, never downloaded.

The embedded corpus is English text that ships with every CPython: the help topics of the
standard library documentation (``pydoc_data.topics``) and the docstrings of a fixed list of
pure-Python standard-library modules. It is about 1.4 MB (CPython 3.11), the same on every run
of one Python version (documents are visited in sorted order) and split into train/valid/test
(about 90/5/5) by document, each document (a help topic, a module's docstring, or a class or
function with its methods' docstrings; long ones cut into pieces of at most 4000 characters)
going to the split chosen by a hash of its name, so adding or losing a module on another Python
version does not move the other documents between splits.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
import os
import re
import sys
import warnings

from .errors import DataError

# Fraction of documents in the validation and test splits (the rest is train).
VALID_FRACTION = 0.05
TEST_FRACTION = 0.05

# Documents longer than this are cut at paragraph boundaries into pieces that are split
# separately, so that a few long help topics do not make the valid/test sizes swing.
MAX_DOCUMENT_CHARS = 4000

# Pure-Python standard-library modules whose import has no side effects (no GUI, no printing,
# no browser: not antigravity, this, idlelib, tkinter, turtle). A module missing from some
# Python version is skipped.
EMBEDDED_MODULES = tuple(sorted("""
abc argparse ast asyncio.base_events asyncio.events asyncio.futures asyncio.locks asyncio.queues
asyncio.streams asyncio.tasks base64 bdb bisect calendar cmd code codecs codeop collections
collections.abc colorsys compileall concurrent.futures._base configparser contextlib copy copyreg
csv dataclasses datetime difflib dis doctest email.charset email.feedparser email.generator
email.header email.headerregistry email.message email.parser email.policy email.utils enum
filecmp fileinput fnmatch fractions ftplib functools getopt getpass gettext glob gzip hashlib
heapq hmac html html.parser http.client http.cookiejar http.cookies http.server imaplib
importlib.abc importlib.metadata importlib.resources inspect io ipaddress json json.decoder
json.encoder keyword linecache locale logging logging.config logging.handlers lzma mailbox
mimetypes modulefinder multiprocessing.connection multiprocessing.pool netrc numbers opcode
operator optparse os pathlib pdb pickle pickletools pkgutil platform plistlib poplib posixpath
pprint profile pstats py_compile pyclbr queue quopri random re reprlib rlcompleter runpy sched
secrets selectors shelve shlex shutil smtplib socket socketserver sqlite3 ssl stat statistics
string stringprep struct subprocess symtable sysconfig tabnanny tarfile tempfile textwrap
threading timeit token tokenize trace traceback tracemalloc types typing unittest.case
unittest.loader unittest.mock unittest.result unittest.runner unittest.suite urllib.error
urllib.parse urllib.request urllib.robotparser uuid warnings wave weakref xml.dom.minidom
xml.dom.pulldom xml.etree.ElementTree xml.sax xml.sax.handler xml.sax.saxutils xml.sax.xmlreader
zipapp zipfile zipimport
""".split()))

# Names accepted for the files of a corpus folder, per split, in WikiText or plain style.
_SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "validation", "val", "dev"), "test": ("test",)}
_FILE_PATTERNS = ("wiki.{}.tokens", "wiki.{}.raw", "{}.txt", "{}.tokens", "{}.raw")


def load_corpus(path: str | os.PathLike | None = None) -> dict:
    """Load a text corpus as ``dict(train=str, valid=str, test=str)``.

    ``path`` is one of
      - None: the embedded corpus (see the module docstring);
      - a folder holding one file per split, named like WikiText (``wiki.train.tokens``,
        ``wiki.valid.tokens``, ``wiki.test.tokens``; ``.raw`` too) or plainly (``train.txt``,
        ``valid.txt``/``validation.txt``/``val.txt``/``dev.txt``, ``test.txt``);
      - a single UTF-8 text file, split by document: documents are its paragraphs (separated
        by lines that are empty or hold only spaces/tabs), each sent to the split chosen by a hash of its text (so duplicates never
        straddle splits).
    Raises DataError when the path is missing, a file is unreadable or not UTF-8, a folder lacks
    a split (or has two candidates for one), or a split comes out empty.
    """
    if path is None:
        return dict(embedded_corpus())
    path = os.fspath(path)
    if os.path.isdir(path):
        return {split: _read_text(_find_split_file(path, split)) for split in _SPLIT_NAMES}
    if os.path.isfile(path):
        # Paragraphs end at a blank line; WikiText's blank lines hold a space (" \n").
        docs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", _read_text(path))]
        docs = [d for d in docs if d.strip()]
        out = _split_documents([(d, d) for d in docs])
        empty = [s for s, text in out.items() if not text]
        if empty:
            raise DataError(
                f"corpus file {path!r} has {len(docs)} paragraph(s) (blank-line-separated), too few "
                f"to fill the {'/'.join(empty)} split(s); give more text or a folder with "
                "train/valid/test files")
        return out
    raise DataError(f"corpus path {path!r} does not exist")


@functools.lru_cache(maxsize=1)
def embedded_corpus() -> dict:
    """The embedded corpus (built once per process): ``dict(train=str, valid=str, test=str)``."""
    return _split_documents(_embedded_documents())


def _embedded_documents() -> list:
    """``[(name, text)]``: the pydoc help topics, then one document per module docstring and per
    public class or function defined in each module of EMBEDDED_MODULES, in sorted order."""
    docs = []
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip the docs; the docstrings remain
        topics = {}
    for name in sorted(topics):
        docs.append((f"topic:{name}", topics[name]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules and aliases (typing.io, ...)
        for modname in EMBEDDED_MODULES:
            try:
                mod = importlib.import_module(modname)
            except ImportError:
                continue
            docs += _module_documents(mod, modname)
    seen, unique = set(), []
    for name, text in docs:  # the same docstring re-exported twice is one document
        text = text.strip()
        if len(text) >= 40 and text not in seen:
            seen.add(text)
            unique += [(f"{name}#{i}", piece) for i, piece in enumerate(_pieces(text))]
    return unique


def _pieces(text: str) -> list:
    """``text`` cut at blank lines into pieces of at most MAX_DOCUMENT_CHARS (a longer paragraph
    stays whole)."""
    pieces, current = [], ""
    for para in text.split("\n\n"):
        if current and len(current) + 2 + len(para) > MAX_DOCUMENT_CHARS:
            pieces.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    pieces.append(current)
    return pieces


def _own_doc(obj) -> str:
    # obj.__doc__ itself, not inspect.getdoc, which inherits a parent's docstring.
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else ""
    return inspect.cleandoc(doc) if doc else ""


def _source_functions(mod) -> dict:
    """``{name: docstring}`` of the functions the module's source defines at top level (read
    with ast, so what other packages assigned over them since does not matter)."""
    try:
        with open(inspect.getsourcefile(mod), encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, TypeError, SyntaxError, ValueError):
        return {}
    return {node.name: ast.get_docstring(node, clean=True) or "" for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _module_documents(mod, modname: str) -> list:
    docs = [(modname, f"{modname}\n\n{_own_doc(mod)}")] if _own_doc(mod) else []
    source_functions = None
    for name in sorted(vars(mod)):
        obj = vars(mod)[name]
        if name.startswith("_"):
            continue
        owner = getattr(obj, "__module__", None)
        if owner != modname:
            # Other packages replace stdlib functions (lightning sets warnings.formatwarning):
            # the source's own definition keeps the corpus independent of what was imported.
            # Objects of other stdlib modules (C accelerators, re-exports) stay out, as before.
            # torch's own replacements (torch.package sets inspect.getfile) are in force in every
            # process that imports mat_cuda and were never in the corpus: they stay out, so the
            # corpus every recorded result used is unchanged.
            if not isinstance(owner, str) or owner.split(".")[0] in sys.stdlib_module_names \
                    or owner.split(".")[0] == "torch":
                continue
            if source_functions is None:
                source_functions = _source_functions(mod)
            doc = source_functions.get(name)
            if doc:
                docs.append((f"{modname}.{name}", f"{modname}.{name}\n\n{doc}"))
            continue
        if inspect.isfunction(obj):
            parts = [_own_doc(obj)]
        elif inspect.isclass(obj):
            parts = [_own_doc(obj)]
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                if attr.startswith("_") and attr != "__init__":
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                # Only the stdlib's own members: other packages patch methods into stdlib
                # classes (transformers adds logging.Logger.warning_once), which would make
                # the corpus depend on what else the process imported.
                code_owner = member.fget if isinstance(member, property) else member
                if getattr(code_owner, "__module__", None) != modname:
                    continue
                if inspect.isfunction(member) or isinstance(member, property):
                    doc = _own_doc(member)
                    if doc:
                        parts.append(f"{name}.{attr}: {doc}")
        else:
            continue
        body = "\n\n".join(p for p in parts if p)
        if body:
            docs.append((f"{modname}.{name}", f"{modname}.{name}\n\n{body}"))
    return docs


def _split_of(key: str) -> str:
    # First 8 bytes of sha256 as a fraction in [0, 1): stable across processes and machines.
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if u < VALID_FRACTION:
        return "valid"
    if u < VALID_FRACTION + TEST_FRACTION:
        return "test"
    return "train"


def _split_documents(docs) -> dict:
    """``[(key, text)]`` -> ``dict(train, valid, test)``; documents joined by blank lines in order."""
    parts = {"train": [], "valid": [], "test": []}
    for key, text in docs:
        parts[_split_of(key)].append(text)
    return {split: "\n\n".join(texts) for split, texts in parts.items()}


def _find_split_file(folder: str, split: str) -> str:
    candidates = [os.path.join(folder, pattern.format(name))
                  for name in _SPLIT_NAMES[split] for pattern in _FILE_PATTERNS]
    found = [c for c in candidates if os.path.isfile(c)]
    if not found:
        names = ", ".join(pattern.format(_SPLIT_NAMES[split][0]) for pattern in _FILE_PATTERNS)
        raise DataError(f"corpus folder {folder!r} has no {split} file (looked for {names} "
                        f"and the aliases {', '.join(_SPLIT_NAMES[split][1:]) or 'none'})")
    if len(found) > 1:
        raise DataError(f"corpus folder {folder!r} has several {split} files: "
                        f"{', '.join(os.path.basename(f) for f in found)}; keep one")
    return found[0]


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError(f"cannot read corpus file {path!r}: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"corpus file {path!r} is not UTF-8 text (byte {exc.start}: "
                        f"{exc.reason})") from exc
