"""Remote weight stores: list a model's files (with checksums when published) and read byte ranges.

s3://bucket/prefix  boto3; endpoint from AWS_ENDPOINT_URL (moto in tests), credentials the usual way.
gs://bucket/prefix  google-cloud-storage; STORAGE_EMULATOR_HOST selects the emulator.
(hf:// goes through huggingface_hub instead: provisioning/weights/hub.py.)
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from urllib.parse import quote, urlparse

from provisioning.weights.manifest import MANIFEST, unsafe_reason
from provisioning.weights.transfer import RemoteFile
from runtime.errors import UserError


def split_bucket(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise UserError(f"model.source: {uri!r}: expected {parsed.scheme}://BUCKET/PREFIX")
    return parsed.netloc, parsed.path.strip("/")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _entry_name(key: str, prefix: str) -> str:
    """A key's name below the prefix, exactly as stored: `m//etc/x` stays `/etc/x` (and is refused
    by the transfer) rather than being quietly turned into another, harmless-looking name."""
    return key[len(_join(prefix, "")):]


def _with_manifest(files: dict[str, int], manifest: dict | None, where: str) -> list[RemoteFile]:
    files.pop(MANIFEST, None)
    if manifest is None:
        return [RemoteFile(name, size, None) for name, size in sorted(files.items())]
    listed = manifest["files"]
    # A malformed name (`../x`) is not judged here but by the transfer, which refuses it with the
    # reason, whether or not the store also holds such a key.
    missing = sorted(name for name in set(listed) - set(files) if unsafe_reason(name) is None)
    if missing:
        raise UserError(f"{where}: the manifest lists {', '.join(missing)} but the store has no such file")
    return [RemoteFile(name, entry["size"], entry["sha256"]) for name, entry in sorted(listed.items())]


def _fill(stream, view: memoryview) -> int:
    """Read a response body into view until it is full or the body ends; bytes read. A body longer
    than asked for is an error (a store that ignored the range)."""
    got = 0
    readinto = getattr(stream, "readinto", None)
    while got < len(view):
        if readinto is not None:
            n = readinto(view[got:])
        else:   # botocore's StreamingBody has read(amt) only
            data = stream.read(len(view) - got)
            n = len(data)
            view[got:got + n] = data
        if not n:
            break
        got += n
    if got == len(view) and stream.read(1):
        raise IOError("the store sent more bytes than the range asked for")
    return got


# ------------------------------------------------------------------ S3
class S3Store:
    def __init__(self, uri: str, concurrency: int = 16):
        import boto3
        from botocore.config import Config
        self.uri = uri
        self.bucket, self.prefix = split_bucket(uri)
        # A session of its own: boto3's default session caches credentials for the whole process.
        self.client = boto3.Session().client(
            "s3", config=Config(max_pool_connections=max(10, concurrency * 2),
                                retries={"max_attempts": 8, "mode": "adaptive"}))

    def _call(self, fn, **kwargs):
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except (NoCredentialsError, PartialCredentialsError):
            raise UserError(f"{self.uri}: no AWS credentials: set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or use an instance role") from None
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code == "NoSuchBucket":
                raise UserError(f"{self.uri}: bucket {self.bucket!r} does not exist") from None
            if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise UserError(f"{self.uri}: access denied ({code}): the credentials need s3:ListBucket "
                                f"and s3:GetObject on {self.bucket}") from None
            if code in ("NoSuchKey", "404"):
                raise UserError(f"{self.uri}: {kwargs.get('Key', '')} does not exist") from None
            raise

    def list(self) -> list[RemoteFile]:
        files: dict[str, int] = {}
        token = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._call(self.client.list_objects_v2, Prefix=_join(self.prefix, ""), **extra)
            for obj in page.get("Contents", []):
                name = _entry_name(obj["Key"], self.prefix)
                if name and not name.endswith("/"):
                    files[name] = obj["Size"]
            if not page.get("IsTruncated"):
                break
            token = page["NextContinuationToken"]
        if not files:
            raise UserError(f"{self.uri}: no files under this prefix")
        manifest = None
        if MANIFEST in files:
            body = self._call(self.client.get_object, Key=_join(self.prefix, MANIFEST))["Body"].read()
            manifest = json.loads(body)
        return _with_manifest(files, manifest, self.uri)

    def read_into(self, name: str, start: int, end: int, view: memoryview) -> int:
        r = self._call(self.client.get_object, Key=_join(self.prefix, name), Range=f"bytes={start}-{end - 1}")
        return _fill(r["Body"], view)

    def upload(self, path: Path, name: str) -> None:
        from boto3.s3.transfer import TransferConfig
        config = TransferConfig(multipart_chunksize=64 * 2**20, max_concurrency=16)
        try:
            self.client.upload_file(str(path), self.bucket, _join(self.prefix, name), Config=config)
        except Exception as err:  # boto3 wraps ClientError in S3UploadFailedError
            if "NoSuchBucket" in str(err):
                raise UserError(f"{self.uri}: bucket {self.bucket!r} does not exist") from None
            raise


# ------------------------------------------------------------------ GCS
READ_ONLY_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"


class GcsStore:
    def __init__(self, uri: str, concurrency: int = 16):
        from google.cloud import storage
        self.uri = uri
        self.bucket_name, self.prefix = split_bucket(uri)
        kwargs = {}
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials
            kwargs = {"credentials": AnonymousCredentials(), "project": "herd-emulator"}
        try:
            self.client = storage.Client(**kwargs)
        except Exception as err:  # google.auth.exceptions.DefaultCredentialsError
            raise UserError(f"{uri}: no Google Cloud credentials: set GOOGLE_APPLICATION_CREDENTIALS or "
                            f"run `gcloud auth application-default login` ({type(err).__name__})") from None
        self.bucket = self.client.bucket(self.bucket_name)
        self._local = threading.local()

    def _call(self, fn, *args, **kwargs):
        from google.api_core import exceptions
        try:
            return fn(*args, **kwargs)
        except exceptions.NotFound as err:
            raise UserError(f"{self.uri}: not found ({err.message})") from None
        except exceptions.Forbidden:
            raise UserError(f"{self.uri}: access denied: the account needs storage.objects.get and "
                            f"storage.objects.list on {self.bucket_name}") from None

    def list(self) -> list[RemoteFile]:
        blobs = self._call(lambda: list(self.client.list_blobs(self.bucket_name, prefix=_join(self.prefix, ""))))
        files = {_entry_name(b.name, self.prefix): b.size for b in blobs if not b.name.endswith("/")}
        files = {k: v for k, v in files.items() if k}
        if not files:
            raise UserError(f"{self.uri}: no files under this prefix")
        manifest = None
        if MANIFEST in files:
            manifest = json.loads(self._call(self.bucket.blob(_join(self.prefix, MANIFEST)).download_as_bytes))
        return _with_manifest(files, manifest, self.uri)

    def _session(self):
        """One HTTP session per fetch thread, authorized read-only (anonymous on the emulator)."""
        session = getattr(self._local, "session", None)
        if session is None:
            if os.environ.get("STORAGE_EMULATOR_HOST"):
                import requests
                session = requests.Session()
            else:
                import google.auth
                from google.auth.transport.requests import AuthorizedSession
                credentials, _ = google.auth.default(scopes=[READ_ONLY_SCOPE])
                session = AuthorizedSession(credentials)
            self._local.session = session
        return session

    def read_into(self, name: str, start: int, end: int, view: memoryview) -> int:
        # The JSON API's media download, read straight into the chunk buffer: the client library's
        # download loop reads 8 KB at a time in Python, which caps a few threads on a small machine
        # well below the link.
        base = os.environ.get("STORAGE_EMULATOR_HOST", "https://storage.googleapis.com").rstrip("/")
        url = (f"{base}/download/storage/v1/b/{self.bucket_name}/o/"
               f"{quote(_join(self.prefix, name), safe='')}?alt=media")
        r = self._session().get(url, headers={"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"},
                                stream=True, timeout=120)
        try:
            if r.status_code == 404:
                raise UserError(f"{self.uri}: {name}: not found")
            if r.status_code in (401, 403):
                raise UserError(f"{self.uri}: access denied: the account needs storage.objects.get on "
                                f"{self.bucket_name}")
            r.raise_for_status()
            return _fill(r.raw, view)
        finally:
            r.close()

    def upload(self, path: Path, name: str) -> None:
        blob = self.bucket.blob(_join(self.prefix, name), chunk_size=32 * 2**20)
        self._call(blob.upload_from_filename, str(path))


STORES = {"s3": S3Store, "gs": GcsStore}


def open_store(uri: str, concurrency: int = 16):
    scheme = urlparse(uri).scheme
    if scheme not in STORES:
        raise UserError(f"source: {uri!r}: unknown scheme {scheme!r} (allowed: s3://, gs://)")
    return STORES[scheme](uri, concurrency)
