"""Tolerances and comparison helpers shared by the op tests."""
import torch

# Relative error (‖out − ref‖ / ‖ref‖) allowed per dtype when the reference runs in float64.
# Half types: the op stores results in the low precision, so one rounding per element is allowed.
REL_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.bfloat16: 1e-2,
    torch.float16: 2e-3,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (absolute error when ref is all zeros). NaN never passes."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out64.shape == ref64.shape, f"shape {tuple(out64.shape)} != {tuple(ref64.shape)}"
    if out64.numel() == 0:
        return 0.0
    num = (out64 - ref64).norm().item()
    den = ref64.norm().item()
    err = num / den if den > 0 else num
    return float("inf") if err != err else err


def assert_close_rel(out, ref, dtype=None, tol=None, msg=""):
    tol = REL_TOL[dtype or out.dtype] if tol is None else tol
    err = rel_err(out, ref)
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e} {msg}"
