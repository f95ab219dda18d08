"""The 503 answers: what trio_bg (the middleware, the integrations) sends when it
cannot take a request's background tasks."""

from __future__ import annotations

from .asgi import Message

UNAVAILABLE_TEXT = "Service Unavailable: background task capacity is exhausted\n"
"""The body of every 503 trio_bg answers (the middleware's, and the integrations')."""

JOURNAL_FAILED_TEXT = "Service Unavailable: the background task journal failed\n"
HANDOFF_FAILED_TEXT = "Service Unavailable: background tasks could not be handed off\n"
HANDOFF_IN_DOUBT_TEXT = (
    "Service Unavailable: Redis did not confirm the background tasks; they may still run\n"
)
"""The body of the 503 that replaces a response whose durable tasks were not stored."""


def check_retry_after(retry_after: object) -> None:
    """`TypeError` unless ``retry_after`` is None or a whole number of seconds >= 0."""
    if retry_after is not None and (
        isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0
    ):
        raise TypeError(f"retry_after must be a whole number of seconds >= 0, not {retry_after!r}")


def retry_after_headers(retry_after: int | None) -> dict[str, str]:
    """The headers of a 503 besides its content type: ``Retry-After``, if any."""
    return {} if retry_after is None else {"Retry-After": str(retry_after)}


def unavailable_response(retry_after: int | None, text: str) -> tuple[Message, Message]:
    body = text.encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]
    headers += [
        (k.lower().encode(), v.encode()) for k, v in retry_after_headers(retry_after).items()
    ]
    return (
        {"type": "http.response.start", "status": 503, "headers": headers},
        {"type": "http.response.body", "body": body},
    )
