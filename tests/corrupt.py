"""Helper for the integrity tests: every changed byte of a file must be refused with a one-line message."""

from collections.abc import Callable, Iterable
from pathlib import Path

import pytest


def assert_each_flip_rejected(
    data: bytes, positions: Iterable[int], bit: int, path: Path, read: Callable[[Path], object], error: type
) -> None:
    """Write ``data`` with ``bit`` flipped at each position to ``path``; ``read(path)`` must raise ``error`` with a
    one-line message naming the file."""
    for pos in positions:
        changed = bytearray(data)
        changed[pos] ^= bit
        path.write_bytes(changed)
        with pytest.raises(error, match=path.name.replace(".", r"\.")) as err:
            read(path)
        assert "\n" not in str(err.value)
