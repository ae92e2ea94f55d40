"""A synthetic long-range retrieval task: find a record far outside the local window.

A sequence is filler noise with `num_pairs` records scattered through it; each record is a
single token standing for one (key, value) pair. The sequence ends with `num_queries`
(query, answer) pairs: a query token names one of the keys present, and the next token is
that key's value. The model is scored on predicting the answer at each query position.

Every record sits at least `window` positions before the first query, so a model that
attends only to the last `window` tokens sees no record and can only guess (accuracy
1 / num_values). A model that can attend to a few chosen far-away tokens solves it by rating
record tokens high and then matching the query's key.

Vocabulary (ids in this order): filler tokens, record tokens (key * num_values + value),
query tokens (one per key), answer tokens (one per value).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class RetrievalTask:
    seq_len: int = 256
    window: int = 32  # every record is at least this far before every query
    num_keys: int = 8
    num_values: int = 8  # chance accuracy 1/8
    # Few filler types: a token's score comes from its embedding, so the score projection
    # has few filler types to push below the records before the records get selected.
    num_filler: int = 4
    num_pairs: int = 6
    num_queries: int = 4

    def __post_init__(self):
        if self.num_queries > self.num_pairs or self.num_pairs > self.num_keys:
            raise ValueError("need num_queries <= num_pairs <= num_keys")
        if self.record_span < self.num_pairs:
            raise ValueError(f"seq_len={self.seq_len} leaves {self.record_span} positions beyond "
                             f"the window for {self.num_pairs} records: make it longer")

    @property
    def record_span(self) -> int:
        """Records occupy positions [0, record_span): all of them are >= window tokens before
        the first query."""
        return self.query_positions()[0] - self.window + 1

    def query_positions(self) -> np.ndarray:
        """Positions of the query tokens: the last 2 * num_queries tokens alternate query,
        answer, and the last answer is only a target (it follows the last input token)."""
        return self.seq_len - 2 * self.num_queries + 1 + 2 * np.arange(self.num_queries)

    @property
    def first_record(self) -> int:
        return self.num_filler

    @property
    def first_query(self) -> int:
        return self.first_record + self.num_keys * self.num_values

    @property
    def first_answer(self) -> int:
        return self.first_query + self.num_keys

    @property
    def vocab_size(self) -> int:
        return self.first_answer + self.num_values

    @property
    def chance_accuracy(self) -> float:
        return 1.0 / self.num_values

    def sample(self, rng: np.random.Generator, batch_size: int):
        """(tokens int32 [B, L], targets int32 [B, L], weights float32 [B, L]): the model reads
        tokens[:, t] and predicts targets[:, t] = tokens[:, t + 1]; weights is 1 exactly at the
        query positions (the answers are what is scored)."""
        B, L, P, Q = batch_size, self.seq_len, self.num_pairs, self.num_queries
        tokens = rng.integers(0, self.num_filler, size=(B, L + 1))
        keys = np.argsort(rng.random((B, self.num_keys)), axis=1)[:, :P]  # distinct keys
        values = rng.integers(0, self.num_values, size=(B, P))
        positions = np.argsort(rng.random((B, self.record_span)), axis=1)[:, :P]
        rows = np.arange(B)[:, None]
        tokens[rows, positions] = self.first_record + keys * self.num_values + values

        asked = np.argsort(rng.random((B, P)), axis=1)[:, :Q]  # which records are queried
        query_pos = self.query_positions()
        tokens[rows, query_pos] = self.first_query + np.take_along_axis(keys, asked, axis=1)
        tokens[rows, query_pos + 1] = self.first_answer + np.take_along_axis(values, asked, axis=1)
        # The input is tokens[:, :L]; its targets are the same tokens shifted by one.
        weights = np.zeros((B, L), np.float32)
        weights[:, query_pos] = 1.0
        return (tokens[:, :L].astype(np.int32), tokens[:, 1:].astype(np.int32), weights)
