"""One storage suite, run against the filesystem backend and against S3 (moto's server mode)."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from tuneforge.config import Settings
from tuneforge.storage import ObjectNotFound, ObjectStore, PresignOptions, open_store, store_from_settings
from tuneforge.storage.filesystem import FilesystemStore
from tuneforge.storage.s3 import S3Store

MIB = 1 << 20


@pytest.fixture(params=["filesystem", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "filesystem":
        yield FilesystemStore(tmp_path / "objects")
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = f"tf-{uuid.uuid4().hex[:12]}"
        yield S3Store(bucket, prefix="some/prefix", endpoint_url=endpoint, create_bucket=True)


def _chunks(total: int, chunk: int = MIB) -> Iterator[bytes]:
    """Deterministic, non-repeating bytes, produced lazily."""
    sent = 0
    counter = 0
    while sent < total:
        block = hashlib.sha256(counter.to_bytes(8, "big")).digest() * (chunk // 32)
        block = block[: min(chunk, total - sent)]
        counter += 1
        sent += len(block)
        yield block


def test_round_trip_small(store: ObjectStore) -> None:
    assert store.put_bytes("files/file-a", b"hello\n") == 6
    assert store.get_bytes("files/file-a") == b"hello\n"
    assert store.stat("files/file-a").size == 6
    assert store.exists("files/file-a")
    with store.open("files/file-a") as handle:
        assert handle.read(2) == b"he"
        assert handle.read() == b"llo\n"


def test_empty_object(store: ObjectStore) -> None:
    assert store.put_stream("empty", []) == 0
    assert store.get_bytes("empty") == b""
    assert store.stat("empty").size == 0


def test_large_stream_is_multipart_and_reads_back(store: ObjectStore) -> None:
    total = 21 * MIB + 123  # three parts of 8 MiB on S3, the last short
    digest = hashlib.sha256()
    for block in _chunks(total):
        digest.update(block)
    assert store.put_stream("big/blob", _chunks(total)) == total
    assert store.stat("big/blob").size == total
    back = hashlib.sha256()
    for block in store.iter_chunks("big/blob"):
        back.update(block)
    assert back.hexdigest() == digest.hexdigest()


def test_failed_stream_leaves_nothing(store: ObjectStore) -> None:
    def broken() -> Iterator[bytes]:
        yield from _chunks(10 * MIB)
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        store.put_stream("half/written", broken())
    assert not store.exists("half/written")
    assert list(store.list("half/")) == []


def test_replace_existing(store: ObjectStore) -> None:
    store.put_bytes("k", b"one")
    store.put_bytes("k", b"two!")
    assert store.get_bytes("k") == b"two!"


def test_missing_objects(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        store.open("nope")
    with pytest.raises(ObjectNotFound):
        store.stat("nope")
    assert not store.exists("nope")
    store.delete("nope")  # not an error


def test_list_delete_and_prefixes(store: ObjectStore) -> None:
    for key in ["jobs/j1/b", "jobs/j1/a", "jobs/j2/c", "files/f"]:
        store.put_bytes(key, key.encode())
    assert [i.key for i in store.list("jobs/j1/")] == ["jobs/j1/a", "jobs/j1/b"]
    assert [i.key for i in store.list("jobs/")] == ["jobs/j1/a", "jobs/j1/b", "jobs/j2/c"]
    assert [i.size for i in store.list("files/")] == [len(b"files/f")]
    store.delete("jobs/j1/a")
    assert [i.key for i in store.list("jobs/j1/")] == ["jobs/j1/b"]
    store.delete_prefix("jobs/")
    assert [i.key for i in store.list("")] == ["files/f"]


def test_download_and_put_file(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "src.bin"
    source.write_bytes(os.urandom(3 * MIB))
    assert store.put_file("x/src.bin", source) == 3 * MIB
    target = tmp_path / "out" / "copy.bin"
    store.download("x/src.bin", target)
    assert target.read_bytes() == source.read_bytes()


def test_keys_cannot_escape(store: ObjectStore) -> None:
    with pytest.raises(ValueError):
        store.put_bytes("../outside", b"x")


def test_check(store: ObjectStore) -> None:
    store.check()


def test_presigned_url(store: ObjectStore) -> None:
    store.put_bytes("jobs/j/adapter.tar.gz", b"adapter-bytes")
    url = store.presigned_url("jobs/j/adapter.tar.gz", expires_in=60)
    if isinstance(store, FilesystemStore):
        assert url is None
        return
    # A private endpoint and no public one: no URL, so the internal address never reaches a client.
    assert url is None


def test_presigned_url_names_the_public_endpoint(s3_endpoint: str) -> None:
    """Download URLs name the endpoint clients reach, expire soon, and show the key id of the
    signing key pair given for them, never the internal endpoint or the service's own key id."""
    bucket = f"tf-{uuid.uuid4().hex[:12]}"
    port = urlparse(s3_endpoint).port
    public = f"http://localhost:{port}"  # the same server under the name clients use
    presign = PresignOptions(
        public_endpoint_url=public,
        expires_in=120,
        access_key_id="DOWNLOADSONLY",
        secret_access_key="download-secret",
    )
    store = S3Store(bucket, prefix="p", endpoint_url=s3_endpoint, create_bucket=True, presign=presign)
    store.put_bytes("jobs/j/adapter.tar.gz", b"adapter-bytes")
    url = store.presigned_url("jobs/j/adapter.tar.gz")
    assert url is not None
    assert url.startswith(f"{public}/")
    assert "127.0.0.1" not in url
    query = parse_qs(urlparse(url).query)
    assert query["X-Amz-Expires"] == ["120"]
    assert query["X-Amz-Credential"][0].startswith("DOWNLOADSONLY/")
    assert os.environ["AWS_ACCESS_KEY_ID"] not in url
    answer = httpx.get(url)  # no credentials: the signature is the permission
    assert answer.status_code == 200
    assert answer.content == b"adapter-bytes"
    assert "X-Amz-Expires=30" in (store.presigned_url("jobs/j/adapter.tar.gz", expires_in=30) or "")


def test_store_from_settings_passes_the_download_url_settings(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bucket = f"tf-{uuid.uuid4().hex[:12]}"
    S3Store(bucket, endpoint_url=s3_endpoint, create_bucket=True)
    public = f"http://localhost:{urlparse(s3_endpoint).port}"
    settings = Settings(
        data_dir=tmp_path,
        storage_url=f"s3://{bucket}/objects",
        s3_endpoint_url=s3_endpoint,
        s3_public_endpoint_url=public,
        s3_presign_expires_seconds=90,
    )
    store = store_from_settings(settings)
    store.put_bytes("a", b"1")
    url = store.presigned_url("a") or ""
    assert url.startswith(f"{public}/{bucket}/objects/a?")
    assert "X-Amz-Expires=90" in url
    assert httpx.get(url).content == b"1"
    private_only = store_from_settings(settings.model_copy(update={"s3_public_endpoint_url": None}))
    assert private_only.presigned_url("a") is None


def test_failed_multipart_upload_is_aborted(s3_endpoint: str) -> None:
    """A stream that fails after parts went up leaves no incomplete multipart upload behind."""
    store = S3Store(f"tf-{uuid.uuid4().hex[:12]}", prefix="p", endpoint_url=s3_endpoint, create_bucket=True)
    sent_parts = []
    real_upload_part = store._client.upload_part

    def counting_upload_part(**kwargs: object) -> object:
        sent_parts.append(kwargs["PartNumber"])
        return real_upload_part(**kwargs)

    store._client.upload_part = counting_upload_part

    def broken() -> Iterator[bytes]:
        yield from _chunks(20 * MIB)
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError, match="client went away"):
        store.put_stream("half/written", broken())
    assert sent_parts == [1, 2]  # the failure came mid-upload, after two parts were stored
    assert store._client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []
    assert not store.exists("half/written")


def test_failed_abort_keeps_the_first_error_and_the_sweep_removes_the_upload(s3_endpoint: str) -> None:
    store = S3Store(f"tf-{uuid.uuid4().hex[:12]}", prefix="p", endpoint_url=s3_endpoint, create_bucket=True)
    other = S3Store(store.bucket, prefix="other", endpoint_url=s3_endpoint)

    def unreachable(**kwargs: object) -> None:
        raise ConnectionError("endpoint unreachable")

    for victim in (store, other):
        real_abort = victim._client.abort_multipart_upload
        victim._client.abort_multipart_upload = unreachable

        def broken() -> Iterator[bytes]:
            yield from _chunks(10 * MIB)
            raise RuntimeError("client went away")

        with pytest.raises(RuntimeError, match="client went away"):
            victim.put_stream("half/written", broken())
        victim._client.abort_multipart_upload = real_abort

    def uploads() -> list[str]:
        found = store._client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
        return sorted(u["Key"] for u in found)

    assert uploads() == ["other/half/written", "p/half/written"]
    # moto reports every upload as started in 2010, so only the cut-off's direction is tested here.
    assert store.remove_incomplete_writes(datetime(2000, 1, 1, tzinfo=UTC)) == 0
    assert store.remove_incomplete_writes(datetime.now(UTC)) == 1
    assert uploads() == ["other/half/written"]  # another prefix is another store's business


def test_filesystem_removes_stale_temporary_files(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "objects")
    store.put_bytes("files/kept", b"x")
    stale = store.root / "files" / ".upload-stale"
    fresh = store.root / "files" / ".upload-fresh"
    stale.write_bytes(b"left by a killed process")
    fresh.write_bytes(b"being written")
    day_ago = (datetime.now(UTC) - timedelta(days=1)).timestamp()
    os.utime(stale, (day_ago, day_ago))
    assert store.remove_incomplete_writes(datetime.now(UTC) - timedelta(hours=1)) == 1
    assert not stale.exists() and fresh.exists()
    assert store.get_bytes("files/kept") == b"x"


def test_open_store_urls(s3_endpoint: str, tmp_path: Path) -> None:
    fs = open_store(f"file://{tmp_path}/objs")
    assert isinstance(fs, FilesystemStore)
    bucket = f"tf-{uuid.uuid4().hex[:12]}"
    S3Store(bucket, endpoint_url=s3_endpoint, create_bucket=True)
    s3 = open_store(f"s3://{bucket}/pre/fix", endpoint_url=s3_endpoint)
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix) == (bucket, "pre/fix")
    s3.put_bytes("a", b"1")
    raw = S3Store(bucket, endpoint_url=s3_endpoint)
    assert [i.key for i in raw.list("")] == ["pre/fix/a"]
    with pytest.raises(ValueError):
        open_store("ftp://nowhere")


def test_s3_missing_bucket_fails_check(s3_endpoint: str) -> None:
    store = S3Store(f"tf-missing-{uuid.uuid4().hex[:8]}", endpoint_url=s3_endpoint)
    with pytest.raises(Exception, match=r"404|Not Found|NoSuchBucket"):
        store.check()
