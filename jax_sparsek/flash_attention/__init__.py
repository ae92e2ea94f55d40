"""Dense flash attention: causal, sliding windows, grouped-query heads (SPEC.md section 1)."""

from __future__ import annotations

import jax

from jax_sparsek import _ffi, decode
from jax_sparsek._validation import check_attention_inputs, check_bool, check_scale
from jax_sparsek.flash_attention import ffi, reference
from jax_sparsek.flash_attention.reference import check_window

__all__ = ["flash_attention"]


def flash_attention(q, k, v, *, causal: bool = False, window=None, scale=None,
                    deterministic: bool = False, implementation=None) -> jax.Array:
    """softmax(scale * q k^T) v over the keys each query may see.

    Args:
      q: [B, T, N, D]; k: [B, S, K, D]; v: [B, S, K, Dv]; one float dtype (float32, bfloat16
        or float16), N % K == 0 (query head h reads kv head h // (N // K)).
      causal: query row i (at position p_i = i + S - T) sees keys j <= p_i.
      window: None, or (left, right) with ints >= 0 or None (unbounded): row i sees keys
        p_i - left <= j <= p_i + right.
      scale: defaults to 1 / sqrt(D).
      deterministic: the gradient of q bitwise reproducible from run to run. The CUDA
        backward then adds the key tiles' dq shares one key tile after the other in a fixed
        order (the backward takes 1.3-2.5x as long, most with random block masks); the CPU
        kernels and the reference always are.
      implementation: None (the FFI kernels when this build has them for the default
        backend, else the reference), "ffi" or "xla" (the pure-JAX reference).

    Returns:
      [B, T, N, Dv] in q's dtype; zeros for a row that sees no key.
    """
    dims = check_attention_inputs(q, k, v)
    causal = check_bool("causal", causal)
    deterministic = check_bool("deterministic", deterministic)
    left, right = check_window(window)
    scale = check_scale(scale, dims.D)
    targets = [ffi.FWD_TARGET, ffi.BWD_TARGET]
    if ffi.runs_decode_kernel(dims.T, dims.D, dims.Dv):
        targets.append(decode.TARGET)
    impl = _ffi.resolve_implementation(implementation, targets,
                                      _ffi.cuda_unsupported(q.dtype, dims.D, dims.Dv))
    if impl == "xla":
        return reference.flash_attention(q, k, v, causal=causal, window=window, scale=scale)
    return ffi.flash_attention(q, k, v, causal=causal, window=(left, right), scale=scale,
                               deterministic=deterministic)
