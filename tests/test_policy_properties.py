"""The policy's invariants (issue 15), as properties over random λ sequences and policy
constants (hypothesis), and on the λ histories recorded by `mat-bench robust`:

1. a kind is never entirely frozen unless every one of its modules is retired;
2. each kind keeps at least min(E, max(min_active, ceil(f·E))) active modules, E = its modules
   not retired;
3. retired modules are never active again, and leave the statistics: replacing their λ by
   anything changes no decision;
4. no module retires before 1 + scale_probes + patience probes after warm-up, and a collapse
   (λ falling by decades over fewer than half of the scale's intervals) cannot set the scale:
   later movement of the collapsed level is never taken for convergence;
5. the schedule check counts probes exactly and warns exactly when there are too few.
"""
import json
import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from mat_cuda.policy import MATPolicy, ModularPolicy, TemporalPolicy, layer_key  # noqa: E402

RECORDED = os.path.join(os.path.dirname(__file__), "..", "docs", "results",
                        "robust-lambda-histories.json")
SETTINGS = settings(max_examples=60, deadline=None)


def groups_of(kinds):
    out = {}
    for i, k in enumerate(kinds):
        out.setdefault(k, []).append(i)
    return out


def required_minimum(modular, eligible_count):
    e = eligible_count
    return min(e, max(modular.min_active, math.ceil(round(modular.min_active_fraction * e, 9))))


def check_invariants(pol, mask, retired_before, where=""):
    """Invariants 1-3 (active side) for one decision of a MATPolicy after warm-up."""
    retired = pol.temporal.retired.cpu() if pol.temporal is not None else torch.zeros_like(mask)
    mask = mask.cpu()
    assert not (mask & retired).any(), f"{where}: a retired module is active"
    assert (retired | ~retired_before).all(), f"{where}: a retirement was undone"
    converged = pol.converged_kinds()
    for kind, idx in groups_of(pol.kinds).items():
        active = int(mask[idx].sum())
        eligible = int((~retired[idx]).sum())
        if active == 0:
            assert eligible == 0 and kind in converged, \
                f"{where}: kind {kind} entirely frozen with {eligible} module(s) not retired"
        if isinstance(pol.modular, ModularPolicy):
            need = required_minimum(pol.modular, eligible)
            assert active >= need, f"{where}: kind {kind} has {active} active, needs {need}"
    if isinstance(pol.modular, ModularPolicy):
        check_layer_minimum(pol.modular, mask, retired, where)


def layer_groups_of(kinds, names):
    """(kind, layer) index groups with ≥ 2 modules and a layer, computed independently."""
    out = {}
    for i, (k, n) in enumerate(zip(kinds, names)):
        if layer_key(n) is not None:
            out.setdefault((k, layer_key(n)), []).append(i)
    return {g: v for g, v in out.items() if len(v) >= 2}


def check_layer_minimum(modular, mask, excluded, where=""):
    """The per-layer minimum: each (kind, layer) group of ≥ 2 modules has ≥ min(L, eligible)
    active."""
    for group, idx in layer_groups_of(modular.kinds, modular.names).items():
        eligible = int((~excluded[idx]).sum())
        need = min(modular.min_active_per_layer, eligible)
        active = int(mask[idx].sum())
        assert active >= need, f"{where}: group {group} has {active} active, needs {need}"


# ------------------------------------------------------------------- strategies

@st.composite
def kinds_strategy(draw):
    counts = draw(st.lists(st.integers(1, 7), min_size=1, max_size=3))
    return [f"k{j}" for j, c in enumerate(counts) for _ in range(c)]


@st.composite
def names_strategy(draw, kinds):
    """Module names as discovery writes them, each in one of up to 3 layers or in none."""
    layers = [draw(st.sampled_from([None, 0, 1, 2])) for _ in kinds]
    return [f"embed.{k}{i}" if layer is None else f"model.layers.{layer}.{k}{i}"
            for i, (k, layer) in enumerate(zip(kinds, layers))]


@st.composite
def policy_strategy(draw, kinds):
    modular = ModularPolicy(
        kinds, names=draw(names_strategy(kinds)),
        relative_to_layer=draw(st.sampled_from([None, "all_kinds", "same_kind"])), mode=draw(st.sampled_from(["ratio", "budget"])),
        alpha=draw(st.floats(0.3, 3.0)), centre=draw(st.sampled_from(["median", "geomean"])),
        budget=draw(st.floats(0.05, 1.0)), hysteresis=draw(st.floats(0.0, 0.6)),
        min_dwell=draw(st.integers(1, 3)),
        relative_to_history=draw(st.sampled_from([None, "warmup", "ema"])),
        ema_decay=draw(st.floats(0.0, 0.95)), min_active=draw(st.integers(1, 3)),
        min_active_fraction=draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])),
        min_active_per_layer=draw(st.sampled_from([0, 0, 1, 2])),
        max_frozen_probes=draw(st.sampled_from([0, 0, 1, 3])))
    temporal = TemporalPolicy(kinds, eps=draw(st.floats(0.01, 2.0)), patience=draw(st.integers(1, 3)),
                              scale_probes=draw(st.integers(1, 6)))
    return modular, temporal


def modular_options(modular):
    """The constructor arguments (besides kinds) that rebuild ``modular`` with fresh state."""
    return dict(mode=modular.mode, alpha=modular.alpha, centre=modular.centre,
                budget=modular.budget, hysteresis=modular.hysteresis, min_dwell=modular.min_dwell,
                relative_to_history=modular.relative_to_history, ema_decay=modular.ema_decay,
                min_active=modular.min_active, min_active_fraction=modular.min_active_fraction,
                relative_to_layer=modular.relative_to_layer,
                min_active_per_layer=modular.min_active_per_layer,
                max_frozen_probes=modular.max_frozen_probes, names=modular.names)


@st.composite
def lambda_sequence(draw, m, max_probes=24):
    """λ (P, M) float64 with the shapes real runs show: spreads over decades, collapses by
    decades, exact zeros, exactly constant stretches, noise."""
    n = draw(st.integers(1, max_probes))
    level = [10 ** draw(st.floats(-4, 3)) for _ in range(m)]
    seq = []
    for _ in range(n):
        row = []
        for j in range(m):
            event = draw(st.sampled_from(["noise", "noise", "noise", "same", "collapse", "jump", "zero"]))
            if event == "collapse":
                level[j] *= 10 ** draw(st.floats(-6, -1))
            elif event == "jump":
                level[j] = 10 ** draw(st.floats(-4, 3))
            elif event == "zero":
                level[j] = 0.0
            elif event == "noise":
                level[j] = level[j] * draw(st.floats(0.5, 1.5)) if level[j] > 0 else 10 ** draw(st.floats(-4, 1))
            row.append(level[j])
        seq.append(row)
    return torch.tensor(seq, dtype=torch.float64)


# ------------------------------------------------------------------- invariants 1-3

@SETTINGS
@given(data=st.data())
def test_invariants_hold_for_any_lambda_and_constants(data):
    kinds = data.draw(kinds_strategy())
    modular, temporal = data.draw(policy_strategy(kinds))
    warmup = data.draw(st.integers(0, 3))
    pol = MATPolicy(kinds, modular=modular, temporal=temporal, warmup=warmup, probe_every=1)
    seq = data.draw(lambda_sequence(len(kinds)))
    retired_before = torch.zeros(len(kinds), dtype=torch.bool)
    for step, lam in enumerate(seq):
        mask = pol.step(step, lam)
        if step < warmup:
            assert mask.all()
            continue
        check_invariants(pol, mask, retired_before, where=f"probe {step}")
        retired_before = pol.temporal.retired.cpu().clone()


@SETTINGS
@given(data=st.data())
def test_retired_modules_leave_the_statistics(data):
    """Two policies on the same λ, except that the second sees arbitrary λ for every module the
    first had already retired: every mask and retirement is the same."""
    kinds = data.draw(kinds_strategy())
    opts = data.draw(policy_strategy(kinds))

    def make(modular, temporal):
        clone_m = ModularPolicy(kinds, **modular_options(modular))
        clone_t = TemporalPolicy(kinds, eps=temporal.eps, patience=temporal.patience,
                                 scale_probes=temporal.scale_probes)
        return MATPolicy(kinds, modular=clone_m, temporal=clone_t, warmup=0, probe_every=1,
                         names=modular.names)

    a, b = make(*opts), make(*opts)
    seq = data.draw(lambda_sequence(len(kinds), max_probes=30))
    other = data.draw(lambda_sequence(len(kinds), max_probes=30))
    any_retired = False
    for step, lam in enumerate(seq):
        retired = a.temporal.retired.cpu() if a.temporal.retired is not None else torch.zeros(len(kinds), dtype=torch.bool)
        any_retired |= bool(retired.any())
        replacement = other[step % len(other)]
        lam_b = torch.where(retired, replacement, lam)
        assert torch.equal(a.step(step, lam), b.step(step, lam_b)), f"probe {step}"
        assert torch.equal(a.temporal.retired, b.temporal.retired)


@SETTINGS
@given(data=st.data(), bound=st.integers(1, 4))
def test_no_module_stays_frozen_past_the_staleness_bound(data, bound):
    """max_frozen_probes = F: a module that is not excluded is never frozen for more than F
    consecutive decisions, whatever λ and the other constants; and the bound only adds modules:
    from the same state, the policy without it activates a subset of what it activates."""
    kinds = data.draw(kinds_strategy())
    modular, _ = data.draw(policy_strategy(kinds))
    options = modular_options(modular)
    bounded = ModularPolicy(kinds, **{**options, "max_frozen_probes": bound})
    seq = data.draw(lambda_sequence(len(kinds), max_probes=30))
    exclude = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(kinds),
                                              max_size=len(kinds))))
    frozen_for = torch.zeros(len(kinds), dtype=torch.int64)
    for t, lam in enumerate(seq):
        plain = ModularPolicy(kinds, **{**options, "max_frozen_probes": 0})
        if bounded.active is not None:
            plain.load_state_dict(bounded.state_dict())
        unbounded = plain.update(lam, exclude=exclude).cpu()
        mask = bounded.update(lam, exclude=exclude).cpu()
        assert not (unbounded & ~mask).any(), f"probe {t}: the bound removed a module"
        frozen_for = torch.where(mask, torch.zeros_like(frozen_for), frozen_for + 1)
        stale = (frozen_for > bound) & ~exclude
        assert not stale.any(), f"probe {t}: modules {stale.nonzero().flatten().tolist()} frozen " \
                                f"for more than {bound} probes"


def test_staleness_bound_reactivates_a_settled_ranking():
    # Two heads whose λ ranking never changes: the ratio rule freezes head 1 for good; with
    # max_frozen_probes=2 it trains one interval in every three.
    lam = torch.tensor([10.0, 1.0], dtype=torch.float64)
    plain = ModularPolicy(["head", "head"], hysteresis=0.0, min_active_fraction=0.0)
    bounded = ModularPolicy(["head", "head"], hysteresis=0.0, min_active_fraction=0.0,
                            max_frozen_probes=2)
    assert [plain.update(lam).tolist() for _ in range(6)] == [[True, False]] * 6
    got = [bounded.update(lam).tolist()[1] for _ in range(7)]
    assert got == [False, False, True, False, False, True, False]
    assert int(bounded.reentries[1]) == 2
    with pytest.raises(ValueError, match="max_frozen_probes"):
        ModularPolicy(["head"], max_frozen_probes=-1)


def test_retired_modules_leave_the_centre():
    # 4 heads, 2 retired with large λ: were they counted, the median (4.5) would freeze both
    # others; over the two that remain, the median is 1.5 and the larger one stays active.
    kinds = ["head"] * 4
    pol = ModularPolicy(kinds, hysteresis=0.0, min_active_fraction=0.0)
    exclude = torch.tensor([True, True, False, False])
    mask = pol.update(torch.tensor([9.0, 8.0, 1.0, 2.0]), exclude=exclude)
    assert mask.tolist() == [False, False, False, True]
    assert pol.kind_centre(torch.tensor([9.0, 8.0, 1.0, 2.0], dtype=torch.float64),
                           ~exclude).item() == 1.5


def test_minimum_tops_up_by_score_and_overrides_dwell():
    kinds = ["head"] * 8
    # α = 3 passes nobody but module 7; the minimum ceil(0.5·8) = 4 adds the next three by λ.
    pol = ModularPolicy(kinds, alpha=3.0, hysteresis=0.0, min_active_fraction=0.5)
    lam = torch.tensor([1.0, 5.0, 2.0, 7.0, 3.0, 0.5, 0.1, 100.0])
    assert pol.update(lam).tolist() == [False, True, False, True, True, False, False, True]
    assert pol.min_active_count(torch.ones(8, dtype=torch.bool)).item() == 4
    # With 6 of 8 excluded, E = 2: ceil(0.5·2) = 1, and min_active=3 is capped at E = 2.
    pol = ModularPolicy(kinds, alpha=3.0, min_active=3, min_active_fraction=0.5)
    exclude = torch.tensor([True] * 6 + [False] * 2)
    assert pol.update(lam, exclude=exclude).tolist() == [False] * 6 + [True, True]
    # A module locked frozen by min_dwell is still activated when the kind needs it.
    pol = ModularPolicy(["h", "h"], hysteresis=0.0, min_dwell=5, min_active_fraction=0.0)
    assert pol.update(torch.tensor([1.0, 3.0])).tolist() == [False, True]
    assert pol.update(torch.tensor([1.0, 3.0]), exclude=torch.tensor([False, True])).tolist() == [True, False]


# ------------------------------------------------------------------- invariant 4

@SETTINGS
@given(data=st.data())
def test_no_retirement_before_scale_and_patience(data):
    kinds = data.draw(kinds_strategy())
    modular, temporal = data.draw(policy_strategy(kinds))
    warmup = data.draw(st.integers(0, 4))
    pol = MATPolicy(kinds, modular=modular, temporal=temporal, warmup=warmup, probe_every=1)
    grace = temporal.scale_probes + temporal.patience  # probe index (0 = first after warm-up)
    for step, lam in enumerate(data.draw(lambda_sequence(len(kinds)))):
        pol.step(step, lam)
        if warmup <= step < warmup + grace:
            assert not pol.temporal.retired.any(), f"retired at probe {step - warmup} < {grace}"


@SETTINGS
@given(scale_probes=st.integers(3, 7), patience=st.integers(1, 3), eps=st.floats(0.01, 0.3),
       level=st.floats(-3, 3), collapse=st.floats(1, 6), data=st.data())
def test_collapse_cannot_set_the_scale(scale_probes, patience, eps, level, collapse, data):
    """λ falls by 10^collapse over k < W/2 intervals, then keeps moving by 10–30% of its new
    level at every probe (noise of a module that is still learning): never retired."""
    k = data.draw(st.integers(1, (scale_probes - 1) // 2))
    high = 10 ** level
    low = high * 10 ** -collapse
    seq = [high * 10 ** (-collapse * i / k) for i in range(k + 1)]  # the collapse
    sign = 1
    for _ in range(scale_probes + patience + 20):
        move = data.draw(st.floats(0.1, 0.3)) * low
        seq.append(seq[-1] + sign * move)
        sign = -sign
    pol = TemporalPolicy(["h"], eps=eps, patience=patience, scale_probes=scale_probes)
    for v in seq:
        assert not pol.update(torch.tensor([v], dtype=torch.float64)).any()
    # The same sequence with the first movement as the scale (the old behaviour) retires it.
    first = TemporalPolicy(["h"], eps=eps, patience=patience, scale_probes=1)
    retired = [bool(first.update(torch.tensor([v], dtype=torch.float64))) for v in seq]
    if collapse >= 2 and k == 1:
        assert any(retired)


# ------------------------------------------------------------------- invariant 5

@SETTINGS
@given(warmup=st.integers(0, 300), probe_every=st.integers(1, 60), total=st.integers(1, 2000),
       temporal=st.booleans())
def test_schedule_check_counts_probes(warmup, probe_every, total, temporal):
    pol = MATPolicy(["h"] * 3, warmup=warmup, probe_every=probe_every,
                    temporal=TemporalPolicy(["h"] * 3) if temporal else None)
    brute = sum(1 for s in range(warmup, total) if s % probe_every == 0)
    assert pol.probes_after_warmup(total) == brute
    message = pol.schedule_warning(total)
    assert (message is None) == (brute >= pol.probes_needed)
    if message:
        assert f"needs at least {pol.probes_needed}" in message and f"give {brute} probe" in message
        # The suggested interval is the largest that gives enough probes (when one does).
        suggested = [e for e in range(1, total + 1)
                     if sum(1 for s in range(warmup, total) if s % e == 0) >= pol.probes_needed]
        if suggested:
            assert f"probe_every ≤ {max(suggested)}," in message
        else:
            assert "probe_every ≤" not in message


def test_schedule_needs():
    kinds = ["h"] * 3
    assert MATPolicy(kinds).probes_needed == 8  # 1 + scale_probes 5 + patience 2
    assert MATPolicy(kinds, temporal=None).probes_needed == 2
    # Without the run length: a run of 5 × warmup is assumed; warmup 0 cannot be judged.
    assert MATPolicy(kinds, warmup=24, probe_every=10).schedule_warning() is None  # 9 probes
    msg = MATPolicy(kinds, warmup=24, probe_every=20).schedule_warning()
    # Probes at 40, 60, 80, 100; every 13 gives 26, 39, ..., 117: 8 (every 14: 28, ..., 112: 7).
    assert "5 × warmup = 120" in msg and "give 4 probe(s)" in msg and "probe_every ≤ 13," in msg
    assert MATPolicy(kinds, warmup=0, probe_every=1000).schedule_warning() is None
    with pytest.raises(ValueError, match="total_steps"):
        MATPolicy(kinds).schedule_warning(0)


# ------------------------------------------------------------------- recorded λ histories

def _recorded():
    if not os.path.exists(RECORDED):
        return []
    with open(RECORDED) as f:
        return json.load(f)


@pytest.mark.parametrize("run", _recorded(), ids=lambda r: f"{r['model']}-{r['length']}-seed{r['seed']}")
def test_invariants_on_recorded_lambda(run):
    """The λ MAT measured in `mat-bench robust` (docs/robustness.md), replayed through the
    default policy: it reproduces every recorded mask (the record is this policy's), and the
    invariants hold at every probe."""
    kinds = run["kinds"]
    pol = MATPolicy(kinds, warmup=run["warmup"], probe_every=run["probe_every"], names=run["names"])
    retired_before = torch.zeros(len(kinds), dtype=torch.bool)
    for step, lam, recorded in zip(run["step"], run["lam"], run["mask"]):
        mask = pol.step(step, torch.tensor(lam, dtype=torch.float64))
        assert mask.tolist() == recorded, f"step {step}: the replay differs from the record"
        if step >= run["warmup"]:
            check_invariants(pol, mask, retired_before, where=f"step {step}")
            retired_before = pol.temporal.retired.cpu().clone()


def test_recorded_histories_exist():
    """The robustness runs' λ histories are part of the docs (docs/results)."""
    runs = _recorded()
    assert runs, f"{RECORDED} is missing or empty"
    assert {r["model"] for r in runs} >= {"bert", "gpt2", "roberta", "vit"}


# ------------------------------------------------------------------- like with like across depth

def test_layer_key_reads_the_module_list_index():
    assert layer_key("bert.encoder.layer.1.attention.head2") == "bert.encoder.layer.1"
    assert layer_key("transformer.h.0.mlp") == "transformer.h.0"
    assert layer_key("model.layers.3.mlp.experts.5") == "model.layers.3"
    assert layer_key("encoder.layers.0.ffn") != layer_key("decoder.layers.0.ffn")
    assert layer_key("vit.embeddings.patch_embeddings.projection") is None
    assert layer_key("head[3]") is None  # the default names carry no layer


@SETTINGS
@given(data=st.data(), mode=st.sampled_from(["all_kinds", "same_kind"]))
def test_relative_to_layer_ignores_a_fixed_scale_per_layer(data, mode):
    """Multiplying every λ of one layer by the same power of two (exact in floating point) at
    every probe changes no decision of a normalised kind: a fixed scale difference between layers
    cannot decide which layer trains."""
    kinds = data.draw(kinds_strategy())
    modular, _ = data.draw(policy_strategy(kinds))
    names = modular.names
    scaled_layer = data.draw(st.sampled_from(sorted({layer_key(n) for n in names}, key=str)))
    factor = 2.0 ** data.draw(st.integers(-12, 12))
    scale = torch.tensor([factor if layer_key(n) == scaled_layer else 1.0 for n in names],
                         dtype=torch.float64)

    def make():
        return ModularPolicy(kinds, mode=modular.mode, alpha=modular.alpha, centre=modular.centre,
                             budget=modular.budget, hysteresis=modular.hysteresis,
                             min_dwell=modular.min_dwell, min_active=modular.min_active,
                             min_active_fraction=modular.min_active_fraction,
                             relative_to_layer=mode, names=names)

    a, b = make(), make()
    covered = torch.tensor([k in a.normalised_kinds for k in kinds])
    seq = data.draw(lambda_sequence(len(kinds)))
    exclude = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(kinds), max_size=len(kinds))))
    for t, lam in enumerate(seq):
        ma, mb = a.update(lam, exclude), b.update(lam * scale, exclude)
        assert torch.equal(ma[covered], mb[covered]), f"probe {t}"


@SETTINGS
@given(data=st.data(), mode=st.sampled_from(["all_kinds", "same_kind"]))
def test_relative_to_layer_without_layers_is_the_plain_score(data, mode):
    """Names without a layer index: relative_to_layer changes no mask."""
    kinds = data.draw(kinds_strategy())
    opts = dict(mode=data.draw(st.sampled_from(["ratio", "budget"])),
                hysteresis=data.draw(st.floats(0.0, 0.6)), min_dwell=data.draw(st.integers(1, 3)))
    a = ModularPolicy(kinds, relative_to_layer=mode, **opts)
    b = ModularPolicy(kinds, relative_to_layer=None, **opts)
    assert a.normalised_kinds == []
    for t, lam in enumerate(data.draw(lambda_sequence(len(kinds)))):
        assert torch.equal(a.update(lam), b.update(lam)), f"probe {t}"


TWO_LAYERS = [f"enc.layer.{l}.{m}" for l in (0, 1) for m in ("ffn", "h0", "h1", "h2", "h3")]
TWO_LAYER_KINDS = ["ffn" if n.endswith("ffn") else "head" for n in TWO_LAYERS]


def test_relative_to_layer_keeps_heads_in_both_layers():
    # Two layers, each 4 heads + 1 FFN; the upper layer's λ is a decade larger (the robustness
    # runs' shape). The plain score keeps only upper-layer modules; over a median of its layer
    # each layer keeps its larger heads.
    lam = torch.tensor([5.0, 1, 2, 3, 4, 50, 10, 20, 30, 40])
    plain = ModularPolicy(TWO_LAYER_KINDS, names=TWO_LAYERS).update(lam)
    assert plain.tolist() == [False] * 5 + [True] * 5
    for mode in ("all_kinds", "same_kind"):
        layered = ModularPolicy(TWO_LAYER_KINDS, names=TWO_LAYERS, relative_to_layer=mode).update(lam)
        assert layered[1:5].tolist() == [False, False, True, True], mode
        assert layered[6:10].tolist() == [False, False, True, True], mode


def test_same_kind_leaves_one_per_layer_kinds_raw():
    # FFN: one per layer, so "same_kind" compares the FFN blocks' raw λ across layers (the larger
    # one trains), where "all_kinds" compares each with its own layer's heads.
    lam = torch.tensor([5.0, 1, 2, 3, 4, 20, 10, 20, 30, 40])  # FFN 5 vs 20; layer medians 3, 20
    same = ModularPolicy(TWO_LAYER_KINDS, names=TWO_LAYERS, relative_to_layer="same_kind")
    assert same.normalised_kinds == ["head"]
    mask = same.update(lam)
    assert (mask[0].item(), mask[5].item()) == (False, True)
    every = ModularPolicy(TWO_LAYER_KINDS, names=TWO_LAYERS, relative_to_layer="all_kinds")
    assert every.normalised_kinds == ["ffn", "head"]
    mask = every.update(lam)  # FFN over its layer's median: 5/3 vs 20/20
    assert (mask[0].item(), mask[5].item()) == (True, False)


def test_relative_to_layer_rejects_unknown_values():
    with pytest.raises(ValueError, match="relative_to_layer must be None, 'all_kinds' or 'same_kind'"):
        ModularPolicy(["head"], relative_to_layer=True)


# ------------------------------------------------------------------- minimum per layer

@SETTINGS
@given(data=st.data())
def test_layer_minimum_holds_with_exclusions(data):
    """Any λ, any exclusion pattern: every (kind, layer) group of ≥ 2 modules keeps
    min(L, its modules not excluded) active; excluded modules are never active; the per-kind
    minimum still holds."""
    kinds = data.draw(kinds_strategy())
    names = data.draw(names_strategy(kinds))
    level = data.draw(st.integers(1, 3))
    pol = ModularPolicy(kinds, names=names, min_active_per_layer=level,
                        mode=data.draw(st.sampled_from(["ratio", "budget"])),
                        min_dwell=data.draw(st.integers(1, 3)),
                        hysteresis=data.draw(st.floats(0.0, 0.6)))
    for t, lam in enumerate(data.draw(lambda_sequence(len(kinds)))):
        exclude = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(kinds),
                                                  max_size=len(kinds))))
        mask = pol.update(lam, exclude=exclude)
        assert not (mask & exclude).any(), f"probe {t}: an excluded module is active"
        check_layer_minimum(pol, mask, exclude, where=f"probe {t}")
        for kind, idx in groups_of(kinds).items():
            need = required_minimum(pol, int((~exclude[idx]).sum()))
            assert int(mask[idx].sum()) >= need, f"probe {t}: kind {kind}"


@SETTINGS
@given(data=st.data())
def test_layer_minimum_only_adds_modules(data):
    """The per-layer minimum never freezes a module the same policy without it keeps, on the
    first decision (later ones differ through the state); and adds none when every group
    already meets it."""
    kinds = data.draw(kinds_strategy())
    names = data.draw(names_strategy(kinds))
    lam = data.draw(lambda_sequence(len(kinds), max_probes=1))[0]
    plain = ModularPolicy(kinds, names=names).update(lam)
    floor = ModularPolicy(kinds, names=names, min_active_per_layer=1).update(lam)
    assert (floor | ~plain).all()
    groups = layer_groups_of(kinds, names)
    if all(plain[idx].any() for idx in groups.values()):
        assert torch.equal(plain, floor)
    for idx in groups.values():  # what was added is the group's top score among the frozen
        added = floor[idx] & ~plain[idx]
        if added.any():
            assert int(added.sum()) == 1
            frozen = [lam[i].item() for i, p in zip(idx, plain[idx].tolist()) if not p]
            assert lam[idx][added].item() == max(frozen)


@SETTINGS
@given(data=st.data())
def test_layer_minimum_without_layers_is_a_no_op(data):
    """Names without a layer index (the default "kind[index]"): the option changes no mask."""
    kinds = data.draw(kinds_strategy())
    a = ModularPolicy(kinds, min_active_per_layer=2)
    b = ModularPolicy(kinds)
    assert a.per_layer_groups == []
    for t, lam in enumerate(data.draw(lambda_sequence(len(kinds)))):
        assert torch.equal(a.update(lam), b.update(lam)), f"probe {t}"


def test_layer_minimum_keeps_a_head_in_each_layer():
    # The robustness runs' shape: upper layer's λ a decade larger. The plain threshold freezes
    # layer 0's heads and FFN; L=1 keeps layer 0's best head (index 4), leaves the FFN kind
    # alone (one FFN block per layer: no group) and changes nothing in layer 1.
    lam = torch.tensor([5.0, 1, 2, 3, 4, 50, 10, 20, 30, 40])
    plain = ModularPolicy(TWO_LAYER_KINDS, names=TWO_LAYERS).update(lam)
    pol = ModularPolicy(TWO_LAYER_KINDS, names=TWO_LAYERS, min_active_per_layer=1)
    assert pol.per_layer_groups == [[1, 2, 3, 4], [6, 7, 8, 9]]
    mask = pol.update(lam)
    assert mask.tolist() == [False, False, False, False, True] + plain[5:].tolist()
    two = ModularPolicy(TWO_LAYER_KINDS, names=TWO_LAYERS, min_active_per_layer=2).update(lam)
    assert two[1:5].tolist() == [False, False, True, True]


def test_layer_minimum_overrides_dwell_and_skips_excluded():
    lam = torch.tensor([5.0, 1, 2, 3, 4, 50, 10, 20, 30, 40])
    pol = ModularPolicy(TWO_LAYER_KINDS, names=TWO_LAYERS, min_active_per_layer=1, min_dwell=5)
    exclude = torch.zeros(10, dtype=torch.bool)
    exclude[4] = True  # layer 0's best head retired: the next best (index 3) is kept
    mask = pol.update(lam, exclude=exclude)
    assert mask[1:5].tolist() == [False, False, True, False]
    exclude[1:5] = True  # all of layer 0's heads retired: the group may be entirely frozen
    mask = pol.update(lam, exclude=exclude)
    assert not mask[1:5].any()


def test_layer_minimum_rejects_bad_values():
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises((ValueError, TypeError)):
            ModularPolicy(["head"], min_active_per_layer=bad)
    with pytest.raises(ValueError, match="min_active_per_layer must be an integer ≥ 0"):
        ModularPolicy(["head"], min_active_per_layer=-1)
