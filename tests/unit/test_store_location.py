"""Store locations (`--store DIR` or `--store s3://BUCKET/PREFIX`): parse, format, refusal
of bad input, default state directories, and opening a local one."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.store.location import StoreLocation, open_backend, open_repository
from cpcoord.errors import InvalidArgument
from storecore.backend import LocalBackend
from tests.helpers.store_support import checkpoint, rand


@pytest.mark.parametrize(
    ("text", "want", "canonical"),
    [
        ("/var/lib/cpcoord", StoreLocation.local("/var/lib/cpcoord"), "/var/lib/cpcoord"),
        ("store", StoreLocation.local("store"), "store"),
        ("file:///srv/store", StoreLocation.local("/srv/store"), "/srv/store"),
        ("file:///x://y", StoreLocation.local("/x://y"), "file:///x://y"),
        ("s3://my-bucket", StoreLocation.s3("my-bucket"), "s3://my-bucket"),
        ("s3://my-bucket/", StoreLocation.s3("my-bucket"), "s3://my-bucket"),
        ("s3://b.example/cp/prod", StoreLocation.s3("b.example", "cp/prod"), "s3://b.example/cp/prod"),
        ("S3://bkt/p/", StoreLocation.s3("bkt", "p"), "s3://bkt/p"),
    ],
)  # fmt: skip
def test_parse_and_format(text: str, want: StoreLocation, canonical: str) -> None:
    got = StoreLocation.parse(text)
    assert got == want
    assert got.format() == canonical == str(got)
    assert StoreLocation.parse(got.format()) == got


@pytest.mark.parametrize(
    "text",
    [
        "", "  ", "gs://bucket/x", "http://host/x", "s3://", "s3:///x", "s3://ab",
        "s3://Bucket/x", "s3://bkt//x", "s3://bkt/../x", "s3://bkt/.hidden", "s3://bkt/a b",
        "s3://bkt/x?endpoint=http://evil", "s3://bkt/x#frag", "file://relative/path",
        "rel://x",
    ],
)  # fmt: skip
def test_bad_locations_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument):
        StoreLocation.parse(text)


def test_credentials_in_the_url_are_refused_and_never_echoed() -> None:
    with pytest.raises(InvalidArgument) as e:
        StoreLocation.parse("s3://AKIAXX:s3cr3t-value@bucket/prefix")
    assert "s3cr3t-value" not in str(e.value) and "AWS_ACCESS_KEY_ID" in str(e.value)


@given(
    st.from_regex(r"[a-z0-9][a-z0-9-]{1,20}[a-z0-9]", fullmatch=True),
    st.lists(st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,8}", fullmatch=True), max_size=4),
)
def test_s3_round_trip(bucket: str, segments: list[str]) -> None:
    loc = StoreLocation.s3(bucket, "/".join(segments))
    assert StoreLocation.parse(loc.format()) == loc


def test_default_state_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert StoreLocation.local("/srv/s").default_state_dir() == Path("/srv/s")
    monkeypatch.setenv("CPCOORD_STATE_DIR", str(tmp_path))
    assert StoreLocation.s3("bkt").default_state_dir() == tmp_path / "s3" / "bkt"
    assert StoreLocation.s3("bkt", "a/b").default_state_dir() == tmp_path / "s3" / "bkt+a+b"


def test_open_a_local_location(tmp_path: Path) -> None:
    b = open_backend(str(tmp_path / "s"))
    assert isinstance(b, LocalBackend) and b.root == tmp_path / "s"
    repo, report = open_repository(tmp_path / "s")
    assert report is None and (tmp_path / "s" / "catalog.sqlite").is_file()
    g = checkpoint(repo, "j", {"m": {"r": rand(4, 1)}})
    repo.close()
    for f in (tmp_path / "s").glob("catalog.sqlite*"):
        f.unlink()
    repo, report = open_repository(f"file://{tmp_path / 's'}")
    assert report is not None and report.restored == (("j", g),)
    repo.close()
