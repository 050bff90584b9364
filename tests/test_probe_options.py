"""MNTKProbe options used by the MAT controller: probe_size (first p samples) and
begin(loss_scale=...) (a GradScaler's factor on the loss)."""
import pytest
import torch
import torch.nn.functional as F

from mat_cuda import MNTKProbe
from probe_models import make_cnn, make_encoder, make_mlp
from helpers import assert_close_rel


def _loss_K(model, mm, x, y, probe_size=None, loss_factor=1.0, **begin):
    probe = MNTKProbe(model, mm, probe_size=probe_size)
    probe.begin(**begin)
    out = model(x)
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
    loss = loss.reshape(y.shape[0], -1).sum(dim=1).mean()
    (loss * loss_factor).backward()
    K = probe.gram()
    probe.close()
    model.zero_grad(set_to_none=True)
    return K


@pytest.mark.parametrize("make", [make_mlp, make_encoder, make_cnn])
@pytest.mark.parametrize("p", [1, 3])
def test_probe_size_is_the_leading_block(make, p):
    model, mm, x, y = make()
    K_full = _loss_K(model, mm, x, y)
    K_p = _loss_K(model, mm, x, y, probe_size=p)
    assert K_p.shape == (mm.num_modules, p, p)
    # Same per-sample terms (the weights refer to the whole batch), so the leading block.
    assert_close_rel(K_p.double(), K_full[:, :p, :p].double(), dtype=torch.float32)


def test_probe_size_with_tensor_loss_weights():
    model, mm, x, y = make_mlp(n=6)
    w = torch.rand(6) + 0.5
    K_full = _loss_K(model, mm, x, y, loss_weights=w)
    K_p = _loss_K(model, mm, x, y, probe_size=4, loss_weights=w)
    assert_close_rel(K_p.double(), K_full[:, :4, :4].double(), dtype=torch.float32)


def test_probe_size_larger_than_batch_raises():
    model, mm, x, y = make_mlp(n=4)
    probe = MNTKProbe(model, mm, probe_size=5)
    probe.begin()
    with pytest.raises(ValueError, match="probe_size=5.*batch of 4"):
        model(x)
    probe.cancel()
    with pytest.raises(ValueError, match="probe_size"):
        MNTKProbe(model, mm, probe_size=0)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_loss_scale_undoes_a_scaled_loss(as_tensor):
    model, mm, x, y = make_encoder()
    K_ref = _loss_K(model, mm, x, y)
    S = 1024.0
    scale = torch.tensor(S) if as_tensor else S
    K_s = _loss_K(model, mm, x, y, loss_factor=S, loss_scale=scale)
    assert_close_rel(K_s.double(), K_ref.double(), dtype=torch.float32)
    # Accumulating into out= with a loss_scale adds the rescaled Grams.
    probe = MNTKProbe(model, mm)
    out = K_ref.clone()
    probe.begin(out=out, loss_scale=scale)
    o = model(x)
    loss = F.cross_entropy(o.reshape(-1, o.shape[-1]), y.reshape(-1), reduction="none")
    (loss.reshape(y.shape[0], -1).sum(dim=1).mean() * S).backward()
    K2 = probe.gram()
    assert K2 is out
    assert_close_rel(K2.double(), 2 * K_ref.double(), dtype=torch.float32)


def test_loss_scale_rejects_bad_values():
    model, mm, x, y = make_mlp()
    probe = MNTKProbe(model, mm)
    with pytest.raises(ValueError, match="loss_scale"):
        probe.begin(loss_scale=0.0)
    with pytest.raises(ValueError, match="loss_scale"):
        probe.begin(loss_scale=torch.ones(2))
