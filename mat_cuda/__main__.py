"""`python -m mat_cuda`: print the environment report to paste into a bug report."""
from .environment import format_report

if __name__ == "__main__":
    print(format_report())
