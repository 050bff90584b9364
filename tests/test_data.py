"""mat_cuda.data: corpora, tokenizers, MLM batching and image data. Nothing here downloads."""
import hashlib
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from mat_cuda import data as D
from mat_cuda.data import corpus as corpus_mod
from mat_cuda.data import tokenizer as tokenizer_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------- corpus

def test_embedded_corpus_size_and_splits():
    c = D.load_corpus()
    assert set(c) == {"train", "valid", "test"}
    total = sum(len(t) for t in c.values())
    assert 500_000 < total < 20_000_000, total
    # about 90/5/5 by document: each held-out split is a real sample, far from the whole corpus.
    for split in ("valid", "test"):
        assert 0.01 * total < len(c[split]) < 0.15 * total, (split, len(c[split]), total)
    assert "the" in c["train"].split()[:5000]


def test_embedded_corpus_documents_each_in_exactly_one_split():
    docs = corpus_mod._embedded_documents()
    assert len(docs) > 500
    assert len({key for key, _ in docs}) == len(docs)
    c = D.load_corpus()
    sizes = {s: 0 for s in c}
    counts = {s: 0 for s in c}
    for key, text in docs:
        split = corpus_mod._split_of(key)
        assert text in c[split], key
        sizes[split] += len(text)
        counts[split] += 1
    # Splits are exactly their documents joined by blank lines: nothing duplicated or lost.
    for split in c:
        assert len(c[split]) == sizes[split] + 2 * max(counts[split] - 1, 0)
    assert all(len(piece) <= corpus_mod.MAX_DOCUMENT_CHARS or "\n\n" not in piece
               for _, piece in docs)


def test_embedded_corpus_same_in_a_fresh_process():
    # Hash randomisation differs per process; the corpus must not depend on it.
    here = {s: hashlib.sha256(t.encode()).hexdigest() for s, t in D.load_corpus().items()}
    code = ("import hashlib, json; from mat_cuda.data import load_corpus; "
            "print(json.dumps({s: hashlib.sha256(t.encode()).hexdigest() "
            "for s, t in load_corpus().items()}))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert eval(out.stdout.strip().splitlines()[-1]) == here


@pytest.mark.parametrize("names", [
    ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
    ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"),
    ("train.txt", "valid.txt", "test.txt"),
    ("train.txt", "validation.txt", "test.txt"),
])
def test_corpus_folder(tmp_path, names):
    texts = {"train": " = Héading = \n\nsome train text\n", "valid": "valid ✓ text\n",
             "test": "test text\n"}
    for split, name in zip(("train", "valid", "test"), names):
        (tmp_path / name).write_text(texts[split], encoding="utf-8")
    assert D.load_corpus(tmp_path) == texts
    assert D.load_corpus(str(tmp_path)) == texts


def test_corpus_folder_errors(tmp_path):
    (tmp_path / "train.txt").write_text("a", encoding="utf-8")
    (tmp_path / "test.txt").write_text("b", encoding="utf-8")
    with pytest.raises(D.DataError, match="no valid file"):
        D.load_corpus(tmp_path)
    (tmp_path / "valid.txt").write_text("c", encoding="utf-8")
    (tmp_path / "wiki.valid.tokens").write_text("c", encoding="utf-8")
    with pytest.raises(D.DataError, match="several valid files"):
        D.load_corpus(tmp_path)
    os.remove(tmp_path / "wiki.valid.tokens")
    (tmp_path / "valid.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(D.DataError, match="not UTF-8"):
        D.load_corpus(tmp_path)


def test_corpus_missing_path(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_corpus(tmp_path / "nope")


def test_corpus_single_file_split(tmp_path):
    paragraphs = [f"paragraph {i}: " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(20))
                  for i in range(400)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    c = D.load_corpus(path)
    assert c == D.load_corpus(path)
    found = {s: set(t.split("\n\n")) for s, t in c.items()}
    assert sum(len(f) for f in found.values()) == len(paragraphs)
    assert set().union(*found.values()) == set(paragraphs)
    assert all(len(found[s]) > 0 for s in ("valid", "test"))
    assert len(found["train"]) > 0.75 * len(paragraphs)


def test_corpus_single_file_wikitext_style_blank_lines(tmp_path):
    # WikiText's blank lines hold one space.
    paragraphs = [f" = Title {i} = \n Body {i} of the article ." for i in range(300)]
    path = tmp_path / "wiki.tokens"
    path.write_text("\n \n".join(paragraphs) + "\n \n", encoding="utf-8")
    c = D.load_corpus(path)
    found = [p for t in c.values() for p in t.split("\n\n")]
    assert sorted(found) == sorted(paragraphs)


def test_corpus_single_file_errors(tmp_path):
    few = tmp_path / "few.txt"
    few.write_text("one paragraph\n\nanother", encoding="utf-8")
    with pytest.raises(D.DataError, match="too few"):
        D.load_corpus(few)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(D.DataError, match="not UTF-8"):
        D.load_corpus(bad)


# ------------------------------------------------------------------------------------ tokenizer

def test_byte_tokenizer_round_trip():
    tok = D.get_tokenizer("byte")
    assert tok.kind == "byte" and tok.vocab_size == 256 + len(D.SPECIAL_TOKENS)
    assert len(set(tok.special_ids)) == len(D.SPECIAL_TOKENS)
    assert all(256 <= i < tok.vocab_size for i in tok.special_ids)
    text = "Naïve café — 漢字 🎉\n\ttabs and\x00nul"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    with_specials = [tok.cls_id] + ids + [tok.sep_id, tok.pad_id]
    assert tok.decode(with_specials) == text
    assert tok.decode(with_specials, skip_special=False) == f"[CLS]{text}[SEP][PAD]"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_byte_encode_to_tensor():
    tok = D.ByteTokenizer()
    text = "héllo\n\nwörld ✓\n\n"
    t = tok.encode_to_tensor(text)
    assert t.dtype == torch.long and t.tolist() == tok.encode(text)
    assert tok.encode_to_tensor("").shape == (0,)


def test_tokenizer_kind_checks(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        D.get_tokenizer("wordpiece")
    if D.bpe_available():
        with pytest.raises(ValueError, match="corpus_train_text"):
            D.get_tokenizer("bpe")
        with pytest.raises(ValueError, match="vocab_size"):
            D.get_tokenizer("bpe", vocab_size=100, corpus_train_text="x")
        tok = D.get_tokenizer("auto", vocab_size=600, corpus_train_text=D.load_corpus()["test"],
                              cache_dir=str(tmp_path))
        assert tok.kind == "bpe"
    else:
        assert D.get_tokenizer("auto").kind == "byte"


def test_bpe_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tokenizer_mod, "bpe_available", lambda: False)
    assert D.get_tokenizer("auto").kind == "byte"
    with pytest.raises(D.DataError, match="pip install tokenizers"):
        D.get_tokenizer("bpe", corpus_train_text="text")


needs_bpe = pytest.mark.skipif(not D.bpe_available(), reason="Hugging Face tokenizers not installed")


@needs_bpe
def test_bpe_train_round_trip_and_cache(tmp_path, monkeypatch):
    text = D.load_corpus()["valid"]
    tok = D.get_tokenizer("bpe", vocab_size=1024, corpus_train_text=text, cache_dir=str(tmp_path))
    assert tok.kind == "bpe" and tok.vocab_size == 1024
    assert len(set(tok.special_ids)) == len(D.SPECIAL_TOKENS)
    sample = text[:3000] + " naïve 漢字"
    ids = tok.encode(sample)
    assert len(ids) < len(sample.encode("utf-8")) / 2  # it learned merges
    assert tok.decode(ids) == sample
    ids_t = tok.encode_to_tensor(sample + "\n\nsecond paragraph\n\n")
    assert ids_t.dtype == torch.long
    assert tok.decode(ids_t) == sample + "\n\nsecond paragraph\n\n"
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("tokenizer-bpe-")

    def no_training(*args):
        raise AssertionError("a cached tokenizer was trained again")
    monkeypatch.setattr(tokenizer_mod, "_train_bpe", no_training)
    again = D.get_tokenizer("bpe", vocab_size=1024, corpus_train_text=text, cache_dir=str(tmp_path))
    assert again.encode(sample) == ids and again.special_ids == tok.special_ids
    # Another text or vocabulary size is another key.
    with pytest.raises(AssertionError, match="trained again"):
        D.get_tokenizer("bpe", vocab_size=1000, corpus_train_text=text, cache_dir=str(tmp_path))


@needs_bpe
def test_bpe_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MAT_CUDA_CACHE", str(tmp_path / "cache"))
    D.get_tokenizer("bpe", vocab_size=600, corpus_train_text=D.load_corpus()["test"])
    assert len(os.listdir(tmp_path / "cache")) == 1


# --------------------------------------------------------------------------------- MLM batching

def _stream(n, vocab=256, specials=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (n,), generator=g)
    for k, s in enumerate(specials):  # sprinkle special tokens, which must never be chosen
        ids[k::97] = s
    return ids


def test_mask_tokens_rates_follow_bert_rule():
    tok = D.ByteTokenizer()
    seqs = _stream(400_000, specials=(tok.sep_id, tok.cls_id)).reshape(-1, 200)
    g = torch.Generator().manual_seed(3)
    inp, lab = D.mask_tokens(seqs, g, 0.15, tok.mask_id, tok.vocab_size, tok.special_ids)
    assert inp.shape == lab.shape == seqs.shape and inp.dtype == lab.dtype == torch.long
    special = torch.isin(seqs, torch.tensor(tok.special_ids))
    chosen = lab != D.IGNORE_INDEX
    assert not (chosen & special).any()
    assert torch.equal(lab[chosen], seqs[chosen])
    assert torch.equal(inp[~chosen], seqs[~chosen])  # unchosen positions are untouched
    eligible = int((~special).sum())
    n = int(chosen.sum())
    sigma = math.sqrt(eligible * 0.15 * 0.85)
    assert abs(n - 0.15 * eligible) < 6 * sigma, (n, eligible)
    masked = chosen & (inp == tok.mask_id)
    kept = chosen & (inp == seqs)
    replaced = chosen & ~masked & ~kept
    # A random replacement equals the original with probability 1/256 (it then counts as kept).
    p = {"mask": 0.8, "kept": 0.1 + 0.1 / 256, "replaced": 0.1 - 0.1 / 256}
    for name, sel in (("mask", masked), ("kept", kept), ("replaced", replaced)):
        frac = int(sel.sum()) / n
        assert abs(frac - p[name]) < 6 * math.sqrt(p[name] * (1 - p[name]) / n), (name, frac)
    assert not torch.isin(inp[replaced], torch.tensor(tok.special_ids)).any()
    # Replacements are spread over the regular vocabulary.
    assert len(torch.unique(inp[replaced])) > 200


def test_mlm_batcher_shapes_epochs_and_seed():
    tok = D.ByteTokenizer()
    ids = _stream(10_000 + 37)
    kw = dict(mask_id=tok.mask_id, vocab_size=tok.vocab_size, special_ids=tok.special_ids)
    b = D.MLMBatcher(ids, 100, 16, seed=5, **kw)
    assert len(b.sequences) == 100 and len(b) == 7
    epoch0 = list(b)
    assert [x.shape[0] for x, _ in epoch0] == [16] * 6 + [4]
    assert all(x.shape[1] == 100 for x, _ in epoch0)
    # Every window appears once per epoch (compare the label-free view: originals).
    originals = torch.cat([torch.where(y == D.IGNORE_INDEX, x, y) for x, y in epoch0])
    assert sorted(map(tuple, originals.tolist())) == sorted(map(tuple, b.sequences.tolist()))
    epoch1 = list(b)
    assert not all(torch.equal(x0, x1) for (x0, _), (x1, _) in zip(epoch0, epoch1))
    b.set_epoch(0)
    assert all(torch.equal(x0, x1) and torch.equal(y0, y1)
               for (x0, y0), (x1, y1) in zip(epoch0, list(b)))
    same = D.MLMBatcher(ids, 100, 16, seed=5, **kw)
    assert all(torch.equal(x0, x1) for (x0, _), (x1, _) in zip(epoch0, list(same)))
    other = D.MLMBatcher(ids, 100, 16, seed=6, **kw)
    assert not all(torch.equal(x0, x1) for (x0, _), (x1, _) in zip(epoch0, list(other)))


def test_mlm_eval_batches_fixed():
    tok = D.ByteTokenizer()
    ids = torch.tensor(tok.encode(D.load_corpus()["test"][:20_000]))
    kw = dict(mask_id=tok.mask_id, vocab_size=tok.vocab_size, special_ids=tok.special_ids)
    a = D.mlm_eval_batches(ids, 64, 32, seed=1, **kw)
    b = D.mlm_eval_batches(ids, 64, 32, seed=1, **kw)
    assert len(a) == -(-(len(ids) // 64) // 32)
    assert all(torch.equal(x0, x1) and torch.equal(y0, y1) for (x0, y0), (x1, y1) in zip(a, b))
    # Windows in stream order.
    x0, y0 = a[0]
    assert torch.equal(torch.where(y0 == D.IGNORE_INDEX, x0, y0)[0], ids[:64])


def test_mlm_bad_arguments():
    tok = D.ByteTokenizer()
    kw = dict(mask_id=tok.mask_id, vocab_size=tok.vocab_size, special_ids=tok.special_ids)
    with pytest.raises(ValueError, match="1-D int64"):
        D.MLMBatcher(torch.zeros(2, 50, dtype=torch.long), 10, 2, **kw)
    with pytest.raises(ValueError, match="do not fill"):
        D.MLMBatcher(torch.zeros(5, dtype=torch.long), 10, 2, **kw)
    with pytest.raises(ValueError, match="mask_prob"):
        D.MLMBatcher(torch.zeros(50, dtype=torch.long), 10, 2, mask_prob=1.0, **kw)


# --------------------------------------------------------------------------------------- images

def _write_cifar(folder, n=3, seed=0, meta=True):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        batches[name] = batch
    if meta:
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return batches


def test_cifar_reader(tmp_path):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py", n=10)
    all_labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):
        # The two-way split: every train batch is train, test_batch is valid.
        im = D.load_images(path, test_split=False)
        assert im.train_x.shape == (50, 3, 32, 32) and im.valid_x.shape == (10, 3, 32, 32)
        assert im.test_x is None
        assert im.train_x.dtype == torch.float32 and im.train_y.dtype == torch.long
        assert im.class_names == tuple(f"c{i}" for i in range(10)) and im.num_classes == 10
        raw = batches["data_batch_2"][b"data"][1]  # the 12th train image (batch 2, row 1)
        c, h, w = 2, 5, 31
        # approx (rel 1e-6): the loader's float32 byte/255, one rounding (u32 ≈ 6e-8).
        assert im.train_x[11, c, h, w].item() == pytest.approx(raw[c * 1024 + h * 32 + w] / 255)
        assert torch.equal(im.train_x[11], torch.from_numpy(raw.reshape(3, 32, 32) / 255.0).float())
        assert im.train_y.tolist() == all_labels
        assert im.valid_y.tolist() == batches["test_batch"][b"labels"]
        # The three-way split (default): test_batch is test, valid is 10% of the train images
        # (a fixed draw), train the other 90%; no image is lost or used twice.
        held = D.load_images(path)
        assert held.train_x.shape == (45, 3, 32, 32) and held.valid_x.shape == (5, 3, 32, 32)
        assert torch.equal(held.test_x, im.valid_x) and held.test_y.tolist() == im.valid_y.tolist()
        both = torch.cat([held.train_x, held.valid_x]).flatten(1)
        order = [int((im.train_x.flatten(1) == row).all(1).nonzero()) for row in both]
        assert sorted(order) == list(range(50))
        assert torch.equal(torch.cat([held.train_y, held.valid_y]), im.train_y[order])
        assert torch.equal(D.load_images(path).valid_x, held.valid_x)


def test_cifar_without_meta_names_classes_by_index(tmp_path):
    _write_cifar(tmp_path / "c", meta=False)
    assert D.load_images(tmp_path / "c").class_names == tuple(str(i) for i in range(10))


def test_cifar_errors(tmp_path):
    with pytest.raises(D.DataError, match="not a folder"):
        D.load_images(tmp_path / "nope")
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    os.remove(folder / "data_batch_3")
    with pytest.raises(D.DataError, match="missing data_batch_3"):
        D.load_images(tmp_path)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(D.DataError, match="uint8 \\(N, 3072\\)"):
        D.load_images(tmp_path)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, f)
    with pytest.raises(D.DataError, match="labels"):
        D.load_images(tmp_path)
    with open(folder / "data_batch_3", "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(D.DataError, match="cannot read"):
        D.load_images(tmp_path)
    with pytest.raises(ValueError, match="3 channels"):
        D.load_images(tmp_path, channels=1)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_reader_refuses_code_in_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _RunsCode(), b"labels": []}, f)
    with pytest.raises(D.DataError, match="not allowed"):
        D.load_images(tmp_path)


def _sklearn_available():
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _sklearn_available(), reason="scikit-learn not installed")
def test_digits_default():
    im = D.load_images()
    assert im.source == "digits" and im.num_classes == 10
    assert im.train_x.shape == (1079, 3, 32, 32) and im.valid_x.shape == (359, 3, 32, 32)
    assert im.test_x.shape == (359, 3, 32, 32) and im.test_y.shape == (359,)
    assert 0.0 <= im.train_x.min() and im.train_x.max() <= 1.0 and im.train_x.max() > 0.9
    assert torch.equal(im.train_x[:, 0], im.train_x[:, 2])
    assert sorted(torch.cat([im.train_y, im.valid_y]).bincount().tolist())[0] > 100
    again = D.load_images()
    assert torch.equal(again.valid_x, im.valid_x) and torch.equal(again.train_y, im.train_y)
    assert torch.equal(again.test_x, im.test_x)
    grey = D.load_images(channels=1)
    assert grey.train_x.shape == (1079, 1, 32, 32) and torch.equal(grey.train_x[:, 0], im.train_x[:, 0])
    # The three splits together are the whole data set, with no image in two splits.
    from sklearn.datasets import load_digits
    target = torch.from_numpy(load_digits().target).long()
    assert torch.equal(torch.cat([im.train_y, im.valid_y, im.test_y]).bincount(), target.bincount())


@pytest.mark.skipif(not _sklearn_available(), reason="scikit-learn not installed")
def test_digits_two_way_split_is_the_earlier_one():
    """test_split=False: the same valid images, train = the three-way train + test (so runs
    measured on the two-way split, issue 15's robust suite, are reproducible)."""
    three, two = D.load_images(), D.load_images(test_split=False)
    assert two.test_x is None and two.test_y is None
    assert two.train_x.shape == (1438, 3, 32, 32)
    assert torch.equal(two.valid_x, three.valid_x) and torch.equal(two.valid_y, three.valid_y)
    assert torch.equal(two.train_x, torch.cat([three.test_x, three.train_x]))
    assert torch.equal(two.train_y, torch.cat([three.test_y, three.train_y]))


def test_digits_without_sklearn_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(D.DataError, match=r"mat_cuda\[bench\]"):
        D.load_images()


def test_embedded_corpus_ignores_methods_patched_into_stdlib(monkeypatch):
    # Libraries patch methods into stdlib classes (transformers adds logging.Logger.warning_once);
    # the corpus must not depend on what else the process imported.
    import logging

    before = corpus_mod._embedded_documents()

    def warning_everywhere(self, msg):
        """A docstring that must not enter the corpus."""

    warning_everywhere.__module__ = "somebody_elses_package"
    monkeypatch.setattr(logging.Logger, "warning_everywhere", warning_everywhere, raising=False)
    assert corpus_mod._embedded_documents() == before


def test_embedded_corpus_ignores_stdlib_functions_patched_by_other_packages(monkeypatch):
    # lightning replaces warnings.formatwarning when imported; the corpus must not change.
    import warnings
    from mat_cuda.data import corpus as C
    before = C._embedded_documents()

    def formatwarning(*args, **kwargs):  # a stand-in defined outside the stdlib
        return ""

    formatwarning.__module__ = "some_package.warnings_patch"
    monkeypatch.setattr(warnings, "formatwarning", formatwarning)
    after = C._embedded_documents()
    assert after == before
    assert any(name.startswith("warnings.formatwarning#") for name, _ in after)
