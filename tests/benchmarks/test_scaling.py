"""The weak-scaling benchmark's code path on 2 host devices (a smoke run: nothing is timed
against anything)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHILD = """
import json, sys
sys.path.append(sys.argv[1])  # the repository, for the benchmarks package
from benchmarks import scaling
records = scaling.main(["--B", "1", "--T", "32", "--N", "4", "--K", "2", "--D", "16",
                        "--dtype", "float32", "--k-select", "4", "--window", "4",
                        "--d-model", "16", "--iters", "2", "--no-save"])
print(json.dumps(records))
"""


def test_weak_scaling_runs_every_workload_on_each_device_count(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", CHILD, str(REPO)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(done.stdout.strip().splitlines()[-1])
    seen = {(r["workload"], r["devices"]) for r in records}
    workloads = {"sparsek_attention", "flash_attention", "train:sparsek", "train:dense"}
    assert seen == {(w, n) for w in workloads for n in (1, 2)}
    for r in records:
        assert r["ms"] > 0 and r["efficiency"] > 0 and r["device"] and r["date"]
        assert r["efficiency"] == 1.0 or r["devices"] > 1
