"""Token-budget microbatches: rows of known padded lengths packed into microbatches of bounded padded size.

A microbatch of rows padded to its longest row holds ``rows × longest`` tokens; memory and time of its
forward and backward are set by that product. :func:`pack_by_tokens` packs an optimizer step's rows into as
few microbatches of at most ``max_tokens`` padded tokens as possible (``--optim.max-tokens-per-microbatch``).
Pure: integers in, index lists out.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["pack_by_tokens", "padded_tokens"]


def padded_tokens(lengths: Sequence[int], rows: Sequence[int]) -> int:
    """Tokens of the microbatch ``rows`` padded to its longest row: ``len(rows) × max(lengths[rows])`` (0 if empty)."""
    return len(rows) * max((lengths[i] for i in rows), default=0)


def pack_by_tokens(lengths: Sequence[int], max_tokens: int, *, multiple_of: int = 1) -> list[list[int]]:
    """The indices of rows with these (padded) ``lengths`` as microbatches of at most ``max_tokens`` padded tokens.

    First-fit-decreasing: rows sorted by length, longest first (ties by index), each into the first
    microbatch it fits. With the cost ``rows × longest row`` a microbatch opened by a row can only take shorter
    rows while ``(rows + 1) × its first length <= max_tokens``, so this packs consecutive runs of the sorted
    order, and it needs the fewest microbatches possible (exchange argument: some optimal packing puts the
    longest rows together with its own longest row; tested against exhaustive search).

    A row longer than ``max_tokens`` on its own gets a microbatch of its own (memory is then set by that row:
    a sequence is never cut); it is not refused, so a long rollout never stops a run.

    ``multiple_of`` (the number of ranks under torchrun, each running as many microbatches): while the count is
    not a multiple of it, the microbatch of the most padded tokens among those of two rows or more is split in
    two halves (every microbatch stays within the budget, and ranks share real work). Only when every
    microbatch already holds a single row are empty microbatches ``[]`` appended instead (a rank with one takes
    part in the gradient reduction without a loss).

    Returns:
        microbatches of row indices, longest rows first, then any empty ones; every index exactly once.

    Raises:
        ValueError: ``max_tokens < 1``, ``multiple_of < 1`` or a negative length.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    if any(n < 0 for n in lengths):
        raise ValueError(f"lengths must be >= 0, got {min(lengths)}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    for i in order:
        if bins and (len(bins[-1]) + 1) * lengths[bins[-1][0]] <= max_tokens:
            bins[-1].append(i)  # sorted: only the newest microbatch can still have room (see the docstring)
        else:
            bins.append([i])
    while len(bins) % multiple_of:
        splittable = [b for b in range(len(bins)) if len(bins[b]) > 1]
        if not splittable:
            bins.append([])
            continue
        b = max(splittable, key=lambda b: (padded_tokens(lengths, bins[b]), -b))
        half = (len(bins[b]) + 1) // 2
        bins[b : b + 1] = [bins[b][:half], bins[b][half:]]
    return bins
