"""MRA, Molecular Retrieval Accuracy (HistDiST, arXiv 2505.06793): does a generated IHC image
look, to a pathology encoder, more like its own real IHC image than like the others of the set?

Each generated image's embedding is compared by cosine with the embedding of every real image of
the paired set; its rank is the number of real images strictly more similar than its own pair
(ties go to the pair, as the authors' `torch.sort`/first-match does). Top-1 and top-3 accuracy
are the fractions of rank 0 and rank < 3; a generator that kept no image-specific information
scores the chance level, 1/N and 3/N.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def retrieval_ranks(real: np.ndarray, fake: np.ndarray) -> np.ndarray:
    """(N,) rank of each fake's own real image (row i pairs with row i) by cosine."""
    if real.shape != fake.shape or real.ndim != 2:
        raise ValueError(f"paired embeddings must have one shape (N, D); got {real.shape} and "
                         f"{fake.shape}")

    def unit(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)

    sim = unit(fake) @ unit(real).T  # (fake i, real j)
    own = np.diag(sim)
    return (sim > own[:, None]).sum(axis=1)


def mra(real: np.ndarray, fake: np.ndarray) -> dict[str, Any]:
    ranks = retrieval_ranks(real, fake)
    n = len(ranks)
    return {"top1": float(np.mean(ranks == 0)) if n else float("nan"),
            "top3": float(np.mean(ranks < 3)) if n else float("nan"),
            "chance_top1": 1.0 / n if n else float("nan"),
            "chance_top3": min(3, n) / n if n else float("nan"), "pairs": n}


def mra_of_pairs(pairs: list[tuple[Any, Any]], features: Any,
                 real_cache: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """MRA over `pairs` of (real item, fake item) with `features` ((B, H, W, 3) uint8 ->
    (B, D)); images of a pair may differ in size, each is embedded on its own. `real_cache`
    (by real item key) keeps the real embeddings for the next generated set."""
    cache = {} if real_cache is None else real_cache
    real, fake = [], []
    for r_item, f_item in pairs:
        if r_item.key not in cache:
            cache[r_item.key] = features(np.asarray(r_item.load())[None])[0]
        real.append(cache[r_item.key])
        fake.append(features(np.asarray(f_item.load())[None])[0])
    if not pairs:
        return mra(np.zeros((0, 1)), np.zeros((0, 1)))
    return mra(np.stack(real), np.stack(fake))
