"""The implementations a problem is timed on: ours, jax's own attentions and, where torch
with CUDA is importable, torch's. A builder returns `Impl`s or raises `Unavailable` with the
reason; the runner prints that reason as one line and records nothing for it."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from benchmarks import report, timing
from benchmarks.problems import Target, dense_targets, scale, selection_threshold
from jax_sparsek.testing import AttentionSpec

QKV = ("q", "k", "v")


class Unavailable(Exception):
    """An implementation that cannot run this problem here (message: "impl: why")."""


@dataclasses.dataclass
class Impl:
    name: str  # the record's `impl`
    target: Target  # what it computes
    fn: Callable  # jax: fn(*arrays named by `args`) -> o; torch: fn(q, k, v) -> o, [B, heads, T, D]
    args: tuple[str, ...] = QKV
    grad_args: Optional[tuple[str, ...]] = QKV  # None: forward only
    backward_variant: bool = False  # fwd+bwd only: its forward is another impl's
    prepare: Optional[Callable[[dict], dict]] = None  # untimed input transform
    torch: bool = False


def selected(name: str, only: Optional[set[str]]) -> bool:
    """Whether `only` (None: everything) names the impl `name`; a name ending in `*` names
    every impl it starts (`jax.nn[cudnn*`: the dense one and the sliding-window stand-in)."""
    return only is None or any(name == o or (o.endswith("*") and name.startswith(o[:-1]))
                               for o in only)


def build(spec: AttentionSpec, arrays: dict, passes: tuple[str, ...],
          log: Callable[[str], None], only: Optional[set[str]] = None) -> list[Impl]:
    """The implementations of `spec` (those `only` names, when given: see selected)."""
    on_gpu = jax.default_backend() == "gpu"
    builders = {  # what the names each builder makes start with
        "jax_sparsek": _ours, report.DETERMINISTIC: _ours_deterministic,
        "jax_sparsek[xla]": _ours_xla, "jax.nn[xla]": _jax_nn_xla,
        "jax.nn[cudnn": _jax_nn_cudnn, "pallas.attention_mgpu": _mgpu, "torch.sdpa": _torch_sdpa,
        "torch.flex": _torch_flex,
    }
    impls = []
    for prefix, builder in builders.items():
        def wanted(n, prefix=prefix):
            if n.endswith("*") and prefix.startswith(n[:-1]):
                return True
            return n == prefix if prefix == "jax_sparsek" else n.startswith(prefix)

        if only is not None and not any(map(wanted, only)):
            continue
        try:
            impls += [i for i in builder(spec, arrays, passes, on_gpu) if selected(i.name, only)]
        except Unavailable as e:
            log(f"skip {e}")
        except Exception as e:  # a peer that breaks must not stop the run
            log(f"skip {builder.__name__.strip('_')}: {type(e).__name__}: {str(e).splitlines()[0]}")
    return impls


# ---------------------------------------------------------------------------------- jax
def _op(spec: AttentionSpec, implementation: Optional[str], name: str, **options) -> Impl:
    """Our op with `implementation=` ("ffi": the kernels), or its pure-JAX reference (None);
    `options` go to the op."""
    import jax_sparsek

    try:
        module = jax_sparsek if implementation else jax_sparsek.reference
        op = getattr(module, spec.op)
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"{name}: {spec.op} is not in this tree ({e})") from None
    extra = {"sparsek_attention": ("scores",), "block_sparse_attention": ("block_mask",)}
    args = QKV + extra.get(spec.op, ())
    kw = dict(spec.op_kwargs(), scale=scale(spec), **options)
    if implementation:
        kw["implementation"] = implementation
    grads = QKV + (("scores",) if spec.op == "sparsek_attention" else ())
    return Impl(name, Target(spec), lambda *a: op(*a, **kw), args=args, grad_args=grads)


def _probe(impl: Impl, arrays: dict) -> Impl:
    """Traces the implementation once, so that argument checks fail here and not mid-run."""
    try:
        jax.eval_shape(impl.fn, *(arrays[n] for n in impl.args))
    except (ValueError, TypeError, NotImplementedError) as e:
        raise Unavailable(f"{impl.name}: {str(e).splitlines()[0]}") from None
    return impl


def _fits_dense(spec: AttentionSpec, passes, name: str) -> None:
    """XLA attention materialises float32 [B, N, T, S] scores: a few of them forward, about
    twice as many with the backward pass."""
    copies = 8 if "fwd+bwd" in passes else 3
    need = 4.0 * spec.B * spec.N * spec.T * spec.s * copies
    stats = jax.devices()[0].memory_stats() or {}
    have = stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > 0.8 * have:
        raise Unavailable(f"{name}: needs about {need / 2**30:.0f} GiB for [B,N,T,S] scores, "
                          f"{have / 2**30:.0f} GiB here")


def _ours(spec, arrays, passes, on_gpu):
    return [_probe(_op(spec, "ffi", "jax_sparsek"), arrays)]


def _ours_deterministic(spec, arrays, passes, on_gpu):
    """The backward with a bitwise reproducible dq (flash and block-sparse; the forward is the
    same kernel, so only fwd+bwd is worth a row)."""
    if spec.op not in ("flash_attention", "block_sparse_attention") or "fwd+bwd" not in passes:
        raise Unavailable(f"{report.DETERMINISTIC}: fwd+bwd of flash / block-sparse only")
    impl = _op(spec, "ffi", report.DETERMINISTIC, deterministic=True)
    return [_probe(dataclasses.replace(impl, backward_variant=True), arrays)]


def _ours_xla(spec, arrays, passes, on_gpu):
    _fits_dense(spec, passes, "jax_sparsek[xla]")
    return [_probe(_op(spec, None, "jax_sparsek[xla]"), arrays)]


def _jax_nn(target: Target, implementation: str, name: str) -> Impl:
    spec = target.spec
    window = None
    if spec.window is not None:  # jax.nn takes (left, right) sizes; -1 (unbounded) -> S
        window = tuple(w if w >= 0 else spec.s for w in spec.window)
    fn = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=scale(spec), is_causal=spec.causal, local_window_size=window,
        implementation=implementation)
    return Impl(name, target, fn)


def _jax_nn_xla(spec, arrays, passes, on_gpu):
    # XLA computes every [T, S] score whatever the mask: the windowed stand-in would cost the same.
    _fits_dense(spec, passes, "jax.nn[xla]")
    return [_probe(_jax_nn(dense_targets(spec)[0][1], "xla", "jax.nn[xla]"), arrays)]


def _jax_nn_cudnn(spec, arrays, passes, on_gpu):
    if not on_gpu:
        raise Unavailable("jax.nn[cudnn]: needs a GPU")
    return [_probe(_jax_nn(t, "cudnn", f"jax.nn[{','.join(filter(None, ('cudnn', sfx)))}]"), arrays)
            for sfx, t in dense_targets(spec)]


def _mgpu(spec, arrays, passes, on_gpu):
    name = "pallas.attention_mgpu"
    if not on_gpu:
        raise Unavailable(f"{name}: needs a GPU")
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu
    except ImportError as e:
        raise Unavailable(f"{name}: not importable ({e})") from None
    target = dense_targets(spec)[0][1]
    if target.spec.window is not None:
        raise Unavailable(f"{name}: no sliding window")
    # Its kernel declares float16 shared-memory buffers whatever the inputs: bfloat16 problems
    # run in float16 (same speed on tensor cores; randn inputs convert exactly): the record says so.
    dtype = jnp.float16
    if jnp.dtype(spec.dtype) != dtype:
        target = Target(target.spec.replace(dtype="float16"))
    # The kernel applies no softmax scale: q is pre-scaled. Both untimed.
    s = scale(spec)
    prepare = lambda a: {**a, "q": (a["q"].astype(jnp.float32) * s).astype(dtype),
                         "k": a["k"].astype(dtype), "v": a["v"].astype(dtype)}
    q, k, v = (prepare(arrays)[n] for n in QKV)
    best, reasons = None, []
    for block_kv in (128, 64, 256):  # its own benchmark tries these and keeps the fastest
        cfg = attention_mgpu.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2,
                                          causal=target.spec.causal)
        fn = lambda q, k, v, cfg=cfg: attention_mgpu.attention(q, k, v, cfg)
        try:
            f = jax.jit(fn)
            ms, _ = timing.median_ms(lambda: f(q, k, v), jax.block_until_ready, iters=5)
        except Exception as e:
            reasons.append(f"block_kv={block_kv}: {str(e).splitlines()[0]}")
            continue
        if best is None or ms < best[0]:
            best = (ms, fn)
    if best is None:
        raise Unavailable(f"{name}: {'; '.join(reasons)}")
    return [Impl(name, target, best[1], grad_args=None, prepare=prepare)]


# -------------------------------------------------------------------------------- torch
def _torch(name: str, on_gpu: bool):
    if not on_gpu:
        raise Unavailable(f"{name}: needs a GPU")
    try:
        import torch
    except ImportError:
        raise Unavailable(f"{name}: torch is not importable") from None
    if not torch.cuda.is_available():
        raise Unavailable(f"{name}: torch sees no CUDA device")
    return torch


def to_torch(x: jax.Array, torch):
    """A jax array as a torch tensor on the same device (shared memory, no copy)."""
    if x.dtype == jnp.bool_:
        return torch.from_dlpack(x.astype(jnp.int8)).bool()
    return torch.from_dlpack(x)


def _torch_sdpa(spec, arrays, passes, on_gpu):
    torch = _torch("torch.sdpa", on_gpu)
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    target = dense_targets(spec)[0][1]
    if target.spec.window is not None:
        raise Unavailable("torch.sdpa: no sliding window")
    if spec.causal and spec.s != spec.T:
        raise Unavailable("torch.sdpa: aligns a causal mask top-left when T != S")
    gqa = {"enable_gqa": True} if spec.N != spec.k else {}
    impls = []
    for backend, label in ((SDPBackend.CUDNN_ATTENTION, "cudnn"), (SDPBackend.FLASH_ATTENTION, "flash")):
        def fn(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=spec.causal,
                                                      scale=scale(spec), **gqa)
        impls.append(Impl(f"torch.sdpa[{label}]", target, fn, torch=True))
    return impls


def _torch_flex(spec, arrays, passes, on_gpu):
    """FlexAttention on the same keep-set; for SparseK the window plus the keys the reference
    selects (0/1 gates: Flex cannot weigh keys), the selection handed over as one threshold
    per query. Building the block mask is not timed."""
    torch = _torch("torch.flex", on_gpu)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T, S, N, K = spec.T, spec.s, spec.N, spec.k
    group, shift = N // K, S - T
    target = Target(spec, hard_selection=spec.op == "sparsek_attention")
    mask_mod, dims, block = None, (None, None), 128
    if spec.op == "sparsek_attention":
        w = spec.sparsek_window or 0
        u = to_torch(jnp.transpose(arrays["scores"], (0, 2, 1)), torch).contiguous()  # [B, K, S]
        theta = to_torch(jax.jit(selection_threshold, static_argnums=1)(arrays["scores"], spec), torch)

        def mask_mod(b, h, i, j):
            pos = i + shift
            selected = u[b, h // group, j] >= theta[b, h // group, i]
            if spec.causal:
                return ((j <= pos) & (j > pos - w)) | ((j <= pos - w) & selected)
            return ((pos - j).abs() < w) | selected

        dims = (spec.B, N)
    elif spec.op == "block_sparse_attention":
        bq, bk = spec.block_size
        bm = arrays["block_mask"]
        if bm.shape[1] not in (1, N):
            bm = jnp.repeat(bm, group, axis=1)
        bm = to_torch(jnp.broadcast_to(bm, (spec.B, N) + bm.shape[2:]), torch).contiguous()

        def mask_mod(b, h, i, j):
            keep = bm[b, h, i // bq, j // bk]
            return keep & (j <= i + shift) if spec.causal else keep

        dims, block = (spec.B, N), (bq, bk)
    elif spec.causal or spec.window is not None:
        left, right = spec.window if spec.window is not None else (-1, -1)

        def mask_mod(b, h, i, j):
            pos = i + shift
            keep = j <= pos if spec.causal else j >= 0
            if left >= 0:
                keep = keep & (j >= pos - left)
            if right >= 0:
                keep = keep & (j <= pos + right)
            return keep

    block_mask = None
    if mask_mod is not None:
        kw = dict(device="cuda", BLOCK_SIZE=block)
        try:
            block_mask = create_block_mask(mask_mod, *dims, T, S, _compile=True, **kw)
        except TypeError:  # torch versions without the _compile switch
            block_mask = create_block_mask(mask_mod, *dims, T, S, **kw)
    flex = torch.compile(flex_attention, dynamic=False)
    gqa = {"enable_gqa": True} if N != K else {}
    fn = lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=scale(spec), **gqa)
    return [Impl("torch.flex", target, fn, torch=True)]
