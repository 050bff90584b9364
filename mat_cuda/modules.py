"""ModuleMap: which elements of which parameters form each MAT module.

A *module* is a set of parameter elements that MAT trains or freezes together (an attention
head, an FFN block, a whole layer). A parameter is mapped in one of three layouts:

- ``whole``: the whole tensor belongs to one module;
- ``rows``: dim 0 is split into equal groups of ``group_size`` rows and a table says which module
  owns each group (a packed QKV weight of shape (3·H·d_h, d) with ``group_size = d_h`` maps the
  rows of head h in the Q, K and V blocks to module h); 1-D parameters (biases) use this too;
- ``cols``: the last dim is split likewise (an output projection W_O of shape (d, H·d_h) maps
  the columns of head h to module h).

A group may map to ``-1``: unmanaged. Parameters (or groups) that no module owns are
*unmanaged*: an optimizer updates them every step, like plain torch.

Parameters are identified by object identity; the map holds a reference to each. This file is
pure bookkeeping plus the small integer tables the fused optimizer kernels read on the device
(see :meth:`ModuleMap.kernel_tables`); no policy and no kernels live here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

# Codes of the per-tensor layout table read by the kernels (csrc/optim/masked_step.h).
LAYOUT_WHOLE = 0
LAYOUT_ROWS = 1
LAYOUT_COLS = 2


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter's elements map to modules.

    kind: "whole", "rows" or "cols". module: the owning module (whole only, else None).
    group_size: rows (cols) per group (rows/cols only, else 0). group_module: the module of each
    group, -1 = unmanaged (rows/cols only, else ()). name: a label used in error messages.
    """

    kind: str
    module: int | None
    group_size: int
    group_module: tuple[int, ...]
    name: str

    def modules(self) -> set[int]:
        """The module ids this layout touches (without -1)."""
        if self.kind == "whole":
            return {self.module}
        return {m for m in self.group_module if m >= 0}


class ModuleMap:
    """A partition of (some of) a model's parameter elements into modules.

    Build it with :meth:`add_module` and the ``assign_*`` methods, or take the simplest one,
    :meth:`per_parameter` (each parameter tensor one module). :meth:`validate` checks it against
    the parameters an optimizer holds.
    """

    def __init__(self):
        self._names: list[str] = []
        self._kinds: list[str] = []
        # id(param) -> (param, layout); insertion order is assignment order.
        self._layouts: dict[int, tuple[torch.Tensor, ParamLayout]] = {}
        self._group_table_cache: dict[torch.device, tuple[torch.Tensor, dict[int, int]]] = {}
        self._layout_table_cache: dict[tuple, torch.Tensor] = {}

    # ---- building ----
    def add_module(self, name: str, kind: str = "param") -> int:
        """Register a module named ``name`` of ``kind`` (heads are compared with heads, FFNs with
        FFNs by the policy). Returns its id, 0 .. num_modules - 1 in order of creation."""
        for arg, value in (("name", name), ("kind", kind)):
            if not isinstance(value, str):
                raise TypeError(f"ModuleMap.add_module: {arg} must be a str, got "
                                f"{type(value).__name__}")
        self._names.append(str(name))
        self._kinds.append(str(kind))
        self._invalidate()
        return len(self._names) - 1

    def assign_whole(self, param: torch.Tensor, module: int, name: str | None = None) -> None:
        """Map every element of ``param`` to ``module``."""
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"ModuleMap: {name or 'param'} must be a tensor, got "
                            f"{type(param).__name__}")
        module = int(module)
        self._check_module_id(module, name or "param", allow_unmanaged=False)
        self._put(param, ParamLayout("whole", module, 0, (), self._label(param, name)))

    def assign_row_groups(self, param: torch.Tensor, group_size: int,
                          group_module: Sequence[int], name: str | None = None) -> None:
        """Split dim 0 of ``param`` into groups of ``group_size`` rows; group g belongs to module
        ``group_module[g]`` (-1: unmanaged, always trained). 1-D parameters (biases) use this."""
        label = self._label(param, name)
        if param.dim() < 1:
            raise ValueError(f"ModuleMap: {label} is a 0-d tensor; row groups need dim >= 1")
        self._put(param, self._grouped("rows", param.shape[0], group_size, group_module, label))

    def assign_col_groups(self, param: torch.Tensor, group_size: int,
                          group_module: Sequence[int], name: str | None = None) -> None:
        """Split the last dim of ``param`` into groups of ``group_size`` columns; group g belongs
        to module ``group_module[g]`` (-1: unmanaged, always trained)."""
        label = self._label(param, name)
        if param.dim() < 1:
            raise ValueError(f"ModuleMap: {label} is a 0-d tensor; column groups need dim >= 1")
        self._put(param, self._grouped("cols", param.shape[-1], group_size, group_module, label))

    @classmethod
    def per_parameter(cls, model_or_params) -> "ModuleMap":
        """One module (kind "param") per parameter tensor: the default of the masked optimizers.

        ``model_or_params``: an ``nn.Module`` (modules named by parameter name), an iterable of
        tensors, or an iterable of optimizer param-group dicts (named by their ``param_names``
        when the optimizer was given named parameters, else ``param<i>``). Tensors that appear
        twice (tied weights) get one module.
        """
        mm = cls()
        for name, p in _named_params(model_or_params):
            if id(p) in mm._layouts:
                continue
            mm.assign_whole(p, mm.add_module(name, "param"), name=name)
        return mm

    # ---- queries ----
    @property
    def num_modules(self) -> int:
        return len(self._names)

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def kinds(self) -> list[str]:
        return list(self._kinds)

    def layout(self, param: torch.Tensor) -> ParamLayout | None:
        """The layout of ``param``, or None when it is unmanaged."""
        entry = self._layouts.get(id(param))
        return entry[1] if entry is not None and entry[0] is param else None

    def params(self) -> list[torch.Tensor]:
        """The mapped parameters, in assignment order."""
        return [p for p, _ in self._layouts.values()]

    def modules_of_kind(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self._kinds) if k == kind]

    def validate(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Raise ValueError naming the problem when the map is inconsistent.

        Checks each layout against its parameter's current shape (group size dividing the dim,
        one module per group, ids in range), that every module covers at least one element
        slot, and, with ``params``, that every mapped parameter is among them.
        """
        owners: dict[int, list[str]] = {m: [] for m in range(self.num_modules)}
        for p, lay in self._layouts.values():
            self._check_layout_fits(p, lay)
            for m in lay.modules():
                self._check_module_id(m, lay.name, allow_unmanaged=False)
                owners[m].append(lay.name)
        empty = [self._names[m] for m, who in owners.items() if not who]
        if empty:
            raise ValueError(f"ModuleMap: module(s) {empty} cover no parameter element")
        if params is not None:
            given = {id(p) for p in params}
            missing = [lay.name for p, lay in self._layouts.values() if id(p) not in given]
            if missing:
                raise ValueError(f"ModuleMap: parameter(s) {missing} are mapped but are not among "
                                 "the optimizer's parameters")

    # ---- device tables for the kernels ----
    def kernel_tables(self, params: Sequence[torch.Tensor],
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The integer tables the fused step kernels read to find each element's module.

        Returns ``(layout_table, group_table)``, both int64:

        - ``layout_table`` (len(params), 4), on the CPU (the kernels' host code reads it to
          build their launch arguments): one row per tensor of ``params``, in order:
          ``[LAYOUT_WHOLE, module, 0, 0]``, ``[LAYOUT_ROWS, group_offset, rows_per_group *
          row_length, 0]`` or ``[LAYOUT_COLS, group_offset, group_size, last_dim]``. Unmanaged
          tensors are whole tensors of module ``num_modules`` (the always-active slot).
        - ``group_table`` (G,) with G >= 1, on ``device``: the module of every row/column group of every
          grouped parameter, -1 replaced by ``num_modules``; a tensor's groups start at its
          ``group_offset``.

        An element at flat index i of a contiguous tensor is in group ``i // span`` (rows) or
        ``(i % last_dim) // group_size`` (cols). Tables are cached per device and parameter list
        and rebuilt when the map changes.
        """
        device = torch.device(device)
        group_table, offsets = self._group_table(device)
        key = (tuple(id(p) for p in params), tuple(tuple(p.shape) for p in params))
        table = self._layout_table_cache.get(key)
        if table is None:
            unmanaged = self.num_modules
            rows = []
            for p in params:
                lay = self.layout(p)
                if lay is None:
                    rows.append([LAYOUT_WHOLE, unmanaged, 0, 0])
                    continue
                self._check_layout_fits(p, lay)
                if lay.kind == "whole":
                    rows.append([LAYOUT_WHOLE, lay.module, 0, 0])
                elif lay.kind == "rows":
                    row_len = p.numel() // p.shape[0] if p.shape[0] else 0
                    rows.append([LAYOUT_ROWS, offsets[id(p)], lay.group_size * row_len, 0])
                else:
                    rows.append([LAYOUT_COLS, offsets[id(p)], lay.group_size, p.shape[-1]])
            table = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 4)
            self._layout_table_cache[key] = table
        return table, group_table

    # ---- internals ----
    def _group_table(self, device: torch.device) -> tuple[torch.Tensor, dict[int, int]]:
        cached = self._group_table_cache.get(device)
        if cached is None:
            entries, offsets = [], {}
            for p, lay in self._layouts.values():
                if lay.kind != "whole":
                    offsets[id(p)] = len(entries)
                    entries += [m if m >= 0 else self.num_modules for m in lay.group_module]
            entries = entries or [self.num_modules]
            cached = (torch.tensor(entries, dtype=torch.int64).to(device), offsets)
            self._group_table_cache[device] = cached
        return cached

    def _invalidate(self) -> None:
        self._group_table_cache.clear()
        self._layout_table_cache.clear()

    def _put(self, param: torch.Tensor, layout: ParamLayout) -> None:
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"ModuleMap: {layout.name} must be a tensor, got {type(param).__name__}")
        if id(param) in self._layouts:
            old = self._layouts[id(param)][1].name
            raise ValueError(f"ModuleMap: parameter {layout.name} is already assigned (as {old}); "
                             "a parameter element can belong to one module only (overlap)")
        self._layouts[id(param)] = (param, layout)
        self._invalidate()

    def _grouped(self, kind: str, dim: int, group_size: int, group_module: Sequence[int],
                 label: str) -> ParamLayout:
        group_size = int(group_size)
        group_module = tuple(int(m) for m in group_module)
        lay = ParamLayout(kind, None, group_size, group_module, label)
        self._check_groups(lay, dim)
        for m in group_module:
            self._check_module_id(m, label, allow_unmanaged=True)
        return lay

    @staticmethod
    def _check_groups(lay: ParamLayout, dim: int) -> None:
        which = "dim 0" if lay.kind == "rows" else "the last dim"
        if lay.group_size <= 0:
            raise ValueError(f"ModuleMap: {lay.name}: group_size must be positive, got {lay.group_size}")
        if dim % lay.group_size:
            raise ValueError(f"ModuleMap: {lay.name}: group_size {lay.group_size} does not divide "
                             f"{which} of size {dim}")
        if len(lay.group_module) != dim // lay.group_size:
            raise ValueError(f"ModuleMap: {lay.name}: {which} of size {dim} has "
                             f"{dim // lay.group_size} groups of {lay.group_size}, but group_module "
                             f"has {len(lay.group_module)} entries")

    def _check_layout_fits(self, p: torch.Tensor, lay: ParamLayout) -> None:
        if lay.kind == "whole":
            return
        if p.dim() < 1:
            raise ValueError(f"ModuleMap: {lay.name} is now 0-d; its {lay.kind} layout no longer fits")
        self._check_groups(lay, p.shape[0] if lay.kind == "rows" else p.shape[-1])

    def _check_module_id(self, m: int, label: str, allow_unmanaged: bool) -> None:
        lo = -1 if allow_unmanaged else 0
        if not lo <= m < self.num_modules:
            raise ValueError(f"ModuleMap: {label}: module id {m} is out of range "
                             f"[{lo}, {self.num_modules}) (add_module first)")

    @staticmethod
    def _label(param, name: str | None) -> str:
        if name is not None:
            return str(name)
        shape = tuple(param.shape) if isinstance(param, torch.Tensor) else "?"
        return f"tensor of shape {shape}"


def _named_params(model_or_params):
    if isinstance(model_or_params, torch.nn.Module):
        yield from model_or_params.named_parameters()
        return
    if isinstance(model_or_params, torch.Tensor):
        model_or_params = [model_or_params]
    i = 0
    for item in model_or_params:
        tensors = item["params"] if isinstance(item, dict) else [item]
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        # optimizers built from named_parameters() keep the names in "param_names"
        names = item.get("param_names") if isinstance(item, dict) else None
        for j, p in enumerate(tensors):
            yield (names[j] if names else f"param{i}"), p
            i += 1
