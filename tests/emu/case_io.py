"""Case files for the CUDA emulation driver (format: tests/emu/case_io.h) and running it."""
from __future__ import annotations

import json
import os
import subprocess

import torch

_DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16",
           torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8",
           torch.bool: "u8"}
_TORCH = {"f32": torch.float32, "f64": torch.float64, "f16": torch.float16,
          "bf16": torch.bfloat16, "i64": torch.int64, "i32": torch.int32, "u8": torch.uint8}

SCHEDULES = ("forward", "reverse", "random1", "random2", "random3")


def write_case(path: str, scalars: dict, arrays: dict) -> None:
    """arrays: name -> tensor or (tensor, misalign_elements)."""
    lines = ["EMUCASE 1"]
    for k, v in scalars.items():
        lines.append("scalar %s %s" % (k, repr(float(v)) if isinstance(v, float) else v))
    blobs, off = [], 0
    for name, a in arrays.items():
        t, mis = a if isinstance(a, tuple) else (a, 0)
        t = t.detach().contiguous().cpu()
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        b = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        lines.append("array %s %s %d %d %d" % (name, _DTYPES[t.dtype], t.numel(), off, mis))
        pad = -len(b) % 64  # every array 64-byte aligned in the file
        blobs.append(b + bytes(pad))
        off += len(b) + pad
    header = "\n".join(lines) + "\n"
    header += "pad " + "x" * (-(len(header) + 9) % 64) + "\nend\n"  # payload 64-byte aligned
    with open(path, "wb") as f:
        f.write(header.encode())
        for b in blobs:
            f.write(b)


def read_case(path: str) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    end = data.index(b"\nend\n") + 5
    out = {}
    for line in data[:end].decode().splitlines():
        parts = line.split()
        if parts and parts[0] == "array":
            name, dt, count, off = parts[1], parts[2], int(parts[3]), int(parts[4])
            dtype = _TORCH[dt]
            nbytes = count * torch.empty((), dtype=dtype).element_size()
            raw = bytearray(data[end + off:end + off + nbytes])
            out[name] = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).clone() if nbytes else \
                torch.empty(0, dtype=dtype)
    return out


class DriverResult:
    def __init__(self, proc: subprocess.CompletedProcess, out_path: str):
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.report = None
        for line in proc.stdout.splitlines():
            if line.startswith("EMU-REPORT "):
                self.report = json.loads(line[len("EMU-REPORT "):])
        self.outputs = read_case(out_path) if proc.returncode == 0 and os.path.exists(out_path) else None

    def describe(self) -> str:
        return "exit %d\nstdout:\n%s\nstderr:\n%s" % (self.returncode, self.stdout[-3000:],
                                                     self.stderr[-6000:])


def sanitizer_env() -> dict:
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=0:detect_stack_use_after_return=0:abort_on_error=0"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    return env


def run_driver(exe: str, kind: str, case_path: str, out_path: str,
               schedules=SCHEDULES, timeout: int = 600) -> DriverResult:
    if os.path.exists(out_path):
        os.remove(out_path)
    proc = subprocess.run([exe, kind, case_path, out_path, ",".join(schedules)],
                          capture_output=True, text=True, timeout=timeout, env=sanitizer_env())
    return DriverResult(proc, out_path)
