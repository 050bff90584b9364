"""ModuleMap bookkeeping: layouts, validation errors and the kernels' device tables."""
import pytest
import torch

from mat_cuda.modules import LAYOUT_COLS, LAYOUT_ROWS, LAYOUT_WHOLE, ModuleMap


def _element_modules(mm, p, layout_row, group_table):
    """The module of each element of p, decoded from the tables as the kernels do (int64)."""
    code, a, b, c = (int(v) for v in layout_row)
    idx = torch.arange(p.numel())
    if code == LAYOUT_WHOLE:
        return torch.full((p.numel(),), a)
    if code == LAYOUT_ROWS:
        return group_table[a + idx // b]
    return group_table[a + (idx % c) // b]


def test_per_parameter_names_and_tables():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    mm = ModuleMap.per_parameter(model)
    assert mm.num_modules == 4
    assert mm.names == [n for n, _ in model.named_parameters()]
    assert mm.kinds == ["param"] * 4
    params = list(model.parameters())
    mm.validate(params)
    layout, groups = mm.kernel_tables(params, "cpu")
    assert layout.shape == (4, 4) and layout.dtype == torch.int64
    assert layout[:, 0].tolist() == [LAYOUT_WHOLE] * 4
    assert layout[:, 1].tolist() == [0, 1, 2, 3]


def test_qkv_rows_and_wo_cols_decode_to_heads():
    heads, dh, d = 3, 2, 6
    qkv = torch.nn.Parameter(torch.randn(3 * heads * dh, d))
    bias = torch.nn.Parameter(torch.randn(3 * heads * dh))
    wo = torch.nn.Parameter(torch.randn(d, heads * dh))
    other = torch.nn.Parameter(torch.randn(5))
    mm = ModuleMap()
    ids = [mm.add_module(f"head{h}", "head") for h in range(heads)]
    table = ids * 3  # Q, K, V blocks: group g -> head g % heads
    mm.assign_row_groups(qkv, dh, table, name="qkv")
    mm.assign_row_groups(bias, dh, table, name="qkv_bias")
    mm.assign_col_groups(wo, dh, ids, name="wo")
    mm.validate([qkv, bias, wo, other])
    assert mm.layout(other) is None
    assert mm.layout(qkv).kind == "rows" and mm.layout(wo).group_module == (0, 1, 2)
    assert mm.modules_of_kind("head") == [0, 1, 2]
    params = [qkv, bias, wo, other]
    layout, groups = mm.kernel_tables(params, "cpu")
    assert layout[0, 0] == LAYOUT_ROWS and layout[2, 0] == LAYOUT_COLS
    # expected element -> module from plain indexing
    exp_qkv = (torch.arange(3 * heads * dh) // dh % heads)[:, None].expand(-1, d).reshape(-1)
    exp_wo = (torch.arange(heads * dh) // dh)[None, :].expand(d, -1).reshape(-1)
    assert torch.equal(_element_modules(mm, qkv, layout[0], groups), exp_qkv)
    assert torch.equal(_element_modules(mm, bias, layout[1], groups), torch.arange(3 * heads * dh) // dh % heads)
    assert torch.equal(_element_modules(mm, wo, layout[2], groups), exp_wo)
    assert torch.equal(_element_modules(mm, other, layout[3], groups), torch.full((5,), heads))


def test_unmanaged_groups_map_to_extra_slot():
    w = torch.randn(4, 3)
    mm = ModuleMap()
    m = mm.add_module("a")
    mm.assign_row_groups(w, 2, [m, -1])
    layout, groups = mm.kernel_tables([w], "cpu")
    assert _element_modules(mm, w, layout[0], groups).tolist() == [0] * 6 + [1] * 6


@pytest.mark.parametrize("bad, match", [
    (lambda mm, w: mm.assign_row_groups(w, 3, [0, 0]), "does not divide"),
    (lambda mm, w: mm.assign_row_groups(w, 2, [0]), "group_module has 1"),
    (lambda mm, w: mm.assign_col_groups(w, 0, []), "positive"),
    (lambda mm, w: mm.assign_whole(w, 5), "out of range"),
    (lambda mm, w: mm.assign_row_groups(w, 2, [0, 7]), "out of range"),
    (lambda mm, w: mm.assign_whole(w, -1), "out of range"),
    (lambda mm, w: mm.assign_row_groups(torch.tensor(1.0), 1, [0]), "0-d"),
])
def test_bad_assignments_raise(bad, match):
    mm = ModuleMap()
    mm.add_module("a")
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match=match):
        bad(mm, w)
    assert mm.layout(w) is None


def test_overlap_and_validate_errors():
    w, v = torch.randn(4, 3), torch.randn(2)
    mm = ModuleMap()
    a, b = mm.add_module("a"), mm.add_module("b")
    mm.assign_whole(w, a, name="w")
    with pytest.raises(ValueError, match="already assigned.*overlap"):
        mm.assign_col_groups(w, 1, [a, b, b])
    with pytest.raises(ValueError, match=r"\['b'\] cover no parameter"):
        mm.validate()
    mm.assign_whole(v, b, name="v")
    mm.validate([w, v])
    with pytest.raises(ValueError, match=r"\['v'\] are mapped but are not among"):
        mm.validate([w])


def test_zero_size_and_tied_parameters():
    empty = torch.empty(0, 4)
    mm = ModuleMap()
    mm.add_module("e")
    mm.assign_row_groups(empty, 2, [])
    mm.assign_whole(torch.empty(0), 0)
    mm.validate()
    lin = torch.nn.Linear(2, 2)
    mm2 = ModuleMap.per_parameter([lin.weight, lin.weight, {"params": [lin.bias]}])
    assert mm2.num_modules == 2 and mm2.names == ["param0", "param2"]


def test_per_parameter_from_named_optimizer_groups():
    from mat_cuda import MaskedAdamW
    model = torch.nn.Linear(3, 2)
    opt = MaskedAdamW(model.named_parameters(), lr=0.1)
    assert opt.module_map.names == ["weight", "bias"]
