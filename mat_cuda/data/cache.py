"""Where mat_cuda caches what it builds locally (trained tokenizers)."""
import hashlib
import os


def cache_dir(override=None) -> str:
    """The cache folder: ``override`` if given, else ``$MAT_CUDA_CACHE``, else
    ``~/.cache/mat_cuda``. Created on first use."""
    path = override or os.environ.get("MAT_CUDA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mat_cuda")
    os.makedirs(path, exist_ok=True)
    return path


def stable_hash(*parts: str) -> str:
    """A hex digest of the parts that is the same in every process (unlike ``hash``)."""
    h = hashlib.sha256()
    for p in parts:
        data = p.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()
