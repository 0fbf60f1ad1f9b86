"""The S3 backend of the page store: the Backend protocol on an S3-compatible bucket.

Layout: the same relative names as LocalBackend under `s3://BUCKET/PREFIX/`:
    PREFIX/config/store.json   PREFIX/packs/ab/ab12...   PREFIX/index/(64 hex)
    PREFIX/manifests/JOB/0000000042                      PREFIX/locks/HOST-PID
so a local store directory copied into a bucket (catalog and lock files aside) is an S3
store, and the other way round.

How the error contract of backend.py holds here:
  put        One PutObject up to `multipart_threshold`, else a multipart upload whose
             parts go up in parallel; S3 makes an object visible only when PutObject or
             CompleteMultipartUpload succeeds, whole. Any failure aborts the multipart
             upload (best effort: if even that fails, `discard_incomplete` removes it
             later) and raises StoreError. A 200 from S3 means the object is durable.
  get_range  A ranged GET; a body shorter than asked (or 416) -> DataCorrupted.
  list       ListObjectsV2 by prefix, paginated; unfinished multipart uploads are not
             objects, so they are never listed.
  delete     DeleteObject (idempotent in S3).
  discard_incomplete  ListMultipartUploads under PREFIX/KIND/, abort each.
Every request is retried by botocore ("standard" mode: connection errors, throttling,
5xx) a bounded number of times, then fails with StoreError naming the object and cause.

Endpoint, region and credentials come from botocore's usual chain unless given: the
AWS_ENDPOINT_URL(_S3), AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE variables and ~/.aws/config and
~/.aws/credentials. AWS_MAX_ATTEMPTS / `max_attempts` there override our default of 5.
Secrets are never logged nor put in messages.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from cpcoord.errors import DataCorrupted, InvalidArgument, ObjectNotFound, StoreError
from cpcoord.faults import fault_point
from storecore.backend import NODE_TEMP_GRACE, Buffer, Kind, ObjectInfo, check_name
from storecore.names import NODES
from storecore.s3_options import MAX_PARTS, S3Options, check_bucket, check_prefix

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


def _code(e: ClientError) -> str:
    err = e.response.get("Error", {})
    return str(err.get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def _why(e: Exception) -> str:
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return f"S3 {_code(e)} (HTTP {status}) {err.get('Message', '')}".rstrip()
    return f"{type(e).__name__}: {e}"


class S3Backend:
    """Objects in an S3 bucket under a key prefix (see the module docstring)."""

    remote = True  # every request crosses the network (Backend.remote)

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        options: S3Options | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
    ) -> None:
        self.bucket = check_bucket(bucket)
        self.prefix = check_prefix(prefix)
        self.options = opts = options or S3Options()
        self._root = f"{prefix}/" if prefix else ""
        core = botocore.session.get_session()
        attempts = opts.max_attempts or core.get_config_variable("max_attempts") or 5
        mode = core.get_config_variable("retry_mode") or "standard"
        config = Config(
            retries={"total_max_attempts": int(attempts), "mode": mode},  # first one included
            connect_timeout=opts.connect_timeout,
            read_timeout=opts.read_timeout,
            max_pool_connections=2 * opts.part_threads + 4,
        )
        region = region or core.get_config_variable("region") or "us-east-1"
        try:
            session = boto3.session.Session(botocore_session=core)
            self._s3: Any = session.client(
                "s3",
                endpoint_url=endpoint_url,  # None: AWS_ENDPOINT_URL(_S3), config file, AWS
                region_name=region,
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                config=config,
            )
        except (BotoCoreError, ValueError) as e:
            raise StoreError(f"cannot open {self.location}: {_why(e)}") from e
        self.region = region
        self._pool = ThreadPoolExecutor(opts.part_threads, thread_name_prefix="s3-part")
        try:
            self._ensure_bucket()
        except BaseException:
            self.close()
            raise

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def endpoint(self) -> str:
        """The endpoint URL the client resolved (AWS_ENDPOINT_URL, the config file, or
        AWS's own)."""
        return str(self._s3.meta.endpoint_url)

    @property
    def source(self) -> str:
        """The endpoint URL with bucket and prefix: a catalog is bound to it (binding.py)."""
        url = self.endpoint.rstrip("/")
        return f"{url}/{self.bucket}/{self.prefix}" if self.prefix else f"{url}/{self.bucket}"

    def _ensure_bucket(self) -> None:
        try:
            self._s3.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            if _code(e) not in ("404", "NoSuchBucket", "NotFound"):
                raise StoreError(f"cannot open {self.location}: {_why(e)}") from e
        except BotoCoreError as e:
            raise StoreError(f"cannot open {self.location}: {_why(e)}") from e
        if not self.options.create_bucket:
            raise StoreError(f"cannot open {self.location}: bucket {self.bucket} does not exist")
        kw: dict[str, Any] = {}
        if self.region != "us-east-1":  # us-east-1 refuses an explicit constraint
            kw["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._s3.create_bucket(Bucket=self.bucket, **kw)
        except ClientError as e:
            if _code(e) != "BucketAlreadyOwnedByYou":  # a concurrent create is fine
                raise StoreError(f"cannot create bucket {self.bucket}: {_why(e)}") from e
        except BotoCoreError as e:
            raise StoreError(f"cannot create bucket {self.bucket}: {_why(e)}") from e

    def _key(self, kind: Kind, name: str) -> str:
        kind = Kind(kind)
        check_name(name)
        if kind is Kind.PACKS and "/" not in name:  # the fan-out of a local store
            return f"{self._root}{kind.value}/{name[:2]}/{name}"
        return f"{self._root}{kind.value}/{name}"

    # -- writing -------------------------------------------------------------------

    def put(self, kind: Kind, name: str, data: Buffer) -> None:
        key = self._key(kind, name)
        view = memoryview(data).cast("B")
        try:
            if view.nbytes <= self.options.multipart_threshold:
                body = data if isinstance(data, bytes) else view.tobytes()
                self._s3.put_object(Bucket=self.bucket, Key=key, Body=body)
            else:
                self._put_multipart(key, view)
        except (ClientError, BotoCoreError) as e:
            raise StoreError(f"cannot write {kind}/{name}: {_why(e)}") from e

    def _put_multipart(self, key: str, view: memoryview) -> None:
        size = view.nbytes
        part = max(self.options.part_size, -(-size // MAX_PARTS))
        upload = self._s3.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        futures: list[Future[dict[str, Any]]] = []
        try:
            for no, off in enumerate(range(0, size, part), start=1):
                chunk = view[off : off + part]
                futures.append(self._pool.submit(self._upload_part, key, upload, no, chunk))
            _done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            if pending:  # a part failed: stop what has not started, let the rest end
                for f in pending:
                    f.cancel()
                wait(pending)
            parts = [f.result() for f in futures]
            fault_point("store.put")  # tests: a put killed with its parts stored, not complete
            self._complete(key, upload, parts, size)
        except BaseException:
            # Parts already stored stay invisible; abort frees them. If the server is
            # gone this fails too, and discard_incomplete() aborts it later.
            for f in futures:
                f.cancel()
            wait(futures)
            with contextlib.suppress(ClientError, BotoCoreError):
                self._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
            raise

    def _upload_part(self, key: str, upload: str, no: int, chunk: memoryview) -> dict[str, Any]:
        r = self._s3.upload_part(
            Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=no, Body=chunk.tobytes()
        )
        return {"PartNumber": no, "ETag": r["ETag"]}

    def _complete(self, key: str, upload: str, parts: list[dict[str, Any]], size: int) -> None:
        try:
            self._s3.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
            )
        except ClientError as e:
            # A retried Complete whose first attempt succeeded (response lost) finds no
            # upload: the object is there if it has our size.
            if _code(e) != "NoSuchUpload" or self._head_size(key) != size:
                raise

    # -- reading -------------------------------------------------------------------

    def _head_size(self, key: str) -> int | None:
        try:
            return int(self._s3.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except ClientError as e:
            if _code(e) in _NOT_FOUND:
                return None
            raise

    def _read(
        self, kind: Kind, name: str, key: str, rng: str | None, info: dict[str, Any] | None = None
    ) -> tuple[bytes, int]:
        """(body, HTTP status) of a GET. botocore retries the request but not a body cut
        off mid-stream, so that is fetched again here (bounded)."""
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if rng is not None:
            kw["Range"] = rng
        for attempt in range(3):
            try:
                r = self._s3.get_object(**kw)
            except ClientError as e:
                if _code(e) in _NOT_FOUND:
                    raise ObjectNotFound(kind, name) from None
                if _code(e) in ("InvalidRange", "416"):
                    why = f"no bytes at {rng}"
                    raise DataCorrupted("object", f"{kind}/{name}", why) from None
                raise StoreError(f"cannot read {kind}/{name}: {_why(e)}") from e
            except BotoCoreError as e:
                raise StoreError(f"cannot read {kind}/{name}: {_why(e)}") from e
            try:
                body = r["Body"].read()
                if info is not None:
                    info["ContentRange"] = r.get("ContentRange")
                return body, int(r["ResponseMetadata"]["HTTPStatusCode"])
            except BotoCoreError as e:  # the body broke off (checked against its length)
                if attempt == 2:
                    raise StoreError(f"cannot read {kind}/{name}: {_why(e)}") from e
        raise AssertionError("unreachable")

    def get(self, kind: Kind, name: str) -> bytes:
        return self._read(kind, name, self._key(kind, name), None)[0]

    def get_range(self, kind: Kind, name: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InvalidArgument(f"bad range {offset}+{length} of {kind}/{name}")
        key = self._key(kind, name)
        if length == 0:  # HTTP cannot ask for zero bytes; the object must still exist
            self.stat(kind, name)
            return b""
        body, status = self._read(kind, name, key, f"bytes={offset}-{offset + length - 1}")
        if status == 200:  # a server that ignored the Range sent the whole object
            body = body[offset : offset + length]
        if len(body) != length:
            raise DataCorrupted("object", f"{kind}/{name}", f"ends before {offset + length} bytes")
        return body

    def get_tail(self, kind: Kind, name: str, length: int) -> tuple[int, bytes]:
        """(object size, its last `length` bytes or all of it): one suffix-range GET,
        the size from its Content-Range (no HEAD first)."""
        if length <= 0:
            return self.stat(kind, name).size, b""
        info: dict[str, Any] = {}
        body, status = self._read(kind, name, self._key(kind, name), f"bytes=-{length}", info)
        crange = info.get("ContentRange") or ""
        if status == 200 or "/" not in crange:  # the whole object came
            return len(body), body[-length:]
        try:
            size = int(crange.rsplit("/", 1)[1])
        except ValueError:
            raise DataCorrupted("object", f"{kind}/{name}", f"Content-Range {crange!r}") from None
        if len(body) != min(size, length):
            raise DataCorrupted("object", f"{kind}/{name}", f"ends before {size} bytes")
        return size, body

    def stat(self, kind: Kind, name: str) -> ObjectInfo:
        key = self._key(kind, name)
        try:
            size = self._head_size(key)
        except (ClientError, BotoCoreError) as e:
            raise StoreError(f"cannot stat {kind}/{name}: {_why(e)}") from e
        if size is None:
            raise ObjectNotFound(kind, name)
        return ObjectInfo(Kind(kind), name, size)

    def exists(self, kind: Kind, name: str) -> bool:
        try:
            self.stat(kind, name)
        except ObjectNotFound:
            return False
        return True

    def list(self, kind: Kind) -> Iterator[ObjectInfo]:
        kind = Kind(kind)
        base = f"{self._root}{kind.value}/"
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket,
            Prefix=base,
            PaginationConfig={"PageSize": self.options.list_page_size},
        )
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(base) :]
                    name = rel
                    if kind is Kind.PACKS and not rel.startswith(NODES + "/"):
                        name = rel.rsplit("/", 1)[-1]
                    with contextlib.suppress(InvalidArgument):  # not ours (folder marker...)
                        yield ObjectInfo(kind, check_name(name), int(obj["Size"]))
        except (ClientError, BotoCoreError) as e:
            raise StoreError(f"cannot list {kind} of {self.location}: {_why(e)}") from e

    # -- removing ------------------------------------------------------------------

    def delete(self, kind: Kind, name: str) -> None:
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=self._key(kind, name))
        except ClientError as e:
            if _code(e) not in _NOT_FOUND:
                raise StoreError(f"cannot delete {kind}/{name}: {_why(e)}") from e
        except BotoCoreError as e:
            raise StoreError(f"cannot delete {kind}/{name}: {_why(e)}") from e

    def incomplete_uploads(self) -> Sequence[tuple[str, str]]:
        """(key, upload id) of every unfinished multipart upload to a key of this store
        (under PREFIX/KIND/ only: other tenants of the bucket are left alone). Uploads of
        agents (under packs/nodes/) only when begun NODE_TEMP_GRACE ago or earlier: the
        coordinator cannot see them in flight."""
        out: list[tuple[str, str]] = []
        paginator = self._s3.get_paginator("list_multipart_uploads")
        nodes = f"{self._root}{Kind.PACKS.value}/{NODES}/"
        old = time.time() - NODE_TEMP_GRACE
        try:
            for kind in Kind:
                pages = paginator.paginate(Bucket=self.bucket, Prefix=f"{self._root}{kind.value}/")
                out += [
                    (u["Key"], u["UploadId"])
                    for p in pages
                    for u in p.get("Uploads", [])
                    if not u["Key"].startswith(nodes) or u["Initiated"].timestamp() <= old
                ]
        except (ClientError, BotoCoreError) as e:
            raise StoreError(f"cannot list uploads of {self.location}: {_why(e)}") from e
        return out

    def discard_incomplete(self) -> int:
        n = 0
        for key, upload in self.incomplete_uploads():
            try:
                self._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
                n += 1
            except ClientError as e:
                if _code(e) != "NoSuchUpload":
                    raise StoreError(f"cannot abort the upload of {key}: {_why(e)}") from e
            except BotoCoreError as e:
                raise StoreError(f"cannot abort the upload of {key}: {_why(e)}") from e
        return n

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with contextlib.suppress(Exception):
            self._s3.close()
