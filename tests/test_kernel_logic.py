"""The CUDA kernels' index and selection logic, brute-forced on the host.

Each `*_test.cc` next to the CUDA kernels includes the headers the kernels use (plain C++ where
they are host-device code) and checks them against brute force; they need a C++ compiler, not
a GPU.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOST_TESTS = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("cpp/*/cuda/*_test.cc"))
COMPILER = shutil.which("c++") or shutil.which("g++")


@pytest.mark.skipif(COMPILER is None, reason="needs a C++ compiler")
@pytest.mark.parametrize("source", HOST_TESTS)
def test_host_check(source, tmp_path):
    exe = tmp_path / pathlib.Path(source).stem
    build = subprocess.run([COMPILER, "-std=c++17", "-O2", f"-I{ROOT / 'cpp'}", str(ROOT / source),
                            "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " 0 failures" in run.stdout, run.stdout
