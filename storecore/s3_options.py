"""What an S3 store is configured with, checked before any connection and without
boto3: the backend's options (`S3Options`: multipart sizes and threads, retries,
timeouts, bucket creation, list pages), bucket names and key prefixes
(`check_bucket`, `check_prefix`), and S3's part limits. storecore/s3.py is the backend
itself and names these too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cpcoord.errors import InvalidArgument
from storecore.backend import check_name

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
MIN_PART = 5 << 20  # S3's smallest part (all but the last)
MAX_PARTS = 10000


@dataclass(frozen=True)
class S3Options:
    multipart_threshold: int = 8 << 20  # larger objects (packs) go up in parts
    part_size: int = 8 << 20
    part_threads: int = 4  # parts in flight per backend (shared by concurrent puts)
    max_attempts: int | None = None  # None: AWS_MAX_ATTEMPTS / config file, else 5
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    create_bucket: bool = True
    list_page_size: int = 1000

    def __post_init__(self) -> None:
        if self.part_size < MIN_PART or self.multipart_threshold < MIN_PART:
            raise InvalidArgument(f"S3 parts must be at least {MIN_PART} bytes")
        if not 1 <= self.part_threads <= 64:
            raise InvalidArgument(f"part threads {self.part_threads} is outside 1..64")
        if self.max_attempts is not None and not 1 <= self.max_attempts <= 20:
            raise InvalidArgument(f"max attempts {self.max_attempts} is outside 1..20")
        if not 1 <= self.list_page_size <= 1000:
            raise InvalidArgument(f"list page size {self.list_page_size} is outside 1..1000")


def check_bucket(bucket: str) -> str:
    """Validate an S3 bucket name (3-63 of [a-z0-9.-], no '..'); return it unchanged."""
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise InvalidArgument(f"bad S3 bucket name {bucket!r} (3-63 of a-z 0-9 . -)")
    return bucket


def check_prefix(prefix: str) -> str:
    """A key prefix: '' or store-name segments joined by '/' (no leading or trailing /)."""
    if prefix:
        try:
            check_name(prefix)
        except InvalidArgument:
            raise InvalidArgument(f"bad S3 key prefix {prefix!r}") from None
    return prefix
