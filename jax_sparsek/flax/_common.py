"""The computation behind both Flax front ends of SparseKAttention (NNX and Linen).

Everything here is a pure function of a parameter dict, so the two front ends only declare
parameters and call in; their outputs agree for the same weights by construction.

Parameters (the same names in NNX and Linen):
  q_kernel [E, N, D], k_kernel [E, K, D], v_kernel [E, K, D], out_kernel [N, D, E],
  score_kernel [E, K] and score_slope [K]: the importance score of the token at position p
  for kv head h is u = x . score_kernel[:, h] + score_slope[h] * p (float32).

Decoding keeps a cache whose size does not grow with the sequence (see `SparseKCache`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

import jax_sparsek
from jax_sparsek import _ffi
from jax_sparsek import decode as decode_attention

PARAM_NAMES = ("q_kernel", "k_kernel", "v_kernel", "out_kernel", "score_kernel", "score_slope")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Static configuration shared by the NNX and Linen layers (hashable: jit-static)."""

    features: int  # E, model width (input and output)
    num_heads: int  # N
    num_kv_heads: int  # K, N % K == 0
    head_dim: int  # D
    k_select: int
    window: int
    causal: bool = True
    rope: bool = True
    rope_theta: float = 10000.0
    dtype: Any = None  # computation dtype; None = promote(input, params)
    param_dtype: Any = jnp.float32
    implementation: Optional[str] = None  # passed through to jax_sparsek.sparsek_attention
    cache_slack: Optional[int] = None  # extra rows of the decode score buffer; None = k_select

    def __post_init__(self):
        for name in ("features", "num_heads", "num_kv_heads", "head_dim", "k_select", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.rope and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.head_dim}")
        if self.cache_slack is not None and self.cache_slack < 1:
            # tau over k_select + 1 candidates needs at least one row beyond k_select
            raise ValueError(f"cache_slack must be >= 1, got {self.cache_slack}")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def candidate_capacity(self) -> int:
        """Rows of the decode cache's score-only buffer of candidate keys."""
        slack = self.k_select if self.cache_slack is None else self.cache_slack
        return self.k_select + slack


def make_config(*, features, num_heads, num_kv_heads=None, head_dim=None, **kw) -> AttentionConfig:
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if head_dim is None:
        if features % num_heads:
            raise ValueError(f"features={features} is not a multiple of num_heads={num_heads}: "
                             "pass head_dim")
        head_dim = features // num_heads
    return AttentionConfig(features=features, num_heads=num_heads, num_kv_heads=num_kv_heads,
                           head_dim=head_dim, **kw)


# ---------------------------------------------------------------------------------------------
# Parameters


def param_initializers(cfg: AttentionConfig) -> dict:
    """name -> (init_fn(key, shape, dtype), shape). Fan-in scaled normal for every kernel,
    zero slope (no preference for recent keys until learnt)."""
    E, N, K, D = cfg.features, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    fan_in = functools.partial(jax.nn.initializers.variance_scaling, 1.0, "fan_in",
                               "truncated_normal")
    return {
        "q_kernel": (fan_in(in_axis=0, out_axis=(1, 2)), (E, N, D)),
        "k_kernel": (fan_in(in_axis=0, out_axis=(1, 2)), (E, K, D)),
        "v_kernel": (fan_in(in_axis=0, out_axis=(1, 2)), (E, K, D)),
        "out_kernel": (fan_in(in_axis=(0, 1), out_axis=2), (N, D, E)),
        "score_kernel": (fan_in(in_axis=0, out_axis=1), (E, K)),
        "score_slope": (jax.nn.initializers.zeros, (K,)),
    }


def init_params(cfg: AttentionConfig, key) -> dict:
    inits = param_initializers(cfg)
    keys = jax.random.split(key, len(PARAM_NAMES))
    return {name: inits[name][0](k, inits[name][1], cfg.param_dtype)
            for name, k in zip(PARAM_NAMES, keys)}


def compute_dtype(cfg: AttentionConfig, x) -> jnp.dtype:
    return jnp.dtype(cfg.dtype) if cfg.dtype is not None else jnp.result_type(x.dtype,
                                                                               cfg.param_dtype)


# ---------------------------------------------------------------------------------------------
# Projections


def apply_rope(x, positions, theta: float):
    """Rotary embedding (rotate-half form) of x [..., T, H, D] at integer positions [T]."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[:, None] * inv_freq  # [T, D/2]
    cos = jnp.cos(angle)[:, None, :]  # broadcast over heads
    sin = jnp.sin(angle)[:, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def project_qkv(params, x, positions, cfg: AttentionConfig):
    """x [B, T, E] at positions [T] -> q [B, T, N, D], k and v [B, T, K, D]."""
    dt = compute_dtype(cfg, x)
    x = x.astype(dt)
    q = jnp.einsum("bte,end->btnd", x, params["q_kernel"].astype(dt))
    k = jnp.einsum("bte,ekd->btkd", x, params["k_kernel"].astype(dt))
    v = jnp.einsum("bte,ekd->btkd", x, params["v_kernel"].astype(dt))
    if cfg.rope:
        q = apply_rope(q, positions, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rope_theta)
    return q, k, v


def project_scores(params, x, positions):
    """The importance score of every key, float32 [B, T, K]: u = x W_u + slope * position."""
    u = jnp.einsum("bte,ek->btk", x.astype(jnp.float32),
                   params["score_kernel"].astype(jnp.float32))
    slope = params["score_slope"].astype(jnp.float32)
    return u + slope * positions.astype(jnp.float32)[:, None]


def project_out(params, o, cfg: AttentionConfig):
    dt = compute_dtype(cfg, o)
    return jnp.einsum("btnd,nde->bte", o.astype(dt), params["out_kernel"].astype(dt))


def check_input(x, cfg: AttentionConfig):
    if x.ndim != 3 or x.shape[-1] != cfg.features:
        raise ValueError(f"x must have shape [batch, length, features={cfg.features}], "
                         f"got {tuple(x.shape)}")


def forward(params, x, cfg: AttentionConfig):
    """The full layer over a sequence starting at position 0: x [B, T, E] -> [B, T, E]."""
    check_input(x, cfg)
    positions = jnp.arange(x.shape[1])
    q, k, v = project_qkv(params, x, positions, cfg)
    scores = project_scores(params, x, positions)
    o = jax_sparsek.sparsek_attention(q, k, v, scores, k_select=cfg.k_select, window=cfg.window,
                                      causal=cfg.causal, implementation=cfg.implementation)
    return project_out(params, o, cfg)


# ---------------------------------------------------------------------------------------------
# Decoding with a bounded cache


@flax.struct.dataclass
class SparseKCache:
    """Decode state of one SparseKAttention layer; no array grows with the sequence.

    Why it is enough (causal SPEC section 4, for each batch row and kv head): step p attends
    to the window (p - window, p] with gate 1, and to its selection T_p (the k_select
    candidates j <= p - window with the largest scores) with gate clip(u_j - tau_p, 0, 1).
    Step p + 1 adds a single candidate, p + 1 - window, so T_{p+1} is within T_p plus that
    key: a key that leaves the selection never returns, and K/V rows are needed only for the
    window (a ring buffer) and the current selection. tau_p depends on the scores of all
    candidates, but tau is nondecreasing in p and a candidate with u_j <= tau_p adds nothing
    to the mass at any later tau, so only scores above tau_p are kept: a score-only buffer of
    `candidate_capacity` = k_select + slack entries.

    Exactness: decoding matches the full causal forward as long as, after every step, the
    candidates scoring above tau fit into that buffer. At most k_select of them score
    >= tau + 1, so this holds whenever at most `slack` candidates score within
    (tau, tau + 1). When the buffer overflows, the lowest scores are dropped and
    `overflowed` is set for that (batch row, kv head): tau may then come out slightly low.

    Shapes (B batch, K kv heads, W window, S = k_select, C = candidate_capacity):
      pos          int32 []          position of the next token (tokens seen so far)
      window_k/v   [B, K, W, D]      ring buffer, slot p % W holds the token at position p
      window_score f32 [B, K, W]     scores of those tokens (needed when they become candidates)
      select_k/v   [B, K, S, D]      the current selection T
      select_score f32 [B, K, S], select_pos int32 [B, K, S] (-1 marks an empty row)
      cand_score   f32 [B, K, C]     scores of candidates above tau (-inf marks an empty entry)
      tau          f32 [B, K]        tau of the last step (-inf while <= k_select candidates)
      overflowed   bool [B, K]
    """

    pos: jax.Array
    window_k: jax.Array
    window_v: jax.Array
    window_score: jax.Array
    select_k: jax.Array
    select_v: jax.Array
    select_score: jax.Array
    select_pos: jax.Array
    cand_score: jax.Array
    tau: jax.Array
    overflowed: jax.Array

    def num_bytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))


def cache_shapes(cfg: AttentionConfig, batch_size: int, dtype) -> dict:
    """field -> jax.ShapeDtypeStruct of an empty cache (used by Linen's 'cache' collection)."""
    B, K, W, S, C, D = (batch_size, cfg.num_kv_heads, cfg.window, cfg.k_select,
                        cfg.candidate_capacity, cfg.head_dim)
    f32 = jnp.float32
    sd = jax.ShapeDtypeStruct
    return {
        "pos": sd((), jnp.int32),
        "window_k": sd((B, K, W, D), dtype), "window_v": sd((B, K, W, D), dtype),
        "window_score": sd((B, K, W), f32),
        "select_k": sd((B, K, S, D), dtype), "select_v": sd((B, K, S, D), dtype),
        "select_score": sd((B, K, S), f32), "select_pos": sd((B, K, S), jnp.int32),
        "cand_score": sd((B, K, C), f32),
        "tau": sd((B, K), f32), "overflowed": sd((B, K), jnp.bool_),
    }


_EMPTY_FILL = {"select_score": -jnp.inf, "select_pos": -1, "cand_score": -jnp.inf,
               "tau": -jnp.inf}


def empty_cache_field(name: str, shape: jax.ShapeDtypeStruct):
    return jnp.full(shape.shape, _EMPTY_FILL.get(name, 0), shape.dtype)


def init_cache(cfg: AttentionConfig, batch_size: int, dtype) -> SparseKCache:
    if not cfg.causal:
        raise ValueError("decoding needs causal=True")
    shapes = cache_shapes(cfg, batch_size, jnp.dtype(dtype))
    return SparseKCache(**{name: empty_cache_field(name, s) for name, s in shapes.items()})


def _insert_candidate(cache: SparseKCache, cfg: AttentionConfig, cand_k, cand_v, cand_u,
                      cand_pos, arrives):
    """Adds the key at position cand_pos (k/v [B, K, D], score [B, K]) to the candidates where
    `arrives`, and returns the cache with the updated selection, buffer and tau."""
    take = lambda x, i: jnp.take_along_axis(x, i[..., None], axis=-1)[..., 0]

    # Selection: the new key replaces the weakest row (empty rows first; ties in score go to
    # the larger position, and the newcomer's is the largest of all candidates).
    sel_u, sel_p = cache.select_score, cache.select_pos
    weakest_u = jnp.min(sel_u, axis=-1)
    weakest = jnp.argmin(jnp.where(sel_u == weakest_u[..., None], sel_p, jnp.iinfo(jnp.int32).max),
                         axis=-1)
    enters = arrives & (cand_u >= weakest_u)
    # A scatter of one row per (batch, kv head): in place wherever XLA may reuse the cache's
    # buffers (the carry of decode's scan, a donated cache), not a pass over them. Where the key
    # does not enter, the row index is out of range and the scatter drops it.
    b, kv = jnp.meshgrid(jnp.arange(sel_u.shape[0]), jnp.arange(sel_u.shape[1]), indexing="ij")
    row = jnp.where(enters, weakest, sel_u.shape[-1])

    def replace_row(rows, new):  # rows [B, K, k_select, ...], new [B, K, ...]
        return rows.at[b, kv, row].set(new, mode="drop")

    select_k = replace_row(cache.select_k, cand_k)
    select_v = replace_row(cache.select_v, cand_v)
    select_score = replace_row(sel_u, cand_u)
    select_pos = replace_row(sel_p, jnp.broadcast_to(cand_pos, enters.shape).astype(sel_p.dtype))

    # Score buffer: holds every candidate above the last tau. A newcomer at or below tau can
    # never carry mass (tau only grows), so it is not stored.
    buf = cache.cand_score
    lowest = jnp.argmin(buf, axis=-1)
    lowest_u = take(buf, lowest)
    needed = arrives & (cand_u > cache.tau)
    full = jnp.isfinite(lowest_u)
    stored = needed & (cand_u > lowest_u)
    buf = jnp.where(jax.nn.one_hot(lowest, buf.shape[-1], dtype=jnp.bool_) & stored[..., None],
                    cand_u[..., None], buf)
    overflowed = cache.overflowed | (needed & full)

    n_candidates = cache.pos - cfg.window + 1  # including the newcomer, when it arrives
    tau = jax_sparsek.sparsek_threshold(buf, cfg.k_select)  # -inf entries are not candidates
    tau = jnp.where(arrives & (n_candidates > cfg.k_select), tau, cache.tau)
    buf = jnp.where(buf > tau[..., None], buf, -jnp.inf)  # these can never matter again
    return cache.replace(select_k=select_k, select_v=select_v, select_score=select_score,
                         select_pos=select_pos, cand_score=buf, tau=tau, overflowed=overflowed)


def _cache_attention(q, parts, scale: float, implementation: Optional[str] = None):
    """q [B, 1, N, D] against cache parts [(k, v [B, K, R, D], gate f32 [B, K, R])]: softmax
    over the entries of every part, each weighted by its gate (<= 0: masked).

    With the FFI kernels (`implementation` as in sparsek_attention), the decode kernel runs
    once per part, reading the rows in place, and the parts merge by their lse; q is rounded
    to the cache's dtype first (the kernel takes one dtype), and the step differentiates in
    reverse mode only (custom_vjp). Otherwise the float32 reference runs on the concatenated
    parts."""
    dtype, D = parts[0][0].dtype, q.shape[-1]
    impl = _ffi.resolve_implementation(implementation, [decode_attention.TARGET],
                                       _ffi.cuda_unsupported(dtype, D, D))
    if impl == "xla":
        k, v, gate = (jnp.concatenate(xs, axis=2) for xs in zip(*parts))
        return decode_attention.reference(q.astype(jnp.float32), k, v, gate, scale=scale,
                                          heads_first=True)[0]
    q = q.astype(dtype)
    outs = [decode_attention.weighted_decode_attention(q, k, v, gate, scale) for k, v, gate in parts]
    lse = jnp.stack([part_lse for _, part_lse in outs])  # [parts, B, N, 1]
    top = jnp.max(lse, axis=0)
    share = jnp.where(jnp.isfinite(lse), jnp.exp(lse - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    share = share / jnp.maximum(jnp.sum(share, axis=0), jnp.finfo(jnp.float32).tiny)
    share = jnp.moveaxis(share, -1, -2)[..., None]  # [parts, B, 1, N, 1]
    return sum(w * o.astype(jnp.float32) for w, (o, _) in zip(share, outs))


def decode_step(params, x_t, cache: SparseKCache, cfg: AttentionConfig):
    """One token for every batch row: x_t [B, E] at position cache.pos -> (y_t [B, E], cache)."""
    if not cfg.causal:
        raise ValueError("decoding needs causal=True")
    B, E = x_t.shape
    K, W = cfg.num_kv_heads, cfg.window
    p = cache.pos
    x = x_t[:, None, :]
    q, k, v = project_qkv(params, x, p[None], cfg)  # [B, 1, N|K, D]
    u = project_scores(params, x, p[None])[:, 0]  # [B, K]
    k, v = k[:, 0].astype(cache.window_k.dtype), v[:, 0].astype(cache.window_v.dtype)

    # The token leaving the window (position p - W) becomes a candidate; its slot takes the new one.
    slot = p % W
    leaving_k = cache.window_k[:, :, slot]
    leaving_v = cache.window_v[:, :, slot]
    leaving_u = cache.window_score[:, :, slot]
    cache = cache.replace(
        window_k=cache.window_k.at[:, :, slot].set(k),
        window_v=cache.window_v.at[:, :, slot].set(v),
        window_score=cache.window_score.at[:, :, slot].set(u))
    arrives = jnp.broadcast_to(p >= W, (B, K))
    cache = _insert_candidate(cache, cfg, leaving_k, leaving_v, leaving_u, p - W, arrives)

    # Gates: 1 on the window (slots of positions >= 0), clip(u - tau, 0, 1) on the selection.
    slot_pos = p - (p - jnp.arange(W)) % W
    window_gate = jnp.broadcast_to(slot_pos >= 0, (B, K, W)).astype(jnp.float32)
    soft = jnp.clip(cache.select_score - cache.tau[..., None], 0.0, 1.0)
    select_gate = jnp.where(cache.select_pos >= 0, soft, 0.0)
    o = _cache_attention(q, [(cache.window_k, cache.window_v, window_gate),
                             (cache.select_k, cache.select_v, select_gate)],
                         1.0 / float(cfg.head_dim) ** 0.5, cfg.implementation)
    y = project_out(params, o.astype(compute_dtype(cfg, x_t)), cfg)[:, 0]
    return y, cache.replace(pos=p + 1)


def decode(params, x, cache: SparseKCache, cfg: AttentionConfig):
    """decode_step over every token of x [B, T, E] in order (a lax.scan)."""

    def step(c, x_t):
        y_t, c = decode_step(params, x_t, c, cfg)
        return c, y_t

    cache, ys = jax.lax.scan(step, cache, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1), cache


def prefill(params, x, cfg: AttentionConfig, cache_dtype=None):
    """The full forward over x [B, T, E] (positions 0..T-1, one parallel pass) and the decode
    cache it leaves, ready for position T."""
    check_input(x, cfg)
    if not cfg.causal:
        raise ValueError("decoding needs causal=True")
    y = forward(params, x, cfg)
    B, T, _ = x.shape
    K, W, S, C = cfg.num_kv_heads, cfg.window, cfg.k_select, cfg.candidate_capacity
    positions = jnp.arange(T)
    _, k, v = project_qkv(params, x, positions, cfg)
    u = project_scores(params, x, positions)
    dtype = compute_dtype(cfg, x) if cache_dtype is None else jnp.dtype(cache_dtype)
    to_heads = lambda a: jnp.swapaxes(a, 1, 2)  # [B, T, K, ...] -> [B, K, T, ...]
    k, v, u = to_heads(k).astype(dtype), to_heads(v).astype(dtype), to_heads(u)
    cache = init_cache(cfg, B, dtype)

    # Ring: slot s holds the newest position t < T with t % W == s (if t >= 0).
    slot_pos = (T - 1) - (T - 1 - jnp.arange(W)) % W
    in_range = slot_pos >= 0
    src = jnp.clip(slot_pos, 0, T - 1)
    ring = lambda a: jnp.where(in_range.reshape((1, 1, W) + (1,) * (a.ndim - 3)),
                               a[:, :, src], 0)
    cache = cache.replace(window_k=ring(k), window_v=ring(v), window_score=ring(u),
                          pos=jnp.int32(T))

    n = T - W  # candidates of the last query: positions 0 .. n-1
    if n <= 0:
        return y, cache
    cand_u = u[:, :, :n]
    # Selection: top k_select by score, ties to the larger position (top_k keeps the first of
    # equal entries, so search the reversed order).
    s = min(S, n)
    top_u, top_rev = jax.lax.top_k(cand_u[..., ::-1], s)
    top_pos = n - 1 - top_rev
    gather = lambda a: jnp.take_along_axis(a, top_pos[..., None], axis=2)
    pad = lambda a, fill: jnp.concatenate(
        [a, jnp.full(a.shape[:2] + (S - s,) + a.shape[3:], fill, a.dtype)], axis=2)
    cache = cache.replace(select_k=pad(gather(k[:, :, :n]), 0),
                          select_v=pad(gather(v[:, :, :n]), 0),
                          select_score=pad(top_u, -jnp.inf),
                          select_pos=pad(top_pos.astype(jnp.int32), -1))
    # Score buffer: the candidates above tau, the highest C of them.
    tau = jax_sparsek.sparsek_threshold(cand_u, S)
    kept = jax.lax.top_k(cand_u, min(C, n))[0]
    kept = jnp.where(kept > tau[..., None], kept, -jnp.inf)
    overflowed = jnp.sum(cand_u > tau[..., None], axis=-1) > C
    if kept.shape[-1] < C:
        kept = jnp.concatenate([kept, jnp.full(kept.shape[:2] + (C - kept.shape[-1],), -jnp.inf)],
                               axis=-1)
    return y, cache.replace(cand_score=kept, tau=tau, overflowed=overflowed)
