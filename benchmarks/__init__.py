"""Benchmark harness: `python -m benchmarks --help`.

Times jax_sparsek's ops and their peers (jax.nn's XLA and cuDNN attention, Pallas Mosaic-GPU
attention, torch SDPA and FlexAttention when torch with CUDA is importable) on the presets of
`jax_sparsek.testing.PRESETS` or custom shapes, following /work/shared/BENCHMARKS.md:

- problems.py  what a row computes (dense stand-ins, keep-set masks, float32 references, bytes)
- peers.py     the implementations, each guarded: unavailable or failing ones are skipped
- timing.py    median wall-clock time of asynchronous device calls
- runner.py    the timing loop and the JSON records
- report.py    the table and the files under benchmarks/results/<device>/<date>-<preset>.json
"""
