"""MAT policies: which modules train, decided from their mNTK eigenvalues λ.

Pure logic on λ (DESIGN.md, "The MAT policy"): the inputs are λ, a float tensor of shape (M,)
(one principal mNTK eigenvalue per module, on any device), and the outputs are boolean masks of
shape (M,) on the same device. No ops, no other tensors.

Three small classes, each replaceable by the user:

- :class:`ModularPolicy` — per module kind, keeps the modules whose λ passes a dynamic threshold
  (``ratio`` mode) or the top fraction by λ (``budget`` mode), with hysteresis and re-entry counts.
- :class:`TemporalPolicy` — retires modules whose λ has stopped moving and reports converged kinds.
- :class:`MATPolicy` — warm-up, probe schedule, combination of the two, history and state_dict.

Host reads. The arithmetic is device-side tensor code and does not synchronise. A host read
happens only at probe steps, where the policy must decide or log: the λ validity check (one
``bool`` read per call), ``MATPolicy``'s history (one copy of λ and the mask to the CPU per probe,
``record_history=True``), and the ``converged_kinds`` / ``should_stop`` queries. Policies run at
probe steps only, so this costs one synchronisation per probe.

Every constant is a documented default; docs/policy.md gives the table and the evidence for each:
measured on the benchmark suite (mode, α, hysteresis, min_dwell, relative_to_history, the
temporal policy's start; ε and patience replayed on recorded λ) or kept at its reasoned value
(ema_decay; centre, run on one seed only; min_active, min_active_fraction and scale_probes, set
against issue 15's failures and checked off the home benchmark, docs/robustness.md;
relative_to_layer, an option tried there on validation seeds and not made the default).

Invariants (docs/policy.md, tested as properties in tests/test_policy_properties.py): a kind is
never entirely frozen unless all its modules are retired; each kind keeps its minimum of active
modules; retired modules leave the statistics; no module retires before 1 + scale_probes +
patience probes after warm-up, and a collapse cannot set the temporal scale.
"""
from __future__ import annotations

import inspect
import math
from typing import Optional, Sequence

import torch

__all__ = ["Policy", "ModularPolicy", "TemporalPolicy", "MATPolicy", "PolicyScheduleWarning",
           "check_lambda", "layer_key"]

# Internal state is float64 whatever λ's dtype: ratios of λ never overflow or lose ties.
_STATE_DTYPE = torch.float64

_DEFAULT = object()  # MATPolicy(temporal=...) not given: a default TemporalPolicy

# Defaults that guard against starvation (docs/policy.md, "Invariants", gives the reasons).
DEFAULT_MIN_ACTIVE_FRACTION = 0.25  # ModularPolicy: ≥ ceil(25%) of a kind's unretired modules
DEFAULT_SCALE_PROBES = 5  # TemporalPolicy: d_m = median |Δλ| of the first 5 trained intervals


class PolicyScheduleWarning(UserWarning):
    """Warm-up, probe interval and run length leave the policy too few probes to mean anything."""


def _module_names(kinds: Sequence[str], names: Optional[Sequence[str]]) -> list[str]:
    if names is None:
        return [f"{k}[{i}]" for i, k in enumerate(kinds)]
    if len(names) != len(kinds):
        raise ValueError(f"names has {len(names)} entries, kinds has {len(kinds)}; expected equal")
    return list(names)


def _check_int(name: str, value, lowest: int) -> int:
    """value as an int ≥ lowest; a bool, NaN, infinity or fraction raises naming the argument."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) \
        and math.isfinite(value) and int(value) == value and value >= lowest
    if not ok:
        raise ValueError(f"{name} must be an integer ≥ {lowest}, got {value!r}")
    return int(value)


def _kinds_list(kinds: Sequence[str]) -> list[str]:
    if isinstance(kinds, str):
        raise TypeError(f"kinds must be a sequence of str (one per module), got the str {kinds!r}")
    return list(kinds)


def _kind_groups(kinds: Sequence[str]) -> dict[str, list[int]]:
    """Module indices per kind, kinds in order of first appearance."""
    if len(kinds) == 0:
        raise ValueError("kinds is empty; a policy needs at least one module")
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(kinds):
        groups.setdefault(k, []).append(i)
    return groups


def layer_key(name: str) -> Optional[str]:
    """The layer a module belongs to, from its discovery name: the dotted path up to and including
    its first all-digit component (a ``ModuleList`` index), e.g. "bert.encoder.layer.1" for
    "bert.encoder.layer.1.attention.head2", "model.layers.3" for "model.layers.3.mlp.experts.5".
    None when the name has no such component (e.g. a patch-embedding conv, or the default names
    "kind[index]"). Encoder and decoder stacks get different keys ("encoder.layers.0" vs
    "decoder.layers.0")."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def _layer_groups(names: Sequence[str]) -> dict[Optional[str], list[int]]:
    """Module indices per layer key (:func:`layer_key`); modules with no layer share key None."""
    groups: dict[Optional[str], list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(layer_key(n), []).append(i)
    return groups


def _per_layer_groups(groups: dict[str, list[int]], layers: Sequence[Optional[str]]
                      ) -> list[list[int]]:
    """The (kind, layer) module index groups ``min_active_per_layer`` applies to: those with a
    layer (:func:`layer_key` not None) and at least two modules. A kind with one module per
    layer (FFN blocks) or modules of no layer gets none."""
    out = []
    for idx in groups.values():
        by_layer: dict[str, list[int]] = {}
        for i in idx:
            if layers[i] is not None:
                by_layer.setdefault(layers[i], []).append(i)
        out.extend(v for v in by_layer.values() if len(v) >= 2)
    return out


def _normalisation_groups(kinds: Sequence[str], groups: dict[str, list[int]],
                          layers: Sequence[Optional[str]], mode: Optional[str]
                          ) -> tuple[list[list[int]], list[str]]:
    """The module index groups whose median divides their scores under ``relative_to_layer``
    ``mode``, and the kinds they cover. "all_kinds": one group per layer (modules with no layer
    form one group), none when there is a single group (a common divisor changes no decision).
    "same_kind": one group per (kind, layer), for each kind that spans ≥ 2 layers with ≥ 2
    modules in every one of them (heads); other kinds (one FFN block per layer, a kind with
    modules of no layer) get no group and keep their score."""
    if mode is None:
        return [], []
    if mode == "all_kinds":
        by_layer: dict[Optional[str], list[int]] = {}
        for i, layer in enumerate(layers):
            by_layer.setdefault(layer, []).append(i)
        if len(by_layer) < 2:
            return [], []
        return list(by_layer.values()), sorted(set(kinds))
    out, covered = [], []
    for kind, idx in groups.items():
        by_layer = {}
        for i in idx:
            by_layer.setdefault(layers[i], []).append(i)
        if None in by_layer or len(by_layer) < 2 or min(len(v) for v in by_layer.values()) < 2:
            continue
        out.extend(by_layer.values())
        covered.append(kind)
    return out, covered


def _masked_median(s: torch.Tensor, include: torch.Tensor) -> torch.Tensor:
    """Median of s (n,) float64 over include (n,) bool -> () float64 (mean of the two middle
    values for an even count), 0 when nothing is included; no host read."""
    n = include.sum()
    srt = torch.sort(torch.where(include, s, torch.full_like(s, math.inf))).values
    lo = ((n - 1).clamp_min(0) // 2).view(1)
    hi = (n // 2).clamp_max(s.shape[0] - 1).view(1)
    med = 0.5 * (srt.gather(0, lo) + srt.gather(0, hi)).squeeze(0)
    return torch.where(n > 0, med, torch.zeros_like(med))


def check_lambda(lam: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """Validate λ and return it as float64 on its own device.

    lam: (M,) floating tensor, M = len(names). Raises ValueError naming every module whose λ is
    NaN, infinite or negative (λ_max of a PSD Gram is ≥ 0; a negative value is a bug upstream, not
    rounding to hide). This is the policy's one host read per call (``bool(bad.any())``).
    """
    if not isinstance(lam, torch.Tensor):
        raise TypeError(f"λ must be a torch.Tensor, got {type(lam).__name__}")
    if lam.dim() != 1 or lam.shape[0] != len(names):
        raise ValueError(f"λ must have shape ({len(names)},), got {tuple(lam.shape)}")
    if not lam.is_floating_point():
        raise TypeError(f"λ must be a floating tensor, got {lam.dtype}")
    lam = lam.detach().to(_STATE_DTYPE)
    bad = ~torch.isfinite(lam) | (lam < 0)
    if bool(bad.any()):  # host read: the policy must not decide on invalid λ
        idx = bad.nonzero().flatten().tolist()
        values = lam.cpu().tolist()
        listed = ", ".join(f"{names[i]}={values[i]}" for i in idx)
        raise ValueError(f"λ must be finite and ≥ 0; invalid for {len(idx)} module(s): {listed}")
    return lam


class _PerKind:
    """Module kinds (M,), their index groups and module names, shared by the policies."""

    def __init__(self, kinds: Sequence[str], names: Optional[Sequence[str]] = None):
        self.kinds = _kinds_list(kinds)
        self.groups = _kind_groups(self.kinds)
        self.names = _module_names(self.kinds, names)

    @property
    def num_modules(self) -> int:
        return len(self.kinds)


class Policy(_PerKind):
    """Base class of a module-selection policy: λ (M,) in, active mask (M,) bool out.

    Subclass and implement :meth:`update`; override :meth:`state_dict` / :meth:`load_state_dict`
    when the policy keeps state. :class:`MATPolicy` accepts any such object as its ``modular``
    policy. ``self.kinds`` (list of M str), ``self.groups`` ({kind: [module indices]}) and
    ``self.names`` are set by this constructor.
    """

    def update(self, lam: torch.Tensor, exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decide at one probe. lam: (M,) float; exclude: (M,) bool or None, modules that must be
        inactive (e.g. retired). Returns the active mask, (M,) bool on lam's device.

        A policy may also accept ``hold`` ((M,) bool or None): modules whose λ could not be
        measured at this probe (their entry of lam is a stand-in, their last valid λ); they must
        keep their state. :class:`MATPolicy` passes it when the signature has it, and otherwise
        keeps those modules' previous mask entries itself."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")


class ModularPolicy(Policy):
    """Per-kind dynamic threshold on λ, with hysteresis and re-entry (DESIGN "Modular policy").

    Modules are compared only with modules of the same kind (``kinds[m]``, e.g. "head", "ffn").

    Score. ``relative_to_history`` picks what is compared ("like with like"):
      - ``None`` (default): s_m = λ_m, the paper's criterion.
      - ``"warmup"``: s_m = λ_m / λ_m(ref), ref = λ at the first call (the end of warm-up): each
        module's growth since warm-up, which removes fixed per-module scale differences (e.g.
        layers with naturally larger λ).
      - ``"ema"``: s_m = λ_m / EMA of the module's past λ (decay ``ema_decay``): its recent trend.
        A frozen module's λ stays put (s≈1) and so does a trained module's that stopped growing,
        so they compete on equal terms: this counters self-reinforcing selection.
      A zero reference (λ_m(ref) = 0) is replaced by the largest reference of the module's kind
      (or 1 when all are zero), so the score stays finite.
    ``relative_to_layer`` (default None: off) then divides scores by a median over the same layer
    (excluded modules left out), to compare like with like across depth: λ differs by about a
    decade between layers of a small model, and a per-kind threshold on raw λ then keeps one
    layer and freezes the other (docs/robustness.md).
      - ``"all_kinds"``: by the median score of the module's layer, every kind of that layer.
      - ``"same_kind"``: by the median score of the module's kind in its layer, for each kind
        with ≥ 2 modules in every one of its (≥ 2) layers, e.g. heads; a kind with one module
        per layer (FFN blocks) keeps its score (``normalised_kinds`` lists the kinds covered).
    A module's layer is read from its name (:func:`layer_key`: the path up to its first
    all-digit component, the index discovery's names carry, e.g. "encoder.layer.1"). Fallback
    when a name has none (a patch embedding; the default names "kind[index]"): "all_kinds" puts
    those modules in one group of their own, "same_kind" leaves their kind unnormalised. With no
    layer index in any name, both give the masks of the plain score.

    Decision per kind (modules of kind k, M_k of them, current active set A):
      - ``mode="ratio"``: c = centre(s) over all modules of the kind (active and frozen), median
        (mean of the two middle values for even M_k) or geometric mean (over s > 0). An active
        module stays active while s ≥ α(1−h)·c; a frozen one re-enters when s ≥ α(1+h)·c
        (h = ``hysteresis``: a band of ±h around τ = α·c). When c = 0 (all scores of the kind
        zero: no signal) the kind's mask is kept unchanged.
      - ``mode="budget"``: exactly K = ceil(ρ·M_k) modules of the kind are active (ρ =
        ``budget``; ceil so a small kind always keeps ≥ 1), fewer only when modules are excluded
        (fewer than K eligible ones are neither excluded nor locked frozen).
        Ranked by s, with active modules' score multiplied by (1+h) (an incumbent advantage
        that is the hysteresis); ties go to the lower module index.
      - ``min_dwell``: a module that switched state must stay ``min_dwell`` probes in its new
        state before switching again (1 = no constraint). In budget mode locked modules keep
        their state and the count stays exactly K.
    Excluded modules (``exclude``, e.g. retired by the temporal policy) are always inactive and
    leave the statistics: the centre, the zero-reference fallback and the ranking are computed
    over the kind's other modules only, so an excluded module's λ changes nobody's decision.

    Minimum per kind (the policy never starves a kind): after the decision above, each kind has
    at least K_min = min(E_k, max(``min_active``, ceil(``min_active_fraction``·E_k))) active
    modules, E_k = its modules not excluded. When fewer passed, the frozen ones with the largest
    score are activated (ties: lower index), overriding ``min_dwell``. So a kind is entirely
    frozen only when all its modules are excluded (retired).

    Minimum per layer (``min_active_per_layer`` = L, default 0: off). Then, within each
    (kind, layer) group with at least two modules (layer from the name, :func:`layer_key`), at
    least min(L, E_g) modules are active, E_g = the group's modules not excluded: when fewer
    are, the group's frozen ones with the largest score are activated (ties: lower index),
    overriding ``min_dwell``. This stops the per-kind threshold from freezing a whole layer's
    heads when λ differs by a decade between layers (docs/robustness.md). It only adds modules,
    so the per-kind minimum still holds; in budget mode a kind may then have more than K active.
    No-op when no name carries a layer index (the default names "kind[index]"), and for kinds
    with one module per layer.

    Staleness bound (``max_frozen_probes`` = F, default 0: off). A module that is not excluded
    and has been frozen for F probe intervals is activated at the next decision, overriding the
    rule above and ``min_dwell`` (it may be frozen again one probe later). So no module stays
    frozen for more than F consecutive intervals unless it is excluded (retired) or held. Why:
    with the ratio rule λ's ranking can settle, and then the same modules stay frozen for the
    rest of the run; at convergence that is a smaller model (docs/heldout.md, converged mlm).
    It only adds modules (like the per-layer minimum), so in budget mode a kind may then have
    more than K active.

    A frozen module that becomes active again is a re-entry; ``reentries`` counts them per module.

    Args:
        kinds: kind of each module, length M.
        mode: "ratio" or "budget".
        alpha: α, threshold factor of ratio mode (default 1.0: at least the kind's centre).
        centre: "median" (default) or "geomean". Not the mean: one fast-growing module drags a
            mean up and freezes all but the top two or three (DESIGN).
        budget: ρ in (0, 1], fraction kept per kind in budget mode (default 0.5).
        hysteresis: h in [0, 1), half-width of the band around the threshold (default 0.1).
        min_dwell: probes a module stays in a state after switching (default 1 = no constraint).
        relative_to_history: None, "warmup" or "ema" (see Score).
        ema_decay: β in [0, 1) of the EMA reference (default 0.9, about 10 probes of memory).
        min_active: the fewest active modules per kind, integer ≥ 1 (default 1; capped at the
            kind's modules not excluded).
        min_active_fraction: f in [0, 1], the fewest active modules per kind as a fraction of
            its modules not excluded, rounded up (default 0.25; see "Minimum per kind").
        relative_to_layer: None (default), "all_kinds" or "same_kind" (see Score).
        min_active_per_layer: L, integer ≥ 0, the fewest active modules per (kind, layer) group
            of ≥ 2 modules (default 0: off; see "Minimum per layer").
        max_frozen_probes: F, integer ≥ 0, the most consecutive probe intervals a module that
            is not excluded stays frozen (default 0: off; see "Staleness bound").
        names: module names for error messages and, with ``relative_to_layer``, the layer of
            each module (default "kind[index]": no layer).
    """

    def __init__(
        self,
        kinds: Sequence[str],
        mode: str = "ratio",
        alpha: float = 1.0,
        centre: str = "median",
        budget: float = 0.5,
        hysteresis: float = 0.1,
        min_dwell: int = 1,
        relative_to_history: Optional[str] = None,
        ema_decay: float = 0.9,
        min_active: int = 1,
        min_active_fraction: float = DEFAULT_MIN_ACTIVE_FRACTION,
        relative_to_layer: Optional[str] = None,
        min_active_per_layer: int = 0,
        max_frozen_probes: int = 0,
        names: Optional[Sequence[str]] = None,
    ):
        super().__init__(kinds, names)
        if mode not in ("ratio", "budget"):
            raise ValueError(f"mode must be 'ratio' or 'budget', got {mode!r}")
        if centre not in ("median", "geomean"):
            raise ValueError(f"centre must be 'median' or 'geomean', got {centre!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not 0 < budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        if not 0 <= hysteresis < 1:
            raise ValueError(f"hysteresis must be in [0, 1), got {hysteresis}")
        min_dwell = _check_int("min_dwell", min_dwell, 1)
        if relative_to_history not in (None, "warmup", "ema"):
            raise ValueError(f"relative_to_history must be None, 'warmup' or 'ema', got {relative_to_history!r}")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        min_active = _check_int("min_active", min_active, 1)
        if not 0 <= min_active_fraction <= 1:
            raise ValueError(f"min_active_fraction must be in [0, 1], got {min_active_fraction}")
        if relative_to_layer not in (None, "all_kinds", "same_kind"):
            raise ValueError(f"relative_to_layer must be None, 'all_kinds' or 'same_kind', got "
                             f"{relative_to_layer!r}")
        min_active_per_layer = _check_int("min_active_per_layer", min_active_per_layer, 0)
        self.max_frozen_probes = _check_int("max_frozen_probes", max_frozen_probes, 0)
        self.min_active, self.min_active_fraction = int(min_active), float(min_active_fraction)
        self.min_active_per_layer = int(min_active_per_layer)
        self.relative_to_layer = relative_to_layer
        # Layer of each module from its name (layer_key); None = no layer index in the name.
        self.layers = [layer_key(n) for n in self.names]
        self.layer_groups = _layer_groups(self.names)
        # The index groups whose median divides their scores (see Score), and the kinds they cover.
        self.normalised_groups, self.normalised_kinds = _normalisation_groups(
            self.kinds, self.groups, self.layers, relative_to_layer)
        self._layer_indices: dict[str, list[torch.Tensor]] = {}
        # The (kind, layer) groups the per-layer minimum applies to (empty when it is off).
        self.per_layer_groups = (_per_layer_groups(self.groups, self.layers)
                                 if self.min_active_per_layer > 0 else [])
        self._per_layer_indices: dict[str, list[torch.Tensor]] = {}
        self.mode, self.alpha, self.centre = mode, float(alpha), centre
        self.budget, self.hysteresis, self.min_dwell = float(budget), float(hysteresis), int(min_dwell)
        self.relative_to_history, self.ema_decay = relative_to_history, float(ema_decay)
        # State, created on λ's device at the first update.
        self.active: Optional[torch.Tensor] = None  # (M,) bool, the last decision
        self.dwell: Optional[torch.Tensor] = None  # (M,) int64, probes since the last switch
        self.reentries: Optional[torch.Tensor] = None  # (M,) int64, frozen → active switches
        self.reference: Optional[torch.Tensor] = None  # (M,) float64, λ reference of the score
        self.num_updates = 0
        self._indices: dict[str, dict[str, torch.Tensor]] = {}

    def _group_indices(self, device: torch.device) -> dict[str, torch.Tensor]:
        # Index tensors per kind, built once per device (a host-to-device copy per probe is
        # avoidable work on CUDA).
        key = str(device)
        if key not in self._indices:
            self._indices[key] = {k: torch.tensor(v, device=device) for k, v in self.groups.items()}
        return self._indices[key]

    def budget_count(self, kind: str) -> int:
        """K = ceil(ρ·M_k): modules of `kind` kept in budget mode (ρ·M_k rounded to 9 decimals
        first, so 0.3·10 gives 3, not 4)."""
        return max(1, math.ceil(round(self.budget * len(self.groups[kind]), 9)))

    def _init_state(self, lam: torch.Tensor) -> None:
        m, dev = self.num_modules, lam.device
        self.active = torch.ones(m, dtype=torch.bool, device=dev)  # warm-up: everything trained
        self.dwell = torch.full((m,), self.min_dwell, dtype=torch.int64, device=dev)
        self.reentries = torch.zeros(m, dtype=torch.int64, device=dev)
        self.reference = lam.clone() if self.relative_to_history is not None else None

    def score(self, lam: torch.Tensor, include: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(M,) float64 score compared within each kind; lam: (M,) float64 (validated);
        include: (M,) bool, the modules whose references may stand in for a zero reference
        (default all; the excluded ones' never do)."""
        s = self._history_score(lam, include)
        return self._layer_normalise(s, include) if self.relative_to_layer is not None else s

    def _layer_normalise(self, s: torch.Tensor, include: Optional[torch.Tensor]) -> torch.Tensor:
        """s divided by the median score of its normalisation group (its layer, or its kind in
        its layer; modules ``include`` marks, default all): s (M,) float64 -> (M,) float64.
        Modules in no group keep s. A group whose median is 0 is divided by its largest included
        score instead, and left as is when that is 0 too (no signal)."""
        if not self.normalised_groups:
            return s
        inc = torch.ones_like(s, dtype=torch.bool) if include is None else include
        key = str(s.device)
        if key not in self._layer_indices:
            self._layer_indices[key] = [torch.tensor(v, device=s.device)
                                        for v in self.normalised_groups]
        out = s.clone()
        for idx in self._layer_indices[key]:
            sl, il = s[idx], inc[idx]
            med = _masked_median(sl, il)
            top = torch.where(il, sl, torch.zeros_like(sl)).max()
            div = torch.where(med > 0, med, torch.where(top > 0, top, torch.ones_like(top)))
            out[idx] = sl / div
        return out

    def _history_score(self, lam: torch.Tensor, include: Optional[torch.Tensor]) -> torch.Tensor:
        if self.reference is None:
            return lam
        ref = self.reference
        inc = torch.ones_like(ref, dtype=torch.bool) if include is None else include
        safe = ref.clone()
        for idx in self._group_indices(ref.device).values():
            r = torch.where(inc[idx], ref[idx], torch.zeros_like(ref[idx]))
            fallback = torch.where(r.max() > 0, r.max(), torch.ones_like(r.max()))
            safe[idx] = torch.where(ref[idx] > 0, ref[idx], fallback)
        return lam / safe

    def kind_centre(self, s: torch.Tensor, include: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Robust centre of one kind's scores s (M_k,) float64 over the modules ``include``
        (M_k,) bool marks (default all) -> () float64, 0 when none is included; no host read."""
        if include is None:
            include = torch.ones_like(s, dtype=torch.bool)
        if self.centre == "median":
            # Excluded scores sort last; the middle of the first n is the included median.
            return _masked_median(s, include)
        positive = (s > 0) & include
        logs = torch.where(positive, torch.log(torch.where(positive, s, torch.ones_like(s))), torch.zeros_like(s))
        count = positive.sum()
        g = torch.exp(logs.sum() / count.clamp_min(1))
        return torch.where(count > 0, g, torch.zeros_like(g))

    def min_active_count(self, eligible: torch.Tensor) -> torch.Tensor:
        """K_min of one kind: eligible (M_k,) bool -> () int64, min(E, max(min_active,
        ceil(min_active_fraction·E))), E = eligible.sum() (rounded to 9 decimals before the
        ceiling, like budget_count)."""
        e = eligible.sum()
        frac = torch.ceil(torch.round(e.to(_STATE_DTYPE) * self.min_active_fraction, decimals=9))
        return torch.minimum(e, frac.to(torch.int64).clamp_min(self.min_active))

    def _propose(self, s: torch.Tensor, eligible: torch.Tensor, locked: torch.Tensor) -> torch.Tensor:
        """Next mask from scores s (M,), eligible (M,) bool, locked (M,) bool (keep state)."""
        active = self.active
        new = torch.zeros_like(active)
        h = self.hysteresis
        for kind, idx in self._group_indices(s.device).items():
            sk, ak, lk, ek = s[idx], active[idx], locked[idx], eligible[idx]
            if self.mode == "ratio":
                c = self.kind_centre(sk, ek)
                stay = sk >= self.alpha * (1 - h) * c
                enter = sk >= self.alpha * (1 + h) * c
                proposal = torch.where(ak, stay, enter)
                proposal = torch.where(c > 0, proposal, ak)
                chosen = torch.where(lk, ak, proposal) & ek
            else:
                # Scores are ≥ 0, so negative values rank below every unlocked eligible module.
                # Locked active modules rank first, excluded ones next to last and locked frozen
                # ones last. At most K modules are locked active (K were active at the last probe)
                # and at most M_k − K locked frozen, so without exclusions exactly K are chosen
                # and every lock holds; an excluded module that gets chosen is masked off below.
                eff = torch.where(ak, sk * (1 + h), sk)
                eff = torch.where(lk & ak, math.inf, eff)
                eff = torch.where(lk & ~ak, -2.0, eff)
                eff = torch.where(ek, eff, -1.0)
                order = torch.sort(eff, descending=True, stable=True).indices
                chosen = torch.zeros_like(ak)
                chosen[order[: self.budget_count(kind)]] = True
                chosen = chosen & ek
            new[idx] = self._top_up(chosen, sk, ek)
        return self._top_up_layers(new, s, eligible)

    def _top_up_layers(self, new: torch.Tensor, s: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
        """The mask (M,) with the per-layer minimum enforced in each (kind, layer) group of
        ``per_layer_groups``: min(L, eligible in the group) active. No host read."""
        if not self.per_layer_groups:
            return new
        key = str(s.device)
        if key not in self._per_layer_indices:
            self._per_layer_indices[key] = [torch.tensor(v, device=s.device)
                                            for v in self.per_layer_groups]
        out = new.clone()
        for idx in self._per_layer_indices[key]:
            eg = eligible[idx]
            want = torch.minimum(eg.sum(), torch.full_like(eg.sum(), self.min_active_per_layer))
            out[idx] = self._top_up(out[idx] & eg, s[idx], eg, want) | out[idx]
        return out

    def _top_up(self, chosen: torch.Tensor, s: torch.Tensor, eligible: torch.Tensor,
                count: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One group's mask with a minimum enforced: chosen, s, eligible (M_k,) -> (M_k,) bool.
        The eligible frozen modules with the largest scores (ties: lower index) are added until
        ``count`` (() int64; default min_active_count(eligible), the per-kind minimum) are
        active. No host read."""
        target = self.min_active_count(eligible) if count is None else count
        need = (target - chosen.sum()).clamp_min(0)
        candidates = eligible & ~chosen
        key = torch.where(candidates, s, torch.full_like(s, -1.0))  # scores are ≥ 0
        order = torch.sort(key, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.shape[0], device=order.device)
        return chosen | (candidates & (rank < need))

    def update(self, lam: torch.Tensor, exclude: Optional[torch.Tensor] = None,
               hold: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decide at one probe. lam: (M,) float (any float dtype, any device); exclude: (M,) bool
        or None; hold: (M,) bool or None, modules not measured at this probe: they keep their
        state (mask, dwell, EMA reference) and count in their kind's centre with their entry of
        lam (:class:`MATPolicy` passes their last valid λ). Returns the active mask (M,) bool on
        lam's device. One host read (validity)."""
        lam = check_lambda(lam, self.names)
        if self.active is None:
            self._init_state(lam)
        eligible = torch.ones_like(self.active) if exclude is None else ~exclude.to(self.active.device)
        held = torch.zeros_like(self.active) if hold is None else hold.to(self.active.device)
        s = self.score(lam, eligible)
        # dwell: probe intervals spent in the current state, this one included (0 right after a
        # switch, so a module that switched at the last probe has dwell 1 now).
        dwell = torch.where(held, self.dwell, self.dwell + 1)
        locked = (dwell < self.min_dwell) | held
        new = self._propose(s, eligible, locked)
        if self.max_frozen_probes > 0:
            new = new | (~self.active & eligible & ~held & (dwell >= self.max_frozen_probes))
        switched = new != self.active
        self.reentries += (switched & new).to(torch.int64)
        self.dwell = torch.where(switched, torch.zeros_like(dwell), dwell)
        self.active = new
        if self.relative_to_history == "ema":
            ema = self.ema_decay * self.reference + (1 - self.ema_decay) * lam
            self.reference = torch.where(held, self.reference, ema)
        self.num_updates += 1
        return new.clone()

    def state_dict(self) -> dict:
        t = lambda x: None if x is None else x.clone()  # noqa: E731
        return {
            "active": t(self.active),
            "dwell": t(self.dwell),
            "reentries": t(self.reentries),
            "reference": t(self.reference),
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        t = lambda x: None if x is None else x.clone()  # noqa: E731
        self.active, self.dwell = t(state["active"]), t(state["dwell"])
        self.reentries, self.reference = t(state["reentries"]), t(state["reference"])
        self.num_updates = int(state["num_updates"])


class TemporalPolicy(_PerKind):
    """Retires modules whose λ has stopped moving (DESIGN "Temporal policy").

    Scale. A module's scale d_m is the median of |λ_t − λ_{t−1}| over its first
    ``scale_probes`` trained intervals (W; for even W the mean of the two middle values), not its
    first movement alone: λ can collapse by decades between two probes (measured on GPT-2 right
    after warm-up, issue 15), and a scale set by that one movement makes every later movement
    look like zero. The median of W intervals ignores up to ⌈W/2⌉ − 1 such outliers.

    Retirement. Once d_m is set, at each probe t, for a module trained since the previous probe:
        r_m = |λ_t − λ_{t−1}| / d_m
    and the module is retired after ``patience`` consecutive trained intervals with r_m < ε
    (the intervals that set the scale do not count, so no module retires before its
    (W + patience)-th trained interval). Retirement is permanent. Intervals in which the module
    was frozen neither count nor reset anything: a frozen module's λ stays put because it is not
    trained, not because it converged. d_m = 0 (λ exactly constant over most of the W intervals,
    e.g. a dead expert with λ = 0 always): r_m = 0 when λ did not move, ∞ when it did.

    When every module of a kind is retired, that kind has converged (``converged_kinds``);
    ``should_stop`` is True when all kinds have. Both read the device (host sync).

    λ is noisy when each probe uses a different batch; a fixed probe batch makes the ratio
    meaningful, and ``patience`` guards against a single lucky small difference.

    A replacement for :class:`MATPolicy` needs the same ``kinds``, ``update(lam, trained)``,
    ``retired``, ``converged_kinds()``, ``should_stop()``, ``probes_to_retire``,
    ``state_dict()`` and ``load_state_dict()``.

    Args:
        kinds: kind of each module, length M.
        eps: ε, retirement threshold on r_m (default 0.05).
        patience: consecutive trained intervals below ε before retiring (default 2).
        scale_probes: W, trained intervals whose median movement is the scale (default 5).
        names: module names for error messages.
    """

    def __init__(self, kinds: Sequence[str], eps: float = 0.05, patience: int = 2,
                 scale_probes: int = DEFAULT_SCALE_PROBES, names: Optional[Sequence[str]] = None):
        super().__init__(kinds, names)
        if not 0 < eps < math.inf:
            raise ValueError(f"eps must be a finite number > 0, got {eps}")
        patience = _check_int("patience", patience, 1)
        scale_probes = _check_int("scale_probes", scale_probes, 1)
        self.eps, self.patience, self.scale_probes = float(eps), int(patience), int(scale_probes)
        self.previous: Optional[torch.Tensor] = None  # (M,) float64, λ at the last probe
        self.moves: Optional[torch.Tensor] = None  # (M, W) float64, the first W trained |Δλ|
        self.seen: Optional[torch.Tensor] = None  # (M,) int64, trained intervals so far (≤ W)
        self.scale: Optional[torch.Tensor] = None  # (M,) float64, d_m (valid where seen == W)
        self.streak: Optional[torch.Tensor] = None  # (M,) int64, consecutive trained r < ε
        self.retired: Optional[torch.Tensor] = None  # (M,) bool

    @property
    def probes_to_retire(self) -> int:
        """The fewest probes (λ_0 included) before a module can retire: 1 + W + patience."""
        return 1 + self.scale_probes + self.patience

    def update(self, lam: torch.Tensor, trained: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Record one probe. lam: (M,) float; trained: (M,) bool, modules trained since the last
        probe (None = all). Returns retired (M,) bool on lam's device."""
        lam = check_lambda(lam, self.names)
        m, dev = self.num_modules, lam.device
        if self.previous is None:
            self.previous = lam.clone()
            self.moves = torch.zeros(m, self.scale_probes, dtype=_STATE_DTYPE, device=dev)
            self.seen = torch.zeros(m, dtype=torch.int64, device=dev)
            self.scale = torch.zeros(m, dtype=_STATE_DTYPE, device=dev)
            self.streak = torch.zeros(m, dtype=torch.int64, device=dev)
            self.retired = torch.zeros(m, dtype=torch.bool, device=dev)
            return self.retired.clone()
        trained = torch.ones(m, dtype=torch.bool, device=dev) if trained is None else trained.to(dev)
        delta = (lam - self.previous).abs()
        w = self.scale_probes
        had_scale = self.seen >= w
        # Collect: a trained interval before the scale is set fills the module's next slot.
        filling = trained & ~had_scale
        slot = torch.nn.functional.one_hot(self.seen.clamp_max(w - 1), w).bool() & filling[:, None]
        self.moves = torch.where(slot, delta[:, None], self.moves)
        self.seen = self.seen + filling.to(torch.int64)
        srt = torch.sort(self.moves, dim=1).values
        median = 0.5 * (srt[:, (w - 1) // 2] + srt[:, w // 2])
        self.scale = torch.where(self.seen >= w, median, self.scale)
        # Judge: only intervals after the scale was set (not the ones that set it).
        safe = torch.where(self.scale > 0, self.scale, torch.ones_like(self.scale))
        ratio = torch.where(self.scale > 0, delta / safe,
                            torch.where(delta > 0, math.inf, 0.0))
        counted = trained & had_scale
        below = ratio < self.eps
        self.streak = torch.where(counted, torch.where(below, self.streak + 1, 0), self.streak)
        self.retired = self.retired | (self.streak >= self.patience)
        self.previous = lam.clone()
        return self.retired.clone()

    def converged_kinds(self) -> list[str]:
        """Kinds whose modules are all retired (host read)."""
        if self.retired is None:
            return []
        retired = self.retired.cpu().tolist()
        return [k for k, idx in self.groups.items() if all(retired[i] for i in idx)]

    def should_stop(self) -> bool:
        """True when every kind has converged (host read)."""
        return len(self.converged_kinds()) == len(self.groups)

    def state_dict(self) -> dict:
        t = lambda x: None if x is None else x.clone()  # noqa: E731
        return {"previous": t(self.previous), "moves": t(self.moves), "seen": t(self.seen),
                "scale": t(self.scale), "streak": t(self.streak), "retired": t(self.retired)}

    def load_state_dict(self, state: dict) -> None:
        t = lambda x: None if x is None else x.clone()  # noqa: E731
        if "moves" not in state:
            raise ValueError("TemporalPolicy.load_state_dict: the state has no 'moves' (it was "
                             "saved by a version whose scale was the first movement alone); "
                             "it cannot be resumed with the median-of-W scale")
        self.previous, self.moves, self.seen = t(state["previous"]), t(state["moves"]), t(state["seen"])
        self.scale, self.streak, self.retired = t(state["scale"]), t(state["streak"]), t(state["retired"])


class MATPolicy:
    """Warm-up, probe schedule and the combination of the modular and temporal policies.

    Call :meth:`step` at every probe step (``is_probe(step)``) with that probe's λ; it returns the
    mask to use until the next probe: all True during warm-up (``step < warmup``), afterwards
    ``modular.update(λ, exclude=retired)`` with the temporal policy's retired modules excluded.
    The temporal policy sees the probes from the end of warm-up on (λ_0 is the first probe at
    step ≥ warmup; its scale comes from the trained intervals after it): at the first probe λ drops from its initial value by up to four
    decades and then grows back during warm-up (measured on the benchmark's mlm task,
    docs/policy.md), so warm-up intervals would both set a meaningless scale d_m and retire
    modules whose λ sat near 0 for two probes.

    :meth:`schedule_warning` says when warm-up and probe interval (and the run length, when
    known) leave fewer probes after warm-up than :attr:`probes_needed`; ``MAT`` warns at
    construction (:class:`PolicyScheduleWarning`).

    Args:
        kinds: kind of each module, length M.
        modular: a :class:`Policy` (default ``ModularPolicy(kinds)``).
        temporal: a :class:`TemporalPolicy`, or None for no temporal policy (default
            ``TemporalPolicy(kinds)``).
        warmup: steps during which every module trains (default 1000).
        probe_every: steps between probes (default 100); probes fall on multiples of it.
        record_history: keep a CPU copy of λ and the mask per probe for :meth:`report` (one host
            copy per probe; default True).
        names: module names for error messages and the report.
    """

    def __init__(self, kinds: Sequence[str], modular: Optional[Policy] = None,
                 temporal: Optional[TemporalPolicy] | object = _DEFAULT, warmup: int = 1000,
                 probe_every: int = 100, record_history: bool = True,
                 names: Optional[Sequence[str]] = None):
        self.kinds = _kinds_list(kinds)
        self.groups = _kind_groups(self.kinds)
        self.names = _module_names(self.kinds, names)
        warmup = _check_int("warmup", warmup, 0)
        probe_every = _check_int("probe_every", probe_every, 1)
        if modular is not None and not callable(getattr(modular, "update", None)):
            raise TypeError(f"modular must be a Policy (with update(lam, exclude)), got "
                            f"{type(modular).__name__}")
        if temporal is not _DEFAULT and temporal is not None \
                and not isinstance(temporal, TemporalPolicy):
            raise TypeError(f"temporal must be a TemporalPolicy or None, got "
                            f"{type(temporal).__name__}")
        self.modular = ModularPolicy(self.kinds, names=self.names) if modular is None else modular
        self.temporal = TemporalPolicy(self.kinds, names=self.names) if temporal is _DEFAULT else temporal
        for name, p in (("modular", self.modular), ("temporal", self.temporal)):
            if p is not None and list(p.kinds) != self.kinds:
                raise ValueError(f"the {name} policy was built for other kinds than this MATPolicy")
        self.warmup, self.probe_every, self.record_history = int(warmup), int(probe_every), record_history
        self.mask: Optional[torch.Tensor] = None  # (M,) bool, the mask in force
        self.last_step: Optional[int] = None
        self.history: dict[str, list] = {"step": [], "lam": [], "mask": []}
        self._last_valid: Optional[torch.Tensor] = None  # (M,) float64, λ of the last probe, held modules' stand-ins included

    def is_probe(self, step: int) -> bool:
        """Whether `step` is a probe step (a multiple of probe_every)."""
        return step % self.probe_every == 0

    @property
    def probes_needed(self) -> int:
        """Probes after warm-up (the first at step ≥ warmup included) the policy needs to mean
        anything: the temporal policy's ``probes_to_retire`` (λ_0, the W intervals of its scale,
        ``patience`` intervals to retire; 8 by default); 2 without a temporal policy (a decision
        and one chance to revise it)."""
        if self.temporal is None:
            return 2
        return max(2, int(getattr(self.temporal, "probes_to_retire", 2)))

    def probes_after_warmup(self, total_steps: int) -> int:
        """Probe steps in [warmup, total_steps): those at which the policy decides."""
        return MATPolicy._count(self.warmup, self.probe_every, total_steps)

    def schedule_warning(self, total_steps: Optional[int] = None) -> Optional[str]:
        """A message when warm-up, probe interval and run length leave fewer probes after warm-up
        than :attr:`probes_needed`, else None. total_steps: the run's optimizer steps; when None,
        the run is taken to be 5 × warmup (warm-up ≈ 20% of the run, the documented advice), and
        warmup = 0 cannot be judged (None)."""
        if total_steps is not None:
            run, assumed = _check_int("total_steps", total_steps, 1), ""
        elif self.warmup == 0:
            return None
        else:
            run = 5 * self.warmup
            assumed = (f" (a run of 5 × warmup = {run} steps assumed, warm-up ≈ 20% of the run; "
                       "pass total_steps to check the real length)")
        have, need = self.probes_after_warmup(run), self.probes_needed
        if have >= need:
            return None
        fix = "a shorter warm-up or a longer run"
        # need probes span need − 1 intervals inside [warmup, run): every ≤ (run−1−warmup)/(need−1).
        every = next((e for e in range(max(1, (run - 1 - self.warmup) // (need - 1)), 0, -1)
                      if MATPolicy._count(self.warmup, e, run) >= need), None)
        if every is not None:
            fix = f"probe_every ≤ {every}, or {fix}"
        return (f"warmup={self.warmup} and probe_every={self.probe_every} give {have} probe(s) "
                f"after warm-up in {run} steps{assumed}; the policy needs at least {need} "
                f"(the temporal policy's scale and patience, or a decision and a revision) to "
                f"mean anything: use {fix}")

    @staticmethod
    def _count(warmup: int, every: int, total: int) -> int:
        first = -(-warmup // every) * every  # the first multiple of every ≥ warmup
        return 0 if first >= total else (total - 1 - first) // every + 1

    def step(self, step: int, lam: torch.Tensor, hold: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decide at a probe. step: the training step; lam: (M,) float λ of this probe.
        Returns the mask (M,) bool on lam's device, to apply until the next probe.

        hold: optional (M,) bool, modules whose λ is invalid at this probe (NaN/Inf in their
        gradients or Gram: their entries of lam are ignored and may be non-finite). Each keeps
        its state: its mask entry, its modular state (dwell, reference) and its temporal state
        (the interval counts as untrained). Its neighbours see its last valid λ (0 if it never
        had one) in their kind's centre. The history records NaN for it at this probe."""
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"steps must increase: got {step} after {self.last_step}")
        m = len(self.kinds)
        if hold is not None:
            if not (isinstance(hold, torch.Tensor) and hold.dtype == torch.bool
                    and tuple(hold.shape) == (m,)):
                raise ValueError(f"hold must be a ({m},) bool tensor, got {hold!r}")
            hold = hold.to(lam.device) if bool(hold.any()) else None   # host read, at a probe
        if hold is not None:
            last = self._last_valid if self._last_valid is not None \
                else torch.zeros(m, dtype=_STATE_DTYPE, device=lam.device)
            lam = torch.where(hold, last.to(device=lam.device, dtype=lam.dtype), lam)
        lam64 = check_lambda(lam, self.names)
        self._last_valid = lam64.clone()
        trained = self.mask if self.mask is not None else torch.ones(m, dtype=torch.bool, device=lam.device)
        if hold is not None:
            trained = trained & ~hold
        retired = self.temporal.update(lam64, trained) \
            if self.temporal is not None and step >= self.warmup else None
        if step < self.warmup:
            mask = torch.ones(m, dtype=torch.bool, device=lam.device)
        else:
            mask = self._modular_update(lam64, retired, hold)
            if retired is not None:
                mask = mask & ~retired
        self.mask, self.last_step = mask, step
        if self.record_history:
            recorded = lam64 if hold is None else torch.where(hold, math.nan, lam64)
            self.history["step"].append(step)
            self.history["lam"].append(recorded.cpu())
            self.history["mask"].append(mask.cpu())
        return mask.clone()

    def _modular_update(self, lam64, retired, hold) -> torch.Tensor:
        if hold is None:
            return self.modular.update(lam64, exclude=retired)
        if "hold" in inspect.signature(self.modular.update).parameters:
            return self.modular.update(lam64, exclude=retired, hold=hold)
        # A policy without hold support: held modules keep their mask entry (from the last
        # probe; all True before the first decision).
        mask = self.modular.update(lam64, exclude=retired)
        previous = self.mask if self.mask is not None else torch.ones_like(mask)
        mask = torch.where(hold, previous.to(mask.device), mask)
        return mask if retired is None else mask & ~retired

    def converged_kinds(self) -> list[str]:
        """Kinds whose modules are all retired by the temporal policy (host read)."""
        return [] if self.temporal is None else self.temporal.converged_kinds()

    def should_stop(self) -> bool:
        """True when the temporal policy reports every kind converged (host read)."""
        return False if self.temporal is None else self.temporal.should_stop()

    def report(self) -> dict:
        """History for logging and plots (CPU tensors; requires record_history=True).

        Returns {"step": (P,) int64, "lam": (P, M) float64, "mask": (P, M) bool,
        "active_fraction": {kind: (P,) float64}, "reentries": (M,) int64 or None,
        "retired": (M,) bool or None, "converged_kinds": list[str], "names": list[str],
        "kinds": list[str]}, P = number of recorded probes.
        """
        p, m = len(self.history["step"]), len(self.kinds)
        lam = torch.stack(self.history["lam"]) if p else torch.zeros(0, m, dtype=_STATE_DTYPE)
        mask = torch.stack(self.history["mask"]) if p else torch.zeros(0, m, dtype=torch.bool)
        reentries = getattr(self.modular, "reentries", None)
        retired = None if self.temporal is None else self.temporal.retired
        return {
            "step": torch.tensor(self.history["step"], dtype=torch.int64),
            "lam": lam,
            "mask": mask,
            "active_fraction": {k: mask[:, idx].double().mean(dim=1) for k, idx in self.groups.items()},
            "reentries": None if reentries is None else reentries.cpu(),
            "retired": None if retired is None else retired.cpu(),
            "converged_kinds": self.converged_kinds(),
            "names": list(self.names),
            "kinds": list(self.kinds),
        }

    def state_dict(self) -> dict:
        return {
            "modular": self.modular.state_dict(),
            "temporal": None if self.temporal is None else self.temporal.state_dict(),
            "mask": None if self.mask is None else self.mask.clone(),
            "last_step": self.last_step,
            "last_valid": None if self._last_valid is None else self._last_valid.clone(),
            "history": {k: [x.clone() if isinstance(x, torch.Tensor) else x for x in v]
                        for k, v in self.history.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.modular.load_state_dict(state["modular"])
        if (self.temporal is None) != (state["temporal"] is None):
            raise ValueError("state_dict's temporal policy presence differs from this MATPolicy's")
        if self.temporal is not None:
            self.temporal.load_state_dict(state["temporal"])
        self.mask = None if state["mask"] is None else state["mask"].clone()
        self.last_step = state["last_step"]
        last = state.get("last_valid")   # absent in checkpoints from before hold existed
        self._last_valid = None if last is None else last.clone()
        self.history = {k: [x.clone() if isinstance(x, torch.Tensor) else x for x in v]
                        for k, v in state["history"].items()}
