"""`Closing`: the base of objects that own a resource (a channel, a socket, a file
descriptor, a store) and are used as `with x:`; the block's end calls `close()`."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
