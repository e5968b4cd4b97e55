"""Embeddings, the pure part: pooling a sequence's per-token hidden states into one vector,
fitting an input to a context, and an ensemble's vector made of its members' (docs/server.md,
"Embeddings").

The backend decodes and hands over rows of hidden states (one per token, in order, a chunk at
a time); everything here is numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

POOLINGS = ("mean", "cls", "last")
"""How a sequence's token vectors become one, as llama.cpp's pooling types name them: their
mean, the first token's (``cls``), the last token's."""

DEFAULT_POOLING = "last"
"""The pooling of a model file that declares none (a language model, not trained to embed): the
last token's vector, which has read the whole input, as Ollama takes it for such models."""

Vectors = npt.NDArray[np.float32]


class Pooler:
    """One sequence's pooled vector, fed its token rows a chunk at a time, in order."""

    def __init__(self, pooling: str, n_embd: int) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}")
        self.pooling = pooling
        self.n = 0
        self._acc = np.zeros(n_embd, dtype=np.float64)

    def add(self, rows: npt.NDArray[np.floating]) -> None:
        if not len(rows):
            return
        if self.pooling == "mean":
            self._acc += rows.sum(axis=0, dtype=np.float64)
        elif self.pooling == "last":
            self._acc[:] = rows[-1]
        elif self.n == 0:  # cls: the first token's
            self._acc[:] = rows[0]
        self.n += len(rows)

    def result(self) -> npt.NDArray[np.float64]:
        if self.n == 0:
            raise ValueError("no token was pooled")
        return self._acc / self.n if self.pooling == "mean" else self._acc.copy()


def fit(tokens: Sequence[int], limit: int, *, ends_with_eos: bool) -> list[int]:
    """The first ``limit`` tokens of an input, keeping its final EOS when the tokenizer put one
    there (as a model that adds an EOS to what it embeds expects to end with it)."""
    if len(tokens) <= limit:
        return list(tokens)
    if ends_with_eos and limit >= 2:
        return [*tokens[: limit - 1], tokens[-1]]
    return list(tokens[:limit])


def l2_normalized(v: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """``v`` scaled to length 1 (a zero vector stays zero), row by row for a 2-D array."""
    v = np.asarray(v, dtype=np.float64)
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    out: npt.NDArray[np.float64] = v / np.maximum(norm, 1e-12)
    return out


def combine(parts: Sequence[npt.NDArray[np.floating]], weights: Sequence[float], *, normalize: bool) -> Vectors:
    """An ensemble's vectors from its members' (``parts[k]``: member k's, one row per input): the
    concatenation of each member's vectors scaled by the square root of its share of the weight.
    With ``normalize`` each member's vector is made unit length first, so the whole is unit length
    and the cosine similarity of two ensemble vectors is the weighted mean of the members' cosine
    similarities; without it the dot product is the weighted sum of the members' dot products.
    One member alone is its own vector (normalised or not)."""
    if len(parts) != len(weights) or not parts:
        raise ValueError("one weight per member's vectors")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("the weights sum to zero")
    cols = []
    for p, w in zip(parts, weights):
        v = l2_normalized(p) if normalize else np.asarray(p, dtype=np.float64)
        cols.append(v if len(parts) == 1 else v * np.sqrt(w / total))
    return np.concatenate(cols, axis=-1).astype(np.float32)
