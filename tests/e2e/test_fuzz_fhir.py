"""End-to-end: fuzz the real ``synthport serve`` (gunicorn, SQLite) with schemathesis from
the OpenAPI document it serves at ``/fhir/openapi.json``: no request may get a 5xx (or
no answer), every 4xx is an OperationOutcome.

The budget is fixed (Hypothesis derandomized, ``MAX_EXAMPLES`` per operation and mode),
so a run is reproducible and takes about a minute on two busy cores. The larger run is
``benchmarks/fuzz_fhir.py``.
"""
from __future__ import annotations

import base64
import http.client
import os
import subprocess
import time
import urllib.parse
from pathlib import Path

import orjson
import pytest
import requests

from tests.e2e.fuzz import fuzz, seed
from tests.e2e.server import run_server, synthport_command

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = 3
MAX_BODY = 1 << 20
FUZZ_TYPES = {"Patient", "Observation", "CodeSystem", "ValueSet"}
JSON = "application/fhir+json"


def select(types: set[str]):
    """Operations on these resource types, plus the system-level ones."""
    def keep(op) -> bool:
        first = op.path.strip("/").split("/")[0]
        return first in types or not first[:1].isupper()
    return keep


def token(data_dir: Path, scope: str, *extra: str) -> str:
    """``synthport token`` for the server whose data dir this is."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHPORT_")}
    out = subprocess.run(synthport_command() + ["token", "--scope", scope, "--data-dir", str(data_dir),
                                                *extra], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_fuzz_development_mode(tmp_path):
    with run_server(tmp_path, None, {"SYNTHPORT_MAX_BODY_BYTES": str(MAX_BODY)}) as base:
        ids = seed(base)
        report = fuzz(f"{base}/openapi.json", max_examples=MAX_EXAMPLES, select=select(FUZZ_TYPES),
                      fixed_ids=ids)
        print("\n" + report.summary())
        assert report.operations >= 80 and report.requests >= 500, report.summary()
        assert not report.failures, report.summary()
        assert sum(n for s, n in report.statuses.items() if isinstance(s, int) and s < 300) >= 100

        # Through gunicorn, not only Werkzeug's test client: a chunked body over the limit is
        # 413, an over-long request line or header a 4xx, and the server keeps answering.
        url = urllib.parse.urlsplit(base)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        body = orjson.dumps({"resourceType": "Patient", "id": "big"}) + b" " * MAX_BODY
        conn.request("PUT", f"{url.path}/Patient/big", body=iter([body[i:i + 65536] for i in
                                                                  range(0, len(body), 65536)]),
                     headers={"Content-Type": JSON}, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413, resp.read()[:300]
        assert orjson.loads(resp.read())["issue"][0]["code"] == "too-costly"
        conn.close()
        assert requests.get(f"{base}/Patient/big", timeout=30).status_code == 404
        r = requests.get(f"{base}/Patient?name={'a' * 20_000}", timeout=30)
        assert 400 <= r.status_code < 500
        r = requests.get(f"{base}/metadata", headers={"X-Padding": "a" * 20_000}, timeout=30)
        assert 400 <= r.status_code < 500
        assert requests.get(f"{base}/metadata", timeout=30).status_code == 200


def _alg_none(tok: str) -> str:
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"at+jwt"}').rstrip(b"=").decode()
    return f"{header}.{tok.split('.')[1]}."


def test_fuzz_with_a_token_and_refused_tokens(tmp_path):
    with run_server(tmp_path, None, {"SYNTHPORT_AUTH": "required"}) as base:
        data_dir = tmp_path / "synthport-data"
        good = {"Authorization": f"Bearer {token(data_dir, 'system/*.cruds', '--lifetime', '3600')}"}
        ids = seed(base, good)

        report = fuzz(f"{base}/openapi.json", max_examples=3, modes=("positive",),
                      select=select({"Patient", "Observation"}), headers=good, fixed_ids=ids)
        print("\n" + report.summary())
        assert report.requests >= 100 and not report.failures, report.summary()
        assert 401 not in report.statuses and 403 not in report.statuses, report.summary()

        # Made-up bearer tokens from the document's security scheme: refused, never 2xx/5xx.
        # ($validate reads nothing stored and no source guards it: it answers without a token.)
        made_up = fuzz(f"{base}/openapi.json", max_examples=3, modes=("positive",), generated_auth=True,
                       select=lambda op: op.path.startswith("/Patient") and "$validate" not in op.path)
        print(made_up.summary())
        assert not made_up.failures, made_up.summary()
        assert made_up.statuses[401] >= made_up.requests // 2, made_up.summary()
        assert not any(isinstance(s, int) and s < 300 for s in made_up.statuses), made_up.summary()

        seed(base, good)      # the fuzzer may have deleted them

        def get(headers: dict) -> requests.Response:
            return requests.get(f"{base}/Patient/{ids['Patient']}", headers=headers, timeout=30)

        assert get(good).status_code == 200
        expired = token(data_dir, "system/*.cruds", "--lifetime", "1")
        other_key = token(tmp_path / "elsewhere", "system/*.cruds")     # another server's key
        time.sleep(1.5)
        for bad in ([], [f"Bearer {expired}"], [f"Bearer {other_key}"], [f"Bearer {_alg_none(expired)}"],
                    [f"Bearer {good['Authorization'][7:-4]}AAAA"], ["Basic dXNlcjpwYXNz"]):
            r = get({"Authorization": bad[0]} if bad else {})
            assert r.status_code == 401, (bad, r.text[:300])
            assert r.json()["resourceType"] == "OperationOutcome"
            assert r.headers["WWW-Authenticate"].startswith("Bearer")

        # Valid tokens whose scopes do not cover the request: 403, and nothing written.
        read_obs = {"Authorization": f"Bearer {token(data_dir, 'system/Observation.rs')}"}
        read_all = {"Authorization": f"Bearer {token(data_dir, 'system/*.rs')}"}
        assert get(read_obs).status_code == 403
        assert requests.get(f"{base}/Observation/{ids['Observation']}", headers=read_obs,
                            timeout=30).status_code == 200
        r = requests.put(f"{base}/Patient/scoped", data=orjson.dumps({"resourceType": "Patient", "id": "scoped"}),
                         headers={**read_all, "Content-Type": JSON}, timeout=30)
        assert r.status_code == 403 and r.json()["issue"][0]["code"] == "forbidden"
        assert requests.get(f"{base}/Patient/scoped", headers=good, timeout=30).status_code == 404
