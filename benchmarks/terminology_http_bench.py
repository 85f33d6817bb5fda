"""Terminology service benchmark on a generated is-a hierarchy (default 350,000 concepts).

Usage (from the repository root, after ``pip install -e '.[test]'``)::

    python benchmarks/terminology_http_bench.py
    python benchmarks/terminology_http_bench.py --concepts 350000 --n 2000 \\
        --db-url postgresql+psycopg://postgres@127.0.0.1:5432/test

Steps:

1. generate a SNOMED-shaped polyhierarchy (a 4-ary tree, depth ~10, plus a second parent
   for 10 % of the concepts) and import it with ``server.terminology.import_codesystem``
   (the code path of ``synthport terminology import``) into a fresh store; store two
   ValueSets of ~1,000 codes: an extensional one (1,000 codes listed) and an intensional
   one (``is-a`` a concept with about 1,000 descendants);
2. library level, in process, on ``SqlTerminologyProvider`` (concepts read from SQL on
   demand, since the system is above ``full_load_max``) and on the same system fully loaded
   in memory (``CodeSystemData``): ``$lookup``, ``$subsumes`` and ``$expand`` p50;
3. HTTP: a real ``synthport serve`` (gunicorn) on the store; ``GET $lookup`` of random
   codes, ``GET $subsumes`` of random pairs (half related), ``GET $expand`` of both value
   sets, sequentially on one keep-alive connection; p50/p95.

Figures are printed beside the targets of issue 4 ($lookup p50 <= 2 ms, $expand of a
1,000-code value set <= 50 ms, subsumption <= 1 ms); nothing passes or fails.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.store import SqlStore  # noqa: E402
from server.terminology.importer import import_codesystem  # noqa: E402
from server.terminology.provider import SqlTerminologyProvider, load_concepts  # noqa: E402
from terminologies.model import CodeSystemData, Concept  # noqa: E402
from terminologies.operations import codesystem_lookup, codesystem_subsumes, valueset_expand  # noqa: E402
from terminologies.provider import InMemoryProvider  # noqa: E402

SYSTEM = "http://example.org/generated-sct"
WORDS = ("disorder", "finding", "procedure", "structure", "substance", "organism", "event",
         "situation", "observable", "qualifier")


def code_of(i: int) -> str:
    return str(100000 + i)


def generate(n: int, seed: int) -> tuple[list[list[int]], list[Concept]]:
    """Parents per index and the concepts (parent before child, deterministic)."""
    rng = random.Random(seed)
    parents: list[list[int]] = [[]]
    for i in range(1, n):
        ps = [(i - 1) // 4]
        if i > 100 and rng.random() < 0.10:
            extra = rng.randrange(1, i)
            if extra != ps[0]:
                ps.append(extra)
        parents.append(ps)
    concepts = [Concept(code_of(i), f"Generated {WORDS[i % len(WORDS)]} {i}",
                        tuple(code_of(p) for p in parents[i])) for i in range(n)]
    return parents, concepts


def anchor_near(parents: list[list[int]], want: int = 1000) -> tuple[int, int]:
    """A concept with about ``want`` is-a descendants (all parents counted), and that count."""
    tree = [0] * len(parents)                  # first-parent tree sizes: cheap pre-selection
    for i in range(len(parents) - 1, 0, -1):
        tree[parents[i][0]] += tree[i] + 1
    children: list[list[int]] = [[] for _ in parents]
    for i, ps in enumerate(parents):
        for p in ps:
            children[p].append(i)
    best = (0, 0)
    for i in [i for i in range(1, len(parents)) if want // 3 <= tree[i] <= want][:300]:
        seen, stack = set(), list(children[i])
        while stack:
            k = stack.pop()
            if k not in seen:
                seen.add(k)
                stack.extend(children[k])
        if abs(len(seen) + 1 - want) < abs(best[1] - want):
            best = (i, len(seen) + 1)
    return best


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


class Timings(list):
    """Wall-clock milliseconds per call, and the CPU milliseconds of this process per call
    (on a shared machine the wall clock includes waiting for a CPU)."""
    cpu: list[float]


def timed(fn, n: int) -> Timings:
    out = Timings()
    out.cpu = []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        fn()
        out.append((time.perf_counter() - t) * 1000)
        out.cpu.append((time.process_time() - c) * 1000)
    return out


def fmt(name: str, ms: Timings, target: str = "", cpu: bool = True) -> str:
    cpu_txt = f"cpu p50 {statistics.median(ms.cpu):8.3f} ms" if cpu else " " * 20
    return (f"{name:<58} p50 {statistics.median(ms):8.3f} ms   p95 {pct(ms, 0.95):8.3f} ms   "
            f"{cpu_txt}   n={len(ms):<5} {target}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", type=int, default=350_000)
    ap.add_argument("--n", type=int, default=2000, help="requests per $lookup/$subsumes measurement")
    ap.add_argument("--expand-n", type=int, default=50, help="requests per $expand measurement")
    ap.add_argument("--db-url", default=None, help="SQLAlchemy URL (default: SQLite in a temp dir)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    from tests.e2e.server import run_server

    work = Path(tempfile.mkdtemp(prefix="synthport-term-bench-"))
    db_url = args.db_url or f"sqlite:///{work}/synthport-data/synthport.db"
    schema = None
    if db_url.startswith("postgresql"):
        import psycopg
        from sqlalchemy.engine import make_url

        schema = "bench_" + secrets.token_hex(4)
        base = make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(base, autocommit=True) as c:
            c.execute(f'CREATE SCHEMA "{schema}"')
        db_url = make_url(db_url).update_query_dict({"options": f"-csearch_path={schema}"}) \
            .render_as_string(hide_password=False)
    figures: dict[str, float] = {}
    try:
        print(f"generating {args.concepts:,} concepts ...", file=sys.stderr)
        parents, concepts = generate(args.concepts, args.seed)
        anchor, _ = anchor_near(parents)
        store = SqlStore.from_url(db_url)
        t = time.perf_counter()
        res = import_codesystem(store, {"url": SYSTEM, "version": "1", "name": "GeneratedSCT",
                                        "content": "complete"}, iter(concepts), progress=False)
        figures["import_s"] = time.perf_counter() - t
        print(f"import: {res.concepts:,} concepts, {res.edges:,} edges in {figures['import_s']:.1f} s "
              f"({res.concepts / figures['import_s']:,.0f} concepts/s)")

        rng = random.Random(args.seed + 1)
        listed = rng.sample(range(args.concepts), 1000)
        vs_list = {"resourceType": "ValueSet", "id": "bench-listed", "url": "http://example.org/vs/listed",
                   "status": "active", "compose": {"include": [
                       {"system": SYSTEM, "concept": [{"code": code_of(i)} for i in listed]}]}}
        vs_isa = {"resourceType": "ValueSet", "id": "bench-isa", "url": "http://example.org/vs/isa",
                  "status": "active", "compose": {"include": [{"system": SYSTEM, "filter": [
                      {"property": "concept", "op": "is-a", "value": code_of(anchor)}]}]}}
        from server.source import RequestContext

        for vs in (vs_list, vs_isa):
            store.update(RequestContext(), "ValueSet", vs["id"], dict(vs))

        # ---------------------------------------------------------------- library level
        prov = SqlTerminologyProvider(store).refresh()
        codes = [code_of(rng.randrange(args.concepts)) for _ in range(args.n)]

        def pairs():
            out = []
            for _ in range(args.n):
                b = rng.randrange(1, args.concepts)
                a = parents[parents[b][0]][0] if rng.random() < 0.5 and parents[b][0] else rng.randrange(args.concepts)
                out.append((code_of(a), code_of(b)))
            return out

        sub_pairs, op_pairs = pairs(), pairs()
        it = iter(codes)
        lib_lookup = timed(lambda: codesystem_lookup.lookup(prov, system=SYSTEM, code=next(it)), args.n)
        it3 = iter(sub_pairs)
        cs = prov.code_system(SYSTEM)
        lib_sub_raw = timed(lambda: cs.subsumes(*next(it3)), args.n)
        it2 = iter(op_pairs)
        lib_sub = timed(lambda: codesystem_subsumes.subsumes(prov, system=SYSTEM, code_a=(p := next(it2))[0],
                                                             code_b=p[1]), args.n)
        valueset_expand.clear_cache()
        lib_exp_list = timed(lambda: (valueset_expand.clear_cache(),
                                      valueset_expand.expand(prov, url=vs_list["url"])), args.expand_n)
        lib_exp_isa = timed(lambda: (valueset_expand.clear_cache(),
                                     valueset_expand.expand(prov, url=vs_isa["url"])), args.expand_n)
        t = time.perf_counter()
        loaded = CodeSystemData.from_concepts(SYSTEM, load_concepts(prov.sql, prov.sql.rows(
            "SELECT pk FROM term_codesystem WHERE url = ?", (SYSTEM,))[0][0]), version="1",
            name="GeneratedSCT", content="complete")
        figures["full_load_s"] = time.perf_counter() - t
        mem = InMemoryProvider(loaded, vs_list, vs_isa)
        it = iter(codes)
        mem_lookup = timed(lambda: codesystem_lookup.lookup(mem, system=SYSTEM, code=next(it)), args.n)
        it2 = iter(sub_pairs)
        mem_sub = timed(lambda: loaded.subsumes(*next(it2)), args.n)
        mem_exp_isa = timed(lambda: (valueset_expand.clear_cache(),
                                     valueset_expand.expand(mem, url=vs_isa["url"])), args.expand_n)
        store.engine.dispose()

        # ---------------------------------------------------------------- HTTP
        env = {"SYNTHPORT_DIMSE_PORT": "0", "SYNTHPORT_AUTH": "required"}
        with run_server(work, db_url, env, workers=args.workers) as base:
            u = urllib.parse.urlsplit(base)
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
            # as in production: a token on every request, each checked and audited
            auth = {"Authorization": "Bearer " + _token(work, db_url)}

            def get(path: str, **q) -> dict:
                conn.request("GET", f"{u.path}/{path}?{urllib.parse.urlencode(q)}",
                             headers={"Accept": "application/fhir+json", **auth})
                r = conn.getresponse()
                body = r.read()
                if r.status != 200:
                    raise RuntimeError(f"{path} {q}: HTTP {r.status} {body[:300]!r}")
                return json.loads(body)

            def post(path: str, body: dict) -> dict:
                conn.request("POST", f"{u.path}/{path}", body=json.dumps(body),
                             headers={"Accept": "application/fhir+json", **auth,
                                      "Content-Type": "application/fhir+json"})
                r = conn.getresponse()
                data = r.read()
                if r.status != 200:
                    raise RuntimeError(f"POST {path}: HTTP {r.status} {data[:300]!r}")
                return json.loads(data)

            def inline_expand(vs: dict, i: list[int]) -> dict:
                # A value set never seen before (its JSON is the cache key): no cached expansion.
                i[0] += 1
                return post("ValueSet/$expand", {"resourceType": "Parameters", "parameter": [
                    {"name": "valueSet", "resource": {**{k: v for k, v in vs.items() if k != "id"}, "name": f"Run{i[0]}"}}]})

            get("CodeSystem/$lookup", system=SYSTEM, code=code_of(0))        # warm up the worker
            exp = get("ValueSet/$expand", url=vs_isa["url"], count=0)["expansion"]["total"]
            exp_list = get("ValueSet/$expand", url=vs_list["url"], count=0)["expansion"]["total"]
            codes = [code_of(rng.randrange(args.concepts)) for _ in range(args.n)]
            it = iter(codes)
            http_lookup = timed(lambda: get("CodeSystem/$lookup", system=SYSTEM, code=next(it)), args.n)
            it = iter(codes)
            http_lookup_warm = timed(lambda: get("CodeSystem/$lookup", system=SYSTEM, code=next(it)), args.n)
            sub_pairs = pairs()
            it2 = iter(sub_pairs)
            http_sub = timed(lambda: get("CodeSystem/$subsumes", system=SYSTEM, codeA=(p := next(it2))[0],
                                         codeB=p[1]), args.n)
            http_exp_list = timed(lambda: get("ValueSet/$expand", url=vs_list["url"]), args.expand_n)
            http_exp_isa = timed(lambda: get("ValueSet/$expand", url=vs_isa["url"]), args.expand_n)
            counter = [0]
            http_exp_list_new = timed(lambda: inline_expand(vs_list, counter), args.expand_n)
            http_exp_isa_new = timed(lambda: inline_expand(vs_isa, counter), args.expand_n)
            http_read = timed(lambda: get(f"CodeSystem/{res.res_id}"), 200)
            conn.close()

        db = "PostgreSQL" if schema else "SQLite"
        print(f"\nterminology benchmark: {args.concepts:,} concepts ({res.edges:,} is-a edges), {db}, "
              f"{args.workers} worker(s), {os.cpu_count()} cores, load average "
              f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print(f"value sets: listed = {exp_list} codes, is-a {code_of(anchor)} = {exp} codes")
        print(f"fully loading the system into memory (CodeSystemData): {figures['full_load_s']:.1f} s\n")
        rows = [
            ("library, SQL provider: $lookup (cold codes)", lib_lookup, "target <= 2 ms"),
            ("library, SQL provider: $subsumes op", lib_sub, "target <= 1 ms"),
            ("library, SQL provider: CodeSystemData.subsumes", lib_sub_raw, "target <= 1 ms"),
            ("library, SQL provider: $expand listed 1,000 (uncached)", lib_exp_list, "target <= 50 ms"),
            (f"library, SQL provider: $expand is-a {exp} (uncached)", lib_exp_isa, "target <= 50 ms"),
            ("library, in memory: $lookup", mem_lookup, "target <= 2 ms"),
            ("library, in memory: CodeSystemData.subsumes", mem_sub, "target <= 1 ms"),
            (f"library, in memory: $expand is-a {exp} (uncached)", mem_exp_isa, "target <= 50 ms"),
            ("HTTP: GET $lookup (codes not yet cached)", http_lookup, "target <= 2 ms"),
            ("HTTP: GET $lookup (same codes again)", http_lookup_warm, "target <= 2 ms"),
            ("HTTP: GET $subsumes", http_sub, "target <= 1 ms (library)"),
            ("HTTP: GET $expand listed 1,000 codes (cached)", http_exp_list, "target <= 50 ms"),
            (f"HTTP: GET $expand is-a ({exp} codes) (cached)", http_exp_isa, "target <= 50 ms"),
            ("HTTP: POST $expand listed 1,000, new value set", http_exp_list_new, "target <= 50 ms"),
            (f"HTTP: POST $expand is-a ({exp}), new value set", http_exp_isa_new, "target <= 50 ms"),
            ("HTTP: GET CodeSystem/{id} (read by id: the HTTP floor)", http_read, ""),
        ]
        for name, ms, target in rows:
            print(fmt(name, ms, target, cpu=name.startswith("library")))
            figures[name] = statistics.median(ms)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
    finally:
        if schema:
            import psycopg
            from sqlalchemy.engine import make_url

            base = make_url(args.db_url).set(drivername="postgresql").render_as_string(hide_password=False)
            with psycopg.connect(base, autocommit=True) as c:
                c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    return 0




def _token(work, db_url) -> str:
    import subprocess

    from tests.e2e.server import synthport_command

    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHPORT_")}
    if db_url:
        env["SYNTHPORT_DATABASE_URL"] = db_url
    return subprocess.run(synthport_command() + [
        "token", "--data-dir", str(Path(work) / "synthport-data"), "--scope", "system/*.rs",
        "--lifetime", "86400"], env=env, check=True, capture_output=True, text=True).stdout.strip()

if __name__ == "__main__":
    sys.exit(main())
