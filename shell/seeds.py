"""One way to derive seeds: every random choice of a run is a pure function of ``--run.seed`` and
named coordinates (what it is for, the step, the epoch ...), so a resumed run draws exactly what an
uninterrupted one would, and two purposes never share a stream by accident.

    derive_seed(seed, "rollout", step)        # the sampling noise of GRPO step ``step``
    derive_seed(seed, "data-order", epoch)    # the permutation of epoch ``epoch``
"""

from __future__ import annotations

import hashlib

__all__ = ["batch_indices", "derive_seed", "seeded_permutation"]


def derive_seed(seed: int, *path: str | int) -> int:
    """A 63-bit seed from ``seed`` and the coordinates ``path`` (strings and integers), by hashing.

    Distinct paths give independent-looking seeds; the same path always gives the same seed.
    """
    text = "/".join([str(int(seed)), *(str(p) for p in path)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def seeded_permutation(n: int, seed: int) -> list[int]:
    """A permutation of ``range(n)`` drawn from ``seed`` (torch's generator, so identical on every platform)."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def batch_indices(n: int, batch_size: int, step: int, *, seed: int, stream: str = "data-order") -> list[int]:
    """Example indices of optimizer step ``step`` (0-based): consecutive slices of one seeded permutation
    per epoch, a pure function of ``(n, batch_size, step, seed, stream)`` so a resumed run sees exactly the
    batches it would have seen."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"batch_indices needs n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    out: list[int] = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = seeded_permutation(n, derive_seed(seed, stream, epoch))
        out.extend(perm[offset : offset + batch_size - len(out)])
    return out
