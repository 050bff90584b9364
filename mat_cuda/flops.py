"""FLOP meter: the forward and backward FLOPs a training step actually executes, per module.

MAT saves compute only if frozen modules really cost less in backward, so the benchmarks
measure it instead of assuming it. ``FlopMeter`` is a ``TorchDispatchMode``: every aten matmul,
convolution and attention kernel that runs inside it - in the forward and in the backward
autograd runs - is counted with the formulas of ``torch.utils.flop_counter`` (so the totals
match ``FlopCounterMode`` wherever that counts; see "What is counted" below), and attributed to

  - a phase: ``forward``, ``grad_input`` (backward products that propagate a gradient to an
    activation: dX of a linear or conv, the attention core's backward) or ``grad_weight``
    (backward products that form a parameter's gradient: dW);
  - a module: in the forward, the innermost module of ``model`` whose forward is running; in the
    backward, the module whose forward created the autograd node being run (the meter labels
    nodes as each module's forward returns; a node created outside any module's forward: for
    dW the module owning the parameter, else "(unattributed)").

Because it counts what runs, ``requires_grad_(False)`` on a weight removes exactly that layer's
dW products, and a layer whose input needs no gradient (everything below is frozen or detached)
skips its dX products: autograd never calls those kernels. ``analytic_step_flops`` computes the
same numbers from layer shapes with the closed-form table (``linear_flops``, ``conv2d_flops``,
``attention_flops``); the tests hold the two together and against ``FlopCounterMode``.

What is counted: aten mm, addmm, bmm, baddbmm, convolution (forward and backward), and the
scaled-dot-product-attention kernels, each as 2 FLOPs per multiply-add, exactly as
``torch.utils.flop_counter``; plus the CPU flash-attention kernel
(``_scaled_dot_product_flash_attention_for_cpu`` and its backward), which torch's table lacks
(``FlopCounterMode`` counts 0 for it), with torch's SDPA formulas. One correction: torch
counts a grouped convolution's weight gradient ``groups`` times over (its formula uses all input
channels); the meter counts it once, like the forward. Element-wise work (norms,
activations, softmax, the optimizer, bias adds and bias gradients) and embedding lookups count
0, as in ``torch.utils.flop_counter``. Causal masks are not discounted (as in torch).

Limits:
  - custom ops (mat_cuda's masked linear backward, ...) count 0 unless given a formula through
    ``extra_formulas``, which also says which phase the FLOPs belong to;
  - the grad_input/grad_weight split of a backward matmul is decided by its operands: a product
    with no parameter among its operands whose result has the size of a parameter the node feeds
    (through views, transposes, casts) is dW; all else is grad_input. A parameter cast to another
    dtype (autocast) is a copy, so in the rare case where a dX product's output also has that
    parameter's size (tokens == d_out) it would be classed as dW;
  - a module forward run again in the backward (reentrant activation checkpointing,
    ``checkpoint(..., use_reentrant=True)``) is counted as phase ``recompute``; the
    non-reentrant checkpoint's recomputation is hidden from dispatch modes in torch 2.14, so
    neither this meter nor ``FlopCounterMode`` counts it;
  - nn.MultiheadAttention's inference fast path (eval, no grad) runs one fused kernel that is
    not counted, as in torch;
  - FLOPs, not time: the meter adds Python work per aten call, so time steps without it
    (``time_step``).
"""
from __future__ import annotations

import collections
import re
import statistics
import time

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

PHASES = ("forward", "grad_input", "grad_weight", "recompute")
UNATTRIBUTED = "(unattributed)"  # module name of work done outside any module of the model


def _cpu_flash_attention_flop(query, key, value, *args, out_val=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_flash_attention_backward_flop(grad_out, query, key, value, *args, out_val=None,
                                       **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape,
                                                 value.shape)


# op packet -> fn(*args, out_val=..., **kwargs) -> FLOPs: torch's table plus the CPU SDPA kernel.
FLOP_FORMULAS = {
    **flop_counter.flop_registry,
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flop,
}

# Autograd nodes that only move, reshape or cast a tensor: a parameter reached through them is
# still "the weight" of the product that consumes it.
_PASS_THROUGH_NODE = re.compile(
    r"^(T|Transpose|Permute|View|UnsafeView|Reshape|ReshapeAlias|Expand|Squeeze|Unsqueeze|"
    r"Slice|Select|AsStrided|Clone|ToCopy|Alias|Split|SplitWithSizes|Unbind|Chunk)Backward\d*$")


def _zero_counts():
    return {phase: 0 for phase in PHASES}


def _same_storage(a, b) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without a storage (sparse, nested)
        return False


class FlopMeter(TorchDispatchMode):
    """Count the FLOPs executed inside ``with FlopMeter(model) as meter:``, per phase and module.

    ``model``: the nn.Module whose submodules FLOPs are attributed to (named as in
    ``model.named_modules()``; the model itself is ``""``). Run a forward and a backward inside
    the block (as many as wanted: counts add up); read ``meter.summary()`` after it.
    ``extra_formulas``: {op overload packet: fn(*args, out_val=out, **kwargs) -> int or
    dict(phase -> int)} for ops torch does not count (custom kernels); an int is classified like
    the built-in ops, a dict is taken as given. Single-threaded forward only (one meter at a time).
    """

    def __init__(self, model: torch.nn.Module, extra_formulas: dict | None = None):
        super().__init__()
        self.model = model
        self.formulas = {**FLOP_FORMULAS, **(extra_formulas or {})}
        self._custom = set(extra_formulas or ())
        self._module_name = {m: name for name, m in model.named_modules()}
        self._param_owner = {}  # id(parameter) -> (name of the module owning it, parameter)
        for name, m in model.named_modules():
            for p in m.parameters(recurse=False):
                self._param_owner.setdefault(id(p), (name, p))
        self.counts = collections.defaultdict(_zero_counts)  # module name -> phase -> FLOPs
        self._stack = []  # names of the modules whose forward is running, innermost last
        self._node_module = {}  # autograd node -> module name, labelled as forwards return
        self._node_params = {}  # autograd node -> parameters it feeds a gradient to
        self._handles = []

    # ------------------------------------------------------------------ context and module hooks
    def __enter__(self):
        for m in self._module_name:
            self._handles.append(m.register_forward_pre_hook(self._pre_hook))
            self._handles.append(m.register_forward_hook(self._post_hook, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        # The node maps hold autograd nodes (and through them the graph): let them go. A
        # backward run after the block is not counted anyway.
        self._node_module.clear()
        self._node_params.clear()
        return super().__exit__(*exc)

    def _pre_hook(self, module, args):
        # The sequence number autograd will give the next node: nodes created from here on,
        # until this forward returns, are this module's (or a submodule's) work.
        self._stack.append((self._module_name[module], _next_sequence_nr()))

    def _post_hook(self, module, args, output):
        name, first_seq = self._stack.pop()
        if first_seq is None:
            return
        # Label this forward's new nodes, walking back from its outputs. Submodules returned
        # first and labelled theirs already: the innermost module keeps a node.
        todo = [t.grad_fn for t in tree_flatten(output)[0]
                if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        seen = set()
        while todo:
            node = todo.pop()
            if node is None or node in seen or node._sequence_nr() < first_seq:
                continue
            seen.add(node)
            if hasattr(node, "variable"):  # AccumulateGrad: a leaf, created long before
                continue
            self._node_module.setdefault(node, name)
            todo.extend(fn for fn, _ in node.next_functions)

    # ----------------------------------------------------------------------------- counting
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is None:
            return out
        in_backward = torch._C._current_graph_task_id() != -1
        if self._stack:  # a module's forward is running (in the backward: a recomputation)
            self._add(formula(*args, out_val=out, **kwargs), self._stack[-1][0],
                      "recompute" if in_backward else "forward")
        elif not in_backward:
            self._add(formula(*args, out_val=out, **kwargs), UNATTRIBUTED, "forward")
        else:
            self._count_backward(func, formula, args, kwargs, out)
        return out

    def _add(self, flops, module, phase):
        if isinstance(flops, dict):
            for ph, n in flops.items():
                self.counts[module][ph] += int(n)
        else:
            self.counts[module][phase] += int(flops)

    def _count_backward(self, func, formula, args, kwargs, out):
        node = torch._C._current_autograd_node()
        module = self._node_module.get(node, UNATTRIBUTED)
        packet = func._overloadpacket
        if packet is aten.convolution_backward and packet not in self._custom:
            # One kernel computes grad_input and grad_weight (output_mask says which): split it.
            mask = list(args[10] if len(args) > 10 else kwargs["output_mask"])
            groups = args[9] if len(args) > 9 else kwargs["groups"]
            for i, phase in ((0, "grad_input"), (1, "grad_weight")):
                if mask[i]:
                    part = [j == i for j in range(3)]
                    a = list(args[:10]) + [part] if len(args) > 10 else args
                    kw = kwargs if len(args) > 10 else {**kwargs, "output_mask": part}
                    n = formula(*a, out_val=out, **kw)
                    # torch's dW formula uses all input channels, not c_in / groups: it counts
                    # a grouped conv's dW `groups` times over. Count the work done.
                    self._add(n // groups if phase == "grad_weight" else n, module, phase)
            return
        flops = formula(*args, out_val=out, **kwargs)
        if isinstance(flops, dict):  # a custom formula that names its phases
            self._add(flops, module, "grad_input")
            return
        owner = self._weight_grad_owner(node, args, out)
        if owner is None:
            self._add(flops, module, "grad_input")
        else:  # the module that ran the product (an nn.MultiheadAttention runs its out_proj's)
            self._add(flops, owner if module == UNATTRIBUTED else module, "grad_weight")

    def _weight_grad_owner(self, node, args, out):
        """The module owning the parameter whose gradient this product forms, or None."""
        if node is None or not isinstance(out, torch.Tensor):
            return None
        params = self._params_fed_by(node)
        operands = [a for a in args if isinstance(a, torch.Tensor)]
        for p in params:
            if out.numel() == p.numel() and not any(_same_storage(a, p) for a in operands):
                return self._param_owner[id(p)][0]
        return None

    def _params_fed_by(self, node):
        if node not in self._node_params:
            params, todo = [], [fn for fn, _ in node.next_functions]
            while todo:
                fn = todo.pop()
                if fn is None:
                    continue
                if hasattr(fn, "variable"):
                    if id(fn.variable) in self._param_owner:
                        params.append(fn.variable)
                elif _PASS_THROUGH_NODE.match(fn.name()):
                    todo.extend(f for f, _ in fn.next_functions)
            self._node_params[node] = params
        return self._node_params[node]

    # ------------------------------------------------------------------------------ results
    def summary(self) -> dict:
        """The counts so far, as plain ints.

        Returns ``dict(forward, backward, grad_input, grad_weight, recompute, total, per_kind,
        per_module)``: backward = grad_input + grad_weight; total = forward + backward +
        recompute; ``per_module`` maps module name -> {phase: FLOPs, "total": ...} and
        ``per_kind`` the same summed by module class name (``"(unattributed)"`` for work outside
        the model's modules).
        """
        kinds = {name: type(m).__name__ for m, name in self._module_name.items()}
        per_module, per_kind = {}, collections.defaultdict(_zero_counts)
        for name in sorted(self.counts):
            c = dict(self.counts[name])
            per_module[name] = {**c, "total": sum(c.values())}
            for phase, n in c.items():
                per_kind[kinds.get(name, UNATTRIBUTED)][phase] += n
        totals = {phase: sum(c[phase] for c in self.counts.values()) for phase in PHASES}
        return _result(totals, per_module, {k: {**v, "total": sum(v.values())}
                                            for k, v in sorted(per_kind.items())})


def _result(totals, per_module, per_kind) -> dict:
    backward = totals["grad_input"] + totals["grad_weight"]
    return {"forward": totals["forward"], "backward": backward,
            "grad_input": totals["grad_input"], "grad_weight": totals["grad_weight"],
            "recompute": totals["recompute"],
            "total": totals["forward"] + backward + totals["recompute"],
            "per_kind": per_kind, "per_module": per_module}


def _next_sequence_nr():
    """The sequence number the next autograd node will get (None when grad mode is off)."""
    if not torch.is_grad_enabled():
        return None
    # A view of a throwaway leaf creates one node; the next real node gets the number after.
    return torch.empty(0, requires_grad=True).view(0).grad_fn._sequence_nr() + 1


def count_step_flops(model: torch.nn.Module, loss_fn, batch, extra_formulas=None) -> dict:
    """FLOPs of one forward + backward: ``loss_fn(model, batch)`` must return a scalar loss;
    ``.backward()`` is called on it. Gradients accumulate into ``.grad`` as in a real step (zero
    them as usual). Returns ``FlopMeter.summary()``."""
    with FlopMeter(model, extra_formulas) as meter:
        loss = loss_fn(model, batch)
        loss.backward()
    return meter.summary()


def time_step(model: torch.nn.Module, loss_fn, batch, repeat: int = 10, warmup: int = 2) -> dict:
    """Median wall time (ms) of the forward (``loss_fn(model, batch)``) and of the backward
    (``loss.backward()``) of real steps, run without any meter. On CUDA (the model's first
    parameter decides) each phase is bracketed by CUDA events, else by ``time.perf_counter``.
    ``.grad`` of the model's parameters is reset (set to None) before every step, so it holds
    the last step's gradients afterwards. Returns {"forward_ms", "backward_ms", "step_ms", "n"}.
    Pair it with ``count_step_flops`` on the same step to report achieved FLOP/s."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    fwd, bwd = [], []

    def stamp():
        if cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def elapsed_ms(a, b):
        return a.elapsed_time(b) if cuda else (b - a) * 1e3

    for i in range(warmup + repeat):
        model.zero_grad(set_to_none=True)
        t0 = stamp()
        loss = loss_fn(model, batch)
        t1 = stamp()
        loss.backward()
        t2 = stamp()
        if cuda:
            t2.synchronize()
        if i >= warmup:
            fwd.append(elapsed_ms(t0, t1))
            bwd.append(elapsed_ms(t1, t2))
    steps = [f + b for f, b in zip(fwd, bwd)]
    return {"forward_ms": statistics.median(fwd), "backward_ms": statistics.median(bwd),
            "step_ms": statistics.median(steps), "n": repeat}


# ------------------------------------------------------------------------- analytic table

def linear_flops(n_tokens: int, d_in: int, d_out: int, grad_input: bool = True,
                 grad_weight: bool = True, weight_grad_fraction: float = 1.0) -> dict:
    """y = x Wᵀ (+b) over ``n_tokens`` rows (batch × sequence): forward 2·N·d_in·d_out;
    backward dX the same (when the input needs a gradient), dW the same times
    ``weight_grad_fraction`` (the active fraction of row/column groups of a head-sliced layer;
    0 when the weight is frozen). Bias work is element-wise: not counted."""
    mm = 2 * n_tokens * d_in * d_out
    return {"forward": mm, "grad_input": mm if grad_input else 0,
            "grad_weight": round(mm * weight_grad_fraction) if grad_weight else 0}


def conv2d_flops(batch: int, c_in: int, c_out: int, kernel: tuple, out_hw: tuple,
                 groups: int = 1, grad_input: bool = True, grad_weight: bool = True) -> dict:
    """Conv2d with output (batch, c_out, *out_hw): forward 2·B·c_out·(c_in/groups)·kH·kW·H·W;
    backward dX and dW the same each (as torch.utils.flop_counter counts them)."""
    f = 2 * batch * c_out * (c_in // groups) * kernel[0] * kernel[1] * out_hw[0] * out_hw[1]
    return {"forward": f, "grad_input": f if grad_input else 0, "grad_weight": f if grad_weight else 0}


def attention_flops(batch: int, heads: int, q_len: int, k_len: int, head_dim: int,
                    v_dim: int | None = None, grad_input: bool = True,
                    fused: bool = False) -> dict:
    """The attention core softmax(Q Kᵀ) V (projections excluded): forward
    2·B·H·Lq·Lk·(d_qk + d_v); backward twice that (dQ, dK from the scores, dP, dV from the
    context) when the inputs need gradients, plus 2·B·H·Lq·Lk·d_qk when ``fused`` (a
    scaled_dot_product_attention kernel, which recomputes the scores in its backward instead of
    storing them). No parameters: dW is 0."""
    v_dim = head_dim if v_dim is None else v_dim
    f = 2 * batch * heads * q_len * k_len * (head_dim + v_dim)
    recompute = 2 * batch * heads * q_len * k_len * head_dim if fused else 0
    return {"forward": f, "grad_input": 2 * f + recompute if grad_input else 0, "grad_weight": 0}


def _add_into(acc: dict, part: dict):
    for phase, n in part.items():
        acc[phase] += n


def _analytic_linear(module, x, weight_requires_grad):
    return linear_flops(x.numel() // x.shape[-1], module.in_features, module.out_features,
                        grad_input=x.requires_grad, grad_weight=weight_requires_grad)


def _analytic_conv2d(module, x, out):
    return conv2d_flops(out.shape[0], module.in_channels, module.out_channels,
                        module.kernel_size, tuple(out.shape[-2:]), module.groups,
                        grad_input=x.requires_grad, grad_weight=module.weight.requires_grad)


def _analytic_mha(module, args, kwargs):
    """nn.MultiheadAttention: q/k/v projections, the attention core, the output projection."""
    query = kwargs.get("query", args[0] if len(args) > 0 else None)
    key = kwargs.get("key", args[1] if len(args) > 1 else None)
    value = kwargs.get("value", args[2] if len(args) > 2 else None)
    if module.batch_first:
        batch, lq, _ = query.shape
        lk = key.shape[1]
    else:
        lq, batch = query.shape[:2]
        lk = key.shape[0]
    e, h = module.embed_dim, module.num_heads
    acc = _zero_counts()
    if module._qkv_same_embed_dim:
        proj_w = (module.in_proj_weight,) * 3
    else:
        proj_w = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    for inp, w, length in ((query, proj_w[0], lq), (key, proj_w[1], lk), (value, proj_w[2], lk)):
        _add_into(acc, linear_flops(batch * length, w.shape[1], e, grad_input=inp.requires_grad,
                                    grad_weight=w.requires_grad))
    heads_need_grad = any(t.requires_grad for t in (query, key, value)) or any(
        w.requires_grad for w in proj_w) or (module.in_proj_bias is not None
                                            and module.in_proj_bias.requires_grad)
    # need_weights=False runs the fused scaled_dot_product_attention kernel, else bmm/softmax.
    need_weights = kwargs.get("need_weights", args[4] if len(args) > 4 else True)
    _add_into(acc, attention_flops(batch, h, lq, lk, e // h, grad_input=heads_need_grad,
                                   fused=not need_weights))
    _add_into(acc, linear_flops(batch * lq, e, e, grad_input=heads_need_grad,
                                grad_weight=module.out_proj.weight.requires_grad))
    return acc


def analytic_step_flops(model: torch.nn.Module, loss_fn, batch) -> dict:
    """The FLOPs a forward + backward of ``loss_fn(model, batch)`` should execute, from the
    shapes its nn.Linear, nn.Conv2d and nn.MultiheadAttention layers see in one forward (run
    here; no backward is run) and the closed-form table above: dX counted when a layer's input
    requires grad, dW when its weight does. Other layers (and matmuls written inline in a
    custom module) are not in the table and count 0, so compare with the meter on models built
    from these layers. Returns the same dict as ``FlopMeter.summary()`` (recompute 0).
    Linear layers inside a MultiheadAttention are counted by the attention layer."""
    names = {m: name for name, m in model.named_modules()}
    inside_mha = {sub for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)
                  for sub in m.modules() if sub is not m}
    per_module = collections.defaultdict(_zero_counts)
    handles = []

    def hook(module, args, kwargs, out):
        if isinstance(module, torch.nn.MultiheadAttention):
            part = _analytic_mha(module, args, kwargs)
        elif isinstance(module, torch.nn.Linear):
            part = _analytic_linear(module, args[0], module.weight.requires_grad)
        else:
            part = _analytic_conv2d(module, args[0], out)
        _add_into(per_module[names[module]], part)

    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.MultiheadAttention)) \
                and m not in inside_mha:
            handles.append(m.register_forward_hook(hook, with_kwargs=True))
    try:
        loss_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    kinds = {name: type(m).__name__ for m, name in names.items()}
    per_kind = collections.defaultdict(_zero_counts)
    for name, c in per_module.items():
        _add_into(per_kind[kinds[name]], c)
    totals = {phase: sum(c[phase] for c in per_module.values()) for phase in PHASES}
    return _result(totals,
                   {n: {**c, "total": sum(c.values())} for n, c in sorted(per_module.items())},
                   {k: {**c, "total": sum(c.values())} for k, c in sorted(per_kind.items())})
