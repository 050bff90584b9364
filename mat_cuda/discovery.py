"""Module discovery: split a model into MAT modules (heads, FFN blocks, experts, conv layers,
embeddings) by its structure, and say what was left shared.

``discover(model)`` walks the module tree once and recognises (see mat_cuda/_structure.py):

- attention blocks with per-head structure, one "head" module per head: separate Q/K/V
  projections (mat_cuda.models, HF BERT/RoBERTa/ViT), a packed [Q; K; V] projection
  (mat_cuda.models packed, HF GPT-2 Conv1D), ``torch.nn.MultiheadAttention``. Head h owns rows
  h·d_h … (h+1)·d_h of each of Q, K, V (or those columns of a GPT-2 Conv1D weight (d, 3d)),
  the matching Q/K/V bias entries, and its input slice of the output projection (columns of an
  nn.Linear weight, rows of a Conv1D weight). The output projection's bias is shared.
- FFN blocks d -> f -> d, one "ffn" module (all weights and biases of its linears);
- experts: a ModuleList named ``*experts`` of FFN blocks, one "expert" module each (the router
  stays shared);
- ``nn.Conv1d/2d/3d`` layers, one "conv" module each; ``nn.Embedding``/``EmbeddingBag``, one
  "embedding" module each.

Everything else is *shared*: unmanaged, trained every step (norms, output-projection biases,
routers, classifier and LM heads, ViT's cls token and position table).

Tied weights (one tensor under several names, e.g. an LM head tied to the word embedding) are
always left shared: their per-sample gradient is the sum over every layer that uses them, so
no single layer's factors give their Gram, and freezing them would freeze every user at once.

Fallback: an attention-looking block that matches no pattern (grouped K/V, unknown names, no
head count) gets one "layer" module per leaf layer inside it, with a warning that names it; a
model in which no attention, FFN, expert or conv structure is found at all gets one "layer"
module per leaf layer (a module with parameters of its own, norms excepted), with a warning.

Parameters with ``requires_grad=False`` are left out of every module (an optimizer does not
hold them) and listed as frozen.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import nn

from ._structure import (is_conv1d_transposed, is_norm, looks_like_attention, match_attention,
                         match_experts, match_ffn)
from .modules import ModuleMap

ALL_KINDS = ("head", "ffn", "expert", "conv", "embedding", "layer")
DEFAULT_KINDS = ("head", "ffn", "expert", "conv", "embedding")
_STRUCTURED_KINDS = ("head", "ffn", "expert", "conv")  # finding none of these = unknown architecture


@dataclass
class AttentionSpec:
    """One attention block split into heads (the contract with mat_cuda/nn's conversion).

    q, k, v: separate projections (nn.Linear), or None. qkv: packed projection (nn.Linear with
    weight (3·H·d_h, d), rows [Q; K; V], or HF GPT-2 Conv1D with weight (d, 3·H·d_h), columns
    [Q; K; V]), or None. Both are None for style "torch_mha", whose projections are raw
    parameters of the nn.MultiheadAttention (see ``params``). o: the output projection.
    head_modules[h]: the ModuleMap id of head h.

    style: "mat_bert" (mat_cuda.models), "hf_bert" (HF BERT/RoBERTa: block.self.{query,key,
    value}, block.output.dense), "hf_vit" (HF ViT), "hf_gpt2" (c_attn/c_proj Conv1D),
    "torch_mha", "separate_linear" / "packed_linear" (other models with the same layouts). The
    layouts below, not the style, say which slices belong to which head.

    qkv_axis: the weight axis of q/k/v/qkv (or of the MHA in-projection) split by heads:
    "rows" (nn.Linear, MHA) or "cols" (Conv1D). o_axis: the axis of o's weight split by heads:
    "cols" (nn.Linear) or "rows" (Conv1D). params: the projection tensors by role ("q.weight",
    "q.bias", ..., "qkv.weight", "qkv.bias", "o.weight", "o.bias"; for torch_mha
    "in_proj_weight", "in_proj_bias" or "q_proj_weight", "k_proj_weight", "v_proj_weight"),
    only those that exist.
    """

    path: str
    block: nn.Module
    num_heads: int
    head_dim: int
    q: Optional[nn.Module]
    k: Optional[nn.Module]
    v: Optional[nn.Module]
    qkv: Optional[nn.Module]
    o: nn.Module
    head_modules: list[int]
    style: str
    qkv_axis: str = "rows"
    o_axis: str = "cols"
    params: dict = field(default_factory=dict)


@dataclass
class FFNSpec:
    """One FFN block (or expert): a single module owning all weights and biases of ``linears``
    (input projection(s) first, output projection last). path: the block's dotted path (for a
    pattern that matches on a whole transformer layer, the layer's path). kind: "ffn" or
    "expert"."""

    path: str
    block: nn.Module
    linears: list[nn.Module]
    module: int
    kind: str = "ffn"


@dataclass
class Discovery:
    """The result of :func:`discover` (or :meth:`from_module_map`).

    module_map: the ModuleMap (validated). attentions, ffns: the recognised blocks that became
    modules. others: dotted path -> module id for conv layers, embeddings and fallback leaf
    layers. shared: names of the trainable parameters no module owns (always trained).
    tied: name groups of tied tensors (left shared). frozen: names of parameters with
    requires_grad=False (left out). unsplit: paths of blocks that were not recognised and fell
    back to one module per leaf layer. module_numel[m]: parameter elements of module m.
    """

    module_map: ModuleMap
    attentions: list[AttentionSpec]
    ffns: list[FFNSpec]
    others: dict[str, int]
    shared: list[str]
    tied: list[list[str]] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    unsplit: list[str] = field(default_factory=list)
    module_numel: list[int] = field(default_factory=list)
    shared_numel: int = 0
    model_name: str = ""
    model: Optional[nn.Module] = None

    def summary(self) -> str:
        """Modules per kind with their parameter counts, parameters covered, and what is shared."""
        mm = self.module_map
        module_numel = self.module_numel
        if len(module_numel) != mm.num_modules:  # built by hand: count from the map
            module_numel = _numel_per_module(mm, mm.params())[0]
        covered = sum(module_numel)
        total = covered + self.shared_numel
        pct = 100.0 * covered / total if total else 0.0
        lines = [f"MAT modules of {self.model_name or 'model'}: {mm.num_modules} modules cover "
                 f"{covered:,} of {total:,} trainable parameters ({pct:.1f}%)"]
        lines.append(f"  {'kind':<10} {'modules':>7} {'parameters':>12}")
        kinds = mm.kinds
        for kind in ALL_KINDS + tuple(sorted(set(kinds) - set(ALL_KINDS))):
            ids = [m for m, k in enumerate(kinds) if k == kind]
            if ids:
                numel = sum(module_numel[m] for m in ids)
                lines.append(f"  {kind:<10} {len(ids):>7} {numel:>12,}")
        lines.append(f"  shared (always trained): {self.shared_numel:,} parameters in "
                     f"{len(self.shared)} tensors{_preview(self.shared)}")
        if self.tied:
            lines.append("  tied (left shared): " + "; ".join(" = ".join(g) for g in self.tied))
        if self.frozen:
            lines.append(f"  frozen (requires_grad=False, left out): {len(self.frozen)} tensors"
                         f"{_preview(self.frozen)}")
        if self.unsplit:
            lines.append("  not split (one module per leaf layer): " + ", ".join(self.unsplit))
        return "\n".join(lines)

    @classmethod
    def from_module_map(cls, model: nn.Module, module_map: ModuleMap) -> "Discovery":
        """Describe an explicit, user-built ModuleMap of ``model`` (no attention/FFN specs).

        Validates the map against the model's trainable parameters and counts what it covers.
        """
        model = unwrap_model(model)
        named = _named_trainable(model)
        module_map.validate([p for _, p in named])
        numel, shared_numel = _numel_per_module(module_map, [p for _, p in named])
        shared = [n for n, p in named if module_map.layout(p) is None]
        return cls(module_map, [], [], {}, shared, module_numel=numel, shared_numel=shared_numel,
                   frozen=[n for n, p in model.named_parameters() if not p.requires_grad],
                   model_name=type(model).__name__, model=model)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DataParallel / DistributedDataParallel (``.module``) and
    torch.compile's OptimizedModule (``._orig_mod``), however nested."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def discover(model: nn.Module, kinds: Iterable[str] = DEFAULT_KINDS, *, verbose: bool = False) -> Discovery:
    """Split ``model`` into MAT modules by its structure.

    model: any nn.Module, possibly wrapped in DataParallel/DDP or torch.compile (unwrapped;
    parameter names are those of the inner model). kinds: the kinds that become modules, among
    "head", "ffn", "expert", "conv", "embedding", "layer"; structures of other kinds are left
    shared. "layer" makes every leftover leaf layer with parameters (norms excepted) a module of
    its own. The fallback of an unknown architecture makes "layer" modules whatever ``kinds``
    says, and warns (UserWarning) naming what it could not split. verbose: print the summary.

    Returns a :class:`Discovery` whose module_map has passed ``validate``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"discover: model must be an nn.Module, got {type(model).__name__}")
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in ALL_KINDS]
    if bad:
        raise ValueError(f"discover: unknown module kind(s) {bad}; expected some of {list(ALL_KINDS)}")
    model = unwrap_model(model)
    walk = _Walk(model)
    units = list(walk.units)
    unsplit = walk.unsplit_blocks()
    fallback: list[_Unit] = []
    if unsplit:
        for path, _ in unsplit:
            fallback += walk.leaf_units(under=path)
        warnings.warn(
            "mat_cuda.discover: could not split " + ", ".join(f"'{p}' ({type(m).__name__})" for p, m in unsplit)
            + " into heads (no recognised Q/K/V and output projections of equal width with a head "
            "count); falling back to one module per leaf layer: " + _paths(fallback), stacklevel=2)
    if not any(u.kind in _STRUCTURED_KINDS for u in units):
        fallback = walk.leaf_units()
        if fallback:
            warnings.warn(
                f"mat_cuda.discover: found no attention heads, FFN blocks, experts or conv layers in "
                f"{type(model).__name__}; falling back to one module per leaf layer: {_paths(fallback)}",
                stacklevel=2)
    for u in fallback:
        u.forced = True
    units += fallback
    if "layer" in kinds:
        units += walk.leaf_units()
    result = _materialise(model, units, kinds)
    result.unsplit = [p for p, _ in unsplit]
    if verbose:
        print(result.summary())
    return result


def resolve_modules(model: nn.Module, modules="auto", kinds: Iterable[str] = DEFAULT_KINDS) -> Discovery:
    """The MAT controller's ``modules=`` argument as a Discovery: "auto" runs :func:`discover`
    (with ``kinds``), a ModuleMap is described by :meth:`Discovery.from_module_map`."""
    if isinstance(modules, str) and modules == "auto":
        return discover(model, kinds)
    if isinstance(modules, ModuleMap):
        return Discovery.from_module_map(model, modules)
    raise TypeError(f"modules must be 'auto' or a ModuleMap, got {modules!r}")


# ---------------------------------------------------------------------------------------------
# Planning: the walk produces units (one recognised structure, one or more modules), then
# _materialise turns the units of the requested kinds into ModuleMap modules.

@dataclass
class _TensorPlan:
    param: torch.Tensor
    layout: str                # "whole", "rows" or "cols"
    group_size: int = 0
    groups: tuple = ()         # local module index of each group (rows/cols)


@dataclass
class _Unit:
    kind: str
    path: str
    names: list[str]           # one per module of the unit
    tensors: list[_TensorPlan]
    spec: object = None        # AttentionSpec / FFNSpec, or None (others)
    forced: bool = False       # fallback unit: made whatever `kinds` says


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _related(a: str, b: str) -> bool:
    """a == b, or one is inside the other ("" is the root)."""
    return a == b or not a or not b or a.startswith(b + ".") or b.startswith(a + ".")


class _Walk:
    """One pre-order pass over the module tree; claims projection layers as it matches them."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.units: list[_Unit] = []
        self.claimed: set[int] = set()    # ids of modules owned by a recognised structure
        self.attention_paths: list[str] = []
        self.attention_like: list[tuple[str, nn.Module]] = []
        self._seen: set[int] = set()
        self._visit("", "", model)

    def _visit(self, path: str, name: str, m: nn.Module) -> None:
        if id(m) in self._seen or id(m) in self.claimed:
            return
        self._seen.add(id(m))
        att = match_attention(m, self.claimed)
        if att is not None:
            self.units.append(_attention_unit(path, m, att))
            self.attention_paths.append(path)
            self.claimed.update(id(x) for x in att.parts.values())
            if isinstance(m, nn.MultiheadAttention):
                self.claimed.add(id(m))
                return
        experts = match_experts(name, m, self.claimed)
        if experts is not None:
            for (child_name, child), ffn in zip(m.named_children(), experts):
                self.units.append(_ffn_unit(_join(path, child_name), child, ffn.linears, "expert"))
                self.claimed.add(id(child))
                self.claimed.update(id(x) for x in ffn.linears)
        ffn = match_ffn(m, self.claimed)
        if ffn is not None:
            self.units.append(_ffn_unit(path, m, ffn.linears, "ffn", ffn.layer_level))
            self.claimed.update(id(x) for x in ffn.linears)
        if isinstance(m, nn.modules.conv._ConvNd):
            self.units.append(_single_unit("conv", path, m))
            self.claimed.add(id(m))
            return
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            self.units.append(_single_unit("embedding", path, m))
            self.claimed.add(id(m))
            return
        if att is None and looks_like_attention(m):
            self.attention_like.append((path, m))
        for child_name, child in m.named_children():
            self._visit(_join(path, child_name), child_name, child)

    def unsplit_blocks(self) -> list[tuple[str, nn.Module]]:
        """Attention-looking blocks with no recognised attention inside, around or at them
        (outermost only: a block inside an unsplit block is covered by it)."""
        unsplit = [(p, m) for p, m in self.attention_like
                   if not any(_related(p, a) for a in self.attention_paths)]
        return [(p, m) for p, m in unsplit
                if not any(q != p and (not q or p.startswith(q + ".")) for q, _ in unsplit)]

    def leaf_units(self, under: Optional[str] = None) -> list[_Unit]:
        """One "layer" unit per unclaimed module with parameters of its own (norms excepted),
        optionally only inside the block at path ``under``."""
        units, seen = [], set()
        for path, m in self.model.named_modules():
            if under is not None and not (path == under or path.startswith(under + ".") or not under):
                continue
            if id(m) in seen or self._inside_claimed(path) or is_norm(m):
                continue
            seen.add(id(m))
            own = [p for p in m.parameters(recurse=False)]
            if own:
                units.append(_Unit("layer", path, [path or type(m).__name__],
                                   [_TensorPlan(p, "whole", groups=(0,)) for p in own]))
        return units

    def _inside_claimed(self, path: str) -> bool:
        m = self.model
        if id(m) in self.claimed:
            return True
        for part in path.split(".") if path else []:
            m = m._modules[part]
            if id(m) in self.claimed:
                return True
        return False


def _attention_unit(path: str, block: nn.Module, att) -> _Unit:
    H, dh = att.num_heads, att.head_dim
    heads = tuple(range(H))
    tensors, params = [], {}

    def add(role, t, layout, groups):
        if t is None:
            return
        params[role] = t
        tensors.append(_TensorPlan(t, layout, dh, groups))

    qkv_axis = "rows"
    if att.style == "torch_mha":
        if block._qkv_same_embed_dim:
            add("in_proj_weight", block.in_proj_weight, "rows", heads * 3)
        else:
            for role in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                add(role, getattr(block, role), "rows", heads)
        add("in_proj_bias", block.in_proj_bias, "rows", heads * 3)
    elif att.qkv is not None:
        qkv_axis = "cols" if is_conv1d_transposed(att.qkv) else "rows"
        add("qkv.weight", att.qkv.weight, qkv_axis, heads * 3)
        add("qkv.bias", att.qkv.bias, "rows", heads * 3)
    else:
        for role, lin in (("q", att.q), ("k", att.k), ("v", att.v)):
            add(f"{role}.weight", lin.weight, "rows", heads)
            add(f"{role}.bias", lin.bias, "rows", heads)
    o_axis = "rows" if is_conv1d_transposed(att.o) else "cols"
    add("o.weight", att.o.weight, o_axis, heads)
    if att.o.bias is not None:
        params["o.bias"] = att.o.bias  # shared: it is added once, after the heads are summed
    spec = AttentionSpec(path, block, H, dh, att.q, att.k, att.v, att.qkv, att.o, [], att.style,
                         qkv_axis=qkv_axis, o_axis=o_axis, params=params)
    return _Unit("head", path, [_join(path, f"head{h}") for h in range(H)], tensors, spec)


def _ffn_unit(path: str, block: nn.Module, linears: list, kind: str, layer_level: bool = False) -> _Unit:
    tensors = [_TensorPlan(p, "whole", groups=(0,)) for lin in linears for p in lin.parameters(recurse=False)]
    name = _join(path, "ffn") if layer_level else path
    return _Unit(kind, path, [name], tensors, FFNSpec(path, block, list(linears), -1, kind))


def _single_unit(kind: str, path: str, m: nn.Module) -> _Unit:
    return _Unit(kind, path, [path or type(m).__name__],
                 [_TensorPlan(p, "whole", groups=(0,)) for p in m.parameters(recurse=False)])


def _named_trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _materialise(model: nn.Module, units: list[_Unit], kinds: tuple) -> Discovery:
    names_of: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(n)
    tied_ids = {i for i, ns in names_of.items() if len(ns) > 1}
    mm = ModuleMap()
    attentions, ffns, others = [], [], {}
    for u in units:
        if u.kind not in kinds and not u.forced:
            continue
        keep = [t for t in u.tensors if t.param.requires_grad and id(t.param) not in tied_ids
                and mm.layout(t.param) is None]
        covered = sorted({g for t in keep for g in t.groups})
        if not covered:
            continue
        ids = {local: mm.add_module(u.names[local], u.kind) for local in covered}
        for t in keep:
            label = names_of[id(t.param)][0]
            if t.layout == "whole":
                mm.assign_whole(t.param, ids[t.groups[0]], name=label)
                continue
            groups = [ids[g] for g in t.groups]
            if t.layout == "rows":
                mm.assign_row_groups(t.param, t.group_size, groups, name=label)
            else:
                mm.assign_col_groups(t.param, t.group_size, groups, name=label)
        if isinstance(u.spec, AttentionSpec):
            u.spec.head_modules = [ids.get(h, -1) for h in range(u.spec.num_heads)]
            attentions.append(u.spec)
        elif isinstance(u.spec, FFNSpec):
            u.spec.module = ids[0]
            ffns.append(u.spec)
        else:
            others[u.path] = ids[0]
    named = _named_trainable(model)
    mm.validate([p for _, p in named])
    shared = [n for n, p in named if mm.layout(p) is None]
    numel, shared_numel = _numel_per_module(mm, [p for _, p in named])
    return Discovery(mm, attentions, ffns, others, shared,
                     tied=[names_of[i] for i in names_of if i in tied_ids],
                     frozen=[n for n, p in model.named_parameters() if not p.requires_grad],
                     module_numel=numel, shared_numel=shared_numel,
                     model_name=type(model).__name__, model=model)


def _numel_per_module(mm: ModuleMap, params: list) -> tuple[list[int], int]:
    """Parameter elements of each module of ``mm`` among ``params``, and the unmanaged rest."""
    numel, unmanaged = [0] * mm.num_modules, 0
    for p in params:
        lay = mm.layout(p)
        if lay is None:
            unmanaged += p.numel()
        elif lay.kind == "whole":
            numel[lay.module] += p.numel()
        elif lay.group_module:
            per_group = p.numel() // len(lay.group_module)
            for m in lay.group_module:
                if m >= 0:
                    numel[m] += per_group
                else:
                    unmanaged += per_group
    return numel, unmanaged


def _paths(units: list[_Unit]) -> str:
    return ", ".join(f"'{u.path or u.names[0]}'" for u in units)


def _preview(names: list[str], limit: int = 6) -> str:
    if not names:
        return ""
    more = f", ... and {len(names) - limit} more" if len(names) > limit else ""
    return ": " + ", ".join(names[:limit]) + more
