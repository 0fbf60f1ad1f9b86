"""Where a store lives, as the user writes it (`--store`): a value with parse and format,
and the function that opens its backend (the agents open the store the coordinator
announces with it; coordinator/store/location.py opens the repository).

Grammar:
    location = s3-url | file-url | path
    s3-url   = "s3://" BUCKET [ "/" PREFIX ] [ "/" ]    BUCKET: S3 rules (3-63 of a-z0-9.-)
                                                         PREFIX: store-name segments
    file-url = "file://" ABSOLUTE-PATH
    path     = any other non-empty text: a local directory
Any other scheme, a query or fragment, and credentials in the URL are refused: endpoint
and credentials come from the standard AWS variables and config files (s3.py).

A local store keeps its catalog and lock inside its directory. An S3 store keeps them
in a local state directory (default: $CPCOORD_STATE_DIR, else /var/lib/cpcoord for root,
else $XDG_STATE_HOME/cpcoord or ~/.local/state/cpcoord; then s3/BUCKET[+PREFIX] with
'/' as '+').
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from cpcoord.errors import InvalidArgument
from storecore.backend import Backend, LocalBackend
from storecore.s3 import S3Backend
from storecore.s3_options import S3Options, check_bucket, check_prefix

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)


@dataclass(frozen=True)
class StoreLocation:
    scheme: Literal["local", "s3"]
    path: str = ""  # local: the directory
    bucket: str = ""  # s3
    prefix: str = ""  # s3: '' or segments joined by '/', no leading or trailing '/'

    def __post_init__(self) -> None:
        if self.scheme == "local":
            if not self.path or "\0" in self.path or self.bucket or self.prefix:
                raise InvalidArgument(f"bad local store location {self.path!r}")
            if "://" in self.path and not self.path.startswith("/"):  # reads as a URL
                raise InvalidArgument(f"store directory {self.path!r} must be absolute")
        elif self.scheme == "s3":
            check_bucket(self.bucket)
            check_prefix(self.prefix)
            if self.path:
                raise InvalidArgument("an S3 store location has no local path")
        else:
            raise InvalidArgument(f"unknown store scheme {self.scheme!r}")

    @classmethod
    def local(cls, path: Path | str) -> StoreLocation:
        return cls("local", path=str(path))

    @classmethod
    def s3(cls, bucket: str, prefix: str = "") -> StoreLocation:
        return cls("s3", bucket=bucket, prefix=prefix)

    @classmethod
    def parse(cls, text: str) -> StoreLocation:
        """Parse `--store` text (grammar in the module docstring)."""
        if not text or not text.strip():
            raise InvalidArgument("empty store location")
        m = _SCHEME.fullmatch(text)
        if m is None:
            return cls.local(text)
        scheme, rest = m.group(1).lower(), m.group(2)
        if scheme == "file":
            if not rest.startswith("/"):
                raise InvalidArgument(f"file store URL {text!r} needs an absolute path")
            return cls.local(rest)
        if scheme != "s3":
            raise InvalidArgument(f"unsupported store URL {text!r}: use a directory or s3://")
        if "?" in rest or "#" in rest:
            raise InvalidArgument(
                f"store URL {text!r} has a query or fragment: set the endpoint and region "
                "with AWS_ENDPOINT_URL and AWS_REGION (or ~/.aws/config)"
            )
        bucket, _, prefix = rest.partition("/")
        if "@" in bucket or ":" in bucket:
            # Never echo it back: it may hold a secret.
            raise InvalidArgument(
                "an S3 store URL takes no credentials or port: use AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL (or ~/.aws/config)"
            )
        return cls.s3(bucket, prefix.removesuffix("/"))

    def format(self) -> str:
        """The canonical text; `parse(loc.format()) == loc`."""
        if self.scheme == "local":
            return self.path if "://" not in self.path else f"file://{self.path}"
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def __str__(self) -> str:
        return self.format()

    def default_state_dir(self) -> Path:
        """Where the catalog and lock of this store live unless told otherwise."""
        if self.scheme == "local":
            return Path(self.path)
        env = os.environ.get("CPCOORD_STATE_DIR")
        if env:
            base = Path(env)
        elif os.geteuid() == 0:
            base = Path("/var/lib/cpcoord")
        else:
            xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
            base = Path(xdg) / "cpcoord"
        leaf = self.bucket if not self.prefix else f"{self.bucket}+{self.prefix.replace('/', '+')}"
        return base / "s3" / leaf


def as_location(where: StoreLocation | str | Path) -> StoreLocation:
    if isinstance(where, StoreLocation):
        return where
    if isinstance(where, Path):
        return StoreLocation.local(where)
    return StoreLocation.parse(where)


def open_backend(
    where: StoreLocation | str | Path,
    *,
    s3_options: S3Options | None = None,
    create: bool = True,
) -> Backend:
    """The backend of a store location (an S3 bucket or a directory is created when
    missing, unless `create` is false: an agent opens only a store that exists)."""
    loc = as_location(where)
    if loc.scheme == "local":
        return LocalBackend(loc.path, create=create)
    opts = s3_options or S3Options()
    if not create:
        opts = replace(opts, create_bucket=False)
    return S3Backend(loc.bucket, loc.prefix, options=opts)
