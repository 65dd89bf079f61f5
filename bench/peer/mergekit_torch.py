#!/usr/bin/env python3
"""PyTorch peer for della-merge's kernel benchmark: mergekit's formulas, timed.

A measuring aid, not a test dependency: bench/peer/run.js runs it when a python3 with
torch is present and prints its throughput beside della-merge's.

What it re-implements (our own re-write of the formulas, read from arcee-ai/mergekit at
commit a6e40288, 2026-06-17; not a copy of its code):

- mergekit/merge_methods/generalized_task_arithmetic.py
  - get_task_vectors: delta = expert.to(base.dtype) - base (in the base's dtype);
  - GTATask.execute: sparsify each delta, stack them, multiply by the weights (a tensor
    of the deltas' dtype), sign consensus, masked sum, divisor = sum of the agreeing
    weights (0 -> 1; without consensus sum of all weights, |.| < 1e-8 -> 1), divide if
    normalize, times lambda if lambda != 1, base + mixed, cast to the base's dtype;
  - get_mask ("sum"): majority sign = sign of the sum of the weighted deltas (>= 0 ->
    +1), an expert agrees iff sign(its weighted delta) == majority sign (a zero never
    agrees); the mask has the base's dtype (int8_mask false, the default);
  - rescale: true means RescaleNorm.l1 for every sparsifier (make_task).
- mergekit/sparsify.py
  - magnitude (TIES trim): k = int(density * numel); argsort of |delta| as float32 over
    the whole flattened tensor, descending, the first k set to 1 in a mask of the
    tensor's dtype;
  - bernoulli (DARE): torch.bernoulli of a tensor full of density, in the tensor's dtype
    for bfloat16 (float32 for float16/float32 on the CPU);
  - della_magprune (DELLA): per row, ranks = argsort(argsort(|delta|)) + 1 in the work
    dtype (bfloat16 for bfloat16 tensors, else float32), min-max normalized per row,
    p = (density - epsilon) + 2 * epsilon * rank_norm, mask = bernoulli(p);
  - magnitude_outliers (breadcrumbs): ascending sort of |delta| as float32, keep
    indices [n_bot, numel - n_top);
  - rescaled_masked_tensor: masked = delta * mask; l1: times |delta|_1 / |masked|_1
    (unless either is below 1e-7).

Dtype: mergekit computes in the tensors' own dtype (the recipe's `dtype`, bfloat16
here); only the magnitude/breadcrumbs sort keys are upcast to float32 on the CPU, and
bernoulli/della masks are float32 for non-bfloat16 CPU tensors. This file does the same.

What is timed: one GTATask.execute for one [rows, cols] tensor already in memory (base
and K experts in, merged tensor out), torch.set_num_threads(threads), one warm-up call,
then the best of repeated calls over at least --min-seconds and at least 3 calls.

  python3 bench/peer/mergekit_torch.py [--rows 4096] [--cols 4096] [--ks 1,2,3,4]
      [--methods della,ties,...] [--dtype bf16] [--threads N] [--min-seconds 1.5]
      [--inputs DIR] [--out FILE]

--inputs DIR reads base.bin, expert0.bin, ... (raw little-endian tensors of --dtype, as
bench/peer/run.js writes them, so both sides merge the same bytes); without it the
inputs are generated (base uniform in +-0.02, deltas uniform in +-0.002). Prints one
JSON object to stdout (or --out FILE); progress goes to stderr.
"""

import argparse
import json
import os
import platform
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}

# Same parameters as bench/lib/kernel-timer.js (weight 1 for every expert, lambda 1).
# sparsifier, consensus, normalize, rescale (mergekit's registry defaults), density, epsilon
METHODS = {
    "della": ("della_magprune", "sum", True, True, 0.5, 0.1),
    "della_linear": ("della_magprune", None, False, True, 0.5, 0.1),
    "dare_ties": ("random", "sum", False, True, 0.5, 0.0),
    "ties": ("magnitude", "sum", True, False, 0.5, 0.0),
    "task_arithmetic": (None, None, False, False, 1.0, 0.0),
}


# ---- mergekit/sparsify.py -------------------------------------------------------------

def masked_rescaled(delta, mask, l1):
    kept = delta * mask
    if not l1:
        return kept
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def cpu_work_dtype(t):
    # bernoulli and della_magprune: the tensor's dtype on an accelerator or for
    # bfloat16; float32 for other dtypes on the CPU.
    return t.dtype if t.device.type != "cpu" or t.dtype == torch.bfloat16 else torch.float32


def trim_magnitude(delta, density, l1):
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    assert k > 0
    keys = delta.abs().view(-1)
    if keys.device.type == "cpu":
        keys = keys.float()
    top = torch.argsort(keys, descending=True)[:k]
    mask = torch.zeros_like(delta)
    mask.view(-1)[top] = 1
    return masked_rescaled(delta, mask, l1)


def trim_outliers(delta, density, l1, gamma):
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    keys = delta.abs().view(-1)
    if keys.device.type == "cpu":
        keys = keys.float()
    order = torch.sort(keys, descending=False).indices
    mask = torch.zeros_like(delta)
    # mergekit slices [n_bot:-n_top]; an n_top of 0 there keeps nothing, written as is.
    mask.view(-1)[order[n_bot:-n_top]] = 1
    return masked_rescaled(delta, mask, l1)


def drop_random(delta, density, l1):
    if density >= 1:
        return delta
    wd = cpu_work_dtype(delta)
    mask = torch.bernoulli(torch.full_like(delta, density, dtype=wd))
    return masked_rescaled(delta.to(wd), mask, l1).to(delta.dtype)


def magprune(delta, density, epsilon, l1):
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("density +/- epsilon must lie in (0, 1)")
    shape = delta.shape
    wd = cpu_work_dtype(delta)
    t = delta.unsqueeze(0) if delta.dim() < 2 else delta
    order = torch.argsort(t.abs(), dim=1, descending=False)
    ranks = order.argsort(dim=1).to(wd) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    u = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    p = (density - epsilon) + u * 2 * epsilon
    mask = torch.bernoulli(p).to(wd)
    return masked_rescaled(t.to(wd), mask, l1).to(delta.dtype).reshape(shape)


def sparsify(delta, kind, density, epsilon, l1, gamma=0.01):
    if kind == "magnitude":
        return trim_magnitude(delta, density, l1)
    if kind == "random":
        return drop_random(delta, density, l1)
    if kind == "magnitude_outliers":
        return trim_outliers(delta, density, l1, gamma)
    if kind == "della_magprune":
        return magprune(delta, density, epsilon, l1)
    raise NotImplementedError(kind)


# ---- mergekit/merge_methods/generalized_task_arithmetic.py ----------------------------

def sign_agreement(weighted, mask_dtype):
    # get_mask(method="sum")
    signs = weighted.sign().to(mask_dtype)
    majority = (weighted.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return signs == majority


def merge(method, base, experts, weights, lam=1.0):
    kind, consensus, normalize, rescale, density, epsilon = METHODS[method]
    deltas = [e.to(base.dtype) - base for e in experts]  # get_task_vectors
    if kind:
        deltas = [sparsify(d, kind, density, epsilon, rescale) for d in deltas]
    stacked = torch.stack(deltas, dim=0)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    while w.dim() < stacked.dim():
        w.unsqueeze_(-1)
    weighted = stacked * w
    if consensus:
        mask = sign_agreement(weighted, base.dtype)
        mixed = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)


# ---- inputs and timing ----------------------------------------------------------------

def load_inputs(directory, rows, cols, dtype, count):
    def read(name):
        with open(os.path.join(directory, name), "rb") as f:
            data = bytearray(f.read())
        t = torch.frombuffer(data, dtype=dtype)
        if t.numel() != rows * cols:
            raise SystemExit(f"{name}: {t.numel()} elements, expected {rows} x {cols}")
        return t.view(rows, cols).clone()

    return read("base.bin"), [read(f"expert{k}.bin") for k in range(count)]


def make_inputs(rows, cols, dtype, count):
    g = torch.Generator().manual_seed(1)
    base32 = (torch.rand(rows, cols, generator=g) - 0.5) * 0.04
    experts = [(base32 + (torch.rand(rows, cols, generator=g) - 0.5) * 0.004).to(dtype) for _ in range(count)]
    return base32.to(dtype), experts


def best_time(fn, min_seconds):
    fn()  # warm-up
    best, n, t0 = float("inf"), 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds or n < 3:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        n += 1
    return best, n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--ks", default="1,2,3,4")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--min-seconds", type=float, default=1.5)
    ap.add_argument("--inputs")
    ap.add_argument("--out")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    ks = [int(k) for k in args.ks.split(",")]
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    if args.inputs:
        base, experts = load_inputs(args.inputs, args.rows, args.cols, dtype, max(ks))
    else:
        base, experts = make_inputs(args.rows, args.cols, dtype, max(ks))
    numel = args.rows * args.cols

    results = []
    for k in ks:
        for m in methods:
            seconds, repeats = best_time(lambda: merge(m, base, experts[:k], [1.0] * k), args.min_seconds)
            row = {"method": m, "dtype": args.dtype.upper(), "K": k, "seconds": seconds, "repeats": repeats,
                   "mparamsPerSecond": numel / seconds / 1e6}
            results.append(row)
            print(f"peer {m:<16} {row['dtype']:<5} K={k}  {row['mparamsPerSecond']:9.2f} M params/s  ({repeats} runs)",
                  file=sys.stderr, flush=True)

    report = {
        "peer": "mergekit formulas in PyTorch (bench/peer/mergekit_torch.py)",
        "mergekitCommit": "a6e402884ba9bc30da7f23e8304a35f19485de95",
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "rows": args.rows, "cols": args.cols,
        "inputs": "files" if args.inputs else "generated", "results": results,
    }
    text = json.dumps(report, indent=2) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
