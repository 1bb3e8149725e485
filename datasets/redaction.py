"""Credentials in URLs: the one definition of what is hidden where a URL is written or logged.

``redact_url`` hides the userinfo and the values of credential-carrying query parameters of one URL,
``redact_text`` every URL in a text, ``redact_urls`` every string in nested values; ``install_log_redaction``
makes every log record of the process pass through ``redact_text`` (datasets/shards/storage.py installs it on
import). Nothing here changes the URL a process uses to reach storage. No imports from molscale: errors.py uses
it for the one line an entry point prints.
"""

from __future__ import annotations

import logging
import re

REDACTED = "***"

# URL query parameters that carry credentials, compared in lower case: presigned S3/GCS URLs (X-Amz-Signature,
# X-Amz-Credential, X-Amz-Security-Token, X-Goog-Signature, AWSAccessKeyId + Signature), Azure SAS (sig), and
# the generic token / access_token / password / secret / key / api_key. Exact names, then substrings.
_SECRET_PARAMS = {"key", "sig", "signature", "token", "access_token", "refresh_token", "id_token", "password",
                  "passwd", "pwd", "secret", "client_secret", "apikey", "api_key", "api-key", "auth",
                  "authorization", "code", "sas", "session", "sessiontoken", "session_token"}
_SECRET_PARAM_PARTS = ("signature", "credential", "token", "secret", "password", "passwd", "accesskey",
                       "access_key", "apikey", "api_key", "api-key", "private")
# scheme://rest-of-url in free text (log lines, command lines, error messages): up to whitespace or a quote
_URL_IN_TEXT = re.compile(r"""[A-Za-z][A-Za-z0-9+.\-]*://[^\s'"<>`\\]+""")


def _secret_param(name: str) -> bool:
    name = name.lower()
    return name in _SECRET_PARAMS or any(part in name for part in _SECRET_PARAM_PARTS)


def redact_url(url: str) -> str:
    """``url`` as it may be written or logged: the credentials in it replaced by ``***``.

    The one place that decides what a secret in a URL is: the userinfo (``s3://KEY:SECRET@bucket/x`` and
    ``https://user:token@host/x`` become ``s3://***@bucket/x`` and ``https://***@host/x``: with S3 the user part
    is the access key id) and the values of query parameters that carry credentials (``X-Amz-Signature``,
    ``X-Amz-Credential``, ``X-Amz-Security-Token``, ``sig``, ``token``, ``access_token``, ``password``,
    ``secret``, ``key``, ...). Everything else stays as it was, byte for byte; a string that is not a URL is
    returned unchanged. Only for what is written or logged: the process keeps using the real URL.
    """
    if not isinstance(url, str) or "://" not in url:
        return url
    scheme, sep, rest = url.partition("://")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme):
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        authority = REDACTED + "@" + authority.rsplit("@", 1)[1]
    if "?" in tail:
        path, _, query = tail.partition("?")
        query, hash_, fragment = query.partition("#")
        params = []
        for param in query.split("&"):
            name, eq, value = param.partition("=")
            params.append(f"{name}={REDACTED}" if eq and value and _secret_param(name) else param)
        tail = path + "?" + "&".join(params) + hash_ + fragment
    return scheme + sep + authority + tail


def redact_text(text: str) -> str:
    """``text`` (a log line, a command line, an error message) with every URL in it passed through redact_url."""
    if not isinstance(text, str) or "://" not in text:
        return text
    def one(match) -> str:  # punctuation that ends a sentence or a bracket is not part of the URL
        url = match.group(0)
        core = url.rstrip(".,;:!?)]}")
        return redact_url(core) + url[len(core):]

    return _URL_IN_TEXT.sub(one, text)


def redact_urls(value):
    """A copy of ``value`` (dicts, lists and tuples at any depth) with redact_text applied to every string in
    it, keys included: for configs, manifests, metrics and cards before they are written or logged."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact_urls(k): redact_urls(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_urls(v) for v in value)
    return value



def _redacting_record_factory(previous):
    """A logging record factory that redacts the URLs in every record's message and traceback, so that no
    handler (console, file, W&B's console capture) ever sees a credential in a URL."""

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: logging reports it as it would have
            return record
        if "://" in message:
            redacted = redact_text(message)
            if redacted != message:
                record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            if "://" in text:
                record.exc_text = redact_text(text)
        return record

    factory.molscale_redacts_urls = True
    return factory


def install_log_redaction() -> None:
    """Redact URL credentials in every log record of this process (idempotent; done on import)."""
    current = logging.getLogRecordFactory()
    if not getattr(current, "molscale_redacts_urls", False):
        logging.setLogRecordFactory(_redacting_record_factory(current))
