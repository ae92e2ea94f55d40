"""Wall-clock timing of asynchronous device work."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable

# Calls shorter than this are timed in back-to-back batches lasting about BATCH_S, so that
# the host round trip of one synchronisation does not dominate the sample.
SHORT_CALL_S = 2e-4
BATCH_S = 1e-3


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
    per_sample = 1 if single >= SHORT_CALL_S else math.ceil(BATCH_S / max(single, 1e-6))
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        for _ in range(per_sample):
            out = call()
        sync(out)
        samples.append((time.perf_counter() - start) / per_sample)
    return 1e3 * statistics.median(samples), out
