"""Demo: SparseK attention solves long-range retrieval that window attention cannot.

`python -m jax_sparsek.demo` trains a small transformer LM three times (dense, window-only
and SparseK attention) on `task.RetrievalTask`, prints a table of accuracy, loss, step time
and decode cache size, and saves the learning curves to demo_out/learning_curves.png.
"""

from jax_sparsek.demo.run import main

__all__ = ["main"]
