"""A small pre-norm transformer LM (Flax NNX) with a choice of attention:

- "dense":   causal `flash_attention` over every earlier token;
- "window":  causal `flash_attention` over the last `window` tokens (window=(window-1, 0));
- "sparsek": `SparseKAttention`: the same window plus k_select learnt far-away tokens.

The three share the q/k/v/out projections and RoPE (jax_sparsek.flax._common), so they differ
only in which keys each query may read.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

import jax_sparsek
from jax_sparsek.flax import SparseKAttention, _common

VARIANTS = ("dense", "window", "sparsek")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    window: int = 32
    k_select: int = 16
    mlp_ratio: int = 4
    implementation: Optional[str] = None


class FlashAttentionLayer(nnx.Module):
    """The dense and window-only baselines: SparseKAttention's projections without the score."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int,
                 window: Optional[int], implementation: Optional[str], *, rngs: nnx.Rngs):
        # k_select is unused here; the shared config only needs a valid value.
        self.config = _common.make_config(features=d_model, num_heads=num_heads,
                                          num_kv_heads=num_kv_heads, k_select=1,
                                          window=window or 1, implementation=implementation)
        self.window = window
        for name, (init, shape) in _common.param_initializers(self.config).items():
            if not name.startswith("score"):
                setattr(self, name, nnx.Param(init(rngs.params(), shape, jnp.float32)))

    def __call__(self, x):
        params = {n: getattr(self, n)[...] for n in ("q_kernel", "k_kernel", "v_kernel",
                                                     "out_kernel")}
        q, k, v = _common.project_qkv(params, x, jnp.arange(x.shape[1]), self.config)
        window = None if self.window is None else (self.window - 1, 0)
        o = jax_sparsek.flash_attention(q, k, v, causal=True, window=window,
                                          implementation=self.config.implementation)
        return _common.project_out(params, o, self.config)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, variant: str, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.attn_norm = nnx.RMSNorm(d, rngs=rngs)
        if variant == "sparsek":
            self.attn = SparseKAttention(d, cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                                         k_select=cfg.k_select, window=cfg.window,
                                         implementation=cfg.implementation, rngs=rngs)
        else:
            self.attn = FlashAttentionLayer(d, cfg.num_heads, cfg.num_kv_heads,
                                            None if variant == "dense" else cfg.window,
                                            cfg.implementation, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(d, rngs=rngs)
        self.mlp_in = nnx.Linear(d, cfg.mlp_ratio * d, rngs=rngs)
        self.mlp_out = nnx.Linear(cfg.mlp_ratio * d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class TransformerLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, variant: str, *, rngs: nnx.Rngs):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, variant, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, cfg.vocab_size, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))


def kv_cache_bytes(cfg: ModelConfig, variant: str, seq_len: int) -> int:
    """Bytes of attention state one sequence keeps per layer to decode token seq_len (float32):
    every K/V row for dense, the last `window` rows for window-only, and SparseKAttention's
    bounded cache (window + k_select rows and the score buffers) for SparseK."""
    head_dim = cfg.d_model // cfg.num_heads
    row = 2 * cfg.num_kv_heads * head_dim * 4  # one K row and one V row
    if variant == "dense":
        return seq_len * row
    if variant == "window":
        return cfg.window * row
    layer = SparseKAttention(cfg.d_model, cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                             k_select=cfg.k_select, window=cfg.window, rngs=nnx.Rngs(0))
    return layer.init_cache(1).num_bytes()
