"""Fingerprints of what the results API serves, and the poll that computes them (the sensor's tick).

There is no ETag or HEAD upstream: a fingerprint is the sha256 of a body, a poll is a GET per kind.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from aistock_pipelines.rdagent.catalog_models import Alpha158Meta, CatalogResponse, RunRegistryResponse
from aistock_pipelines.rdagent.results_client import (
    RDAgentResultsClient,
    ResultsApiBadResponse,
    ResultsApiOutOfTime,
)
from aistock_pipelines.rdagent.sync_types import (
    CATALOGS,
    DETAIL_CHARS,
    LOOP_ARTIFACTS,
    RUN_REGISTRY_ENDPOINTS,
    RUN_REGISTRY_KINDS,
    CatalogName,
)

#: Fingerprint of a catalog the server does not publish (404); a value of its own so that a later
#: publication is a change.
NOT_PUBLISHED = "not-published"
#: Fingerprint of a registry listing the server does not offer (404).
NOT_OFFERED = "not-offered"
#: What the results sensor fingerprints, in this order (the artifacts need the loop catalog's loops).
POLL_KINDS: tuple[str, ...] = (*CATALOGS, *RUN_REGISTRY_KINDS, LOOP_ARTIFACTS)


def catalog_fingerprint(response: CatalogResponse | Alpha158Meta | None) -> str:
    """``<generated_at_utc>|sha256:<hex of the body>``, or :data:`NOT_PUBLISHED` for ``None``.

    The sha256 alone would do (the body contains ``generated_at_utc``); the timestamp is kept in front
    so a cursor or a metadata entry is readable at a glance.
    """
    if response is None:
        return NOT_PUBLISHED
    return f"{response.generated_at_utc}|sha256:{response.sha256}"


def artifacts_digest(task_run_id: str, loop_id: int, body_sha256: str) -> str:
    """One loop's part of :func:`artifacts_fingerprint`."""
    return f"{task_run_id}/{loop_id}:{body_sha256}"


def artifacts_fingerprint(digests: Iterable[str]) -> str:
    """The loop artifacts' fingerprint: over every loop's answer, in any order. The sync stores it in
    ``sync_state`` and the sensor computes the same one to notice an artifact-only change."""
    return "sha256:" + hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


@dataclass(frozen=True)
class PollResult:
    """Fingerprints of the catalogs that answered; per-catalog errors for bodies that were unusable;
    kinds left for the next poll because the time budget ran out; the loops the loop catalog lists
    (``(task_run_id, loop_id)``, sorted; None when it was not read)."""

    fingerprints: dict[str, str]
    errors: dict[str, str] = field(default_factory=dict)
    not_polled: tuple[str, ...] = ()
    loops: tuple[tuple[str, int], ...] | None = None


def poll_fingerprints(
    client: RDAgentResultsClient,
    kinds: Sequence[str] = CATALOGS,
    *,
    budget_s: float | None = None,
    clock: Callable[[], float] | None = None,
) -> PollResult:
    """Fetch each kind once and fingerprint it (there is no ETag/HEAD upstream: a poll is a GET).

    ``kinds`` are catalogs, registry listings and :data:`LOOP_ARTIFACTS` (see :data:`POLL_KINDS`); the
    artifacts are fingerprinted over the loops of the loop catalog read earlier in the same poll (one
    GET per loop; skipped when the loop catalog was not read). A server that cannot be reached raises
    :class:`ResultsApiUnavailable` at the first request (no point trying the others); an unusable body
    only marks its own kind. With ``budget_s``, no new request is started once the budget is spent, and
    a request the client's own ``deadline_at`` cut off ends the poll too (the remaining kinds are
    returned in ``not_polled``).
    """
    now = clock or time.monotonic
    started = now()

    def out_of_time() -> bool:
        return budget_s is not None and now() - started > budget_s

    fingerprints: dict[str, str] = {}
    errors: dict[str, str] = {}
    loops: tuple[tuple[str, int], ...] | None = None
    for index, kind in enumerate(kinds):
        if out_of_time():
            return PollResult(fingerprints, errors, tuple(kinds[index:]), loops)
        try:
            if kind == LOOP_ARTIFACTS:
                if loops is None:
                    continue
                fingerprint = _poll_artifacts(client, loops, out_of_time)
                if fingerprint is None:
                    return PollResult(fingerprints, errors, tuple(kinds[index:]), loops)
                fingerprints[kind] = fingerprint
            elif kind in RUN_REGISTRY_ENDPOINTS:
                fingerprints[kind] = run_registry_fingerprint(client.fetch_run_registry(RUN_REGISTRY_ENDPOINTS[kind]))
            else:
                response = fetch_envelope(client, kind)  # type: ignore[arg-type]
                if kind == "loops" and isinstance(response, CatalogResponse):
                    loops = tuple(sorted({(r["task_run_id"], r["loop_id"]) for r in response.records}))
                fingerprints[kind] = catalog_fingerprint(response)
        except ResultsApiBadResponse as exc:
            errors[kind] = str(exc)[:DETAIL_CHARS]
        except ResultsApiOutOfTime:  # the caller's deadline, not the server's fault: next time
            return PollResult(fingerprints, errors, tuple(kinds[index:]), loops)
    return PollResult(fingerprints, errors, (), loops)


def _poll_artifacts(client: RDAgentResultsClient, loops: Iterable[tuple[str, int]],
                    out_of_time: Callable[[], bool]) -> str | None:
    """:func:`artifacts_fingerprint` of the loops' artifact answers; None when time ran out first."""
    digests = []
    for task_run_id, loop_id in loops:
        if out_of_time():
            return None
        digests.append(artifacts_digest(task_run_id, loop_id, client.fetch_loop_artifacts(task_run_id, loop_id).sha256))
    return artifacts_fingerprint(digests)


def fetch_envelope(client: RDAgentResultsClient, kind: CatalogName) -> CatalogResponse | Alpha158Meta | None:
    if kind == "alpha158":
        return client.fetch_alpha158_meta()
    return client.fetch_catalog(kind)


def run_registry_fingerprint(response: RunRegistryResponse | None) -> str:
    """``sha256:<hex of the body>``, or :data:`NOT_OFFERED` for ``None``."""
    return NOT_OFFERED if response is None else f"sha256:{response.sha256}"
