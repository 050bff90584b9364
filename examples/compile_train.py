"""Train a MAT-converted BERT-style encoder under torch.compile, and check it against eager.

    python examples/compile_train.py                          # inductor, hidden 64, 40 steps
    python examples/compile_train.py --backend aot_eager --tiny --steps 12

The same model (same seed, same batches) is trained twice with MAT: eagerly, then with
``mat_cuda.compile_model`` (training steps compiled, probe steps eager). Prints both losses per
step, the masks MAT chose, the seconds of the first compiled step under each distinct mask (its
compile time: one new graph per mask, docs/compile.md) and ``compiled == eager`` when every loss
agrees within the tolerance (relative 1e-4: see docs/compile.md for why).
"""
from __future__ import annotations

import argparse
import time

import torch

import mat_cuda
from mat_cuda import MAT, MATPolicy, ModularPolicy
from mat_cuda.models import BertEncoderMLM, mlm_loss

VOCAB, BATCH, SEQ = 64, 8, 16


def make_model(tiny: bool) -> BertEncoderMLM:
    torch.manual_seed(0)
    if tiny:
        return BertEncoderMLM(VOCAB, hidden=16, layers=2, heads=2, ffn=32, max_len=SEQ)
    return BertEncoderMLM(VOCAB, hidden=64, layers=2, heads=4, ffn=256, max_len=SEQ)


def make_batches(steps: int):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        y = torch.where(torch.rand(BATCH, SEQ, generator=g) < 0.15, x, torch.full_like(x, -100))
        y[:, 0] = x[:, 0]  # every sample predicts at least one token
        out.append((x, y))
    return out


def make_mat(model, probe_every: int, backward: str) -> MAT:
    def policy(kinds, names):  # called by MAT with the kinds of the modules it discovered
        # Budget mode: the top half of each kind by λ trains, so the masks change at the probes.
        return MATPolicy(kinds, modular=ModularPolicy(kinds, mode="budget", budget=0.5),
                         warmup=probe_every, probe_every=probe_every, names=names)

    return MAT(model, torch.optim.AdamW(model.parameters(), lr=1e-3), policy=policy,
               backward=backward)


def train(args, compiled: bool):
    model = make_model(args.tiny)
    mat = make_mat(model, args.probe_every, args.backward)
    forward = mat_cuda.compile_model(mat, backend=args.backend) if compiled else model
    losses, masks, first_step_seconds = [], [], {}
    for x, y in make_batches(args.steps):
        mask, probe = tuple(mat.skipper.active), mat.is_probe_step  # probe steps run eagerly
        t0 = time.perf_counter()
        loss = mlm_loss(forward(x), y)
        loss.backward()
        mat.step()
        mat.zero_grad()
        seconds = time.perf_counter() - t0
        losses.append(loss.item())
        masks.append(mask)
        if compiled and not probe and mask not in first_step_seconds:
            first_step_seconds[mask] = seconds
    mat.close()
    return losses, masks, first_step_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--probe-every", type=int, default=8)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--backward", default="detach", choices=["detach", "exact"])
    parser.add_argument("--tiny", action="store_true", help="hidden 16, 2 heads (for tests)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    eager, _, _ = train(args, compiled=False)
    losses, masks, compile_seconds = train(args, compiled=True)
    print("step  eager loss  compiled loss  mask (1 = module trains)")
    for k, (e, c, m) in enumerate(zip(eager, losses, masks)):
        print(f"{k:4d}  {e:10.6f}  {c:13.6f}  {''.join('1' if a else '0' for a in m)}")
    print(f"distinct masks on compiled steps: {len(compile_seconds)}")
    for m, s in compile_seconds.items():
        print(f"  first step under {''.join('1' if a else '0' for a in m)}: {s:.2f} s (compile + run)")
    worst = max(abs(c - e) / abs(e) for c, e in zip(losses, eager))
    print(f"largest relative loss difference: {worst:.2e}")
    print("compiled == eager" if worst <= 1e-4 else "compiled != eager (beyond 1e-4)")


if __name__ == "__main__":
    main()
