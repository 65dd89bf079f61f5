#!/usr/bin/env python3
"""Independent implementation of della-merge's merge semantics (SPEC.md), numpy only.

Usage: python3 spec_merge.py RECIPE.json OUT.safetensors [--m-sum-from-p0]

--m-sum-from-p0: without consensus, compute M as p_0 + p_1 + … instead of the default
+0 + p_0 + p_1 + … (they differ only in the sign of a zero; see main()).

Methods: task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties,
della, della_linear (SPEC §4-§6), linear and slerp (README "What a merge computes");
parameters may be scalars, gradients or filter lists, with the drop_rate / window_size
aliases (SPEC §7); rescale true/false/inverse/l1/l2/linf.

Written only from /work/shared/SPEC.md and the README's "What a merge computes", as a
cross-check of the project's CLI.
Every "fp32" step is done with numpy float32 arrays / np.float32 scalars, one
operation at a time and in the order the spec writes it (numpy never fuses).
"""
import json
import math
import os
import struct
import sys

import numpy as np

U32 = np.uint32
U64 = np.uint64
F32 = np.float32
MASK32 = U64(0xFFFFFFFF)
M_FROM_P0 = False

# ---------------------------------------------------------------------------
# safetensors I/O
# ---------------------------------------------------------------------------

DTYPE_SIZE = {
    'F64': 8, 'F32': 4, 'F16': 2, 'BF16': 2,
    'I64': 8, 'I32': 4, 'I16': 2, 'I8': 1, 'U64': 8, 'U32': 4, 'U16': 2, 'U8': 1,
    'BOOL': 1, 'F8_E4M3': 1, 'F8_E5M2': 1,
}
MERGEABLE = ('F32', 'F16', 'BF16', 'F64')


class Tensor:
    __slots__ = ('dtype', 'shape', 'raw')

    def __init__(self, dtype, shape, raw):
        self.dtype = dtype
        self.shape = tuple(int(s) for s in shape)
        self.raw = raw

    @property
    def numel(self):
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_safetensors(path):
    with open(path, 'rb') as f:
        buf = f.read()
    (hlen,) = struct.unpack('<Q', buf[:8])
    if hlen > 100_000_000:
        raise ValueError(f'{path}: header too large')
    header = json.loads(buf[8:8 + hlen].decode('utf-8'))
    data = memoryview(buf)[8 + hlen:]
    out = {}
    for name, info in header.items():
        if name == '__metadata__':
            continue
        b, e = info['data_offsets']
        t = Tensor(info['dtype'], info['shape'], bytes(data[b:e]))
        size = DTYPE_SIZE.get(t.dtype)
        if size is not None and e - b != t.numel * size:
            raise ValueError(f'{path}: {name}: byte size mismatch')
        out[name] = t
    return out


def write_safetensors(path, tensors):
    header = {'__metadata__': {'format': 'pt'}}
    off = 0
    names = list(tensors.keys())
    for name in names:
        t = tensors[name]
        header[name] = {'dtype': t.dtype, 'shape': list(t.shape), 'data_offsets': [off, off + len(t.raw)]}
        off += len(t.raw)
    hb = json.dumps(header, separators=(',', ':')).encode('utf-8')
    hb += b' ' * ((8 - len(hb) % 8) % 8)
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(hb)))
        f.write(hb)
        for name in names:
            f.write(tensors[name].raw)


def load_model(path):
    """A .safetensors file, or a directory with model.safetensors or an index."""
    if os.path.isfile(path):
        return read_safetensors(path)
    single = os.path.join(path, 'model.safetensors')
    index = os.path.join(path, 'model.safetensors.index.json')
    if os.path.isfile(single):
        return read_safetensors(single)
    if os.path.isfile(index):
        with open(index) as f:
            wm = json.load(f)['weight_map']
        out = {}
        files = {}
        for name, fn in wm.items():
            if fn not in files:
                files[fn] = read_safetensors(os.path.join(path, fn))
            out[name] = files[fn][name]
        return out
    shards = sorted(fn for fn in os.listdir(path) if fn.endswith('.safetensors'))
    if not shards:
        raise ValueError(f'{path}: no safetensors found')
    out = {}
    for fn in shards:
        out.update(read_safetensors(os.path.join(path, fn)))
    return out


# ---------------------------------------------------------------------------
# dtype conversions (bit-exact, on uint32 patterns)
# ---------------------------------------------------------------------------

def bf16_bits_to_f32(u16):
    return (u16.astype(U32) << U32(16)).view(F32)


def f32_to_bf16_bits(f):
    """RNE of binary32 to bfloat16 (upper 16 bits after RNE); NaN stays NaN (quiet)."""
    x = np.ascontiguousarray(f, dtype=F32).view(U32)
    lsb = (x >> U32(16)) & U32(1)
    with np.errstate(over='ignore'):
        r = (x + U32(0x7FFF) + lsb) >> U32(16)  # no overflow for finite values below NaN range
    nan = (x & U32(0x7FFFFFFF)) > U32(0x7F800000)
    r = np.where(nan, (x >> U32(16)) | U32(0x0040), r)
    return r.astype(np.uint16)


def f32_to_f16_bits(f):
    """IEEE binary32 -> binary16, round to nearest even, with subnormals."""
    x = np.ascontiguousarray(f, dtype=F32).view(U32).astype(np.int64)
    sign = (x >> 16) & 0x8000
    exp = (x >> 23) & 0xFF
    mant = x & 0x7FFFFF
    out = np.zeros(x.shape, dtype=np.int64)
    # normal half range: exp-127+15 in [1, 30]
    e = exp - 112
    # normals
    h = (e << 10) | (mant >> 13)
    rem = mant & 0x1FFF
    up = (rem > 0x1000) | ((rem == 0x1000) & ((h & 1) == 1))
    hn = h + up.astype(np.int64)  # carry into exponent is correct, up to 0x7c00 (inf)
    hn = np.minimum(hn, 0x7C00)
    # subnormals (e <= 0): value = m24 * 2^(exp-150); half unit 2^-24 -> shift = 126 - exp
    m24 = mant | 0x800000
    shift = np.clip(126 - exp, 0, 62)
    hs = m24 >> shift
    one = np.int64(1)
    remmask = (one << shift) - 1
    rems = m24 & remmask
    halfv = one << np.maximum(shift - 1, 0)
    ups = (rems > halfv) | ((rems == halfv) & ((hs & 1) == 1))
    hs = hs + ups.astype(np.int64)
    hs = np.where(shift > 25, 0, hs)  # below half of the smallest subnormal
    out = np.where(e >= 31, 0x7C00, np.where(e >= 1, hn, hs))
    out = np.where(exp == 0, 0, out)  # float32 zeros/subnormals -> 0 (all < 2^-126, far below half subnormals)
    isnan = (exp == 0xFF) & (mant != 0)
    isinf = (exp == 0xFF) & (mant == 0)
    out = np.where(isinf, 0x7C00, out)
    out = np.where(isnan, 0x7E00, out)
    return (out | sign).astype(np.uint16)


def load_f32(t):
    """Exact conversion to fp32 (F64 with RNE)."""
    if t.dtype == 'F32':
        a = np.frombuffer(t.raw, dtype='<f4').astype(F32)
    elif t.dtype == 'F16':
        a = np.frombuffer(t.raw, dtype='<f2').astype(F32)
    elif t.dtype == 'BF16':
        a = bf16_bits_to_f32(np.frombuffer(t.raw, dtype='<u2'))
    elif t.dtype == 'F64':
        with np.errstate(over='ignore'):
            a = np.frombuffer(t.raw, dtype='<f8').astype(F32)
    else:
        raise ValueError(t.dtype)
    return a.reshape(t.shape) if t.shape else a.reshape(())


def store(a, dtype):
    a = np.ascontiguousarray(a, dtype=F32).reshape(-1)
    if dtype == 'F32':
        return a.astype('<f4').tobytes()
    if dtype == 'F16':
        return f32_to_f16_bits(a).astype('<u2').tobytes()
    if dtype == 'BF16':
        return f32_to_bf16_bits(a).astype('<u2').tobytes()
    if dtype == 'F64':
        return a.astype('<f8').tobytes()
    raise ValueError(dtype)


# ---------------------------------------------------------------------------
# Philox4x32-10
# ---------------------------------------------------------------------------

PH_M0 = U64(0xD2511F53)
PH_M1 = U64(0xCD9E8D57)
PH_W0 = U64(0x9E3779B9)
PH_W1 = U64(0xBB67AE85)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Vectorized Philox4x32-10; inputs broadcastable integer arrays/scalars (< 2^32)."""
    c0 = np.asarray(c0, dtype=U64)
    c1 = np.asarray(c1, dtype=U64)
    c2 = np.asarray(c2, dtype=U64)
    c3 = np.asarray(c3, dtype=U64)
    k0 = U64(k0)
    k1 = U64(k1)
    for r in range(10):
        if r > 0:
            k0 = (k0 + PH_W0) & MASK32
            k1 = (k1 + PH_W1) & MASK32
        p0 = PH_M0 * c0  # < 2^64, exact in uint64
        p1 = PH_M1 * c2
        hi0 = p0 >> U64(32)
        lo0 = p0 & MASK32
        hi1 = p1 >> U64(32)
        lo1 = p1 & MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0.astype(U32), c1.astype(U32), c2.astype(U32), c3.astype(U32)


def _philox_selftest():
    def one(ctr, key):
        r = philox4x32_10(*[np.array([c], dtype=U64) for c in ctr], *key)
        return tuple(int(x[0]) for x in r)
    assert one((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8), 'philox KAT 0'
    assert one((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD), 'philox KAT ff'
    # Random123 kat_vectors philox4x32_10 with pi digits
    assert one((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == \
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1), 'philox KAT pi'


def fnv1a32(name):
    h = 2166136261
    for b in name.encode('utf-8'):
        h ^= b
        h = (h * 16777619) & 0xFFFFFFFF
    return h


def uniforms(numel, seed, tensor_id, k):
    """x_i = f32(w >>> 8) * 2^-24 for element i (flat row-major index)."""
    G = (numel + 3) // 4
    g = np.arange(G, dtype=U64)
    r0, r1, r2, r3 = philox4x32_10(g & MASK32, g >> U64(32), U64(tensor_id), U64(k),
                                   seed & 0xFFFFFFFF, seed >> 32)
    w = np.stack([r0, r1, r2, r3], axis=1).reshape(-1)[:numel]
    return (w >> U32(8)).astype(F32) * F32(2.0 ** -24)


# ---------------------------------------------------------------------------
# sparsifiers (SPEC §4)
# ---------------------------------------------------------------------------

def magnitude_keys(delta, base_dtype):
    a = np.abs(delta).astype(F32)  # sign cleared
    if base_dtype == 'F16':
        return (f32_to_f16_bits(a) & np.uint16(0x7FFF)).astype(np.int64)
    if base_dtype == 'BF16':
        return (f32_to_bf16_bits(a) & np.uint16(0x7FFF)).astype(np.int64)
    return (a.view(U32) & U32(0x7FFFFFFF)).astype(np.int64)


def stable_row_ranks(keys2d):
    """Stable ascending rank of each element within its row (ties by ascending index)."""
    rows, n = keys2d.shape
    order = np.argsort(keys2d, axis=1, kind='stable')
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(n, dtype=order.dtype), (rows, n)), axis=1)
    return ranks


def ranks_of(keys1d):
    """Stable ascending rank over a flat array (ties by ascending index)."""
    order = np.argsort(keys1d, kind='stable')
    ranks = np.empty(keys1d.size, dtype=np.int64)
    ranks[order] = np.arange(keys1d.size, dtype=np.int64)
    return ranks


def rows_shape(shape):
    numel = 1
    for s in shape:
        numel *= s
    if len(shape) >= 2:
        n = shape[-1]
        return (numel // n if n else 0), n
    return 1, numel


def tensor_norm(v, shape, kind):
    """‖v‖ in binary64: row partial sums in index order (from 0.0), rows summed in index
    order (from 0.0); l2 takes the square root of the sum of squares; linf the max."""
    rows, n = rows_shape(shape)
    if v.size == 0:
        return 0.0
    a = np.abs(v.astype(np.float64)).reshape(rows, n)
    if kind == 'linf':
        return float(a.max())
    if kind == 'l2':
        a = a * a  # exact: a binary32 squared fits binary64
    # np.add.accumulate is a strictly sequential running sum (no pairwise summation)
    row_sums = np.add.accumulate(a, axis=1)[:, -1]
    total = float(np.add.accumulate(row_sums)[-1])
    if kind == 'l2':
        total = math.sqrt(total)
    return total


def sparsify(delta, kind, density, epsilon, gamma, rescale, x, base_dtype, shape):
    """delta: flat fp32 array. rescale: None | 'inverse' | 'l1' | 'l2' | 'linf'.
    Returns the sparsified (and rescaled) flat fp32 array."""
    if kind == 'none' or density >= 1:
        return delta
    N = delta.size
    if N == 0:
        return delta
    q = None
    if kind == 'magprune':
        rows, n = rows_shape(shape)
        keys = magnitude_keys(delta, base_dtype).reshape(rows, n)
        if n >= 2:
            r = stable_row_ranks(keys).reshape(-1)
            u = r.astype(F32) / F32(n - 1)
        else:
            u = np.full(N, F32(0.5), dtype=F32)
        lo = F32(density - epsilon)
        span = F32(2 * epsilon)
        q = lo + span * u  # fp32 mul then fp32 add
        keep = x < q
    elif kind == 'random':
        q = np.full(N, F32(density), dtype=F32)
        keep = x < q
    elif kind == 'magnitude':
        keys = magnitude_keys(delta, base_dtype)
        k = math.floor(density * N)
        # descending rank by key, ties by ascending flat index
        rank = ranks_of(-keys)
        keep = rank < k
    elif kind == 'breadcrumbs':
        keys = magnitude_keys(delta, base_dtype)
        target = math.floor(density * N)
        top = math.floor(gamma * N)
        bottom = N - target - top
        if bottom < 0:
            top += bottom
            bottom = 0
        rank = ranks_of(keys)
        keep = (rank >= bottom) & (rank < N - top)
    else:
        raise ValueError(kind)

    if rescale is None:
        kept = delta
    elif rescale == 'inverse':
        if q is None:
            raise SystemExit(f'rescale inverse is not defined for the {kind} sparsifier')
        with np.errstate(divide='ignore', over='ignore'):
            s = F32(1.0) / q
            kept = delta * s
    elif rescale in ('l1', 'l2', 'linf'):
        masked = np.where(keep, delta, F32(0.0)).astype(F32)
        full = tensor_norm(delta, shape, rescale)
        part = tensor_norm(masked, shape, rescale)
        s = 1.0 if (full < 1e-7 or part < 1e-7) else full / part
        with np.errstate(over='ignore'):
            kept = (delta * F32(s)).astype(F32)
    else:
        raise ValueError(rescale)
    return np.where(keep, kept, F32(0.0)).astype(F32)


# ---------------------------------------------------------------------------
# recipe parameters (SPEC §7): scalars, gradients, filter lists, aliases
# ---------------------------------------------------------------------------

METHODS = {
    # sparsifier, consensus, normalize, rescale
    'task_arithmetic': ('none', 'none', False, False),
    'ties': ('magnitude', 'sum', True, False),
    'dare_ties': ('random', 'sum', False, True),
    'dare_linear': ('random', 'none', False, True),
    'breadcrumbs': ('breadcrumbs', 'none', False, False),
    'breadcrumbs_ties': ('breadcrumbs', 'sum', False, False),
    'della': ('magprune', 'sum', True, True),
    'della_linear': ('magprune', 'none', False, True),
}

DTYPE_NAMES = {
    'bfloat16': 'BF16', 'bf16': 'BF16', 'float16': 'F16', 'fp16': 'F16', 'half': 'F16',
    'float32': 'F32', 'fp32': 'F32', 'float': 'F32',
}

LAYER_KEYS = ('layers', 'h', 'blocks', 'layer', 'block')
NOMATCH = object()


def layer_index(name):
    """N of the first dotted path component pair `<key>.N.` (key in LAYER_KEYS), else None."""
    parts = name.split('.')
    for j in range(len(parts) - 2):  # N must be followed by a dot
        p = parts[j + 1]
        if parts[j] in LAYER_KEYS and p and p.isascii() and p.isdigit():
            return int(p)
    return None


def layer_count(names):
    """L = 1 + the largest layer index among the names (0 when none has one)."""
    idx = [i for i in (layer_index(n) for n in names) if i is not None]
    return 1 + max(idx) if idx else 0


def gradient_t(name, L):
    li = layer_index(name)
    if li is None:
        return 0.0
    if L == 1:
        return 1.0
    return li / (L - 1)


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def interp(a, t):
    m = len(a)
    if m == 0:
        raise SystemExit('empty gradient')
    s = t * (m - 1)
    i = math.floor(s)
    if i >= m - 1:
        return float(a[m - 1])
    a0 = float(a[i])
    a1 = float(a[i + 1])
    return a0 + (a1 - a0) * (s - i)


def is_filter_list(v):
    return isinstance(v, list) and len(v) > 0 and all(isinstance(e, dict) for e in v)


def map_numbers(v, f):
    """Apply an alias conversion to every number of a value (inside gradients and filters)."""
    if is_filter_list(v):
        return [{**e, 'value': map_numbers(e['value'], f)} for e in v]
    if isinstance(v, list):
        return [map_numbers(x, f) for x in v]
    if is_number(v):
        return f(float(v))
    return v


def resolve(v, name, t):
    """The value of one parameter for tensor `name` at gradient position t, or NOMATCH."""
    if is_filter_list(v):
        for e in v:
            f = e.get('filter')
            if f is None or f in name:
                return resolve(e['value'], name, t)
        return NOMATCH
    if isinstance(v, list):
        if not all(is_number(x) for x in v):
            raise SystemExit(f'bad gradient {v!r}')
        return interp(v, t)
    return v


ALIASES = {
    'density': ('drop_rate', lambda x: 1.0 - x),
    'epsilon': ('window_size', lambda x: x / 2),
}


def lookup(levels, key, name, t, default):
    """levels: parameter dicts, most specific first (the model's, then the global ones)."""
    alias, conv = ALIASES.get(key, (None, None))
    for p in levels:
        if key in p:
            if alias is not None and alias in p:
                raise SystemExit(f'both {key} and {alias} given')
            v = p[key]
        elif alias is not None and alias in p:
            v = map_numbers(p[alias], conv)
        else:
            continue
        r = resolve(v, name, t)
        if r is not NOMATCH:
            return r
    return default


def num(v, what):
    if not is_number(v):
        raise SystemExit(f'{what}: expected a number, got {v!r}')
    return float(v)


# ---------------------------------------------------------------------------
# merging
# ---------------------------------------------------------------------------

EMBED_NAMES = ('embed_tokens', 'lm_head', 'wte', 'word_embeddings', 'embed_in', 'embed_out')


def expert_f32(name, et, ref_shape, who, allow_embed_block=True):
    E = load_f32(et)
    if et.shape != ref_shape:
        if (allow_embed_block and any(s in name for s in EMBED_NAMES) and len(et.shape) == len(ref_shape)
                and all(a > b for a, b in zip(et.shape, ref_shape))):
            E = E[tuple(slice(0, s) for s in ref_shape)]
        else:
            raise SystemExit(f'{who}: {name}: shape {et.shape} vs base {ref_shape}')
    Ef = np.ascontiguousarray(E).reshape(-1)
    if not np.all(np.isfinite(Ef)):
        raise SystemExit(f'{who}: {name}: {int(np.sum(~np.isfinite(Ef)))} non-finite values')
    return Ef


class Loader:
    def __init__(self):
        self.cache = {}

    def __call__(self, path):
        if path not in self.cache:
            self.cache[path] = load_model(path)
        return self.cache[path]


def out_dtype_of(recipe):
    od = recipe.get('out_dtype') or recipe.get('dtype')
    return DTYPE_NAMES[od] if od else None


def rescale_mode(r, sparsifier):
    if r is True:
        return 'inverse' if sparsifier in ('magprune', 'random') else 'l1'
    if r is False or r is None:
        return None
    if r in ('inverse', 'l1', 'l2', 'linf'):
        if r == 'inverse' and sparsifier in ('magnitude', 'breadcrumbs'):
            raise SystemExit(f'rescale inverse is refused for {sparsifier}')
        return r
    raise SystemExit(f'unsupported rescale {r!r}')


def merge_delta_method(recipe, method, load):
    sparsifier, consensus0, normalize0, rescale0 = METHODS[method]
    gp = recipe.get('parameters') or {}
    seed = int(recipe.get('seed', 0) or 0)
    assert 0 <= seed < 2 ** 53
    out_dtype = out_dtype_of(recipe)
    base_path = recipe['base_model']
    experts = []
    for m in recipe['models']:
        if m['model'] == base_path:
            continue  # the base is excluded from the expert list
        experts.append((m['model'], m.get('parameters') or {}))
    base = load(base_path)
    exp_models = [load(p) for p, _ in experts]
    L = layer_count(base.keys())

    out = {}
    for name, bt in base.items():
        if bt.dtype not in MERGEABLE:
            out[name] = Tensor(bt.dtype, bt.shape, bt.raw)
            continue
        B = load_f32(bt)
        if not np.all(np.isfinite(B)):
            raise SystemExit(f'base: {name}: {int(np.sum(~np.isfinite(B)))} non-finite values')
        Bf = B.reshape(-1)
        N = Bf.size
        tid = fnv1a32(name)
        t = gradient_t(name, L)
        consensus = lookup([gp], 'consensus', name, t, consensus0)
        normalize = bool(lookup([gp], 'normalize', name, t, normalize0))
        rescale = rescale_mode(lookup([gp], 'rescale', name, t, rescale0), sparsifier)
        lam = num(lookup([gp], 'lambda', name, t, 1.0), 'lambda')
        ps = []
        ws = []
        for k, ((mpath, mp), em) in enumerate(zip(experts, exp_models)):
            if name not in em:
                raise SystemExit(f'{mpath}: missing tensor {name}')
            Ef = expert_f32(name, em[name], bt.shape, mpath)
            delta = (Ef - Bf).astype(F32)
            levels = [mp, gp]
            weight = num(lookup(levels, 'weight', name, t, 1.0), 'weight')
            density = num(lookup(levels, 'density', name, t, 1.0), 'density')
            epsilon = num(lookup(levels, 'epsilon', name, t, 0.15), 'epsilon')
            gamma = num(lookup(levels, 'gamma', name, t, 0.01), 'gamma')
            if sparsifier != 'none' and density < 1:
                x = uniforms(N, seed, tid, k) if sparsifier in ('magprune', 'random') else None
                if sparsifier == 'magprune':
                    d, e = density, epsilon
                    if not (e >= 0 and d - e > 0 and d + e <= 1):
                        raise SystemExit(f'{mpath}: {name}: invalid density/epsilon {d}/{e}')
                dsp = sparsify(delta, sparsifier, density, epsilon, gamma, rescale, x, bt.dtype, bt.shape)
            else:
                dsp = delta
            wk = F32(weight)
            ps.append((wk * dsp).astype(F32))
            ws.append(wk)

        with np.errstate(over='ignore', invalid='ignore', divide='ignore'):
            if consensus in ('sum', 'count'):
                if consensus == 'sum':
                    S = ps[0].copy()
                    for p in ps[1:]:
                        S = S + p
                    e = np.where(S >= F32(0), 1, -1)
                else:
                    cnt = np.zeros(N, dtype=np.int64)
                    for p in ps:
                        cnt += np.sign(p).astype(np.int64)
                    e = np.where(cnt >= 0, 1, -1)
                M = np.zeros(N, dtype=F32)
                D = np.zeros(N, dtype=F32)
                for p, w in zip(ps, ws):
                    agree = (p != F32(0)) & (np.sign(p).astype(np.int64) == e)
                    M = np.where(agree, M + p, M).astype(F32)
                    D = np.where(agree, D + w, D).astype(F32)
                D = np.where(D == F32(0), F32(1), D).astype(F32)
            elif consensus in ('none', None, False):
                # "M = Σ p_k": an fp32 accumulator that starts at +0 and adds p_k in k order
                # (README: sums start from +0). --m-sum-from-p0 selects M = p_0 + p_1 + ….
                if M_FROM_P0:
                    M = ps[0].copy()
                    for p in ps[1:]:
                        M = (M + p).astype(F32)
                else:
                    M = np.zeros(N, dtype=F32)
                    for p in ps:
                        M = (M + p).astype(F32)
                Ds = F32(0)
                for w in ws:
                    Ds = F32(Ds + w)
                if abs(float(Ds)) < 1e-8:
                    Ds = F32(1)
                D = np.full(N, Ds, dtype=F32)
            else:
                raise SystemExit(f'unsupported consensus {consensus!r}')
            if normalize:
                M = (M / D).astype(F32)
            if lam != 1:
                M = (M * F32(lam)).astype(F32)
            R = (Bf + M).astype(F32)
        od = out_dtype or bt.dtype
        out[name] = Tensor(od, bt.shape, store(R, od))
    return out


def merge_linear(recipe, load):
    """README: p_k = f32(w_k)·f32(X_k); M = Σ p_k, D = Σ f32(w_k) in model order from +0;
    out = M / D when normalize (default true; D = 1 when |D| < 1e-8), else M."""
    gp = recipe.get('parameters') or {}
    out_dtype = out_dtype_of(recipe)
    models = [(m['model'], m.get('parameters') or {}) for m in recipe['models']]
    ref_path = recipe.get('base_model') or models[0][0]
    ref = load(ref_path)
    loaded = [load(p) for p, _ in models]
    L = layer_count(ref.keys())
    out = {}
    for name, rt in ref.items():
        if rt.dtype not in MERGEABLE:
            out[name] = Tensor(rt.dtype, rt.shape, rt.raw)
            continue
        t = gradient_t(name, L)
        normalize = bool(lookup([gp], 'normalize', name, t, True))
        N = 1
        for s in rt.shape:
            N *= s
        M = np.zeros(N, dtype=F32)
        D = F32(0)
        with np.errstate(over='ignore', invalid='ignore', divide='ignore'):
            for (mpath, mp), mm in zip(models, loaded):
                if name not in mm:
                    raise SystemExit(f'{mpath}: missing tensor {name}')
                X = expert_f32(name, mm[name], rt.shape, mpath)
                wk = F32(num(lookup([mp, gp], 'weight', name, t, 1.0), 'weight'))
                M = (M + (wk * X).astype(F32)).astype(F32)
                D = F32(D + wk)
            if normalize:
                if abs(float(D)) < 1e-8:
                    D = F32(1)
                M = (M / D).astype(F32)
        od = out_dtype or rt.dtype
        out[name] = Tensor(od, rt.shape, store(M, od))
    return out


def row_sums_f64(prod, shape):
    """Σ in binary64: row partial sums in index order, rows summed in index order."""
    rows, n = rows_shape(shape)
    if prod.size == 0:
        return 0.0
    r = np.add.accumulate(prod.reshape(rows, n), axis=1)[:, -1]
    return float(np.add.accumulate(r)[-1])


def slerp_coefficients(A, B, shape, t):
    a = A.astype(np.float64)
    b = B.astype(np.float64)
    dot = row_sums_f64(a * b, shape)  # products of binary32 values are exact in binary64
    na = math.sqrt(row_sums_f64(a * a, shape))
    nb = math.sqrt(row_sums_f64(b * b, shape))
    if na <= 1e-8:
        na = 1.0
    if nb <= 1e-8:
        nb = 1.0
    cos = dot / (na * nb)
    if abs(cos) > 0.9995:
        return 1 - t, t
    theta = math.acos(cos)
    st = math.sin(theta)
    return math.sin(theta - t * theta) / st, math.sin(t * theta) / st


def merge_slerp(recipe, load):
    gp = recipe.get('parameters') or {}
    out_dtype = out_dtype_of(recipe)
    base_path = recipe['base_model']
    others = [m['model'] for m in recipe['models'] if m['model'] != base_path]
    if len(others) != 1:
        raise SystemExit(f'slerp needs exactly one model besides the base, got {len(others)}')
    base = load(base_path)
    other = load(others[0])
    L = layer_count(base.keys())
    out = {}
    for name, bt in base.items():
        if bt.dtype not in MERGEABLE:
            out[name] = Tensor(bt.dtype, bt.shape, bt.raw)
            continue
        if name not in other:
            raise SystemExit(f'{others[0]}: missing tensor {name}')
        A = expert_f32(name, bt, bt.shape, base_path)
        B = expert_f32(name, other[name], bt.shape, others[0], allow_embed_block=False)
        t = lookup([gp], 't', name, gradient_t(name, L), None)
        if t is None:
            # SPEC §7 / README give t no default: a tensor that no filter entry names has no t
            raise SystemExit(f'slerp: no value of t for tensor {name} (t has no default)')
        t = num(t, 't')
        c0, c1 = slerp_coefficients(A, B, bt.shape, t)
        with np.errstate(over='ignore', invalid='ignore'):
            m = (F32(0) + (F32(c0) * A).astype(F32)).astype(F32)
            m = (m + (F32(c1) * B).astype(F32)).astype(F32)
        od = out_dtype or bt.dtype
        out[name] = Tensor(od, bt.shape, store(m, od))
    return out


def main(argv):
    global M_FROM_P0
    _philox_selftest()
    args = [a for a in argv[1:] if not a.startswith('--')]
    M_FROM_P0 = '--m-sum-from-p0' in argv[1:]
    if len(args) != 2:
        raise SystemExit('usage: spec_merge.py RECIPE.json OUT.safetensors [--m-sum-from-p0]')
    recipe_path, out_path = args
    with open(recipe_path) as f:
        recipe = json.load(f)
    method = recipe['merge_method']
    load = Loader()
    if method in METHODS:
        out = merge_delta_method(recipe, method, load)
    elif method == 'linear':
        out = merge_linear(recipe, load)
    elif method == 'slerp':
        out = merge_slerp(recipe, load)
    else:
        raise SystemExit(f'unsupported merge_method {method}')
    write_safetensors(out_path, out)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
