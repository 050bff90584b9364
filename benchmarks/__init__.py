"""mat-bench: kernel micro-benchmarks and end-to-end MAT runs (see benchmarks/__main__.py)."""
