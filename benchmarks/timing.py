"""Wall-clock timing of asynchronous device work."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable

# Each sample times back-to-back calls lasting at least SAMPLE_S, so that the host round trip
# of its one synchronisation (tens of microseconds) stays small against it.
SAMPLE_S = 10e-3


def median_ms(call: Callable[[], Any], sync: Callable[[Any], Any], iters: int,
              warmup: int = 2) -> tuple[float, Any]:
    """Median milliseconds of `call()` over `iters` samples (after compilation and `warmup`
    calls) and the last call's result. `sync(result)` waits for the device work."""
    sync(call())  # compiles
    for _ in range(warmup):
        sync(call())
    start = time.perf_counter()
    out = call()
    sync(out)
    single = time.perf_counter() - start
    per_sample = max(1, math.ceil(SAMPLE_S / max(single, 1e-6)))
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        for _ in range(per_sample):
            out = call()
        sync(out)
        samples.append((time.perf_counter() - start) / per_sample)
    return 1e3 * statistics.median(samples), out
