"""Sweep presets on top of jax_sparsek.testing.PRESETS (the BENCHMARKS.md ones), and named
groups of them. Names are stable: records, plots and reports refer to them.

- `long8k` ... `long128k`: long32k's shape (B1 H16 D128 bf16 causal, dense flash) at T = S
  of 8k to 128k.
- `decode32k`, `decode128k`: one query token per sequence against a 32k / 128k cache
  (B8, T=1, N32 K8 D128 bf16); `sparsek-decode32k`, `sparsek-decode128k`: the same query
  through sparsek_attention (k_select 1024, window 512), selection included.
- `bsdensity05` ... `bsdensity100`: blocksparse80's shape with the given percent of 128x128
  blocks ON (so `bsdensity20` is `blocksparse80`, whose name counts the blocks off).
- `sparsek-seed003-k{K}-w{W}`, `sparsek-long32k-k{K}-w{W}`: SparseK at seed003 / long32k
  shapes over k_select K in 64..1024 and window W in 128..512.
"""

from __future__ import annotations

from jax_sparsek.testing import PRESETS as BASE
from jax_sparsek.testing import AttentionSpec

LONG = {f"long{n}k": BASE["long32k"].replace(T=n * 1024) for n in (8, 16, 32, 64, 128)}
DECODE = {f"decode{n}k": AttentionSpec(B=8, T=1, S=n * 1024, N=32, K=8, D=128, dtype="bfloat16")
          for n in (32, 128)}
SPARSEK_DECODE = {f"sparsek-{name}": spec.replace(causal=True, k_select=1024, sparsek_window=512)
                  for name, spec in DECODE.items()}
DENSITY_PERCENT = (5, 10, 20, 40, 60, 80, 100)
DENSITY = {f"bsdensity{p:02d}": BASE["blocksparse80"].replace(block_density=p / 100)
           for p in DENSITY_PERCENT}
K_SELECT = (64, 128, 256, 512, 1024)
WINDOW = (128, 256, 512)
SPARSEK_SWEEP = {
    shape: {f"sparsek-{shape}-k{k}-w{w}": BASE[shape].replace(k_select=k, sparsek_window=w)
            for k in K_SELECT for w in WINDOW}
    for shape in ("seed003", "long32k")
}

PRESETS: dict[str, AttentionSpec] = {**BASE, **LONG, **DECODE, **SPARSEK_DECODE, **DENSITY,
                                     **SPARSEK_SWEEP["seed003"], **SPARSEK_SWEEP["long32k"]}
GROUPS: dict[str, list[str]] = {
    "all": list(BASE),  # what a run without --preset measures
    "long": list(LONG),
    "decode": list(DECODE) + list(SPARSEK_DECODE),
    "density": list(DENSITY),
    "sparsek-sweep": [*SPARSEK_SWEEP["seed003"], *SPARSEK_SWEEP["long32k"]],
    "sparsek-seed003-sweep": list(SPARSEK_SWEEP["seed003"]),
    "sparsek-long32k-sweep": list(SPARSEK_SWEEP["long32k"]),
}


def resolve(names) -> list[str]:
    """Preset names from preset and group names, in order, each once; ValueError on an
    unknown name."""
    out: list[str] = []
    for name in names:
        if name in GROUPS:
            out += GROUPS[name]
        elif name in PRESETS:
            out.append(name)
        else:
            raise ValueError(f"unknown preset or group {name!r}; groups: {', '.join(GROUPS)}")
    return list(dict.fromkeys(out))
