"""`mat-bench train`: end-to-end training comparisons (tasks.py: models and data; methods.py:
selection rules; runner.py: one run, measured FLOPs and wall time; report.py: statistics,
summary and plots; cli.py: arguments and the run plan)."""
