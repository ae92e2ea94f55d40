"""Benchmark harness of jax-sparsek: `python -m benchmarks --help`.

    PYTHONPATH=. python -m benchmarks                         # every preset, fwd and fwd+bwd
    PYTHONPATH=. python -m benchmarks --preset seed003 sparsek-seed003 --passes fwd
    PYTHONPATH=. python -m benchmarks --preset seed000 --scale-down 16   # CPU-sized
    PYTHONPATH=. python -m benchmarks --T 8192 --N 32 --K 8 --D 128 --dtype bf16 --causal
    PYTHONPATH=. python -m benchmarks --preset long32k --impl jax_sparsek 'jax.nn[cudnn*'
    PYTHONPATH=. python -m benchmarks --preset long decode density sparsek-sweep --passes fwd --plots
    PYTHONPATH=. python -m benchmarks.plots                   # PNGs from benchmarks/results/*/
    PYTHONPATH=. python -m benchmarks --profile seed003       # our forward under ncu (GPU)
    tools/device_bench.sh main1                               # the suite on a GPU, in parts

Presets (presets.py): BENCHMARKS.md's, plus the sweeps long8k..long128k, decode32k/128k, sparsek-decode32k/128k,
bsdensity05..bsdensity100 (percent of blocks ON) and sparsek-{seed003,long32k}-k{K}-w{W};
--preset takes group names too: all (BENCHMARKS.md's, the default), long, decode, density,
sparsek-sweep, sparsek-seed003-sweep, sparsek-long32k-sweep.

Protocol (/work/shared/BENCHMARKS.md): every implementation runs on the same fresh random
normal inputs, jit-compiled; after compilation and two warm-up calls, each of `--iters` samples
times back-to-back calls lasting at least 10 ms with one synchronisation at the end, and the
row reports the median. fwd+bwd times the gradient of sum(o * do) w.r.t. q, k, v (and scores
for SparseK) with a fixed random `do`.

Implementations (`impl` of the records):
- `jax_sparsek`: our op with implementation="ffi" (the compiled kernels; never the reference
  under this name). `jax_sparsek[xla]`: our pure-JAX reference (`jax_sparsek.reference`).
  `jax_sparsek[deterministic]`: flash / block-sparse fwd+bwd with deterministic=True.
- `jax.nn[xla]`, `jax.nn[cudnn]`: jax.nn.dot_product_attention. `pallas.attention_mgpu`:
  jax's Mosaic-GPU attention, forward only, fastest of block_kv 64/128/256, q pre-scaled;
  its kernel only has float16 buffers, so bfloat16 problems run it in float16.
- `torch.sdpa[cudnn]`, `torch.sdpa[flash]`, `torch.flex` when torch sees a CUDA device.
Dense peers of a sparse preset run a dense stand-in and their records describe that problem
(op flash_attention, its causal/window, its FLOPs): dense attention with the same causality
and, for SparseK, `jax.nn[cudnn,window=W]` with W = window + k_select keys per query (the same
work, contiguous). `torch.flex` runs the exact keep-set: the block mask, or for SparseK the
window plus the keys the SparseK selection picks (0/1 gates: Flex cannot weigh keys), built
outside the timing from one threshold per query. XLA-based rows are skipped when their
[B, N, T, S] float32 scores would not fit in memory; each skipped or failing implementation
prints one line and records nothing.

Columns: TF/s from AttentionSpec.flops (fwd+bwd = 3.5x fwd), us/head = ms * 1000 / N,
GB/s from q, k, v read and o written once (+ scores / block mask; fwd+bwd counts 3x),
t/best peer = ms over the fastest row of the same preset and pass that is not our kernels'
(`jax_sparsek`, `jax_sparsek[deterministic]`; our float32 reference counts as a peer).
rel_err = |x - ref| / |ref| (fwd: o; fwd+bwd: the worst gradient) against a float32
reference of what the row computes (jax_sparsek's reference for SparseK's soft gates, dense
masked attention otherwise), computed on a slice for large problems: the first batch
elements and kv-head groups with at most 2^26 score elements, never less than one batch
element and one kv-head group (batch elements and head groups are independent, so the
slice's outputs and gradients are exact slices of the full ones). Where one batch element
and kv-head group holds more scores than that (long sequences), the reference runs in query
blocks of about 2^26 scores: the forward's error is that of the last queries, the backward's
of every query (gradients w.r.t. k, v and scores summed over the blocks; the soft SparseK
blocks see the keys up to their last query, which is exact with causality).

Memory: JAX, the references and torch share the device. Without preallocation JAX's pool
still never shrinks, so when torch's peers may run, `python -m benchmarks` caps it at half
the device (XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 unless set). Between implementations the
outputs are dropped before the reference runs, Python's cycles collected and torch's cache
emptied; after each problem JAX's and torch.compile's caches are cleared. A failing peer
(out of memory included) records nothing and leaves no buffers behind.

Records go to benchmarks/results/<device-slug>/<date>-<preset>.json, one file per preset,
each row as soon as it is measured (a run cut short keeps what it finished); a later run of
the same day replaces the rows of the (impl, pass) it measured. The end of a run also prints
the tier table: our forward us/head against the original reports' tiers (<= 3.82, < 3.0,
< 2.0 us/head) beside the HBM floor (bytes at 2.97 TB/s) and the tensor-core floor (FLOPs at
795 TF/s); `python -m benchmarks.report` writes the BENCHMARKS.md presets' rows and tiers
into the README.
Plots go to <device-slug>/plots/, ncu summaries to <device-slug>/profiles/.

Modules: presets.py (sweeps, groups), problems.py (what a row computes: stand-ins, keep-set
masks, references, bytes), peers.py (the implementations), timing.py, runner.py (timing
loop, records), report.py (tables, README), plots.py, profile.py (ncu).
"""
