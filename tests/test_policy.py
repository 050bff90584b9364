"""MAT policies on hand-built λ sequences: thresholds, budget, hysteresis, re-entry, temporal
retirement, invalid λ, state_dict round trips and user-defined policies."""
import io
import math

import pytest
import torch

from mat_cuda.policy import MATPolicy, ModularPolicy, Policy, TemporalPolicy


def lam_of(values, device, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype, device=device)


def mask_list(mask):
    return mask.cpu().tolist()


# ---------------------------------------------------------------- warm-up and schedule

def test_warmup_keeps_all_active(device):
    kinds = ["head"] * 4 + ["ffn"] * 2
    pol = MATPolicy(kinds, warmup=30, probe_every=10, temporal=None)
    for step in (0, 10, 20):
        lam = torch.rand(6, device=device) * torch.tensor([100, 1, 1, 1, 1e-3, 5], device=device)
        mask = pol.step(step, lam)
        assert mask.dtype == torch.bool and mask.device.type == device and mask.all()
    # First decision. Heads: median 2.5, an active head stays at ≥ 0.9·2.5. FFNs: median 5.5.
    mask = pol.step(30, lam_of([10, 1, 2, 3, 1, 10], device))
    assert mask_list(mask) == [True, False, False, True, False, True]
    assert [pol.is_probe(s) for s in (0, 5, 10, 30)] == [True, False, True, True]


def test_steps_must_increase(device):
    pol = MATPolicy(["a"], warmup=0, temporal=None)
    pol.step(5, lam_of([1.0], device))
    with pytest.raises(ValueError, match="steps must increase"):
        pol.step(5, lam_of([1.0], device))


# ---------------------------------------------------------------- ratio mode

@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5])
def test_ratio_median_threshold(device, alpha):
    lam = [1.0, 2.0, 3.0, 4.0, 10.0]  # median 3; hysteresis 0 so the threshold is exactly α·3
    # The threshold alone: no per-kind minimum beyond one module (tested separately).
    pol = ModularPolicy(["h"] * 5, alpha=alpha, hysteresis=0.0, min_active_fraction=0.0)
    got = mask_list(pol.update(lam_of(lam, device)))
    assert got == [v >= alpha * 3.0 for v in lam]


def test_ratio_median_even_count_is_mean_of_middle(device):
    pol = ModularPolicy(["h"] * 4, alpha=1.0, hysteresis=0.0)
    # Median of [1, 2, 4, 8] is 3: 2 is below it, 4 above (the lower median 2 would keep 2).
    assert mask_list(pol.update(lam_of([2.0, 8.0, 1.0, 4.0], device))) == [False, True, False, True]


def test_ratio_geomean_threshold(device):
    lam = [1.0, 4.0, 16.0, 0.0]  # geometric mean over λ > 0: 4
    pol = ModularPolicy(["h"] * 4, centre="geomean", alpha=1.0, hysteresis=0.0)
    assert mask_list(pol.update(lam_of(lam, device))) == [False, True, True, False]
    # approx (rel 1e-6): a float64 geometric mean via exp(mean(log)), a few u64 off 4.0.
    assert pol.kind_centre(lam_of(lam, device, torch.float64)).item() == pytest.approx(4.0)


def test_median_is_robust_to_one_large_module(device):
    # The DESIGN's case: one module 50x the rest. A mean-based threshold would keep only it; the
    # median keeps the upper half.
    lam = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 80.0]
    pol = ModularPolicy(["h"] * 8, hysteresis=0.0)
    assert sum(mask_list(pol.update(lam_of(lam, device)))) == 4


def test_per_kind_separation(device):
    # Heads have λ ~ 100, FFNs ~ 1: judged separately, each kind keeps its own upper half.
    kinds = ["head", "ffn", "head", "ffn", "head", "ffn", "head", "ffn"]
    lam = [100, 1, 200, 2, 300, 3, 400, 4]
    pol = ModularPolicy(kinds, hysteresis=0.0)
    got = mask_list(pol.update(lam_of(lam, device)))
    assert got == [False, False, False, False, True, True, True, True]
    # The same λ judged as one kind would freeze every FFN.
    one = mask_list(ModularPolicy(["x"] * 8, hysteresis=0.0).update(lam_of(lam, device)))
    assert not any(one[1::2])


def test_single_module_kind(device):
    # A kind with one module is its own centre: it stays active for α·(1−h) ≤ 1.
    pol = ModularPolicy(["head", "head", "head", "pool"], hysteresis=0.1)
    for lam in ([1.0, 2.0, 3.0, 5.0], [1.0, 2.0, 3.0, 0.5], [3.0, 2.0, 1.0, 9.0]):
        assert mask_list(pol.update(lam_of(lam, device)))[3] is True
    pol = MATPolicy(["only"], warmup=0, temporal=TemporalPolicy(["only"]))
    assert mask_list(pol.step(0, lam_of([2.0], device))) == [True]


def test_zero_lambda(device):
    pol = ModularPolicy(["h"] * 4, hysteresis=0.0)
    # Zero λ never passes a positive threshold.
    assert mask_list(pol.update(lam_of([0.0, 0.0, 3.0, 4.0], device))) == [False, False, True, True]
    # All zero: no signal, the kind's mask is kept.
    assert mask_list(pol.update(lam_of([0.0, 0.0, 0.0, 0.0], device))) == [False, False, True, True]
    pol = ModularPolicy(["h"] * 3, relative_to_history="warmup", hysteresis=0.0)
    assert mask_list(pol.update(lam_of([0.0, 0.0, 0.0], device))).count(True) == 3
    # Reference 0 is replaced by 1 (all zero refs): the score stays finite.
    assert torch.isfinite(pol.score(lam_of([1.0, 2.0, 3.0], device, torch.float64))).all()
    assert mask_list(pol.update(lam_of([1.0, 2.0, 3.0], device))) == [False, True, True]


# ---------------------------------------------------------------- budget mode

@pytest.mark.parametrize("m,rho", [(1, 0.5), (4, 0.5), (7, 0.3), (10, 0.3), (12, 0.25), (5, 1.0), (9, 0.01)])
def test_budget_keeps_ceil_of_fraction(device, m, rho):
    kinds = ["head"] * m + ["ffn"] * (m + 3)
    # The budget alone: no per-kind minimum beyond one module (the minimum's own test below).
    pol = ModularPolicy(kinds, mode="budget", budget=rho, hysteresis=0.0, min_active_fraction=0.0)
    for _ in range(5):
        lam = torch.rand(len(kinds), device=device)
        mask = pol.update(lam)
        for kind, count in (("head", m), ("ffn", m + 3)):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            k_expected = max(1, math.ceil(round(rho * count, 9)))
            assert pol.budget_count(kind) == k_expected
            assert int(mask[idx].sum()) == k_expected
    assert ModularPolicy(["h"] * 10, mode="budget", budget=0.3).budget_count("h") == 3


def test_budget_keeps_top_by_lambda_and_breaks_ties_by_index(device):
    pol = ModularPolicy(["h"] * 6, mode="budget", budget=0.5, hysteresis=0.0)
    assert mask_list(pol.update(lam_of([5, 1, 6, 2, 7, 0], device))) == [True, False, True, False, True, False]
    pol = ModularPolicy(["h"] * 4, mode="budget", budget=0.5, hysteresis=0.0)
    assert mask_list(pol.update(lam_of([1, 1, 1, 1], device))) == [True, True, False, False]


# ---------------------------------------------------------------- hysteresis and re-entry

def oscillating(n):
    # Module 0 oscillates ±5% around the median (= 1) of its kind; the others are fixed.
    return [[1.0 + (0.05 if t % 2 else -0.05), 0.5, 1.0, 1.0, 2.0] for t in range(n)]


def count_switches(pol, seq, device):
    masks = [mask_list(pol.update(lam_of(lam, device)))[0] for lam in seq]
    return sum(a != b for a, b in zip(masks, masks[1:])), masks


def test_hysteresis_prevents_flapping(device):
    seq = oscillating(12)
    flaps, _ = count_switches(ModularPolicy(["h"] * 5, hysteresis=0.0), seq, device)
    assert flaps == 11  # without hysteresis the module flips at every probe
    flaps, masks = count_switches(ModularPolicy(["h"] * 5, hysteresis=0.1), seq, device)
    assert flaps == 0 and masks[0] is True  # inside the ±10% band it keeps its state


def test_min_dwell_limits_switching(device):
    seq = oscillating(12)
    pol = ModularPolicy(["h"] * 5, hysteresis=0.0, min_dwell=3)
    flaps, masks = count_switches(pol, seq, device)
    assert flaps == 3  # one switch every 3 probes at most: at probes 3, 6 and 9
    assert masks == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3


def test_budget_hysteresis_and_dwell_keep_exact_count(device):
    pol = ModularPolicy(["h"] * 6, mode="budget", budget=0.5, hysteresis=0.2, min_dwell=2)
    for _ in range(20):
        assert int(pol.update(torch.rand(6, device=device) + 1).sum()) == 3
    # Incumbent advantage: an active module beaten by less than 20% stays.
    pol = ModularPolicy(["h"] * 2, mode="budget", budget=0.5, hysteresis=0.2)
    assert mask_list(pol.update(lam_of([2.0, 1.0], device))) == [True, False]
    assert mask_list(pol.update(lam_of([2.0, 2.3], device))) == [True, False]
    assert mask_list(pol.update(lam_of([2.0, 2.5], device))) == [False, True]


def test_reentry_counted(device):
    pol = ModularPolicy(["h"] * 4, hysteresis=0.1)
    seq = [
        [1.0, 2.0, 3.0, 4.0],  # median 2.5: modules 0, 1 frozen (first decision: not re-entries)
        [4.0, 2.0, 3.0, 1.0],  # module 0 re-enters (4 ≥ 1.1·2.5), module 3 frozen
        [1.0, 2.0, 3.0, 4.0],  # module 0 frozen, module 3 re-enters
        [4.0, 2.0, 3.0, 3.5],  # median 3.25: module 0 re-enters again (4 ≥ 1.1·3.25)
    ]
    masks = [mask_list(pol.update(lam_of(lam, device))) for lam in seq]
    assert masks[0] == [False, False, True, True]
    assert masks[1] == [True, False, True, False]
    assert masks[2] == [False, False, True, True]
    assert masks[3] == [True, False, True, True]
    assert pol.reentries.cpu().tolist() == [2, 0, 0, 1]
    assert pol.reentries.device.type == device


def test_relative_to_warmup_normalises_scale(device):
    # Module 0 has a 100x larger natural scale; relative to warm-up, growth is what counts.
    pol = ModularPolicy(["h"] * 4, relative_to_history="warmup", hysteresis=0.0)
    pol.update(lam_of([100.0, 1.0, 1.0, 1.0], device))
    assert mask_list(pol.update(lam_of([100.0, 1.0, 3.0, 2.0], device))) == [False, False, True, True]
    raw = ModularPolicy(["h"] * 4, hysteresis=0.0)
    assert mask_list(raw.update(lam_of([100.0, 1.0, 3.0, 2.0], device)))[0] is True


def test_relative_to_ema_lets_frozen_modules_compete(device):
    # Modules 1-3 grew while module 0 was frozen, then stopped; now module 0's λ rises by 10%.
    # Raw λ keeps it frozen (1.1 < median 1.2); relative to its own history it re-enters.
    pol = ModularPolicy(["h"] * 4, relative_to_history="ema", ema_decay=0.5, hysteresis=0.0)
    pol.update(lam_of([1.0, 1.0, 1.0, 1.0], device))
    for _ in range(6):
        assert mask_list(pol.update(lam_of([1.0, 1.2, 1.2, 10.0], device)))[0] is False
    assert mask_list(pol.update(lam_of([1.1, 1.2, 1.2, 10.0], device)))[0] is True
    assert pol.reentries.cpu().tolist() == [1, 0, 0, 0]
    raw = ModularPolicy(["h"] * 4, hysteresis=0.0)
    assert mask_list(raw.update(lam_of([1.1, 1.2, 1.2, 10.0], device)))[0] is False


# ---------------------------------------------------------------- temporal policy

def test_temporal_retirement_and_convergence(device):
    # scale_probes=1: the scale is the first trained movement (the median of one), the paper's
    # |λ_1 − λ_0|; the median over several intervals has its own tests below.
    kinds = ["head", "head", "ffn"]
    pol = TemporalPolicy(kinds, eps=0.1, patience=2, scale_probes=1)
    seq = [
        [1.0, 1.0, 1.0],
        [2.0, 2.0, 3.0],   # reference moves d = 1, 1, 2
        [2.05, 3.0, 3.1],  # ratios .05, 1, .05: modules 0 and 2 below ε once
        [2.06, 3.5, 3.15],  # ratios .01, .5, .025: modules 0 and 2 retired (patience 2)
        [2.06, 3.51, 3.15],  # module 1: ratio .01, once
    ]
    outs = [mask_list(pol.update(lam_of(lam, device))) for lam in seq]
    assert outs[:3] == [[False] * 3] * 3
    assert outs[3] == [True, False, True]
    assert pol.converged_kinds() == ["ffn"] and not pol.should_stop()
    assert mask_list(pol.update(lam_of([2.06, 3.511, 3.15], device))) == [True, True, True]
    assert pol.converged_kinds() == ["head", "ffn"] and pol.should_stop()
    # Retirement is permanent even if λ moves again.
    assert mask_list(pol.update(lam_of([9.0, 9.0, 9.0], device))) == [True, True, True]


def test_temporal_streak_resets_and_frozen_intervals_do_not_count(device):
    pol = TemporalPolicy(["h", "h"], eps=0.1, patience=2, scale_probes=1)
    pol.update(lam_of([0.0, 0.0], device))
    pol.update(lam_of([1.0, 1.0], device))
    pol.update(lam_of([1.01, 1.01], device))  # both below once
    pol.update(lam_of([1.5, 1.01], device), trained=torch.tensor([True, False], device=device))
    # Module 0 moved: streak reset. Module 1 was frozen: its constant λ does not count.
    assert pol.streak.cpu().tolist() == [0, 1]
    assert mask_list(pol.update(lam_of([1.5, 1.01], device))) == [False, True]


def test_temporal_zero_scale(device):
    pol = TemporalPolicy(["h"] * 3, eps=0.1, patience=1, scale_probes=1)
    pol.update(lam_of([0.0, 1.0, 2.0], device))
    # λ_1 == λ_0 for modules 0 and 1: scale 0. No scale to compare with: λ that does not move
    # at all has stopped (e.g. a dead expert, λ = 0 always), λ that moves has not.
    assert mask_list(pol.update(lam_of([0.0, 1.0, 3.0], device))) == [False, False, False]
    assert pol.scale.tolist() == [0.0, 0.0, 1.0]
    assert mask_list(pol.update(lam_of([0.0, 1.5, 3.05], device))) == [True, False, True]
    # Frozen intervals neither fill the scale window nor count.
    pol = TemporalPolicy(["h"], eps=0.1, patience=1, scale_probes=2)
    pol.update(lam_of([1.0], device))
    pol.update(lam_of([1.0], device), trained=torch.tensor([False], device=device))
    assert pol.seen.tolist() == [0]
    pol.update(lam_of([2.0], device))   # |Δ| = 1
    pol.update(lam_of([5.0], device))   # |Δ| = 3: scale = median(1, 3) = 2
    assert pol.scale.item() == 2.0
    assert mask_list(pol.update(lam_of([5.1], device))) == [True]  # r = 0.05


def test_temporal_scale_is_median_of_first_intervals(device):
    # A collapse by 3 decades in the first interval after warm-up, then ±20% probe noise: with
    # the first movement as the scale the noise is r ≈ 1e-3 and the module retires; the median
    # of 3 intervals is the noise's size and it never does.
    seq = [5.0, 5e-3, 6e-3, 5e-3, 6e-3, 5e-3, 6e-3, 5e-3, 6e-3, 5e-3]
    first = TemporalPolicy(["h"], eps=0.05, patience=2, scale_probes=1)
    robust = TemporalPolicy(["h"], eps=0.05, patience=2, scale_probes=3)
    retired_first = [mask_list(first.update(lam_of([v], device)))[0] for v in seq]
    retired_robust = [mask_list(robust.update(lam_of([v], device)))[0] for v in seq]
    assert retired_first[3] is True  # the old behaviour: retired 2 probes after the scale
    assert not any(retired_robust)
    assert robust.scale.item() == pytest.approx(1e-3)
    # Even W: the mean of the two middle movements.
    even = TemporalPolicy(["h"], scale_probes=4)
    for v in (0.0, 1.0, 3.0, 6.0, 10.0):  # movements 1, 2, 3, 4
        even.update(lam_of([v], device))
    assert even.scale.item() == 2.5


def test_temporal_never_retires_before_scale_and_patience(device):
    # λ exactly constant: r = 0 from the start, yet nothing retires before 1 + W + patience probes.
    pol = TemporalPolicy(["h"], eps=0.05, patience=2, scale_probes=5)
    assert pol.probes_to_retire == 8
    out = [mask_list(pol.update(lam_of([1.0], device)))[0] for _ in range(9)]
    assert out == [False] * 7 + [True] * 2


def test_mat_policy_excludes_retired_and_reports_convergence(device):
    kinds = ["head", "head", "ffn", "ffn"]
    pol = MATPolicy(kinds, modular=ModularPolicy(kinds, alpha=0.5),
                    temporal=TemporalPolicy(kinds, eps=0.1, patience=1, scale_probes=1),
                    warmup=0, probe_every=1)
    pol.step(0, lam_of([1.0, 1.0, 1.0, 1.0], device))
    pol.step(1, lam_of([2.0, 2.0, 2.0, 2.0], device))
    mask = pol.step(2, lam_of([2.01, 3.0, 3.0, 2.01], device))  # modules 0 and 3 retired
    assert mask_list(mask) == [False, True, True, False]
    mask = pol.step(3, lam_of([2.01, 3.01, 3.01, 2.01], device))
    assert mask_list(mask) == [False] * 4 and pol.should_stop()
    rep = pol.report()
    assert rep["converged_kinds"] == ["head", "ffn"]
    assert rep["active_fraction"]["head"].tolist() == [1.0, 1.0, 0.5, 0.0]


def test_temporal_policy_starts_after_warmup(device):
    # λ flat near 0 early in warm-up, then growing: nothing retires during warm-up, and the
    # scale d_m comes from the first two probes after it.
    kinds = ["head", "head"]
    temporal = TemporalPolicy(kinds, eps=0.1, patience=1, scale_probes=1)
    pol = MATPolicy(kinds, modular=ModularPolicy(kinds, alpha=0.5), temporal=temporal,
                    warmup=3, probe_every=1)
    for step, lam in enumerate([[1.0, 1.0], [1e-5, 1e-5], [1e-5, 1e-5]]):  # warm-up
        assert mask_list(pol.step(step, lam_of(lam, device))) == [True, True]
    assert temporal.previous is None  # warm-up probes were not recorded
    pol.step(3, lam_of([1.0, 1.0], device))   # λ_0
    pol.step(4, lam_of([2.0, 3.0], device))   # λ_1: d = (1, 2)
    mask = pol.step(5, lam_of([2.05, 4.0], device))  # r = (0.05, 0.5): module 0 retires
    assert mask_list(mask) == [False, True]
    assert temporal.scale.tolist() == [1.0, 2.0]


# ---------------------------------------------------------------- invalid λ

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_invalid_lambda_names_modules(device, bad):
    names = ["layer0.head0", "layer0.head1", "layer0.ffn"]
    pol = MATPolicy(["head", "head", "ffn"], warmup=0, names=names)
    with pytest.raises(ValueError, match=r"layer0\.head1") as info:
        pol.step(0, lam_of([1.0, bad, 2.0], device))
    assert "layer0.head0" not in str(info.value) and "layer0.ffn" not in str(info.value)
    assert pol.mask is None and pol.history["step"] == []  # nothing recorded
    with pytest.raises(ValueError, match=r"h\[0\].*h\[2\]"):
        ModularPolicy(["h"] * 3).update(lam_of([bad, 1.0, bad], device))
    with pytest.raises(ValueError, match="shape"):
        ModularPolicy(["h"] * 3).update(lam_of([1.0, 2.0], device))
    with pytest.raises(TypeError, match="floating"):
        ModularPolicy(["h"] * 2).update(torch.tensor([1, 2], device=device))


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        ModularPolicy(["h"], mode="top")
    with pytest.raises(ValueError, match="centre"):
        ModularPolicy(["h"], centre="mean")
    with pytest.raises(ValueError, match="budget"):
        ModularPolicy(["h"], budget=0.0)
    with pytest.raises(ValueError, match="kinds is empty"):
        ModularPolicy([])
    with pytest.raises(ValueError, match="other kinds"):
        MATPolicy(["a", "b"], modular=ModularPolicy(["a", "a"]))


# ---------------------------------------------------------------- state and extension

def run_policy(pol, lams, device, start):
    return [mask_list(pol.step(start + i, lam.to(device))) for i, lam in enumerate(lams)]


@pytest.mark.parametrize("mode,rel", [("ratio", None), ("ratio", "ema"), ("budget", "warmup")])
def test_state_dict_round_trip(device, mode, rel):
    kinds = ["head"] * 6 + ["ffn"] * 3
    def make():
        return MATPolicy(kinds, modular=ModularPolicy(kinds, mode=mode, relative_to_history=rel, min_dwell=2),
                         temporal=TemporalPolicy(kinds, eps=0.2, patience=2), warmup=3, probe_every=1)
    # Slowly settling λ with noise, so that masks, re-entries and retirements all change.
    lams = [torch.rand(9) * (1 + 5 / (t + 1)) + torch.arange(9) * 0.1 for t in range(30)]
    a = make()
    run_policy(a, lams[:12], device, 0)
    state = a.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)  # checkpoints hold it: it must survive torch.save/load
    buffer.seek(0)
    b = make()
    b.load_state_dict(torch.load(buffer, weights_only=True))
    future = run_policy(a, lams[12:], device, 12)
    assert future == run_policy(b, lams[12:], device, 12)
    ra, rb = a.report(), b.report()
    for key in ("step", "lam", "mask", "reentries", "retired"):
        assert torch.equal(ra[key], rb[key]), key
    assert ra["converged_kinds"] == rb["converged_kinds"]
    # The saved state is a copy: running a and b on did not change it.
    c = make()
    c.load_state_dict(state)
    assert run_policy(c, lams[12:], device, 12) == future


def test_user_defined_policy(device):
    class KeepLargest(Policy):
        """Keeps the single largest λ of each kind."""

        def update(self, lam, exclude=None):
            mask = torch.zeros(len(self.kinds), dtype=torch.bool, device=lam.device)
            for idx in self.groups.values():
                mask[idx[int(lam[idx].argmax())]] = True
            return mask

    kinds = ["a", "a", "b", "b"]
    pol = MATPolicy(kinds, modular=KeepLargest(kinds), temporal=None, warmup=1, probe_every=1)
    assert mask_list(pol.step(0, lam_of([1, 2, 3, 4], device))) == [True] * 4
    assert mask_list(pol.step(1, lam_of([5, 2, 3, 4], device))) == [True, False, False, True]
    assert pol.report()["reentries"] is None

    class Quantile(ModularPolicy):
        """A user replacing the centre: the 75th percentile instead of the median."""

        def kind_centre(self, s, include=None):
            return torch.quantile(s if include is None else s[include], 0.75)

    q = Quantile(["h"] * 4, hysteresis=0.0)
    assert mask_list(q.update(lam_of([1, 2, 3, 4], device))) == [False, False, False, True]
