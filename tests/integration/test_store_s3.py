"""What only the S3 backend has, against a real SeaweedFS server: multipart uploads that
never show a partial object, stale uploads discarded, paginated listing, the bucket made
when missing, bounded retries with clear errors, and endpoint and credentials taken from
the standard AWS variables and config files. (The shared contract suite is
tests/integration/test_store_backend.py, which runs on S3 too.)"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.store.location import open_backend, open_repository
from cpcoord.errors import InvalidArgument, ObjectNotFound, StoreError
from storecore.backend import Kind
from storecore.s3 import S3Backend
from storecore.s3_options import S3Options
from testbed.seaweed import BUCKET, Seaweed, free_ports
from tests.helpers.store_support import assert_restores, checkpoint, rand

pytestmark = pytest.mark.integration
PACK = "ab" + "0" * 62
MIB = 1 << 20


def test_large_put_goes_up_in_parts(seaweed: Seaweed, monkeypatch: pytest.MonkeyPatch) -> None:
    b = seaweed.backend(multipart_threshold=5 * MIB, part_size=5 * MIB)
    parts: list[int] = []
    real = b._upload_part

    def counting(key: str, upload: str, no: int, chunk: memoryview) -> dict[str, Any]:
        parts.append(no)
        return real(key, upload, no, chunk)

    monkeypatch.setattr(b, "_upload_part", counting)
    data = os.urandom(12 * MIB)
    b.put(Kind.PACKS, PACK, data)
    assert sorted(parts) == [1, 2, 3]
    assert b.get(Kind.PACKS, PACK) == data
    assert b.get_range(Kind.PACKS, PACK, 5 * MIB - 10, 20) == data[5 * MIB - 10 : 5 * MIB + 10]
    b.put(Kind.PACKS, PACK, data[: 2 * MIB])  # replaced by a small single put
    assert b.stat(Kind.PACKS, PACK).size == 2 * MIB
    b.close()


def test_failed_multipart_upload_is_never_visible(
    seaweed: Seaweed, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = seaweed.backend(multipart_threshold=5 * MIB, part_size=5 * MIB, part_threads=1)
    old = os.urandom(MIB)
    b.put(Kind.PACKS, PACK, old)
    other = "cd" + "1" * 62
    real = b._upload_part

    def failing(key: str, upload: str, no: int, chunk: memoryview) -> dict[str, Any]:
        if no == 3:
            raise StoreError("injected: part 3 lost")
        return real(key, upload, no, chunk)

    monkeypatch.setattr(b, "_upload_part", failing)
    for name in (PACK, other):
        with pytest.raises(StoreError, match="part 3 lost"):
            b.put(Kind.PACKS, name, os.urandom(16 * MIB))
    assert b.get(Kind.PACKS, PACK) == old  # the old object, whole
    assert not b.exists(Kind.PACKS, other)
    assert [o.name for o in b.list(Kind.PACKS)] == [PACK]
    assert b.incomplete_uploads() == []  # the failed uploads were aborted
    b.close()


def test_stale_uploads_are_discarded(seaweed: Seaweed) -> None:
    b = seaweed.backend()
    b.put(Kind.INDEX, "i1", b"complete")
    s3 = seaweed.client()
    key = f"{b.prefix}/packs/ab/{PACK}"
    up = s3.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    s3.upload_part(Bucket=BUCKET, Key=key, UploadId=up, PartNumber=1, Body=os.urandom(MIB))
    assert list(b.list(Kind.PACKS)) == []  # an unfinished upload is not an object
    assert [k for k, _ in b.incomplete_uploads()] == [key]
    other = seaweed.backend()  # another store's uploads are not ours to discard
    assert other.discard_incomplete() == 0
    assert b.discard_incomplete() == 1
    assert b.incomplete_uploads() == []
    assert b.get(Kind.INDEX, "i1") == b"complete"
    b.close()
    other.close()


def test_list_paginates_and_ignores_foreign_keys(seaweed: Seaweed) -> None:
    b = seaweed.backend(list_page_size=3)
    names = {f"job-{i % 3}/{i:010d}" for i in range(11)}
    for n in names:
        b.put(Kind.MANIFESTS, n, n.encode())
    s3 = seaweed.client()
    for junk in ("manifests/.hidden", "manifests/sp ace", "manifestsX/y", "manifests/x/"):
        s3.put_object(Bucket=BUCKET, Key=f"{b.prefix}/{junk}", Body=b"?")
    got = {(o.name, o.size) for o in b.list(Kind.MANIFESTS)}
    assert got == {(n, len(n)) for n in names}
    b.close()


def test_objects_are_laid_out_like_a_local_store(seaweed: Seaweed) -> None:
    b = seaweed.backend()
    b.put(Kind.PACKS, PACK, b"p")
    b.put(Kind.MANIFESTS, "j/0000000001", b"m")
    b.put(Kind.CONFIG, "store.json", b"{}")
    keys = {o["Key"] for o in seaweed.client().list_objects_v2(Bucket=BUCKET)["Contents"]}
    mine = {k.removeprefix(b.prefix + "/") for k in keys if k.startswith(b.prefix + "/")}
    assert mine == {f"packs/ab/{PACK}", "manifests/j/0000000001", "config/store.json"}
    assert b.location == f"s3://{BUCKET}/{b.prefix}"
    b.close()


def test_bucket_is_created_when_missing(seaweed: Seaweed) -> None:
    name = f"cpcoord-new-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    with pytest.raises(StoreError, match="does not exist"):
        seaweed.backend(bucket=name, create_bucket=False)
    b = seaweed.backend(bucket=name)
    b.put(Kind.INDEX, "x", b"1")
    assert seaweed.backend(bucket=name, prefix=b.prefix).get(Kind.INDEX, "x") == b"1"
    b.close()


def test_wrong_credentials_are_a_clear_error(seaweed: Seaweed) -> None:
    secret = "not-the-secret-" + "x" * 20
    with pytest.raises(StoreError) as e:
        S3Backend(
            BUCKET, "p", endpoint_url=seaweed.endpoint, region="us-east-1",
            access_key=seaweed.access_key, secret_key=secret,
        )  # fmt: skip
    assert f"s3://{BUCKET}/p" in str(e.value)
    assert "403" in str(e.value) or "SignatureDoesNotMatch" in str(e.value)
    assert secret not in str(e.value)


def test_unreachable_endpoint_fails_after_bounded_retries() -> None:
    (port,) = free_ports(1)  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="cannot open s3://"):
        S3Backend(
            BUCKET, "p", endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1",
            access_key="k", secret_key="s", options=S3Options(max_attempts=3),
        )  # fmt: skip
    assert time.monotonic() - t0 < 20


def test_bad_bucket_prefix_and_options_are_refused() -> None:
    for bucket in ("ab", "UPPER", "a..b", "-ab", "x" * 64, "a_b"):
        with pytest.raises(InvalidArgument):
            S3Backend(bucket)
    for prefix in ("/p", "p/", "a//b", "../x", ".p"):
        with pytest.raises(InvalidArgument):
            S3Backend(BUCKET, prefix)
    with pytest.raises(InvalidArgument):
        S3Options(part_size=MIB)


# -- endpoint and credentials from the environment -----------------------------------------


@pytest.fixture
def clean_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    # No ~/.aws of whoever runs the tests may leak in.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none-credentials"))
    return monkeypatch


def test_aws_environment_variables_are_honoured(
    seaweed: Seaweed, clean_aws_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for k, v in seaweed.env().items():
        clean_aws_env.setenv(k, v)
    clean_aws_env.setenv("AWS_MAX_ATTEMPTS", "2")
    b = open_backend(f"s3://{BUCKET}/env-{os.getpid()}/x")
    assert isinstance(b, S3Backend)
    assert b.endpoint == seaweed.endpoint
    assert b._s3.meta.config.retries["total_max_attempts"] == 2
    b.put(Kind.INDEX, "i", b"via env")
    assert b.get(Kind.INDEX, "i") == b"via env"
    b.close()


def test_aws_config_files_are_honoured(
    seaweed: Seaweed, clean_aws_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg, creds = tmp_path / "config", tmp_path / "credentials"
    cfg.write_text(
        f"[profile store]\nregion = {seaweed.region}\nendpoint_url = {seaweed.endpoint}\n"
    )
    creds.write_text(
        f"[store]\naws_access_key_id = {seaweed.access_key}\n"
        f"aws_secret_access_key = {seaweed.secret_key}\n"
    )
    clean_aws_env.setenv("AWS_CONFIG_FILE", str(cfg))
    clean_aws_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    clean_aws_env.setenv("AWS_PROFILE", "store")
    clean_aws_env.setenv("CPCOORD_STATE_DIR", str(tmp_path / "state"))
    url = f"s3://{BUCKET}/cfg-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    repo, report = open_repository(url)
    assert report is None  # a new store: nothing to rebuild
    assert repo.backend.location == url
    assert (tmp_path / "state" / "s3").is_dir()
    img = {"m": {"r": rand(16, 1)}}
    g = checkpoint(repo, "j", img)
    assert_restores(repo, "j", g, img)
    repo.close()


def test_missing_credentials_are_a_clear_error(
    seaweed: Seaweed, clean_aws_env: pytest.MonkeyPatch
) -> None:
    clean_aws_env.setenv("AWS_ENDPOINT_URL", seaweed.endpoint)
    with pytest.raises(StoreError, match="credentials"):
        open_backend(f"s3://{BUCKET}/nocreds")


def test_absent_objects_on_s3(seaweed: Seaweed) -> None:
    b = seaweed.backend()
    with pytest.raises(ObjectNotFound):
        b.get_range(Kind.PACKS, PACK, 0, 0)  # zero bytes of nothing: still absent
    b.put(Kind.PACKS, PACK, b"abc")
    assert b.get_range(Kind.PACKS, PACK, 3, 0) == b""
    b.close()


def test_a_tail_and_the_size_come_from_one_get(
    seaweed: Seaweed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """get_tail: one suffix-range GET gives the last bytes and the object's size (the
    coordinator checks an agent's pack with it, no HEAD first)."""
    b = seaweed.backend()
    name = "cd" + "0" * 62
    with pytest.raises(ObjectNotFound):
        b.get_tail(Kind.PACKS, name, 100)
    data = os.urandom(300_000)
    b.put(Kind.PACKS, name, data)
    heads: list[str] = []
    monkeypatch.setattr(b, "_head_size", lambda key: heads.append(key))
    assert b.get_tail(Kind.PACKS, name, 1000) == (len(data), data[-1000:])
    assert b.get_tail(Kind.PACKS, name, 10**6) == (len(data), data)
    assert heads == []
    b.close()
