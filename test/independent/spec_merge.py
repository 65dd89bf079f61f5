#!/usr/bin/env python3
"""Independent implementation of della-merge's merge semantics (SPEC.md), numpy only.

Usage: python3 spec_merge.py RECIPE.json OUT.safetensors [--m-sum-from-p0]

--m-sum-from-p0: without consensus, compute M as p_0 + p_1 + … instead of the default
+0 + p_0 + p_1 + … (they differ only in the sign of a zero; see main()).

Written only from /work/shared/SPEC.md, as a cross-check of the project's CLI.
Every "fp32" step is done with numpy float32 arrays / np.float32 scalars, one
operation at a time and in the order the spec writes it (numpy never fuses).
"""
import json
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
# sparsifiers
# ---------------------------------------------------------------------------

def magnitude_keys(delta, base_dtype):
    a = np.abs(delta).astype(F32)  # sign cleared
    if base_dtype == 'F16':
        return (f32_to_f16_bits(a) & np.uint16(0x7FFF)).astype(np.int64)
    if base_dtype == 'BF16':
        return (f32_to_bf16_bits(a) & np.uint16(0x7FFF)).astype(np.int64)
    return (a.view(U32) & U32(0x7FFFFFFF)).astype(np.int64)


def stable_row_ranks(keys2d):
    rows, n = keys2d.shape
    order = np.argsort(keys2d, axis=1, kind='stable')
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(n, dtype=order.dtype), (rows, n)), axis=1)
    return ranks


def rows_shape(shape):
    numel = 1
    for s in shape:
        numel *= s
    if len(shape) >= 2:
        n = shape[-1]
        return (numel // n if n else 0), n
    return 1, numel


def sparsify(delta, kind, density, epsilon, rescale_inverse, x, base_dtype, shape):
    """delta: flat fp32 array. Returns the sparsified flat fp32 array."""
    if kind == 'none' or density >= 1:
        return delta
    N = delta.size
    if kind == 'magprune':
        rows, n = rows_shape(shape)
        if N == 0:
            return delta
        keys = magnitude_keys(delta, base_dtype).reshape(rows, n)
        if n >= 2:
            r = stable_row_ranks(keys).reshape(-1)
            u = r.astype(F32) / F32(n - 1)
        else:
            u = np.full(N, F32(0.5), dtype=F32)
        lo = F32(density - epsilon)
        span = F32(2 * epsilon)
        q = lo + span * u  # fp32 mul then fp32 add
    elif kind == 'random':
        q = np.full(N, F32(density), dtype=F32)
    else:
        raise ValueError(kind)
    keep = x < q
    if rescale_inverse:
        with np.errstate(divide='ignore', over='ignore'):
            s = F32(1.0) / q
            kept = delta * s
    else:
        kept = delta
    return np.where(keep, kept, F32(0.0)).astype(F32)


# ---------------------------------------------------------------------------
# recipe
# ---------------------------------------------------------------------------

METHODS = {
    # sparsifier, consensus, normalize, rescale
    'task_arithmetic': ('none', 'none', False, None),
    'dare_ties': ('random', 'sum', False, True),
    'dare_linear': ('random', 'none', False, True),
    'della': ('magprune', 'sum', True, True),
    'della_linear': ('magprune', 'none', False, True),
}

DTYPE_NAMES = {
    'bfloat16': 'BF16', 'bf16': 'BF16', 'float16': 'F16', 'fp16': 'F16', 'half': 'F16',
    'float32': 'F32', 'fp32': 'F32', 'float': 'F32',
}


def scalar(v, what):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f'only scalar parameters are supported: {what} = {v!r}')
    return float(v)


def model_params(global_p, model_p):
    def get(name, default):
        if name in model_p:
            return scalar(model_p[name], name)
        if name in global_p:
            return scalar(global_p[name], name)
        return default
    density = get('density', None)
    if density is None:
        dr = model_p.get('drop_rate', global_p.get('drop_rate'))
        density = 1.0 - scalar(dr, 'drop_rate') if dr is not None else 1.0
    eps = get('epsilon', None)
    if eps is None:
        ws = model_p.get('window_size', global_p.get('window_size'))
        eps = scalar(ws, 'window_size') / 2 if ws is not None else 0.15
    return {'weight': get('weight', 1.0), 'density': density, 'epsilon': eps}


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
    if method not in METHODS:
        raise SystemExit(f'unsupported merge_method {method}')
    sparsifier, consensus, normalize, rescale = METHODS[method]
    gp = recipe.get('parameters') or {}
    if 'consensus' in gp:
        consensus = gp['consensus']
    if 'normalize' in gp:
        normalize = bool(gp['normalize'])
    if 'rescale' in gp:
        rescale = gp['rescale']
    if rescale not in (True, False, None, 'inverse'):
        raise SystemExit(f'unsupported rescale {rescale!r}')
    rescale_inverse = rescale is True or rescale == 'inverse'
    lam = scalar(gp['lambda'], 'lambda') if 'lambda' in gp else 1.0
    seed = int(recipe.get('seed', 0) or 0)
    assert 0 <= seed < 2 ** 53
    out_dtype = recipe.get('out_dtype') or recipe.get('dtype')
    out_dtype = DTYPE_NAMES[out_dtype] if out_dtype else None

    base_path = recipe['base_model']
    experts = []
    for m in recipe['models']:
        if m['model'] == base_path:
            continue  # the base is excluded from the expert list
        experts.append((m['model'], model_params(gp, m.get('parameters') or {})))

    base = load_model(base_path)
    exp_models = [load_model(p) for p, _ in experts]

    embed_names = ('embed_tokens', 'lm_head', 'wte', 'word_embeddings', 'embed_in', 'embed_out')
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
        ps = []
        ws = []
        for k, ((mpath, prm), em) in enumerate(zip(experts, exp_models)):
            if name not in em:
                raise SystemExit(f'{mpath}: missing tensor {name}')
            et = em[name]
            E = load_f32(et)
            if et.shape != bt.shape:
                if (any(s in name for s in embed_names) and len(et.shape) == len(bt.shape)
                        and all(a > b for a, b in zip(et.shape, bt.shape))):
                    E = E[tuple(slice(0, s) for s in bt.shape)]
                else:
                    raise SystemExit(f'{mpath}: {name}: shape {et.shape} vs base {bt.shape}')
            Ef = np.ascontiguousarray(E).reshape(-1)
            if not np.all(np.isfinite(Ef)):
                raise SystemExit(f'{mpath}: {name}: {int(np.sum(~np.isfinite(Ef)))} non-finite values')
            delta = (Ef - Bf).astype(F32)
            if sparsifier != 'none' and prm['density'] < 1:
                x = uniforms(N, seed, tid, k)
                if sparsifier == 'magprune':
                    d, e = prm['density'], prm['epsilon']
                    if not (e >= 0 and d - e > 0 and d + e <= 1):
                        raise SystemExit(f'{mpath}: invalid density/epsilon {d}/{e}')
                dsp = sparsify(delta, sparsifier, prm['density'], prm['epsilon'], rescale_inverse,
                               x, bt.dtype, bt.shape)
            else:
                dsp = delta
            wk = F32(prm['weight'])
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
                # "M = Σ p_k": an fp32 accumulator that starts at +0 and adds p_k in k order,
                # the same summation as the consensus branch above (whose empty sum is +0).
                # NOTE: SPEC.md writes S as "p_0 + p_1 + …" but M only as "Σ p_k"; the two
                # readings differ in one case: all p_k == -0 (negative weights, dropped or
                # zero deltas) and base == -0, where p_0 + p_1 + … gives -0 + -0 = -0 at the
                # end but +0 + p_0 + … gives +0 (before normalize, which may flip it).
                # The CLI follows the +0-accumulator reading; see the cross-check report.
                # --m-sum-from-p0 selects the other reading (M = p_0 + p_1 + …).
                if M_FROM_P0:
                    M = ps[0].copy()
                    for p in ps[1:]:
                        M = (M + p).astype(F32)
                else:
                    M = np.zeros(N, dtype=F32)
                    for p in ps:
                        M = (M + p).astype(F32)
                Ds = ws[0]
                for w in ws[1:]:
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

    write_safetensors(out_path, out)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
