"""Synchronous client for the RD-Agent results API (read-only).

Why it looks the way it does:

* **404 on a catalog is not an error**: RD-Agent answers 404 both for "never exported" and for "file
  exists but is half-written / invalid JSON", and most installations publish no model catalog. The
  fetchers return ``None`` and the caller keeps its last good copy.
* **Retries only where a retry can help**: connection errors, timeouts and 5xx are retried with
  exponential backoff; a 4xx is a wrong URL or a wrong request and fails at once.
* **Bodies are streamed under a byte cap**, so a wrong ``base_url`` pointing at something huge cannot
  exhaust memory; the cap is enforced on the decoded bytes while reading.
* **An overall deadline per request** (``request_deadline``, retries and backoff included) besides the
  per-operation timeouts, enforced by :class:`RequestDeadline` even against a server that drips one byte
  at a time; ``deadline_at`` adds the caller's own limit (a sensor tick) to every request.
* **Every fetch returns the sha256 of the body bytes** so callers can fingerprint a catalog and skip
  unchanged ones.
* Bodies are never logged (only URL, status, size and the reason for a failure).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from aistock_pipelines.conventions import RESULTS_API_URL
from aistock_pipelines.rdagent.catalog_models import (
    CATALOG_KINDS,
    ENVELOPES,
    RUN_REGISTRY_RECORDS,
    Alpha158Meta,
    CatalogKind,
    CatalogResponse,
    FactorRecord,
    LoopArtifacts,
    RunRegistryEndpoint,
    RunRegistryResponse,
)
from aistock_pipelines.rdagent.request_deadline import RequestDeadline

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = RESULTS_API_URL
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
_DETAIL_CHARS = 200  # how much of an error body may appear in an exception message


class ResultsApiError(Exception):
    """Any failure talking to the RD-Agent results API; the message names URL, problem and fix."""

    def __init__(self, message: str, *, url: str | None = None, status_code: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status_code = status_code


class ResultsApiUnavailable(ResultsApiError):
    """Could not get an answer: connection refused/reset, timeouts or 5xx, after all retries."""


class ResultsApiOutOfTime(ResultsApiUnavailable):
    """The caller's own deadline (``deadline_at``) ended or prevented the request: no fault of the server."""


class ResultsApiBadResponse(ResultsApiError):
    """Got an answer that cannot be used: unexpected 4xx, not JSON, wrong shape, bad records, too big."""


@dataclass(frozen=True)
class _Body:
    url: str
    data: Any
    sha256: str
    size_bytes: int


def _finite_or_none(text: str) -> float | None:
    """``parse_float`` hook: a literal like ``1e999`` overflows to inf; keep JSON's value space."""
    value = float(text)
    return value if math.isfinite(value) else None


def _loads(body: bytes) -> Any:
    """Strict-enough JSON: ``NaN``/``Infinity`` tokens (accepted by Python's json) become ``None``."""
    try:
        return json.loads(body, parse_constant=lambda _token: None, parse_float=_finite_or_none)
    except RecursionError:  # a body nested deeper than the parser's stack: hostile or broken
        raise ValueError("nested too deeply to parse") from None


def _summarize(exc: ValidationError, limit: int = 5) -> str:
    """Locations and messages of the first few errors, never the offending input values."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False)[:limit]:
        loc = ".".join(str(p) for p in error["loc"]) or "<root>"
        parts.append(f"{loc}: {error['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


class RDAgentResultsClient:
    """Client for one RD-Agent results API instance; use as a context manager or call ``close()``."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        connect_timeout: float = 3.0,
        read_timeout: float = 15.0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        retries: int = 3,
        backoff: float = 0.2,
        request_deadline: float = 60.0,
        deadline_at: float | None = None,
        trust_env: bool = False,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``retries`` is the number of *extra* attempts (3 -> up to 4 requests); the n-th retry waits
        ``backoff * 2**(n-1)`` seconds. ``trust_env=False`` ignores ``HTTP(S)_PROXY`` variables by
        default: the API lives on this machine or the LAN, and a corporate proxy would only break it.
        ``request_deadline`` bounds each call (all its attempts) in seconds; ``deadline_at`` is a
        ``time.monotonic()`` instant no request may outlive. ``transport`` is for tests
        (``httpx.MockTransport``)."""
        if retries < 0 or backoff < 0 or max_body_bytes <= 0 or request_deadline <= 0:
            raise ValueError("retries and backoff must be >= 0, max_body_bytes and request_deadline > 0")
        self.base_url = base_url.rstrip("/")
        self.max_body_bytes = max_body_bytes
        self.retries = retries
        self.backoff = backoff
        self.request_deadline = request_deadline
        self.deadline_at = deadline_at
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            headers={"Accept": "application/json"},
            follow_redirects=False,
            # A fresh connection per request, so the deadline always sees (and can cut) its socket.
            limits=httpx.Limits(max_keepalive_connections=0),
            trust_env=trust_env,
            transport=transport,
        )

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RDAgentResultsClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- public API ------------------------------------------------------------------------------
    def health(self) -> bool:
        """True when ``/health`` answers ``{"status": "ok"}``; one attempt, never raises."""
        try:
            body = self._get("/health", attempts=1)
        except ResultsApiError as exc:
            log.info("RD-Agent results API health check failed: %s", exc)
            return False
        return body is not None and isinstance(body.data, dict) and body.data.get("status") == "ok"

    def fetch_catalog(self, kind: CatalogKind) -> CatalogResponse | None:
        """``/catalog/<kind>``, validated; ``None`` when the catalog is not published (404)."""
        if kind not in CATALOG_KINDS:
            raise ValueError(f"unknown catalog kind {kind!r}; expected one of {', '.join(CATALOG_KINDS)}")
        body = self._get(f"/catalog/{kind}")
        if body is None:
            return None
        model, list_key = ENVELOPES[kind]
        if isinstance(body.data, dict) and list_key not in body.data:
            found = sorted(k for k, v in body.data.items() if isinstance(v, list))
            raise ResultsApiBadResponse(
                f"GET {body.url}: the {kind} catalog has no {list_key!r} list (list keys present: "
                f"{found or 'none'}); base_url may point at a different service or an incompatible "
                "RD-Agent version — check the RD-Agent results API version and the catalog file",
                url=body.url,
            )
        envelope = self._validate(model, body, what=f"{kind} catalog")
        dumped = envelope.model_dump()
        records = dumped.pop(list_key)
        return CatalogResponse(
            kind=kind,
            url=body.url,
            version=dumped.pop("version"),
            generated_at_utc=dumped.pop("generated_at_utc"),
            source=dumped.pop("source"),
            records=records,
            sha256=body.sha256,
            size_bytes=body.size_bytes,
            envelope_extra=dumped,
        )

    def fetch_alpha158_meta(self) -> Alpha158Meta | None:
        """``/alpha158/meta``; ``None`` when not published (404)."""
        body = self._get("/alpha158/meta")
        if body is None:
            return None
        meta = self._validate(Alpha158Meta, body, what="alpha158 meta")
        return meta.model_copy(update={"sha256": body.sha256})

    def fetch_factor(self, name: str) -> dict[str, Any] | None:
        """``/factors/{name}`` (first exact, case-sensitive match server-side); ``None`` on 404.

        A name containing ``/`` cannot be addressed by the upstream route and always yields ``None``.
        """
        body = self._get(f"/factors/{quote(name, safe='')}")
        if body is None:
            return None
        return self._validate(FactorRecord, body, what=f"factor {name!r}").model_dump()

    def fetch_loop_artifacts(self, task_run_id: str, loop_id: int) -> LoopArtifacts:
        """``/loops/{task_run_id}/{loop_id}/artifacts``; unknown ids give an empty ``artifacts`` list."""
        if isinstance(loop_id, bool) or not isinstance(loop_id, int):
            raise TypeError(f"loop_id must be an int, got {type(loop_id).__name__}")
        path = f"/loops/{quote(str(task_run_id), safe='')}/{loop_id}/artifacts"
        body = self._get(path)
        if body is None:
            raise ResultsApiBadResponse(
                f"GET {self.base_url}{path}: 404 — this server has no loop artifacts endpoint; "
                "check that base_url points at the RD-Agent results API",
                url=f"{self.base_url}{path}",
                status_code=404,
            )
        result = self._validate(LoopArtifacts, body, what="loop artifacts")
        return result.model_copy(update={"sha256": body.sha256})

    def fetch_run_registry(self, endpoint: RunRegistryEndpoint) -> RunRegistryResponse | None:
        """``/task_runs``, ``/loops`` or ``/workspaces`` (Phase 2 design); ``None`` when the server does not
        offer it (404: the real API today)."""
        if endpoint not in RUN_REGISTRY_RECORDS:
            raise ValueError(f"unknown registry listing {endpoint!r}; expected one of {', '.join(RUN_REGISTRY_RECORDS)}")
        body = self._get(f"/{endpoint}")
        if body is None:
            return None
        data = body.data
        if isinstance(data, dict):
            data = next((data[k] for k in (endpoint, "items") if isinstance(data.get(k), list)), None)
        if not isinstance(data, list):
            raise ResultsApiBadResponse(
                f"GET {body.url}: expected a list of records (or an object holding one under {endpoint!r} or "
                "'items'); check the RD-Agent results API version", url=body.url)
        model = RUN_REGISTRY_RECORDS[endpoint]
        records = [self._validate(model, _Body(body.url, item, body.sha256, 0), what=f"{endpoint} record #{i}")
                   for i, item in enumerate(data)]
        return RunRegistryResponse(endpoint=endpoint, url=body.url, records=[r.model_dump() for r in records],
                                   sha256=body.sha256)

    # -- internals -------------------------------------------------------------------------------
    def _validate(self, model: type[BaseModel], body: _Body, *, what: str) -> Any:
        try:
            return model.model_validate(body.data)
        except ValidationError as exc:
            raise ResultsApiBadResponse(
                f"GET {body.url}: the {what} does not have the expected shape ({_summarize(exc)}); "
                "fix the export on the RD-Agent side or check base_url",
                url=body.url,
            ) from exc

    def _get(self, path: str, *, attempts: int | None = None) -> _Body | None:
        """GET with retries within the deadline; ``None`` on 404, parsed body otherwise."""
        url = f"{self.base_url}{path}"
        attempts = self.retries + 1 if attempts is None else attempts
        seconds, callers = self._deadline_seconds()
        if seconds <= 0:
            raise ResultsApiOutOfTime(f"GET {url}: not attempted, the caller's time limit has passed", url=url)
        reason = ""
        with RequestDeadline(seconds) as deadline:
            for attempt in range(attempts):
                if deadline.expired:
                    break
                if attempt:
                    delay = min(self.backoff * 2 ** (attempt - 1), deadline.remaining())
                    log.warning(
                        "RD-Agent results API: retry %d/%d of GET %s in %.2fs (%s)",
                        attempt, attempts - 1, url, delay, reason,
                    )
                    time.sleep(delay)
                try:
                    outcome = self._attempt(path, url, deadline)
                except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
                    raise ResultsApiError(
                        f"GET {url}: invalid URL ({exc}); set base_url like {DEFAULT_BASE_URL}", url=url
                    ) from exc
                except httpx.TimeoutException as exc:
                    reason = f"timed out ({type(exc).__name__})"
                    continue
                except httpx.TransportError as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                    continue
                if isinstance(outcome, str):  # a retryable 5xx, described
                    reason = outcome
                    continue
                return outcome
            if deadline.expired:
                raise self._out_of_time(url, seconds, callers)
        raise ResultsApiUnavailable(
            f"GET {url}: no usable answer after {attempts} attempt(s), last error: {reason}; "
            "check that the RD-Agent results API is running and reachable at "
            f"{self.base_url} (and that its timeouts suit this catalog size)",
            url=url,
        )

    def _deadline_seconds(self) -> tuple[float, bool]:
        """Seconds this call may take, and whether the caller's ``deadline_at`` is what limits them."""
        if self.deadline_at is None:
            return self.request_deadline, False
        left = self.deadline_at - time.monotonic()
        return min(self.request_deadline, left), left < self.request_deadline

    def _out_of_time(self, url: str, seconds: float, callers: bool) -> ResultsApiUnavailable:
        if callers:
            return ResultsApiOutOfTime(f"GET {url}: cut off after {seconds:.1f} s, the caller's time limit", url=url)
        return ResultsApiUnavailable(
            f"GET {url}: no complete answer within the {seconds:.1f} s deadline per request (the server "
            "answers too slowly); check the RD-Agent results API at "
            f"{self.base_url}, or raise the deadline if this catalog is really that large",
            url=url,
        )

    def _attempt(self, path: str, url: str, deadline: RequestDeadline) -> _Body | str | None:
        """One request. Returns the body, ``None`` for 404, or a string describing a retryable 5xx."""
        with self._http.stream("GET", path, timeout=deadline.timeout(self._http.timeout),
                               extensions={"trace": deadline.trace}) as response:
            status = response.status_code
            if status >= 500:
                return f"HTTP {status}: {self._short_detail(response)}"
            if status == 404:
                log.info("RD-Agent results API: GET %s -> 404 (%s)", url, self._short_detail(response))
                return None
            if status != 200:
                raise ResultsApiBadResponse(
                    f"GET {url}: unexpected HTTP {status} ({self._short_detail(response)}); "
                    "not retried — check base_url and the RD-Agent results API version",
                    url=url,
                    status_code=status,
                )
            raw = self._read_capped(response, url, deadline)
        try:
            data = _loads(raw)
        except ValueError as exc:
            content_type = response.headers.get("content-type", "?")
            raise ResultsApiBadResponse(
                f"GET {url}: response is not valid JSON ({exc}; content-type {content_type}, "
                f"{len(raw)} bytes); check that base_url points at the RD-Agent results API",
                url=url,
                status_code=status,
            ) from exc
        log.debug("RD-Agent results API: GET %s -> %d, %d bytes", url, status, len(raw))
        return _Body(url=url, data=data, sha256=hashlib.sha256(raw).hexdigest(), size_bytes=len(raw))

    def _read_capped(self, response: httpx.Response, url: str, deadline: RequestDeadline) -> bytes:
        cap = self.max_body_bytes
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise self._too_big(url, f"declares {int(declared)} bytes")
        chunks: list[bytes] = []
        total = 0
        for chunk in response.iter_bytes():
            if deadline.expired:  # a body dripping within each read timeout
                raise httpx.ReadTimeout("request deadline passed while reading the body")
            total += len(chunk)
            if total > cap:
                raise self._too_big(url, f"exceeded it after {total} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_big(self, url: str, what: str) -> ResultsApiBadResponse:
        return ResultsApiBadResponse(
            f"GET {url}: response body is over the {self.max_body_bytes}-byte cap ({what}); raise "
            "max_body_bytes if this catalog is really that large, otherwise check base_url",
            url=url,
        )

    @staticmethod
    def _short_detail(response: httpx.Response) -> str:
        """A bounded excerpt of an error body (FastAPI's ``detail`` when present), for messages."""
        raw = b""
        try:
            for chunk in response.iter_bytes():
                raw += chunk
                if len(raw) >= 4096:
                    break
        except httpx.HTTPError:
            pass
        text = raw[:4096].decode("utf-8", errors="replace").strip()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        detail = parsed.get("detail", text) if isinstance(parsed, dict) else text
        return str(detail)[:_DETAIL_CHARS] or "<empty body>"
