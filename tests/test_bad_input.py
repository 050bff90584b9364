"""Bad input, as a table: each row is an input to a public function or constructor, the
exception it must raise, a fragment of the message (which names the problem), and a check that
nothing changed (model parameters, buffers, requires_grad, hooks and converted forwards;
optimizer, MAT and policy state; tensors passed in)."""
import copy
import math

import pytest
import torch
from torch import nn

import mat_cuda
from mat_cuda import (MAT, MATPolicy, MaskedAdamW, MaskedSGD, MNTKProbe, ModularPolicy,
                      ModuleMap, Skipper, TemporalPolicy, discover, embedding_gram_, lambda_max,
                      linear_gram_, sample_gram_)

from test_mat import make_batches, make_model, step

NAN, INF = float("nan"), float("inf")


# ---- what "nothing changed" means ----

def _hooks(model: nn.Module) -> list:
    out = []
    for name, m in model.named_modules():
        out.append((name, len(m._forward_hooks), len(m._forward_pre_hooks),
                    len(m._backward_hooks), len(getattr(m, "_backward_pre_hooks", {})),
                    "forward" in m.__dict__))   # a converted attention replaces its forward
    return out


def snapshot(obj):
    """A comparable copy of everything observable about obj."""
    if isinstance(obj, MAT):
        return {"mat": obj.state_dict(), "opt": snapshot(obj.optimizer),
                "model": snapshot(obj.model), "closed": obj._closed, "armed": obj._armed}
    if isinstance(obj, nn.Module):
        return {"state": {k: v.clone() for k, v in obj.state_dict(keep_vars=True).items()},
                "requires_grad": [p.requires_grad for p in obj.parameters()],
                "hooks": _hooks(obj)}
    if isinstance(obj, torch.optim.Optimizer):
        return copy.deepcopy(obj.state_dict())
    if isinstance(obj, (MATPolicy, ModularPolicy, TemporalPolicy)):
        return obj.state_dict()
    if isinstance(obj, MNTKProbe):
        return {"active": obj._active, "handles": None if obj._handles is None else len(obj._handles)}
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert a.device == b.device, where
        assert torch.equal(torch.nan_to_num(a.detach()), torch.nan_to_num(b.detach())) and \
            torch.equal(torch.isnan(a.detach()), torch.isnan(b.detach())) \
            if a.is_floating_point() else torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where


# ---- fixtures of the rows ----

def model_only():
    return {"model": make_model()}


def model_and_opt():
    m = make_model()
    return {"model": m, "opt": torch.optim.AdamW(m.parameters(), lr=1e-2)}


def model_and_nan_lr():
    o = model_and_opt()
    o["opt"].param_groups[0]["lr"] = NAN   # torch.optim.AdamW itself rejects lr=nan
    return o


def mat_after_steps():
    m = make_model()
    mm = discover(m, ("head", "ffn")).module_map
    pol = MATPolicy(mm.kinds, modular=ModularPolicy(mm.kinds, mode="budget"), warmup=0,
                    probe_every=2)
    mat = MAT(m, torch.optim.AdamW(m.parameters(), lr=1e-2), policy=pol)
    for b in make_batches(3):
        step(mat, m, b)
    return {"mat": mat, "model": m, "policy": mat.policy}


def masked_opt():
    m = make_model()
    return {"model": m, "opt": MaskedAdamW(m.parameters(), lr=1e-2)}


def masked_opt_tensor_lr():
    o = masked_opt()
    o["opt"].param_groups[0]["lr"] = torch.tensor(0.1)   # e.g. set by a scheduler
    for p in o["model"].parameters():
        p.grad = torch.ones_like(p)
    return o


def stepped_masked_opt():
    o = masked_opt()
    x, y = make_batches(1)[0]
    from mat_cuda.models import mlm_loss
    mlm_loss(o["model"](x), y).backward()
    o["opt"].step()
    return o


def policy():
    kinds = ["head"] * 4 + ["ffn"] * 2
    pol = MATPolicy(kinds, warmup=0, probe_every=1)
    pol.step(0, torch.arange(1.0, 7.0))
    return {"policy": pol}


def gram_args():
    g = torch.Generator().manual_seed(0)
    return {"K": torch.zeros(2, 3, 3), "A": torch.randn(3, 4, 5, generator=g),
            "B": torch.randn(3, 4, 6, generator=g), "gm": torch.tensor([0, 1])}


def probe():
    m = make_model()
    return {"model": m, "probe": MNTKProbe(m, discover(m, ("head", "ffn")).module_map)}


def nothing():
    return {}


def _mat_state_with(**changes):
    def call(o):
        state = copy.deepcopy(o["mat"].state_dict())
        for k, v in changes.items():
            state[k] = v(state) if callable(v) else v
        o["mat"].load_state_dict(state)
    return call


def _other_mat_state(o):
    other = make_model()
    other_mat = MAT(other, torch.optim.AdamW(other.parameters()), kinds=("head",))
    state = other_mat.state_dict()
    other_mat.close()
    o["mat"].load_state_dict(state)


# (id, setup, call, exception type, message fragment)
ROWS = [
    # -- MAT constructor: types, NaN hyper-parameters, empty / undiscoverable models --
    ("MAT model=str", nothing, lambda o: MAT("model", None), TypeError, "model must be an nn.Module"),
    ("MAT optimizer=None", model_only, lambda o: MAT(o["model"], None), TypeError,
     "cannot use an optimizer of type NoneType"),
    ("MAT modules=str", model_and_opt, lambda o: MAT(o["model"], o["opt"], modules="heads"),
     TypeError, "modules must be 'auto' or a ModuleMap"),
    ("MAT probe_every=nan", model_and_opt, lambda o: MAT(o["model"], o["opt"], probe_every=NAN),
     ValueError, "probe_every must be an integer"),
    ("MAT probe_every=0", model_and_opt, lambda o: MAT(o["model"], o["opt"], probe_every=0),
     ValueError, "probe_every must be an integer"),
    ("MAT warmup=nan", model_and_opt, lambda o: MAT(o["model"], o["opt"], warmup=NAN),
     ValueError, "warmup must be an integer"),
    ("MAT warmup=-1", model_and_opt, lambda o: MAT(o["model"], o["opt"], warmup=-1),
     ValueError, "warmup must be an integer"),
    ("MAT probe_size=0", model_and_opt, lambda o: MAT(o["model"], o["opt"], probe_size=0),
     ValueError, "probe_size must be None or an int"),
    ("MAT probe_size=2.5", model_and_opt, lambda o: MAT(o["model"], o["opt"], probe_size=2.5),
     ValueError, "probe_size must be None or an int"),
    ("MAT lanczos_iters=nan", model_and_opt, lambda o: MAT(o["model"], o["opt"], lanczos_iters=NAN),
     ValueError, "lanczos_iters must be None or an int"),
    ("MAT lanczos_iters=0", model_and_opt, lambda o: MAT(o["model"], o["opt"], lanczos_iters=0),
     ValueError, "lanczos_iters must be None or an int"),
    ("MAT scaler=str", model_and_opt, lambda o: MAT(o["model"], o["opt"], scaler="yes"),
     TypeError, "scaler must be a torch.amp.GradScaler"),
    ("MAT process_group=str", model_and_opt,
     lambda o: MAT(o["model"], o["opt"], process_group="world"), TypeError,
     "process_group must be a torch.distributed ProcessGroup"),
    ("MAT kernel=unknown", model_and_opt, lambda o: MAT(o["model"], o["opt"], kernel="hessian"),
     ValueError, "kernel must be one of"),
    ("MAT kinds=unknown", model_and_opt, lambda o: MAT(o["model"], o["opt"], kinds=("heads",)),
     ValueError, "unknown module kind(s) ['heads']"),
    ("MAT lr=nan", model_and_nan_lr, lambda o: MAT(o["model"], o["opt"]),
     ValueError, "invalid learning rate nan"),
    ("MAT empty model", nothing,
     lambda o: MAT(nn.Module(), torch.optim.AdamW([nn.Parameter(torch.zeros(1))])),
     ValueError, "the model has no MAT modules"),
    ("MAT no discoverable modules", nothing,
     lambda o: MAT(nn.Sequential(nn.LayerNorm(4), nn.ReLU()),
                   torch.optim.AdamW([nn.Parameter(torch.zeros(1))])),
     ValueError, "the model has no MAT modules"),
    ("MAT optimizer of another model", model_only,
     lambda o: MAT(o["model"], torch.optim.AdamW(make_model().parameters())), ValueError,
     "are mapped but are not among"),
    ("MAT ModuleMap of another model", model_and_opt,
     lambda o: MAT(o["model"], o["opt"], modules=ModuleMap.per_parameter(make_model())),
     ValueError, "does not fit the model"),
    ("MAT float64 model (dtype)", nothing,
     lambda o: (lambda m: MAT(m, torch.optim.AdamW(m.parameters())))(make_model().double()),
     ValueError, "dtype(s) ['torch.float64'] are not supported"),
    ("MAT optimizer with a parameter on another device", model_only,
     lambda o: MAT(o["model"], torch.optim.AdamW(
         list(o["model"].parameters()) + [nn.Parameter(torch.zeros(2, device="meta"))])),
     ValueError, "all parameters must be on one device"),
    # -- MAT methods --
    ("MAT.load_state_dict another module map", mat_after_steps, _other_mat_state, ValueError,
     "another module map"),
    ("MAT.load_state_dict renamed modules", mat_after_steps,
     _mat_state_with(names=lambda s: [n + "_" for n in s["names"]]), ValueError,
     "saved for another module map"),
    ("MAT.load_state_dict float mask (dtype)", mat_after_steps,
     _mat_state_with(mask=lambda s: s["mask"].float()), TypeError, "mask must be a bool tensor"),
    ("MAT.load_state_dict int32 module_steps", mat_after_steps,
     _mat_state_with(module_steps=lambda s: s["module_steps"].int()), ValueError,
     "module_steps must be an int64"),
    ("MAT.load_state_dict broken policy state", mat_after_steps,
     _mat_state_with(policy={"modular": {}}), ValueError, "policy state"),
    ("MAT.load_state_dict policy of another policy class", mat_after_steps,
     _mat_state_with(policy=lambda s: {**s["policy"], "modular": {"threshold": 1.0}}), ValueError,
     "the state does not fit this MAT (KeyError"),
    ("MAT.load_state_dict empty dict", mat_after_steps, lambda o: o["mat"].load_state_dict({}),
     ValueError, "not saved by MAT.state_dict()"),
    ("MAT.load_state_dict str", mat_after_steps, lambda o: o["mat"].load_state_dict("ckpt.pt"),
     TypeError, "expected the dict of MAT.state_dict()"),
    ("MAT.step after close", mat_after_steps, lambda o: (o["mat"].close(), o["mat"].step()),
     RuntimeError, "this MAT is closed"),
    # -- masked optimizers --
    ("MaskedAdamW lr=nan", model_only, lambda o: MaskedAdamW(o["model"].parameters(), lr=NAN),
     ValueError, "invalid learning rate nan"),
    ("MaskedAdamW lr=inf", model_only, lambda o: MaskedAdamW(o["model"].parameters(), lr=INF),
     ValueError, "invalid learning rate inf"),
    ("MaskedAdamW beta1=nan", model_only,
     lambda o: MaskedAdamW(o["model"].parameters(), betas=(NAN, 0.9)), ValueError, "invalid beta1"),
    ("MaskedAdamW eps=inf", model_only, lambda o: MaskedAdamW(o["model"].parameters(), eps=INF),
     ValueError, "invalid eps inf"),
    ("MaskedAdamW weight_decay=nan", model_only,
     lambda o: MaskedAdamW(o["model"].parameters(), weight_decay=NAN), ValueError,
     "invalid weight_decay nan"),
    ("MaskedAdamW no parameters", nothing, lambda o: MaskedAdamW([]), ValueError,
     "empty parameter list"),
    ("MaskedAdamW float64 parameter", nothing,
     lambda o: MaskedAdamW([nn.Parameter(torch.zeros(3, dtype=torch.float64))]), ValueError,
     "dtype(s) ['torch.float64'] are not supported"),
    ("MaskedAdamW module_map=str", model_only,
     lambda o: MaskedAdamW(o["model"].parameters(), module_map="heads"), TypeError,
     "module_map must be a ModuleMap"),
    ("MaskedSGD momentum=nan", model_only,
     lambda o: MaskedSGD(o["model"].parameters(), momentum=NAN), ValueError, "invalid momentum nan"),
    ("MaskedSGD dampening=nan", model_only,
     lambda o: MaskedSGD(o["model"].parameters(), momentum=0.9, dampening=NAN), ValueError,
     "invalid dampening nan"),
    ("set_module_mask list", masked_opt, lambda o: o["opt"].set_module_mask([True]), TypeError,
     "mask must be a torch.Tensor"),
    ("set_module_mask int dtype", masked_opt,
     lambda o: o["opt"].set_module_mask(torch.ones(o["opt"].num_modules, dtype=torch.int64)),
     ValueError, "mask must have dtype torch.bool"),
    ("set_module_mask shape", masked_opt,
     lambda o: o["opt"].set_module_mask(torch.ones(1, dtype=torch.bool)), ValueError,
     "mask must have shape"),
    ("set_module_mask device", masked_opt,
     lambda o: o["opt"].set_module_mask(torch.ones(o["opt"].num_modules, dtype=torch.bool,
                                                   device="meta")), ValueError,
     "mask must be on the parameters' device"),
    ("optimizer.load_state_dict of torch AdamW", stepped_masked_opt,
     lambda o: o["opt"].load_state_dict(torch.optim.AdamW(o["model"].parameters()).state_dict()),
     ValueError, "not saved by a masked optimizer"),
    ("optimizer.load_state_dict another module map", stepped_masked_opt,
     lambda o: o["opt"].load_state_dict(
         MaskedAdamW([nn.Parameter(torch.zeros(2))]).state_dict()), ValueError,
     "module_steps has shape"),
    ("optimizer.step tensor lr", masked_opt_tensor_lr, lambda o: o["opt"].step(),
     TypeError, "lr must be a Python number"),
    # -- policies --
    ("MATPolicy kinds=str", nothing, lambda o: MATPolicy("head"), TypeError,
     "kinds must be a sequence of str"),
    ("MATPolicy kinds=[]", nothing, lambda o: MATPolicy([]), ValueError, "kinds is empty"),
    ("MATPolicy warmup=nan", nothing, lambda o: MATPolicy(["h"], warmup=NAN), ValueError,
     "warmup must be an integer"),
    ("MATPolicy probe_every=inf", nothing, lambda o: MATPolicy(["h"], probe_every=INF),
     ValueError, "probe_every must be an integer"),
    ("MATPolicy modular=str", nothing, lambda o: MATPolicy(["h"], modular="budget"), TypeError,
     "modular must be a Policy"),
    ("MATPolicy temporal=str", nothing, lambda o: MATPolicy(["h"], temporal="on"), TypeError,
     "temporal must be a TemporalPolicy"),
    ("ModularPolicy alpha=nan", nothing, lambda o: ModularPolicy(["h"], alpha=NAN), ValueError,
     "alpha must be > 0"),
    ("ModularPolicy budget=nan", nothing, lambda o: ModularPolicy(["h"], budget=NAN), ValueError,
     "budget must be in (0, 1]"),
    ("ModularPolicy hysteresis=nan", nothing, lambda o: ModularPolicy(["h"], hysteresis=NAN),
     ValueError, "hysteresis must be in [0, 1)"),
    ("ModularPolicy min_dwell=nan", nothing, lambda o: ModularPolicy(["h"], min_dwell=NAN),
     ValueError, "min_dwell must be an integer"),
    ("ModularPolicy ema_decay=nan", nothing, lambda o: ModularPolicy(["h"], ema_decay=NAN),
     ValueError, "ema_decay must be in [0, 1)"),
    ("TemporalPolicy eps=inf", nothing, lambda o: TemporalPolicy(["h"], eps=INF), ValueError,
     "eps must be a finite number > 0"),
    ("TemporalPolicy patience=nan", nothing, lambda o: TemporalPolicy(["h"], patience=NAN),
     ValueError, "patience must be an integer"),
    ("MATPolicy.step λ wrong shape", policy, lambda o: o["policy"].step(1, torch.ones(3)),
     ValueError, "λ must have shape (6,)"),
    ("MATPolicy.step λ list", policy, lambda o: o["policy"].step(1, [1.0] * 6), TypeError,
     "λ must be a torch.Tensor"),
    ("MATPolicy.step λ int dtype", policy,
     lambda o: o["policy"].step(1, torch.ones(6, dtype=torch.int64)), TypeError,
     "λ must be a floating tensor"),
    ("MATPolicy.step λ NaN", policy,
     lambda o: o["policy"].step(1, torch.tensor([1.0, NAN, 1, 1, 1, 1])), ValueError,
     "invalid for 1 module(s): head[1]=nan"),
    ("MATPolicy.step hold wrong dtype", policy,
     lambda o: o["policy"].step(1, torch.ones(6), hold=torch.zeros(6)), ValueError,
     "hold must be a (6,) bool tensor"),
    ("MATPolicy.step step not increasing", policy, lambda o: o["policy"].step(0, torch.ones(6)),
     ValueError, "steps must increase"),
    # -- kernels --
    ("lambda_max list", nothing, lambda o: lambda_max([[1.0]]), TypeError,
     "K must be a torch.Tensor"),
    ("lambda_max 2-D", nothing, lambda o: lambda_max(torch.eye(3)), ValueError,
     "K must have shape (M, n, n)"),
    ("lambda_max int64", nothing, lambda o: lambda_max(torch.ones(1, 2, 2, dtype=torch.int64)),
     TypeError, "K must have dtype float32 or float64"),
    ("lambda_max non-square", nothing, lambda o: lambda_max(torch.ones(1, 2, 3)), ValueError,
     "K must have shape (M, n, n)"),
    ("lambda_max iters=0", nothing, lambda o: lambda_max(torch.ones(1, 2, 2), iters=0),
     ValueError, "iters must be >= topk"),
    ("lambda_max tol=nan", nothing, lambda o: lambda_max(torch.ones(1, 2, 2), tol=NAN),
     RuntimeError, "tol must be >= 0"),
    ("lambda_max v0 shape", nothing, lambda o: lambda_max(torch.ones(1, 2, 2), v0=torch.ones(3)),
     RuntimeError, "v0 must have shape (M, n)"),
    ("lambda_max v0 dtype", nothing,
     lambda o: lambda_max(torch.ones(1, 2, 2), v0=torch.ones(1, 2, dtype=torch.float64)),
     RuntimeError, "v0 must have dtype Float"),
    ("linear_gram_ K int64", gram_args,
     lambda o: linear_gram_(o["K"].long(), o["A"], o["B"], o["gm"], group_size=3),
     RuntimeError, "K must have dtype Float"),
    ("linear_gram_ A list", gram_args,
     lambda o: linear_gram_(o["K"], o["A"].tolist(), o["B"], o["gm"], group_size=3), TypeError,
     "A must be a torch.Tensor"),
    ("linear_gram_ n mismatch", gram_args,
     lambda o: linear_gram_(o["K"], o["A"][:2], o["B"], o["gm"], group_size=3), RuntimeError,
     "A and B must have the same sample count"),
    ("linear_gram_ scale=nan", gram_args,
     lambda o: linear_gram_(o["K"], o["A"], o["B"], o["gm"], group_size=3, scale=NAN),
     ValueError, "scale must be a finite"),
    ("linear_gram_ float group_module", gram_args,
     lambda o: linear_gram_(o["K"], o["A"], o["B"], o["gm"].float(), group_size=3),
     RuntimeError, "group_module must have dtype Long"),
    ("linear_gram_ module id out of range", gram_args,
     lambda o: linear_gram_(o["K"], o["A"], o["B"], torch.tensor([0, 2]), group_size=3),
     RuntimeError, "group_module ids must be in [-1, 1]"),
    ("linear_gram_ B float64", gram_args,
     lambda o: linear_gram_(o["K"], o["A"], o["B"].double(), o["gm"], group_size=3),
     RuntimeError, "B must have A's dtype"),
    ("linear_gram_ algorithm", gram_args,
     lambda o: linear_gram_(o["K"], o["A"], o["B"], o["gm"], group_size=3, algorithm="fast"),
     ValueError, "algorithm must be one of"),
    ("sample_gram_ 1-D G", gram_args,
     lambda o: sample_gram_(o["K"], torch.ones(3), o["gm"][:1]), RuntimeError,
     "G must have 2 dimensions"),
    ("embedding_gram_ float indices", gram_args,
     lambda o: embedding_gram_(o["K"], torch.ones(3, 4), o["B"], 0), RuntimeError,
     "indices must have dtype Long"),
    # -- probe, module map, discovery, skipper --
    ("MNTKProbe model=str", nothing, lambda o: MNTKProbe("model", ModuleMap()), TypeError,
     "model must be an nn.Module"),
    ("MNTKProbe module_map=str", model_only, lambda o: MNTKProbe(o["model"], "map"), TypeError,
     "module_map must be a ModuleMap"),
    ("MNTKProbe mode", model_only,
     lambda o: MNTKProbe(o["model"], ModuleMap.per_parameter(o["model"]), mode="jacobian"),
     ValueError, "mode must be one of"),
    ("MNTKProbe.begin loss_weights=nan", probe, lambda o: o["probe"].begin(loss_weights=NAN),
     ValueError, "loss_weights must be positive"),
    ("MNTKProbe.begin loss_scale=nan", probe, lambda o: o["probe"].begin(loss_scale=NAN),
     ValueError, "loss_scale must be positive"),
    ("MNTKProbe.gram without begin", probe, lambda o: o["probe"].gram(), RuntimeError,
     "gram() without a matching begin()"),
    ("MNTKProbe.measure in loss mode", probe, lambda o: o["probe"].measure(torch.zeros(2, 3)),
     RuntimeError, "measure() is for modes"),
    ("ModuleMap.add_module name=int", nothing, lambda o: ModuleMap().add_module(3), TypeError,
     "name must be a str"),
    ("ModuleMap.add_module kind=int", nothing, lambda o: ModuleMap().add_module("a", 3),
     TypeError, "kind must be a str"),
    ("ModuleMap.assign_whole str", nothing, lambda o: ModuleMap().assign_whole("w", 0),
     TypeError, "must be a tensor"),
    ("ModuleMap.assign_row_groups size 0", nothing,
     lambda o: (lambda mm: mm.assign_row_groups(nn.Parameter(torch.zeros(4, 2)), 0,
                                                [mm.add_module("a")]))(ModuleMap()),
     ValueError, "group_size must be positive"),
    ("discover model=str", nothing, lambda o: discover("model"), TypeError,
     "model must be an nn.Module"),
    ("discover kinds=unknown", model_only, lambda o: discover(o["model"], ("heads",)), ValueError,
     "unknown module kind(s)"),
    ("Skipper module_map=str", nothing, lambda o: Skipper("map"), TypeError,
     "module_map must be a ModuleMap"),
]


@pytest.mark.parametrize("setup,call,exc,fragment", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_raises_one_clear_error_and_changes_nothing(setup, call, exc, fragment):
    objs = setup()
    before = snapshot(objs)
    with pytest.raises(exc) as info:
        call(objs)
    assert fragment in str(info.value), f"message {str(info.value)!r} lacks {fragment!r}"
    if "is closed" in str(info.value):
        return   # the row closed the MAT on purpose; the failed step() itself raised first thing
    assert_same(snapshot(objs), before)
    if "mat" in objs:
        objs["mat"].close()


def test_double_close_is_a_no_op_and_the_model_is_restored():
    """close() is idempotent (as file.close()); using a closed MAT is the error."""
    o = mat_after_steps()
    o["mat"].close()
    after_first = snapshot(o["model"])
    o["mat"].close()
    assert_same(snapshot(o["model"]), after_first)
    for call in (o["mat"].step, o["mat"].zero_grad):
        with pytest.raises(RuntimeError, match="this MAT is closed"):
            call()


def test_snapshot_sees_the_changes_it_guards_against():
    """The "nothing changed" check would catch a conversion, a hook, a step or a policy update."""
    o = model_and_opt()
    before = snapshot(o)
    mat = MAT(o["model"], o["opt"])
    with pytest.raises(AssertionError):
        assert_same(snapshot(o), before)   # hooks and converted attention forwards
    mat.close()
    assert_same(snapshot(o), before)
    p = policy()
    before = snapshot(p)
    p["policy"].step(1, torch.ones(6))
    with pytest.raises(AssertionError):
        assert_same(snapshot(p), before)
