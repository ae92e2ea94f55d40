"""python -m benchmarks.profile PRESET [--scale-down F] [--pass fwd+bwd] [--kernel REGEX]: our
forward (or forward and backward) of PRESET under Nsight Compute (`ncu --clock-control none
--set basic`, boost clocks as in the timed runs), summarised per kernel (name, launch shape, duration, achieved SM and memory throughput as % of
peak) into benchmarks/results/<device-slug>/profiles/<date>-<preset>[-fwd-bwd].txt.

With --kernel, the first launch of the one kernel whose name matches REGEX instead, in detail:
ncu's sections on throughput, warp states (why warps stall), scheduler, memory and occupancy,
then the SASS instructions where warps stalled most (sampled), into
<date>-<preset>-<REGEX>.txt, and the whole SASS listing with its samples beside it (.sass.csv).

ncu profiles a child process (`--child`) that builds the inputs on the host (so that no
input-generation kernel shows up), compiles our forward and runs it once (ncu replays each
kernel, so no warm-up is needed); the summary adds up each kernel's launches in that call
(the SparseK selection runs its kernels once per chunk of rows).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import problems, report
from benchmarks.presets import PRESETS, resolve

# Only our kernels (namespace jax_sparsek, and CUB's sort in the SparseK selection; XLA's own
# launches, autotuning included, are not replayed), at most 400 launches.
NCU_FLAGS = ("--clock-control", "none", "--set", "basic", "--csv", "--page", "details",
             "--kernel-name-base", "demangled", "--kernel-name", "regex:jax_sparsek|SegmentedRadixSort",
             "--launch-count", "400")
# One kernel in detail (--kernel): these sections, and the source page's stall samples.
DETAIL_SECTIONS = ("SpeedOfLight", "WarpStateStats", "SchedulerStats", "MemoryWorkloadAnalysis",
                   "Occupancy", "LaunchStats", "InstructionStats", "SourceCounters")
# ncu's metric names (section GPU Speed Of Light Throughput) -> summary columns.
METRICS = {"Duration": "duration_us", "Compute (SM) Throughput": "sm_pct",
           "Memory Throughput": "memory_pct", "DRAM Throughput": "dram_pct"}
TO_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
         "second": 1e6, "s": 1e6}


def child(preset: str, scale_down: int, passes: str, python: str) -> list[str]:
    """The command line of the process that ncu profiles."""
    return [python, "-m", "benchmarks.profile", preset, "--scale-down", str(scale_down),
            "--pass", passes, "--child"]


def command(preset: str, scale_down: int = 1, ncu: str = "ncu", python: str = sys.executable,
            passes: str = "fwd") -> list[str]:
    """The ncu command line that profiles our `passes` of `preset`."""
    return [ncu, *NCU_FLAGS, *child(preset, scale_down, passes, python)]


def detail_commands(preset: str, kernel: str, report_path: str, scale_down: int = 1,
                    ncu: str = "ncu", python: str = sys.executable,
                    passes: str = "fwd") -> list[list[str]]:
    """ncu command lines for --kernel: profile into report_path, then print its details page
    and its source page (SASS, CSV)."""
    sections = [a for name in DETAIL_SECTIONS for a in ("--section", name)]
    profile = [ncu, "--clock-control", "none", *sections, "--kernel-name-base", "demangled",
               "--kernel-name", f"regex:{kernel}", "--launch-count", "1", "-f", "-o", report_path,
               *child(preset, scale_down, passes, python)]
    rep = report_path + ".ncu-rep"
    return [profile, [ncu, "-i", rep, "--page", "details"],
            [ncu, "-i", rep, "--page", "source", "--csv", "--print-source", "sass"]]


def top_stalls(source_csv: str, count: int = 40) -> str:
    """The `count` SASS instructions with the most warp-stall samples in ncu's source page (CSV),
    each with its share of all samples."""
    lines = source_csv.splitlines()
    start = next((i for i, line in enumerate(lines) if '"Address"' in line and '"Source"' in line),
                 None)
    if start is None:
        return "no source page\n"
    rows = list(csv.DictReader(line for line in lines[start:] if line.startswith('"')))
    total_col = next((c for c in (rows[0] if rows else {})
                      if c and c.startswith("Warp Stall Sampling (All")), None)
    if total_col is None:
        return "no stall samples in the source page: " + lines[start][:500] + "\n"

    def samples(row):
        try:
            return _number(row.get(total_col) or "0")
        except ValueError:
            return 0.0
    total = sum(samples(r) for r in rows) or 1.0
    out = [f"SASS instructions by stall samples ({total_col}, {int(total)} in all):"]
    for r in sorted(rows, key=lambda r: -samples(r))[:count]:
        out.append(f"{100 * samples(r) / total:5.1f}%  {r.get('Address', ''):>6}  {r['Source']}")
    return "\n".join(out) + "\n"


def _number(text: str) -> float:
    return float(text.replace(",", ""))  # ncu groups thousands: "1,234.5"


def parse_ncu_csv(text: str) -> list[dict]:
    """Kernels of `ncu --csv --page details` output, one dict per launch in order: name,
    grid, block, and the METRICS columns (duration in us, throughputs in % of peak). Lines
    before the CSV header (the program's own output, ==PROF== lines) are ignored."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID",')), None)
    if start is None:
        return []
    kernels: dict[str, dict] = {}
    for row in csv.DictReader(line for line in lines[start:] if line.startswith('"')):
        launch = kernels.setdefault(row["ID"], {"name": row["Kernel Name"], "grid": row["Grid Size"],
                                                "block": row["Block Size"]})
        column = METRICS.get(row["Metric Name"])
        if column is None or not row["Metric Value"]:
            continue
        value = _number(row["Metric Value"])
        if column == "duration_us":
            value *= TO_US[row["Metric Unit"]]
        launch[column] = value
    return list(kernels.values())


def summary(kernels: list[dict], title: str) -> str:
    """A short text: per kernel name its launches in the profiled call, their total duration
    and the duration-weighted throughputs (grid / block of its longest launch), longest total
    first, then the total of the call."""
    groups: dict[str, dict] = {}
    for k in kernels:
        g = groups.setdefault(k["name"], {"name": k["name"], "launches": 0, "duration_us": 0.0,
                                          "longest": k, "weighted": {}})
        us = k.get("duration_us", 0.0)
        g["launches"] += 1
        g["duration_us"] += us
        if us > g["longest"].get("duration_us", 0.0):
            g["longest"] = k
        for c in ("sm_pct", "memory_pct", "dram_pct"):
            if c in k:
                total, weight = g["weighted"].get(c, (0.0, 0.0))
                g["weighted"][c] = (total + k[c] * us, weight + us)
    rows = sorted(groups.values(), key=lambda g: -g["duration_us"])

    def pct(g, c):
        total, weight = g["weighted"].get(c, (0.0, 0.0))
        return f"{total / weight:6.1f}" if weight > 0 else f"{'-':>6}"

    out = [title, f"{'total us':>10} {'calls':>5} {'SM %':>6} {'mem %':>6} {'DRAM %':>6}  "
                  "grid / block  kernel"]
    for g in rows:
        out.append(f"{g['duration_us']:10.1f} {g['launches']:5d} {pct(g, 'sm_pct')} "
                   f"{pct(g, 'memory_pct')} {pct(g, 'dram_pct')}  "
                   f"{g['longest']['grid']} / {g['longest']['block']}  {g['name']}")
    total = sum(g["duration_us"] for g in rows)
    out.append(f"{total:10.1f} us in {sum(g['launches'] for g in rows)} launches of {len(rows)} kernels")
    return "\n".join(out) + "\n"


def _child(preset: str, scale_down: int, passes: str) -> None:
    """Our forward (and backward) of the preset, one call (compiled first), on inputs made on
    the host."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import peers, runner

    spec = problems.scale_down(PRESETS[preset], scale_down)
    rng = np.random.default_rng(0)
    shapes = {"q": (spec.B, spec.T, spec.N, spec.D), "k": (spec.B, spec.s, spec.k, spec.D),
              "v": (spec.B, spec.s, spec.k, spec.dv)}
    host = {n: rng.standard_normal(s, np.float32).astype(jnp.dtype(spec.dtype)) for n, s in shapes.items()}
    if spec.block_size is not None:
        bq, bk = spec.block_size
        grid = (spec.B, spec.N, -(-spec.T // bq), -(-spec.s // bk))
        host["block_mask"] = rng.random(grid) < (0.5 if spec.block_density is None else spec.block_density)
    if spec.k_select is not None:
        host["scores"] = 2 * rng.standard_normal((spec.B, spec.s, spec.k), np.float32)
    (impl,) = peers.build(spec, host, (passes,), print, only={report.OURS})
    args = [jax.device_put(host[n]) for n in impl.args]
    if passes == "fwd":
        jax.block_until_ready(jax.jit(impl.fn)(*args))
    else:
        do = jax.device_put(rng.standard_normal((spec.B, spec.T, spec.N, spec.dv), np.float32)
                            .astype(jnp.dtype(spec.dtype)))
        jax.block_until_ready(jax.jit(runner.fwd_bwd(impl))(do, *args))


def _run_ncu(cmd: list[str], env: dict, timeout: float):
    """ncu's stdout, or None after printing why it gave none."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"ncu did not finish: {e}")
        return None
    if done.returncode != 0:
        print(f"ncu failed (exit {done.returncode}):\n{(done.stderr or done.stdout)[-2000:]}")
        return None
    return done.stdout


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset")
    p.add_argument("--scale-down", type=int, default=1)
    p.add_argument("--pass", dest="passes", choices=("fwd", "fwd+bwd"), default="fwd")
    p.add_argument("--out", type=Path, default=report.RESULTS)
    p.add_argument("--timeout", type=float, default=300, help="seconds ncu may take")
    p.add_argument("--kernel", help="profile the first launch of this kernel (regex) in detail")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    (preset,) = resolve([args.preset])
    if args.child:
        return _child(preset, args.scale_down, args.passes)
    ncu = shutil.which("ncu")
    if ncu is None:
        print("ncu is not on PATH: no profile (Nsight Compute ships with the CUDA toolkit)")
        return
    import jax

    # Without preallocation the child leaves ncu room to save and restore what each replayed
    # kernel writes (the kernels themselves are the same).
    # The platform allocator keeps the live buffers small too, and without autotuning XLA
    # launches fewer kernels for ncu to intercept. XLA's command buffers (CUDA graphs) are
    # off: with them, ncu sat for minutes on the full-size presets without profiling a kernel
    # (H100, 2026-11); without them each custom call is a plain launch.
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_ALLOCATOR": "platform",
           **os.environ}
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_gpu_autotune_level=0 --xla_gpu_enable_command_buffer=").strip()
    device = jax.devices()[0].device_kind
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    name = preset + (f"-div{args.scale_down}" if args.scale_down > 1 else "")
    name += "" if args.passes == "fwd" else "-fwd-bwd"
    path = Path(args.out) / report.device_slug(device) / "profiles" / f"{date}-{name}.txt"
    if args.kernel:
        path = path.with_name(f"{date}-{name}-{re.sub(r'[^A-Za-z0-9_]+', '_', args.kernel)}.txt")
        with tempfile.TemporaryDirectory() as tmp:
            outputs = []
            for cmd in detail_commands(preset, args.kernel, str(Path(tmp) / "kernel"),
                                       args.scale_down, ncu, passes=args.passes):
                out = _run_ncu(cmd, env, args.timeout)
                if out is None:
                    return
                outputs.append(out)
        # The whole SASS listing with its samples first, for reading the kernel's loops in order.
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".sass.csv").write_text(outputs[2])
        text = (f"{name} ({args.passes}), ours, {device}, ncu sections {', '.join(DETAIL_SECTIONS)}\n"
                f"{outputs[1]}\n{top_stalls(outputs[2])}")
    else:
        out = _run_ncu(command(preset, args.scale_down, ncu, passes=args.passes), env, args.timeout)
        kernels = parse_ncu_csv(out) if out is not None else []
        if out is not None and not kernels:
            print(f"ncu profiled no kernel:\n{out[-2000:]}")
        if not kernels:
            return
        text = summary(kernels, f"{name} ({args.passes}), ours, {device}, ncu --set basic")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(path.read_text() + f"wrote {path}")


if __name__ == "__main__":
    main()
