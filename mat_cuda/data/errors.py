"""The one error type of mat_cuda.data: a problem with the user's data, not a bug.

The benchmark CLI catches it and prints its message without a traceback.
"""


class DataError(Exception):
    """Data that cannot be used as asked: a missing path, a file that is not UTF-8, a malformed
    CIFAR-10 pickle, an optional dependency that is not installed. The message says what and where."""
