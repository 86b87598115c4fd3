"""An upstream's URL as it may be shown (logs, metrics labels, error details): a URL may carry credentials
(``http://user:key@host/v1``) or a key in its query (``?api-key=...``), and every failure line used to print it."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit


def shown_url(url: str) -> str:
    """``url`` without user, password, query or fragment, and without a trailing slash (so that two spellings of
    one replica are one name, and one metrics series)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address keeps its brackets
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}".rstrip("/")


def without_secrets(text: str, url: str) -> str:
    """``text`` (an exception's words, say) with ``url``'s password, user and query taken out wherever they
    appear, as written or percent-decoded."""
    parts = urlsplit(url)
    for secret in (parts.password, parts.username, parts.query):
        if secret:
            for form in {secret, unquote(secret)}:
                text = text.replace(form, "***")
    return text


def with_path(base: str, path: str) -> str:
    """``base`` with ``path`` appended to its path and its query kept after it (Azure's ``?api-version=``)."""
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + path, fragment=""))
