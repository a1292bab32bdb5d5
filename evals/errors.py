"""The user-facing error type, owned by the lowest layer so that every layer can raise it.

`evals` sits below `soups`, which sits below `rl` and `vision`; an error type that all of them raise must live
at the bottom or the metrics would have to import the engine. `soups.utils.SoupsError` is this same class,
re-exported, so `except SoupsError` catches errors raised anywhere.
"""

from __future__ import annotations

__all__ = ["SoupsError"]


class SoupsError(Exception):
    """A user-facing error: bad input, named precisely in one line. CLIs print it and exit non-zero."""
