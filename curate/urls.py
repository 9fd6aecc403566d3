"""URLs: the host of a URL and curate's URL normalisation (exact URL dedup, forget by URL), in
one place for the annotate, fetch and forget stages."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}
# Query parameters that track the click, not the resource: dropped for exact URL dedup.
TRACKING_PARAMS = frozenset(
    {
        "fbclid",
        "gclid",
        "dclid",
        "gbraid",
        "wbraid",
        "msclkid",
        "yclid",
        "igshid",
        "mc_cid",
        "mc_eid",
        "_ga",
        "_gl",
        "ref_src",
    }
)
TRACKING_PREFIXES = ("utm_",)


def _strip_tracking(query: str) -> str:
    if not query:
        return query
    kept = [
        part
        for part in query.split("&")
        if part
        and not ((name := part.split("=", 1)[0].lower()) in TRACKING_PARAMS or name.startswith(TRACKING_PREFIXES))
    ]
    return "&".join(kept)


def normalize_url(url: str | None) -> str | None:
    """Lower-case scheme and host, drop the default port, the fragment, a trailing '?', and
    tracking query parameters (TRACKING_PARAMS, utm_*). The path and the other parameters are
    kept as they are, in their order: they are case-sensitive on most servers."""
    if not url:
        return None
    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return url.strip()
    scheme = parts.scheme.lower()
    netloc = f"[{host}]" if ":" in host else host  # IPv6 literals keep their brackets
    if parts.username or parts.password:
        netloc = f"{parts.username or ''}{':' + parts.password if parts.password else ''}@{host}"
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        netloc = f"{netloc}:{port}"
    return urlunsplit((scheme, netloc, parts.path or "/", _strip_tracking(parts.query), ""))


def host_of(url: str | None) -> str:
    """The URL's host, lower-case; '' for a missing or unparsable URL."""
    if not url:
        return ""
    try:
        return (urlsplit(url.strip()).hostname or "").lower()
    except ValueError:
        return ""
