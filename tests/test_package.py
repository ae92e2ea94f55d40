"""The package itself: every FFI target registered once per platform, the jaxlib version
guard, and the implementation switch."""

import os
import subprocess
import sys

import pytest

import jax_sparsek
from jax_sparsek import _ffi

CPU_TARGETS = {
    "jax_sparsek_flash_fwd", "jax_sparsek_flash_bwd",
    "jax_sparsek_block_sparse_fwd", "jax_sparsek_block_sparse_bwd",
    "jax_sparsek_sparsek_select", "jax_sparsek_sparsek_fwd", "jax_sparsek_sparsek_bwd",
    "jax_sparsek_decode_fwd",
}


def test_every_cpu_target_is_registered():
    assert {name for name in _ffi._TARGETS if _ffi.has_target(name, "cpu")} == CPU_TARGETS
    if _ffi.WITH_CUDA:  # the CUDA build registers the flash / block-sparse / decode kernels too
        assert all(_ffi.has_target(t, "cuda") for t in CPU_TARGETS
                   if not t.startswith("jax_sparsek_sparsek_"))


def test_public_api():
    assert set(jax_sparsek.__all__) == {"block_sparse_attention", "flash_attention", "reference",
                                        "sparsek", "sparsek_attention", "sparsek_threshold"}
    assert callable(jax_sparsek.sparsek) and callable(jax_sparsek.flash_attention)


def test_an_older_jaxlib_than_the_build_is_refused(tmp_path):
    child = ("import jaxlib; jaxlib.__version__ = '0.0.1'\n"
             "try:\n    import jax_sparsek\nexcept ImportError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert f"built against jaxlib {_ffi.BUILT_AGAINST_JAXLIB}" in done.stdout, done.stderr[-2000:]
    assert "jaxlib 0.0.1 is installed" in done.stdout


def test_implementation_switch():
    targets = ["jax_sparsek_flash_fwd"]
    assert _ffi.resolve_implementation("xla", targets) == "xla"
    assert _ffi.resolve_implementation(None, ["no_such_target"]) == "xla"
    with pytest.raises(ValueError, match="no_such_target"):
        _ffi.resolve_implementation("ffi", ["no_such_target"])
    with pytest.raises(ValueError, match="implementation must be"):
        _ffi.resolve_implementation("cuda", targets)
