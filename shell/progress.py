"""Progress bars as users of HF/TRL expect them (steps done, rate, ETA), quiet when output is not a terminal."""

from __future__ import annotations

import sys
from typing import Any

from shell.world import is_main

__all__ = ["progress_bar", "say"]

_ACTIVE: list[Any] = []


class _Silent:
    """What a bar is when output is not a terminal (or bars are off): every call does nothing."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(*, total: int, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0) -> Any:
    """A ``tqdm`` bar on stderr when it is a terminal and ``enabled`` (on rank 0 under torchrun); otherwise a
    silent stand-in with the same ``update`` / ``set_postfix_str`` / ``close`` methods."""
    if not enabled or not sys.stderr.isatty() or not is_main():
        return _Silent()
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, leave=not _ACTIVE,
               position=len(_ACTIVE))
    _ACTIVE.append(bar)
    close = bar.close

    def close_and_forget() -> None:
        if bar in _ACTIVE:
            _ACTIVE.remove(bar)
        close()

    bar.close = close_and_forget  # type: ignore[method-assign]
    return bar


def say(text: str) -> None:
    """Print a line of the run's log without breaking the progress bars on screen (rank 0 alone under torchrun)."""
    if not is_main():
        return
    if _ACTIVE:
        from tqdm import tqdm

        tqdm.write(text)
    else:
        print(text, flush=True)
