"""python -m benchmarks [--preset NAME ...] [shape flags] [--passes fwd,fwd+bwd] [--iters N]

Without --preset or shape flags the BENCHMARKS.md presets run (group `all`; the sweeps and
their groups are in benchmarks/presets.py). Shape flags alone describe one custom
problem; with --preset they override the presets' fields (the name then says so).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

# torch's peers share the GPU with JAX in this process: JAX must not take most of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Without preallocation JAX's pool still grows on demand and never shrinks, up to this fraction
# of the device (JAX's default: 0.75); torch's caching allocator keeps its own pool beside it.
# On an 80 GB H100 0.5 leaves JAX about 40 GiB: the largest problem (sparsek-seed003 fwd+bwd,
# ours) needs about 26 GiB of it (6 GiB of q, k, v, do; 4.5 GiB of gradients, twice while the
# next call runs; 9 GiB of backward workspace and 2 GiB of residuals and selection lists) and
# the float32 reference a few GiB (problems.REF_SCORE_BUDGET). torch's peers then have about
# 38 GiB for their ~20 GiB (transposed copies of q, k, v, do; outputs and gradients twice; the
# float32 dq accumulator of the flash backward) next to the CUDA context and libraries.
# Only set when torch's peers may run and the variable is not given.
TORCH_SHARE_JAX_FRACTION = "0.5"

from benchmarks import problems, report, runner  # noqa: E402
from benchmarks.presets import GROUPS, PRESETS, resolve  # noqa: E402
from jax_sparsek.testing import AttentionSpec  # noqa: E402

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SHAPE_FLAGS = ("B", "T", "N", "K", "D", "dtype", "causal", "window", "k_select", "block_size",
               "density")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", metavar="NAME",
                   help=f"presets or groups to run (groups: {', '.join(GROUPS)}; "
                        "presets: benchmarks/presets.py)")
    shape = p.add_argument_group("shape flags (override presets, or describe a custom problem)")
    for dim in ("B", "T", "N", "K", "D"):
        shape.add_argument(f"--{dim}", type=int)
    shape.add_argument("--dtype", choices=sorted(DTYPES) + sorted(DTYPES.values()))
    shape.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None)
    shape.add_argument("--window", type=_ints, help="flash: LEFT,RIGHT (-1 unbounded); SparseK: W")
    shape.add_argument("--k-select", type=int, help="SparseK: keys selected per query")
    shape.add_argument("--block-size", type=_ints, help="block-sparse: BQ,BK")
    shape.add_argument("--density", type=float, help="block-sparse: fraction of blocks on")
    p.add_argument("--passes", default="fwd,fwd+bwd", type=lambda s: tuple(s.split(",")),
                   help="comma-separated subset of fwd,fwd+bwd")
    p.add_argument("--iters", type=int, default=20, help="timed samples per row (median)")
    p.add_argument("--scale-down", type=int, default=1, metavar="F",
                   help="divide batch, heads, lengths, windows, k_select, blocks by F (CPU runs)")
    p.add_argument("--impl", nargs="+", metavar="NAME",
                   help="run only these impls; NAME* names every impl NAME starts "
                        "('jax.nn[cudnn*': also the sliding-window stand-in of SparseK)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=report.RESULTS, help="results folder")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--plots", action="store_true",
                   help="after saving, draw the plots of the devices measured (benchmarks.plots)")
    p.add_argument("--profile", metavar="PRESET",
                   help="instead of timing, run our forward of PRESET under ncu (benchmarks.profile)")
    args = p.parse_args(argv)
    try:
        args.preset = resolve(args.preset) if args.preset else None
        if args.profile:
            resolve([args.profile])
    except ValueError as e:
        p.error(str(e))
    if not set(args.passes) <= set(runner.PASSES):
        p.error(f"--passes takes a subset of {','.join(runner.PASSES)}")
    if args.iters < 1:
        p.error("--iters must be positive")
    return args


def _apply(spec: AttentionSpec, args: argparse.Namespace) -> AttentionSpec:
    kw = {d: getattr(args, d) for d in ("B", "T", "N", "K", "D", "causal") if getattr(args, d) is not None}
    if args.dtype:
        kw["dtype"] = DTYPES.get(args.dtype, args.dtype)
    if args.k_select is not None:
        kw["k_select"] = args.k_select
    if args.block_size is not None:
        kw["block_size"] = (args.block_size * 2)[:2]
    if args.density is not None:
        kw["block_density"] = args.density
    spec = spec.replace(**kw)
    if args.window is not None:
        if spec.op == "sparsek_attention":
            spec = spec.replace(sparsek_window=args.window[0])
        elif len(args.window) == 2:
            spec = spec.replace(window=args.window)
        else:
            raise SystemExit("--window: flash attention takes LEFT,RIGHT")
    if spec.N % spec.k:
        raise SystemExit(f"--N {spec.N} is not a multiple of --K {spec.k}")
    return spec


def problem_specs(args: argparse.Namespace) -> dict[str, AttentionSpec]:
    """{name: spec} from the command line; the name records overrides and scaling."""
    given = [f for f in SHAPE_FLAGS if getattr(args, f) is not None]
    suffix = "".join(f"-{f.replace('_', '')}{str(getattr(args, f)).replace(' ', '')}" for f in given)
    for bad in "(),[]":
        suffix = suffix.replace(bad, "" if bad in "()[]" else "_")
    names = args.preset or GROUPS["all"]
    if not args.preset and given:
        bases = {"custom": AttentionSpec(B=1, T=1024, N=8, D=64, dtype="bfloat16")}
    else:
        bases = {n: PRESETS[n] for n in names}
    out = {}
    for name, spec in bases.items():
        spec = problems.scale_down(_apply(spec, args), args.scale_down)
        scaled = f"-div{args.scale_down}" if args.scale_down > 1 else ""
        out[f"{name}{suffix}{scaled}"] = spec
    return out


def share_device_with_torch(only) -> None:
    """Caps JAX's memory pool (TORCH_SHARE_JAX_FRACTION) when torch's peers may run in this
    process, unless XLA_PYTHON_CLIENT_MEM_FRACTION is set; before JAX starts its backend."""
    if "XLA_PYTHON_CLIENT_MEM_FRACTION" in os.environ:
        return
    if only is not None and not any(name.startswith("torch") for name in only):
        return
    if importlib.util.find_spec("torch") is None:
        return
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = TORCH_SHARE_JAX_FRACTION


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.profile:
        from benchmarks import profile

        profile.main([args.profile, "--scale-down", str(args.scale_down), "--out", str(args.out)])
        return []
    only = set(args.impl) if args.impl else None
    share_device_with_torch(only)
    paths = set()

    def save(records):  # each record as soon as it exists (a run cut short keeps them)
        for path in report.save(records, args.out):
            if path not in paths:
                paths.add(path)
                print(f"writing {path}", flush=True)

    records = runner.run(problem_specs(args), passes=args.passes, iters=args.iters, only=only,
                         seed=args.seed, done=None if args.no_save else save)
    if not records:
        print("no implementation ran", file=sys.stderr)
        return records
    print(report.table(records))
    tiers = report.tier_table(records)
    if tiers:
        print("\n" + tiers)
    if not args.no_save:
        if args.plots:
            from benchmarks import plots

            for device_dir in sorted({path.parent for path in paths}):
                plots.write_plots(device_dir)
    return records


if __name__ == "__main__":
    main()
