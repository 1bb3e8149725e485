"""Object storage through fsspec: one place that turns a URL into a filesystem, joins paths,
retries transient errors and writes objects so that a reader never sees half of one.

S3 endpoint and credentials come from the standard places (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_PROFILE, ~/.aws), from an explicit ``storage`` dict (a run config's ``storage`` section):
``{"endpoint_url": ..., "key": ..., "secret": ..., "profile": ..., "region": ...}``, or from the URL itself
(``s3://KEY:SECRET@bucket/prefix``; an ``https://user:token@host/...`` URL is read with basic auth).
Credentials are never logged or written: ``redact`` (options) here and ``redact_url`` / ``redact_text`` /
``redact_urls`` (URLs, alone or in text and nested values, datasets/redaction.py) are the one definition of what
is hidden, and importing this module makes every log record of the process go through ``redact_text``.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time

import fsspec
from fsspec.core import url_to_fs

from molscale.datasets.errors import InputError, RunError
from molscale.datasets.redaction import REDACTED, install_log_redaction, redact_text, redact_url, redact_urls

log = logging.getLogger(__name__)

# Errors worth retrying: network trouble, throttling, a server that is restarting.
# FileNotFoundError and PermissionError are answers, not transient faults.
_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# botocore's answers that waiting will not change (matched by name: botocore is optional here).
_FINAL_ERROR_NAMES = {"NoCredentialsError", "PartialCredentialsError", "InvalidBucketName", "NoSuchBucket",
                      "ParamValidationError", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


class StorageError(RunError, OSError):
    """Storage that kept failing through every retry while the work ran.

    An OSError, so code that tolerates storage trouble (optional caches, skipped shards) keeps catching it;
    a RunError, so an entry point reports it as one line and exit code 1.
    """


class StorageAccessError(InputError, OSError):
    """Storage answered that the request can never succeed (no credentials, a bucket that does not exist):
    bad input (exit code 2), and still an OSError like StorageError."""


def storage_options(url: str, storage: dict | None = None) -> dict:
    """fsspec keyword arguments for ``url`` from the ``storage`` dict and the environment."""
    storage = dict(storage or {})
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol not in ("s3", "s3a"):
        return storage
    opts: dict = {}
    endpoint = storage.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3") \
        or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs = dict(storage.pop("client_kwargs", {}) or {})
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = storage.pop("region", None) or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    for name in ("key", "secret", "token", "profile", "anon"):
        if storage.get(name) is not None:
            opts[name] = storage.pop(name)
    opts.update(storage)  # anything else is passed to s3fs as given
    return opts


def get_fs(url: str, storage: dict | None = None):
    """(filesystem, path) for a local path or any fsspec URL.

    ``s3://KEY:SECRET@bucket/x`` takes its credentials from the URL (url_credentials), ahead of ``storage``'s;
    the path never holds them. Write such a URL only as redact_url gives it."""
    url, from_url = url_credentials(url)
    fs, path = url_to_fs(url, **storage_options(url, {**(storage or {}), **from_url}))
    return fs, path


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])


def retry(fn, what: str, attempts: int = 6, base_delay_s: float = 0.5, max_delay_s: float = 8.0):
    """Call ``fn()``; on a transient error wait (exponential backoff with jitter) and try again.

    ``what`` names the object in log lines and in the final error: StorageAccessError for an answer that
    waiting will not change (credentials, bucket), StorageError when every attempt failed. Both are OSErrors.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except _NOT_TRANSIENT:
            raise
        except Exception as err:  # s3fs/aiohttp/botocore raise many types for the same network fault
            if type(err).__name__ in _FINAL_ERROR_NAMES:
                raise StorageAccessError(redact_text(f"{what}: {err}")) from err
            if attempt == attempts:
                raise StorageError(redact_text(f"{what}: still failing after {attempts} attempts: {err!r}")) \
                    from err
            delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("%s: %r; retrying in %.1f s (attempt %d of %d)", what, err, delay, attempt, attempts)
            time.sleep(delay)


def write_bytes(fs, path: str, data: bytes) -> None:
    """Write an object so that no reader sees a partial one.

    Local files go to a temporary name in the same folder and are renamed into place; an S3 PUT
    (or completed multipart upload) is atomic by itself.
    """
    if is_local(fs):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        retry(lambda: fs.pipe_file(path, data), f"writing {path}")


def put_file(fs, local_path: str, path: str) -> None:
    """Move a finished local file to ``path`` (rename locally, upload otherwise)."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.chmod(local_path, 0o644)  # mkstemp makes 0600; shards are for everyone who can read the folder
        os.replace(local_path, path)
    else:
        retry(lambda: fs.put_file(local_path, path), f"uploading {path}")
        os.unlink(local_path)


def read_bytes(fs, path: str) -> bytes:
    return retry(lambda: fs.cat_file(path), f"reading {path}")


def check_writable(fs, path: str, url: str) -> None:
    """Fail early, before any work, when ``url`` cannot be written."""
    probe = path.rstrip("/") + "/.write-probe"
    try:
        if is_local(fs):
            os.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as err:
        raise InputError(f"cannot write to {redact_url(url)}: {redact_text(str(err))}. Check the path, bucket "
                         f"name and credentials (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                         f"AWS_PROFILE).") from None


# Option names that hold credentials (s3fs/botocore spell them key, secret, token, aws_secret_access_key,
# aws_session_token, ...): matched by substring so nested client_kwargs / config_kwargs are covered too.
_SECRET_PARTS = ("key", "secret", "token", "password", "passwd", "credential")

def redact(options):
    """A copy of storage options with every credential-like value replaced by ``***``, at any depth, and the
    credentials in URLs among them (an endpoint_url with user:password@) redacted by redact_url.

    For anything that writes or logs a configuration (RUN_DIR/config.json, the W&B run config, log lines).
    """
    if isinstance(options, dict):
        return {k: (REDACTED if isinstance(k, str) and any(p in k.lower() for p in _SECRET_PARTS)
                    and v not in (None, "") else redact(v)) for k, v in options.items()}
    if isinstance(options, (list, tuple)):
        return type(options)(redact(v) for v in options)
    return redact_urls(options)


def url_credentials(url: str) -> tuple[str, dict]:
    """(url without its userinfo, S3 options from it): ``s3://KEY:SECRET@bucket/x`` -> ``s3://bucket/x`` and
    ``{"key": KEY, "secret": SECRET}`` (percent-decoded: write a ``/`` in a secret as ``%2F``). The redacted
    form ``s3://***@bucket/x`` (what a run writes) gives no options: the credentials then come from the
    ``storage`` dict or the environment as usual. Other protocols keep their userinfo (aiohttp sends an
    https://user:token@host URL's as basic auth) except the redacted ``***@``, which is dropped."""
    if not isinstance(url, str) or "://" not in url:
        return url, {}
    scheme, sep, rest = url.partition("://")
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority = rest[:end]
    if "@" not in authority:
        return url, {}
    userinfo, host = authority.rsplit("@", 1)
    if userinfo == REDACTED:
        return scheme + sep + host + rest[end:], {}
    if scheme.lower() not in ("s3", "s3a"):
        return url, {}
    from urllib.parse import unquote
    key, _, secret = userinfo.partition(":")
    options = {"key": unquote(key)}
    if secret:
        options["secret"] = unquote(secret)
    return scheme + sep + host + rest[end:], options


install_log_redaction()


__all__ = ["StorageError", "StorageAccessError", "get_fs", "storage_options", "join", "retry", "write_bytes",
           "put_file", "read_bytes", "check_writable", "is_local", "fsspec", "redact", "redact_url", "redact_text",
           "redact_urls", "url_credentials", "REDACTED"]
