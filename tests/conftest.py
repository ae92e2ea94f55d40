import jax
import pytest

# Reference comparisons in float32 need full-precision matmuls on every backend.
jax.config.update("jax_default_matmul_precision", "highest")

ON_GPU = jax.default_backend() == "gpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not ON_GPU:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _cpu_unless_marked_gpu(request):
    """Tests not marked `gpu` test the CPU kernels, on a GPU machine too."""
    if ON_GPU and "gpu" not in request.keywords:
        with jax.default_device(jax.devices("cpu")[0]):
            yield
    else:
        yield
