"""The S3 backend: any S3-protocol endpoint (AWS, MinIO, moto) through boto3.

Credentials come the standard AWS way (environment, config files, instance roles). Streams larger
than one part go up as a multipart upload, aborted on failure so no partial object is left.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any, BinaryIO, cast

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from tuneforge.storage.base import ObjectInfo, ObjectNotFound, ObjectStore, PresignOptions

log = logging.getLogger(__name__)

PART_SIZE = 8 << 20  # S3's minimum part size is 5 MiB (except the last part)
_MISSING_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


class S3Store(ObjectStore):
    """Objects under `s3://bucket/prefix/`. The client is thread-safe; one per store."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        *,
        create_bucket: bool = False,
        part_size: int = PART_SIZE,
        region_name: str | None = None,
        presign: PresignOptions | None = None,
    ) -> None:
        if not bucket:
            raise ValueError("S3 storage URL needs a bucket: s3://bucket/prefix")
        if part_size < 5 << 20:
            raise ValueError("part_size must be at least 5 MiB (S3's minimum part size)")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.part_size = part_size
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region_name,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32),
        )
        self.presign = presign or PresignOptions()
        self._presigner: Any = None
        if self.presign.public_endpoint_url or endpoint_url is None:
            # Signing is local (no request is sent): a client of its own names the endpoint that
            # clients reach and, when given, the read-only key pair the URLs are signed with.
            self._presigner = boto3.session.Session(
                aws_access_key_id=self.presign.access_key_id,
                aws_secret_access_key=self.presign.secret_access_key,
            ).client(
                "s3",
                endpoint_url=self.presign.public_endpoint_url or endpoint_url,
                region_name=region_name,
                config=Config(signature_version="s3v4"),
            )
        self._bucket_checked = threading.Event()
        if create_bucket:
            self.ensure_bucket()

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"object key {key!r} is not a relative path inside the store")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _unkey(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def ensure_bucket(self) -> None:
        """Creates the bucket when it does not exist (only when asked: production buckets are made
        by whoever runs the service)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            if _code(error) not in _MISSING_CODES:
                raise
            self._client.create_bucket(Bucket=self.bucket)
        self._bucket_checked.set()

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        full = self._key(key)
        buffer = bytearray()
        size = 0
        iterator = iter(chunks)
        # Fill the first part: a small object goes up in one PUT.
        for chunk in iterator:
            buffer += chunk
            size += len(chunk)
            if len(buffer) >= self.part_size:
                break
        if len(buffer) < self.part_size:
            self._client.put_object(Bucket=self.bucket, Key=full, Body=bytes(buffer))
            return size
        upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=full)["UploadId"]
        parts: list[dict[str, Any]] = []
        try:

            def send(data: bytes) -> None:
                number = len(parts) + 1
                answer = self._client.upload_part(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=data
                )
                parts.append({"ETag": answer["ETag"], "PartNumber": number})

            while len(buffer) >= self.part_size:
                send(bytes(buffer[: self.part_size]))
                del buffer[: self.part_size]
            for chunk in iterator:
                buffer += chunk
                size += len(chunk)
                while len(buffer) >= self.part_size:
                    send(bytes(buffer[: self.part_size]))
                    del buffer[: self.part_size]
            if buffer or not parts:
                send(bytes(buffer))
            self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            except Exception:
                # The original failure is the one to report; a lifecycle rule (README) or
                # remove_incomplete_writes removes what is left.
                log.warning("could not abort multipart upload %s of %s", upload_id, full, exc_info=True)
            raise
        return size

    def remove_incomplete_writes(self, older_than: datetime) -> int:
        """Aborts the multipart uploads under this store's prefix started before `older_than`
        (left by a process killed mid-upload, which could not abort its own)."""
        prefix = f"{self.prefix}/" if self.prefix else ""
        paginator = self._client.get_paginator("list_multipart_uploads")
        aborted = 0
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                if upload["Initiated"] < older_than:
                    self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    aborted += 1
        return aborted

    def open(self, key: str) -> BinaryIO:
        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if _code(error) in _MISSING_CODES:
                raise ObjectNotFound(key) from None
            raise
        return cast(BinaryIO, _StreamingBody(answer["Body"]))

    def stat(self, key: str) -> ObjectInfo:
        try:
            answer = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if _code(error) in _MISSING_CODES:
                raise ObjectNotFound(key) from None
            raise
        return ObjectInfo(key, int(answer["ContentLength"]))

    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
            for item in page.get("Contents", []):
                yield ObjectInfo(self._unkey(item["Key"]), int(item["Size"]))

    def delete_prefix(self, prefix: str) -> None:
        batch: list[dict[str, str]] = []
        for info in list(self.list(prefix)):
            batch.append({"Key": self._key(info.key)})
            if len(batch) == 1000:
                self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})
                batch = []
        if batch:
            self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})

    def presigned_url(self, key: str, expires_in: int | None = None) -> str | None:
        """A SigV4 URL on the public endpoint (AWS's own when no endpoint is configured); None when
        only a private endpoint is configured, so that its address never reaches a client."""
        if self._presigner is None:
            return None
        url: str = self._presigner.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=expires_in or self.presign.expires_in,
        )
        return url

    def check(self) -> None:
        self._client.head_bucket(Bucket=self.bucket)


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


class _StreamingBody:
    """botocore's StreamingBody as a file-like object that works in `with` and `read(n)`."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._body.read() if size is None or size < 0 else self._body.read(size)
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> _StreamingBody:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[bytes]:
        return iter(lambda: self.read(1 << 20), b"")
