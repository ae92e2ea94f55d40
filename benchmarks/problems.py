"""What a benchmark row computes, independent of who computes it.

A `Target` is the function a row runs: the preset itself, or the dense stand-in that a dense
peer runs for a sparse preset. From it come the keep-set as a boolean mask, the float32
reference the relative errors are measured against, and the FLOP and byte counts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_sparsek.testing import AttentionSpec

# The float32 reference materialises its [queries, keys] scores: XLA's buffers hold about 10
# float32 copies of them at once for SparseK's soft gates (the threshold's sorts, the gates, the
# softmax, their gradients) and 2 (forward) to 6 (with the backward) for dense masked attention
# (memory_analysis() of the compiled references; allow up to twice that on a GPU). It runs on a
# slice of the problem (first batch elements, first kv-head groups) with at most this many score
# elements, never less than one (batch, kv-head group): 2^26 elements are 256 MiB per float32
# copy, so the reference peaks at a few GiB and leaves the device to the implementations. A
# (batch, kv-head group) with more scores than that runs in query blocks (query_blocks).
REF_SCORE_BUDGET = 1 << 26


@dataclasses.dataclass(frozen=True)
class Target:
    """The function a row computes. `hard_selection` (SparseK only): attention masked to the
    window and the selected keys with 0/1 gates, which is what a mask-based peer can run;
    otherwise the op itself (soft SparseK gates)."""

    spec: AttentionSpec
    hard_selection: bool = False


def scale(spec: AttentionSpec) -> float:
    return 1.0 / math.sqrt(spec.D)


def scale_down(spec: AttentionSpec, factor: int) -> AttentionSpec:
    """Shrinks a preset for a CPU run: batch, heads, length, window, k_select and block sizes
    divided by `factor` (head dims kept, so the same kernel variants run)."""
    if factor <= 1:
        return spec
    div = lambda x, lo: max(lo, x // factor)
    K = div(spec.k, 1)
    N = max(K, div(spec.N, 1) // K * K)  # keep N a multiple of K
    # T never grows: a decoding step (T=1) stays one query.
    kw = dict(B=div(spec.B, 1), T=min(spec.T, div(spec.T, 16)), N=N, K=None if spec.K is None else K)
    if spec.S is not None:
        kw["S"] = div(spec.S, 16)
    if spec.window is not None:
        kw["window"] = tuple(w if w < 0 else div(w, 0) for w in spec.window)
    if spec.block_size is not None:
        kw["block_size"] = tuple(div(b, 16) for b in spec.block_size)
    if spec.k_select is not None:
        kw["k_select"] = div(spec.k_select, 1)
    if spec.sparsek_window is not None:
        kw["sparsek_window"] = div(spec.sparsek_window, 1)
    return spec.replace(**kw)


def dense_targets(spec: AttentionSpec) -> list[tuple[str, Target]]:
    """(name suffix, target) of the dense problems a dense peer runs for `spec`: the problem
    itself for flash_attention; dense attention with the same causality for the sparse ops,
    and for SparseK also the sliding window with as many keys per query as SparseK attends
    (the same work, but contiguous)."""
    if spec.op == "flash_attention":
        return [("", Target(spec))]
    dense = spec.replace(block_size=None, block_density=None, k_select=None, sparsek_window=None)
    if spec.T == 1:  # decoding: the query sits after every key, so dense attention is unmasked
        # (jax.nn would align a causal mask top-left and show it only key 0); no window stand-in
        return [("", Target(dense.replace(causal=False)))]
    out = [("", Target(dense))]
    if spec.op == "sparsek_attention":
        w = int(spec.attended_keys())
        window = (w - 1, 0) if spec.causal else ((w - 1) // 2, w // 2)
        out.append((f"window={w}", Target(dense.replace(window=window))))
    return out


def selection_threshold(scores: jax.Array, spec: AttentionSpec) -> jax.Array:
    """theta [B, K, T]: the k_select-th largest candidate score of each query (-inf where a
    query has at most k_select candidates). SparseK's selection of query i is then the
    candidates j with scores[j] >= theta_i (ties, absent from random data, all kept)."""
    B, S, K = scores.shape
    k_sel, T = spec.k_select, spec.T
    u = jnp.transpose(scores, (0, 2, 1)).reshape(B * K, S)
    if not spec.causal or k_sel >= S:  # one candidate set (all keys) shared by every query
        kth = jax.lax.top_k(u, k_sel)[0][:, -1] if k_sel < S else jnp.full((B * K,), -jnp.inf)
        return jnp.broadcast_to(kth.reshape(B, K, 1), (B, K, T))

    # Causal: the candidate set grows by one key per query. Scan the keys keeping the k_sel
    # largest seen so far; kth[j] is the k_sel-th largest of keys 0..j (-inf until k_sel seen).
    rows = jnp.arange(B * K)

    def push(top, col):
        low = jnp.argmin(top, axis=1)
        top = top.at[rows, low].max(col)
        return top, jnp.min(top, axis=1)

    _, kth = jax.lax.scan(push, jnp.full((B * K, k_sel), -jnp.inf, u.dtype), u.T)
    last_candidate = jnp.arange(T) + S - T - (spec.sparsek_window or 0)
    theta = jnp.where(last_candidate[:, None] >= 0, kth[jnp.clip(last_candidate, 0)], -jnp.inf)
    return theta.T.reshape(B, K, T)


def keep_mask(target: Target, arrays: dict, first_row=0, rows: Optional[int] = None) -> jax.Array:
    """Boolean [B or 1, N or 1, rows, S]: which keys the queries first_row .. first_row + rows - 1
    (all T by default) attend (soft SparseK gates are not a mask: only for hard_selection).
    `first_row` may be traced. For SparseK, arrays["theta"] (selection_threshold's rows of these
    queries) is used when present, else computed from arrays["scores"]."""
    spec = target.spec
    T, S, N, K = spec.T, spec.s, spec.N, spec.k
    rows = T if rows is None else rows
    pos = (first_row + jnp.arange(rows) + S - T)[:, None]
    key = jnp.arange(S)[None, :]
    keep = jnp.ones((rows, S), bool)

    if spec.op == "sparsek_attention":
        if not target.hard_selection:
            raise ValueError("soft SparseK gates are not a 0/1 mask")
        w = spec.sparsek_window or 0
        theta = arrays.get("theta")  # [B, K, rows]
        if theta is None:
            theta = jax.lax.dynamic_slice_in_dim(selection_threshold(arrays["scores"], spec),
                                                 first_row, rows, axis=2)
        u = jnp.transpose(arrays["scores"], (0, 2, 1))[:, :, None, :]  # [B, K, 1, S]
        if spec.causal:
            window = (key <= pos) & (key > pos - w)
            selected = (key <= pos - w) & (u >= theta[..., None])
        else:
            window = jnp.abs(pos - key) < w
            selected = u >= theta[..., None]
        return jnp.repeat(window | selected, N // K, axis=1)

    if spec.causal:
        keep &= key <= pos
    if spec.window is not None:
        left, right = spec.window
        if left >= 0:
            keep &= key >= pos - left
        if right >= 0:
            keep &= key <= pos + right
    keep = keep[None, None]
    if spec.op == "block_sparse_attention":
        bq, bk = spec.block_size
        blocks = arrays["block_mask"]
        if blocks.shape[1] not in (1, N):  # one mask per kv head: shared by its query heads
            blocks = jnp.repeat(blocks, N // K, axis=1)
        blocks = jnp.repeat(blocks, bq, axis=2)
        blocks = jax.lax.dynamic_slice_in_dim(blocks, first_row, rows, axis=2)
        blocks = jnp.repeat(blocks, bk, axis=3)[..., :S]
        keep = keep & blocks
    return keep


def masked_attention_f32(q, k, v, keep, scale_: float):
    """Dense float32 attention restricted to `keep`; a query that keeps no key returns 0."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    hi = jax.lax.Precision.HIGHEST
    s = jnp.einsum("btnd,bsnd->bnts", q, k, precision=hi) * scale_
    s = jnp.where(keep, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    e = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(denom > 0, denom, 1.0)
    return jnp.einsum("bnts,bsnd->btnd", p, v, precision=hi)


def reference_slice(spec: AttentionSpec, budget: int = REF_SCORE_BUDGET) -> tuple[int, int]:
    """(batch elements, kv heads) of the slice the float32 reference runs on."""
    per_kv_head = (spec.N // spec.k) * spec.T * spec.s
    kv_heads = int(np.clip(budget // per_kv_head, 1, spec.k))
    batch = int(np.clip(budget // (per_kv_head * spec.k), 1, spec.B)) if kv_heads == spec.k else 1
    return batch, kv_heads


def slice_arrays(arrays: dict, spec: AttentionSpec, batch: int, kv_heads: int) -> dict:
    """The first `batch` elements and `kv_heads` kv-head groups of inputs, outputs or
    gradients, by name (o, do, q: query heads; k, v, scores: kv heads; block_mask: either)."""
    q_heads = kv_heads * (spec.N // spec.k)
    out = {}
    for name, x in arrays.items():
        if name == "block_mask":
            heads = {spec.N: q_heads, spec.k: kv_heads}.get(x.shape[1], x.shape[1])
            x = x[: batch if x.shape[0] > 1 else 1, :heads]
        elif name == "scores":
            x = x[:batch, :, :kv_heads]
        else:
            x = x[:batch, :, : (q_heads if name in ("q", "o", "do") else kv_heads)]
        out[name] = x
    return out


def _soft(target: Target) -> bool:
    return target.spec.op == "sparsek_attention" and not target.hard_selection


def query_blocks(target: Target, batch: int, kv_heads: int, backward: bool,
                 budget: Optional[int] = None) -> list[tuple[int, int]]:
    """Query blocks [t0, t1) the float32 reference of a (sliced) problem runs one at a time, each
    with at most about `budget` score elements: [(0, T)] when the whole slice fits (or without a
    budget). Forward: the last block only (output rows are independent; the last queries see
    every key). Backward: every query; the gradients w.r.t. k, v and scores are summed over the
    blocks. Dense and mask targets see every key in each block (one block shape: one compile);
    soft SparseK blocks see the keys up to their last query (S - T + t1 keys: exactly the block's
    rows of the causal problem; one compile per block), and without causality (or with fewer
    keys than queries) the soft SparseK backward runs whole."""
    spec = target.spec
    T, S = spec.T, spec.s
    per_key = batch * kv_heads * (spec.N // spec.k)  # score elements per (query, key)
    if budget is None or per_key * T * S <= budget:
        return [(0, T)]

    def rows(room: float) -> int:  # the queries that fit, a multiple of 128 when that is >= 1
        n = int(room)
        return max(1, n // 128 * 128 if n >= 128 else n)

    if not backward:
        return [(T - min(T, rows(budget / (per_key * S))), T)]
    if not _soft(target):
        n = min(T, rows(budget / (per_key * S)))
        return [(t, min(t + n, T)) for t in range(0, T, n)]
    if not spec.causal or S < T:
        return [(0, T)]
    blocks, t0, c, room = [], 0, S - T, budget / per_key
    while t0 < T:  # the largest t1 with (t1 - t0) * (c + t1) <= room
        t1 = (t0 - c + math.sqrt((c - t0) ** 2 + 4 * (c * t0 + room))) / 2
        t1 = min(T, t0 + rows(t1 - t0))
        blocks.append((t0, t1))
        t0 = t1
    return blocks


def reference(target: Target, arrays: dict, do: Optional[jax.Array], grad_args: tuple[str, ...],
              budget: Optional[int] = None):
    """Float32 output (and the gradients of sum(o * do) w.r.t. grad_args when `do` is given)
    of the target on (already sliced) inputs, run in the query blocks of query_blocks(budget):
    the output covers the last o.shape[1] queries (all of them with `do`), the gradients every
    query."""
    spec = target.spec
    soft = _soft(target)
    names = ("q", "k", "v", "scores") if soft else ("q", "k", "v")
    T, S = spec.T, spec.s

    def run(arrays, do, first_row):
        if soft:
            from jax_sparsek import reference as ref  # the op's own definition: gates need tau_i

            fn = lambda q, k, v, scores: ref.sparsek_attention(
                q, k, v, scores, **spec.op_kwargs(), scale=scale(spec))
        else:
            keep = keep_mask(target, arrays, first_row, arrays["q"].shape[1])
            fn = lambda q, k, v: masked_attention_f32(q, k, v, keep, scale(spec))
        args = [arrays[n] for n in names]
        if do is None:
            return fn(*args), {}
        o, vjp = jax.vjp(fn, *args)
        return o, {n: g for n, g in zip(names, vjp(do)) if n in grad_args}

    f32 = {n: x if n == "block_mask" else jnp.asarray(x, jnp.float32) for n, x in arrays.items()}
    do = None if do is None else jnp.asarray(do, jnp.float32)
    blocks = query_blocks(target, f32["k"].shape[0], f32["k"].shape[2], do is not None, budget)
    with jax.default_matmul_precision("highest"):
        if spec.op == "sparsek_attention" and not soft and blocks != [(0, T)]:
            f32["theta"] = jax.jit(selection_threshold, static_argnums=1)(f32["scores"], spec)
        step = jax.jit(run)
        outs, grads = [], {}
        for t0, t1 in blocks:
            part = dict(f32, q=f32["q"][:, t0:t1])
            if "theta" in part:
                part["theta"] = part["theta"][:, :, t0:t1]
            if soft:  # the causal problem of these queries: keys up to the last one's position
                keys = S - T + t1
                part.update({n: f32[n][:, :keys] for n in ("k", "v", "scores")})
            o, g = step(part, None if do is None else do[:, t0:t1], jnp.int32(t0))
            outs.append(np.asarray(o))
            for n, x in g.items():
                x = np.asarray(x)
                if len(blocks) == 1:
                    grads[n] = x
                    continue
                total = grads.setdefault(n, np.zeros(f32[n].shape, np.float64))
                if n == "q":
                    total[:, t0:t1] = x
                else:  # keys beyond a soft block's last query get nothing from it
                    total[:, :x.shape[1]] += x
            del o, g
    o = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)
    return o, grads


def bytes_moved(spec: AttentionSpec, passes: str) -> float:
    """q, k, v read and o written once (plus scores / block mask); fwd+bwd counts every array
    three times (forward, backward read, gradient or do). SparseK reads every score but only
    the k/v rows some query attends: at most S, and at most window + k_select + 2 (T - 1)
    (the window slides by T - 1 rows, the selection changes by at most one key per query),
    which is what bounds a decoding query's bytes."""
    B, T, S, N, K = spec.B, spec.T, spec.s, spec.N, spec.k
    size = jnp.dtype(spec.dtype).itemsize
    rows = S
    if spec.op == "sparsek_attention":
        rows = min(S, int(spec.attended_keys()) + 2 * (T - 1))
    total = size * (B * T * N * spec.D + B * rows * K * (spec.D + spec.dv) + B * T * N * spec.dv)
    if spec.op == "sparsek_attention":
        total += 4 * B * S * K
    if spec.op == "block_sparse_attention":
        bq, bk = spec.block_size
        total += B * N * math.ceil(T / bq) * math.ceil(S / bk)
    return float(total) * (3 if passes == "fwd+bwd" else 1)
