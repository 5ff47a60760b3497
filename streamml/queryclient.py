"""The client side of a worker's ``/query``: SQL in, columns and rows out, with the token.

Used by ``streamml query`` (when a running worker owns the embedded chDB) and by
:class:`streamml.devstack.worker.WorkerProcess`. A refusal (401, 403, 415) becomes a
:class:`~streamml.querysafety.QueryRefused` whose hint says what to set; a query the
warehouse rejects becomes a :class:`~streamml.errors.WarehouseError`. A worker that
does not answer at all raises ``OSError`` (the caller decides what that means).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from streamml.config import Settings
from streamml.errors import WarehouseError
from streamml.querysafety import QueryRefused
from streamml.secrets import query_token

REFUSAL_HINTS = {
    401: "set STREAMML_QUERY_TOKEN (or STREAMML_QUERY_TOKEN_FILE, or STREAMML_SECRETS_DIR) "
    "to the worker's token",
    403: "/query only reads; set STREAMML_QUERY_TABLE_FUNCTIONS=true on the worker to allow "
    "table functions that reach files, URLs or other servers",
    415: "send Content-Type: application/json",
}


def worker_url(settings: Settings) -> str:
    """The base URL of the worker these settings describe."""
    host = f"[{settings.web_host}]" if ":" in settings.web_host else settings.web_host
    return f"http://{host}:{settings.web_port}"


def query_worker(
    settings: Settings, sql: str, timeout_s: float = 60.0, base: str | None = None
) -> tuple[list[str], list[list[Any]]]:
    """Run ``sql`` through the worker's /query with the token of these settings."""
    request = urllib.request.Request(
        (base or worker_url(settings)) + "/query",
        data=json.dumps({"sql": sql}).encode(),
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {query_token(settings)}",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            data = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise _error(exc.code, exc.read()) from None
    return list(data["columns"]), [list(row) for row in data["rows"]]


def _error(status: int, body: bytes) -> Exception:
    """The error a /query answer with ``status`` and JSON ``body`` stands for.

    >>> str(_error(401, b'{"error": "missing or wrong bearer token"}'))[:60]
    'the worker refused the query: missing or wrong bearer token '
    >>> _error(503, b'{"error": "no warehouse open yet", "retriable": true}').retriable
    True
    """
    try:
        data = json.loads(body)
        message = str(data.get("error") or data)
        hint, retriable = data.get("hint"), bool(data.get("retriable"))
    except (ValueError, AttributeError):
        message, hint, retriable = body.decode("utf-8", "replace")[:500], None, False
    if status in REFUSAL_HINTS:
        return QueryRefused(
            f"the worker refused the query: {message}",
            status=status,
            hint=REFUSAL_HINTS[status] if status != 403 or "table function" in message else hint,
        )
    error = WarehouseError(f"query failed: {message}", hint=hint)
    error.retriable = retriable or status >= 500
    return error
