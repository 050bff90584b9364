"""Tolerances and comparison helpers shared by the op tests.

Where the tolerances come from (u = unit roundoff, half the spacing of numbers near 1):
u64 = 2^-53 ≈ 1.1e-16, u32 = 2^-24 ≈ 6.0e-8, bf16 2^-8 ≈ 3.9e-3, fp16 2^-11 ≈ 4.9e-4.
"""
import torch

U32 = 2.0 ** -24  # float32 unit roundoff

# Relative error (‖out − ref‖ / ‖ref‖) allowed per dtype when the reference runs in float64 and
# the op's math takes a handful (≲ 16) of roundings per element in the dtype's own precision:
# fp32: 16·u32 ≈ 1e-6; fp64: 1e-12 is far above 16·u64 ≈ 2e-15 and also absorbs float64
# reductions of up to ~10^3 terms in another order.
# Half types, used only where an op *stores* half results from float32 math: one rounding at
# the write, ≤ u_dtype per element, so the norm-wise error is ≤ u_dtype (bf16 3.9e-3, fp16
# 4.9e-4); the values allow ~2.5x (bf16) and ~4x (fp16) that. For parameter *updates* this is
# too loose (one AdamW step at lr 1e-2 moves a weight by ~1e-2 relative, about this bf16
# tolerance): updates are checked element by element with assert_rounded_once instead.
REL_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.bfloat16: 1e-2,
    torch.float16: 2e-3,
}

# Roundings in the float32 chain of one fused AdamW / SGD element update (prepare grad, decay,
# lerp, v update, sqrt, divide, add: ≤ 8, each ≤ u32 relative to the magnitudes in
# step_error_scale), doubled for margin. See assert_rounded_once.
STEP_ROUNDINGS = 16


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


def assert_rounded_once(out: torch.Tensor, ref64: torch.Tensor, err64: torch.Tensor, msg=""):
    """Check a stored result the way it was computed: float32 math, one rounding at the write.

    ref64: the exact (float64) value of each element; err64 (≥ 0, same shape): a bound on the
    float32 math's error before the write (e.g. STEP_ROUNDINGS · u32 · step_error_scale(...)).
    The kernel's float32 value x lies in [ref − err, ref + err]; rounding to out.dtype is
    monotone, so out must lie in [round(ref − err), round(ref + err)]. With err far below the
    dtype's spacing that interval is almost always the single value round(ref): an update that
    was dropped, applied twice or written to the wrong element fails (unless it is below half
    a spacing, when the correctly rounded result is the old value too).
    """
    dtype = out.dtype
    o = out.detach().double().cpu().flatten()
    r = ref64.detach().double().cpu().flatten()
    # + u32·|r|: torch may round float64 → half via float32 (a second rounding of the bounds).
    e = err64.detach().double().cpu().flatten() + U32 * r.abs()
    lo = (r - e).to(dtype).double()
    hi = (r + e).to(dtype).double()
    bad = ~((o >= lo) & (o <= hi))
    if bad.any():
        i = bad.nonzero()[:5].flatten().tolist()
        raise AssertionError(
            f"{int(bad.sum())}/{o.numel()} elements not a single {dtype} rounding of the reference "
            f"{msg}: at {i}: out {o[i].tolist()}, allowed [{lo[i].tolist()}, {hi[i].tolist()}], "
            f"ref {r[i].tolist()}")


def adamw_error_scale(p, g, m, v, step, lr, beta1, beta2, weight_decay, eps, grad_scale=None):
    """Per-element magnitudes (float64, p's shape) that bound the float32 AdamW update's
    rounding errors: each of its ≤ STEP_ROUNDINGS/2 roundings is ≤ u32 times one of them.
    Returns (param_scale, exp_avg_scale, exp_avg_sq_scale). step: (p.shape) float64 counts + 1."""
    g = g.double() / (float(grad_scale) if grad_scale is not None else 1.0)
    p, m, v = p.double(), m.double(), v.double()
    m_new = beta1 * m + (1 - beta1) * g
    v_new = beta2 * v + (1 - beta2) * g * g
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    denom = v_new.sqrt() / bc2.sqrt() + eps
    step_size = lr / bc1
    m_scale = m.abs() + g.abs()
    # the update's error: step_size · (m's error + |m|·denom's relative error) / denom
    upd_scale = step_size * (m_scale + m_new.abs()) / denom
    p_scale = p.abs() * (1 + lr * weight_decay) + upd_scale
    return p_scale, m_scale, v.abs() + g * g


def sgd_error_scale(p, g, buf, lr, momentum, weight_decay, grad_scale=None):
    """As adamw_error_scale for SGD: (param_scale, momentum_buffer_scale), float64."""
    g = g.double().abs() / (float(grad_scale) if grad_scale is not None else 1.0)
    d = g + weight_decay * p.double().abs()
    b = momentum * buf.double().abs() + d if buf is not None else d
    return p.double().abs() + lr * (d + (1 + momentum) * b), b


def load_example(filename: str):
    """examples/<filename> imported as a module in this process (its main() runs in-process)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        filename)
    spec = importlib.util.spec_from_file_location(f"example_{filename[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
