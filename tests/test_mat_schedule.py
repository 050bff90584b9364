"""MAT checks its probe schedule at construction: a PolicyScheduleWarning that says how many
probes the policy needs when warm-up, probe interval and run length give too few."""
import warnings

import pytest
import torch

from mat_cuda import MAT, MATPolicy, PolicyScheduleWarning
from mat_cuda.models import BertEncoderMLM


def make():
    torch.manual_seed(0)
    model = BertEncoderMLM(30, hidden=16, layers=2, heads=2, ffn=32, max_len=8)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def test_too_few_probes_warns_with_what_is_needed():
    model, opt = make()
    with pytest.warns(PolicyScheduleWarning, match=r"give 2 probe\(s\) after warm-up in 60 "
                      r"steps; the policy needs at least 8.*probe_every ≤ 5,") as rec:
        mat = MAT(model, opt, warmup=20, probe_every=15, total_steps=60)  # probes 30, 45
    assert rec[0].filename == __file__  # attributed to the caller's line
    mat.close()


def test_enough_probes_and_user_policy():
    model, opt = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MAT(model, opt, warmup=20, probe_every=5, total_steps=60).close()  # 20, 25, ..., 55: 8
    model, opt = make()
    # A user's policy is checked too (here without a temporal policy: 2 probes are enough).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MAT(model, opt, policy=lambda kinds, names: MATPolicy(kinds, temporal=None, warmup=20,
                                                             probe_every=20),
            total_steps=60).close()
    model, opt = make()
    with pytest.warns(PolicyScheduleWarning, match="5 × warmup = 500 steps assumed"):
        MAT(model, opt, warmup=100, probe_every=100).close()


def test_bad_total_steps_is_an_error():
    model, opt = make()
    with pytest.raises(ValueError, match="MAT: total_steps must be an integer ≥ 1, got 0"):
        MAT(model, opt, total_steps=0)
