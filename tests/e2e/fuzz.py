"""Fuzz a running FHIR server with schemathesis, from the OpenAPI document it serves.

Used by ``tests/e2e/test_fuzz_fhir.py`` (small, fixed budget) and
``benchmarks/fuzz_fhir.py`` (larger runs). Every generated request is sent; none
stops the run: answers are tallied, and these count as findings:

* a 5xx answer, or no answer at all (connection reset, timeout: a worker died);
* a 4xx answer that is not an OperationOutcome (FHIR R4 http §3.1.0.4).

Usage::

    report = fuzz(f"{base}/openapi.json", max_examples=10, select=lambda op: "Patient" in op.path)
    assert not report.failures, report.summary()
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import orjson
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

MODES = {"positive": GenerationMode.POSITIVE, "negative": GenerationMode.NEGATIVE}


@dataclass
class Finding:
    """One request whose answer broke a rule."""

    operation: str
    status: int | None
    problem: str
    curl: str


@dataclass
class FuzzReport:
    """What a run sent and what came back."""

    operations: int = 0
    requests: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    failures: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    #: operation label -> status -> count
    by_operation: dict[str, collections.Counter] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))

    def not_served(self) -> list[str]:
        """Operations the document declares that only ever answered 405 or 501."""
        return sorted(op for op, c in self.by_operation.items() if c and set(c) <= {405, 501})

    def summary(self, limit: int = 20) -> str:
        hist = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items(), key=lambda kv: str(kv[0])))
        lines = [f"operations covered: {self.operations}", f"requests sent: {self.requests} "
                 f"in {self.seconds:.1f} s", f"status codes: {hist}", f"failures: {len(self.failures)}"]
        if self.not_served():
            lines.append(f"declared but answered only 405/501: {', '.join(self.not_served())}")
        by_problem = collections.Counter((f.operation, f.problem.split(":")[0]) for f in self.failures)
        for (op, problem), n in by_problem.most_common(limit):
            lines.append(f"  {n:5d} x {op}: {problem}")
        for f in self.failures[:limit]:
            lines.append(f"  - {f.operation} -> {f.status}: {f.problem}\n    {f.curl}")
        return "\n".join(lines)


def _problem(resp: requests.Response | object) -> str | None:
    status = resp.status_code
    if status >= 500:
        return f"server error {status}: {resp.content[:300]!r}"
    if 400 <= status < 500:
        try:
            body = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            return f"{status} answer is not JSON: {resp.content[:200]!r}"
        if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
            return f"{status} answer is not an OperationOutcome: {resp.content[:200]!r}"
    return None


def fuzz(schema: str | schemathesis.BaseSchema, *, max_examples: int = 10, modes: Iterable[str] = ("positive", "negative"),
         select: Callable[[schemathesis.APIOperation], bool] | None = None,
         headers: dict[str, str] | None = None, fixed_ids: dict[str, str] | None = None,
         generated_auth: bool = False, timeout: float = 30.0, log: Callable[[str], None] | None = None) -> FuzzReport:
    """Send generated requests to every selected operation of an OpenAPI document.

    Args:
        schema: URL of the OpenAPI document (``<fhir base>/openapi.json``), or a loaded
            schema (``schemathesis.openapi.from_wsgi(path, app)``: requests go in-process).
        max_examples: Hypothesis examples per operation and generation mode.
        modes: ``positive`` (valid per the document) and/or ``negative`` (invalid).
        select: keep only the operations for which this returns true.
        headers: sent with every request (e.g. ``Authorization``).
        fixed_ids: resource type -> an id that exists; operations on ``{id}`` of that
            type then run a second time with it, so that update, patch, delete,
            history and ``$everything`` reach a real resource and not only 404.
        generated_auth: keep the Authorization headers schemathesis makes up from the
            bearer security scheme (random tokens: such requests end in 401 before they
            reach a route). By default they are dropped and ``headers`` alone is sent.
        timeout: seconds per request.
        log: called with one line per operation (progress).

    Returns:
        The :class:`FuzzReport`. Deterministic for a given server state
        (``derandomize=True``).
    """
    if isinstance(schema, str):
        schema = schemathesis.openapi.from_url(schema, headers=dict(headers or {}))
    report = FuzzReport()
    session = requests.Session()
    started = time.monotonic()
    hyp = settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                   phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                   print_blob=False)

    for result in schema.get_all_operations():
        op = result.ok()
        if select is not None and not select(op):
            continue
        report.operations += 1
        variants: list[dict] = [{}]
        res_type = op.path.strip("/").split("/")[0]
        if "{id}" in op.path and fixed_ids and res_type in fixed_ids:
            variants.append({"path_parameters": {"id": fixed_ids[res_type]}})
        for mode in modes:
            for extra in variants:
                if extra and mode == "negative":
                    continue
                strategy = op.as_strategy(generation_mode=MODES[mode], **extra)

                @hyp
                @given(case=strategy)
                def run(case):
                    report.requests += 1
                    if not generated_auth and case.headers:
                        case.headers.pop("Authorization", None)
                    try:
                        # a copy: schemathesis adds its own headers to the dict it is given
                        resp = case.call(session=session, headers=dict(headers or {}), timeout=timeout)
                    except requests.RequestException as exc:
                        report.statuses["no answer"] += 1
                        report.failures.append(Finding(op.label, None, f"no answer: {exc!r}"[:300],
                                                       case.as_curl_command(headers)))
                        return
                    report.statuses[resp.status_code] += 1
                    report.by_operation[op.label][resp.status_code] += 1
                    problem = _problem(resp)
                    if problem:
                        report.failures.append(Finding(op.label, resp.status_code, problem,
                                                       case.as_curl_command(headers)))

                run()
        if log:
            log(f"{op.label}: {report.requests} requests so far, {len(report.failures)} failures")
    report.seconds = time.monotonic() - started
    return report


def seed(base: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    """Load a few linked resources (one transaction) for the fuzzer to reach.

    Returns:
        resource type -> id, for :func:`fuzz`'s ``fixed_ids``.
    """
    cs_url = "http://example.org/fuzz/cs"
    resources = [
        {"resourceType": "Patient", "id": "fz-p1", "name": [{"family": "Fuzz", "given": ["Ann"]}],
         "gender": "female", "birthDate": "1970-01-01",
         "identifier": [{"system": "http://example.org/mrn", "value": "FZ1"}]},
        {"resourceType": "Encounter", "id": "fz-e1", "status": "finished",
         "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
         "subject": {"reference": "Patient/fz-p1"}},
        {"resourceType": "Observation", "id": "fz-o1", "status": "final",
         "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
         "subject": {"reference": "Patient/fz-p1"}, "encounter": {"reference": "Encounter/fz-e1"},
         "effectiveDateTime": "2020-02-03T04:05:06Z",
         "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org",
                           "code": "/min"}},
        {"resourceType": "CodeSystem", "id": "fz-cs", "url": cs_url, "status": "active",
         "content": "complete", "concept": [{"code": "a", "display": "A", "concept": [
             {"code": "a1", "display": "A one"}]}, {"code": "b", "display": "B"}]},
        {"resourceType": "ValueSet", "id": "fz-vs", "url": "http://example.org/fuzz/vs",
         "status": "active", "compose": {"include": [{"system": cs_url}]}},
        {"resourceType": "ConceptMap", "id": "fz-cm", "url": "http://example.org/fuzz/cm",
         "status": "active", "group": [{"source": cs_url, "target": "http://loinc.org", "element": [
             {"code": "a", "target": [{"code": "8867-4", "equivalence": "equivalent"}]}]}]},
    ]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in resources]}
    resp = requests.post(base, data=orjson.dumps(bundle), timeout=60,
                         headers={"Content-Type": "application/fhir+json", **(headers or {})})
    resp.raise_for_status()
    return {r["resourceType"]: r["id"] for r in resources}


def discover_ids(base: str, types: Iterable[str], headers: dict[str, str] | None = None) -> dict[str, str]:
    """resource type -> the id of one resource the server has (first search hit), for the
    types that have one (a synthetic cohort, or a store loaded some other way)."""
    out = {}
    for t in types:
        resp = requests.get(f"{base}/{t}", params={"_count": "1", "_elements": "id"}, headers=headers,
                            timeout=60)
        if resp.ok:
            entries = resp.json().get("entry") or []
            if entries:
                out[t] = entries[0]["resource"]["id"]
    return out
