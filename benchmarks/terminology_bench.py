"""Terminology benchmark: library-level figures on a generated is-a hierarchy.

Generates a polyhierarchy of N concepts (default 350,000: a tree of branching factor
``--branching`` where ``--multi`` of the concepts get a second parent elsewhere, always
an earlier concept, so the graph stays acyclic), indexes it as a ``CodeSystemData``
and times the operations the FHIR server calls (server-side SQL and HTTP not included):

* index build (Concept objects, then ``CodeSystemData.from_concepts``);
* ``$lookup`` (``codesystem_lookup.lookup``) of random codes: p50/p95;
* subsumption (``CodeSystemData.subsumes`` and the ``$subsumes`` operation) on random
  pairs, half of them related: p50/p95, cold (closure not cached) and warm;
* ``$expand`` of a 1,000-code value set, enumerated and by an ``is-a`` filter, cold
  (expansion cache cleared; closures warm or cold as said) and cached;
* ``ValueSet/$validate-code`` against the is-a value set;
* ``expand_codes`` (search ``:in``) cold and cached.

Targets (issue 4) are printed beside the figures; nothing passes or fails.

    python benchmarks/terminology_bench.py [--concepts 350000] [--seed 1] [--repeat 2000]
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from terminologies.model import CodeSystemData, Concept, Designation  # noqa: E402
from terminologies.operations import valueset_expand  # noqa: E402
from terminologies.operations.codesystem_lookup import lookup  # noqa: E402
from terminologies.operations.codesystem_subsumes import subsumes as subsumes_op  # noqa: E402
from terminologies.operations.valueset_validate_code import validate_code  # noqa: E402
from terminologies.provider import InMemoryProvider  # noqa: E402

URL = "http://example.org/generated"


def generate(n: int, branching: int, multi: float, rng: random.Random) -> list[Concept]:
    """Concept i has parent (i-1)//branching, and with probability ``multi`` a second,
    random earlier concept (never a descendant, so no cycles)."""
    use = {"system": URL, "code": "fsn", "display": "Fully specified name"}
    out = []
    for i in range(n):
        code = str(100000 + i)
        if i == 0:
            parents: tuple[str, ...] = ()
        else:
            p = (i - 1) // branching
            parents = (str(100000 + p),)
            if rng.random() < multi and p > 1:
                q = rng.randrange(0, p)
                if q != p:
                    parents += (str(100000 + q),)
        out.append(Concept(code, f"Generated concept {i}", parents,
                           (Designation("en", use, f"Generated concept {i} (finding)"),),
                           (("level", len(parents)),), inactive=(i % 997 == 0)))
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


CPU: list[float] = []  # CPU ms of every timed() call, in order (the machine may be shared)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """Wall-clock ms and result; the CPU ms go to ``CPU``."""
    c = time.process_time()
    t = time.perf_counter()
    r = fn(*args, **kwargs)
    w = (time.perf_counter() - t) * 1000
    CPU.append((time.process_time() - c) * 1000)
    return w, r


def cpu_last(n: int = 1) -> list[float]:
    """CPU ms of the last ``n`` timed() calls."""
    return CPU[-n:]


def row(name: str, value: str, target: str = "") -> None:
    print(f"  {name:<58} {value:>22}   {target}")


def rf2_import(concepts: list[Concept]) -> None:
    """Write the generated hierarchy as RF2 snapshot files and time the importer."""
    import tempfile

    from terminologies.importers import snomed_rf2

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "Snapshot" / "Terminology"
        d.mkdir(parents=True)
        t = time.perf_counter()
        with open(d / "sct2_Concept_Snapshot_INT_20240101.txt", "w", newline="") as f:
            f.write("id\teffectiveTime\tactive\tmoduleId\tdefinitionStatusId\r\n")
            for c in concepts:
                f.write(f"{c.code}\t20240101\t{0 if c.inactive else 1}\t900000000000207008\t900000000000074008\r\n")
        with open(d / "sct2_Description_Snapshot-en_INT_20240101.txt", "w", newline="") as f:
            f.write("id\teffectiveTime\tactive\tmoduleId\tconceptId\tlanguageCode\ttypeId\tterm\tcaseSignificanceId\r\n")
            for i, c in enumerate(concepts):
                f.write(f"{2 * i + 1}011\t20240101\t1\t900000000000207008\t{c.code}\ten\t900000000000003001\t"
                        f"{c.display} (finding)\t900000000000448009\r\n")
                f.write(f"{2 * i + 2}011\t20240101\t1\t900000000000207008\t{c.code}\ten\t900000000000013009\t"
                        f"{c.display}\t900000000000448009\r\n")
        with open(d / "sct2_Relationship_Snapshot_INT_20240101.txt", "w", newline="") as f:
            f.write("id\teffectiveTime\tactive\tmoduleId\tsourceId\tdestinationId\trelationshipGroup\ttypeId\t"
                    "characteristicTypeId\tmodifierId\r\n")
            n = 0
            for c in concepts:
                for p in c.parents:
                    n += 1
                    f.write(f"{n}021\t20240101\t1\t900000000000207008\t{c.code}\t{p}\t0\t116680003\t"
                            f"900000000000011006\t900000000000451002\r\n")
        t_write = time.perf_counter() - t
        c0, t = time.process_time(), time.perf_counter()
        meta, it = snomed_rf2.read(Path(tmp))
        got = sum(1 for _ in it)
        t_read, c_read = time.perf_counter() - t, time.process_time() - c0
    print("SNOMED CT RF2 importer (snomed_rf2.read, generated snapshot)")
    row("write snapshot files", f"{t_write:.1f} s")
    row(f"read {got:,} concepts, {2 * got:,} descriptions, {n:,} is-a", f"{t_read:.1f} s (cpu {c_read:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", type=int, default=350_000)
    ap.add_argument("--branching", type=int, default=4)
    ap.add_argument("--multi", type=float, default=0.05, help="share of concepts with a second parent")
    ap.add_argument("--repeat", type=int, default=2000, help="samples per latency figure")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rf2", action="store_true",
                    help="also write the hierarchy as an RF2 snapshot (2 descriptions per concept) and time "
                         "the snomed_rf2 importer on it")
    args = ap.parse_args()
    rng = random.Random(args.seed)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.1f} on {os.cpu_count()} CPUs: wall-clock figures include waiting "
          "for a CPU; the (cpu ...) figures do not")
    print(f"terminology benchmark: {args.concepts:,} concepts, branching {args.branching}, "
          f"{args.multi:.0%} with a second parent, Python {sys.version.split()[0]}")
    t0 = time.perf_counter()
    concepts = generate(args.concepts, args.branching, args.multi, rng)
    t_gen = time.perf_counter() - t0
    t_build, cs = timed(CodeSystemData.from_concepts, URL, concepts, version="1", name="generated")
    t_children, _ = timed(cs.children, "100000")
    multi = sum(1 for c in concepts if len(c.parents) > 1)
    depth = len(cs.ancestors(str(100000 + args.concepts - 1)))
    print("index")
    row("concepts / with two parents", f"{len(cs):,} / {multi:,}")
    row("ancestors of the last concept", f"{depth}")
    row("generate Concept objects", f"{t_gen:.2f} s")
    c_build, c_children = CPU[0], CPU[1]
    row("CodeSystemData.from_concepts (build index)", f"{t_build / 1000:.3f} s (cpu {c_build / 1000:.3f} s)")
    row("children index (lazy, first hierarchy query)", f"{t_children / 1000:.3f} s (cpu {c_children / 1000:.3f} s)")
    t_root, root_desc = timed(cs.descendants, "100000")
    row("descendants(root), cold", f"{t_root:.0f} ms (cpu {cpu_last()[0]:.0f}) {len(root_desc):,} codes")

    provider = InMemoryProvider(cs)
    codes = list(cs)

    # ------------------------------------------------------------------ $lookup
    sample = [rng.choice(codes) for _ in range(args.repeat)]
    lat = [timed(lookup, provider, URL, c)[0] for c in sample]
    print("$lookup (codesystem_lookup.lookup, supplements consulted)")
    row("p50 / p95", f"{pct(lat, .5) * 1000:.0f} / {pct(lat, .95) * 1000:.0f} us "
        f"(cpu p50 {pct(cpu_last(len(sample)), .5) * 1000:.0f})", "target p50 <= 2 ms")

    # ------------------------------------------------------------------ subsumption
    pairs = []
    for _ in range(args.repeat):
        b = rng.choice(codes)
        anc = list(cs.ancestors.__wrapped__(b)) if rng.random() < .5 else []
        pairs.append((rng.choice(anc) if anc else rng.choice(codes), b))
    cs.ancestors.cache_clear()
    cold = [timed(cs.subsumes, a, b)[0] for a, b in pairs]
    cold_cpu = cpu_last(len(pairs))
    warm = [timed(cs.subsumes, a, b)[0] for a, b in pairs]
    cs.ancestors.cache_clear()
    op = [timed(subsumes_op, provider, URL, a, b)[0] for a, b in pairs]
    outcomes = {}
    for a, b in pairs:
        o = cs.subsumes(a, b)
        outcomes[o] = outcomes.get(o, 0) + 1
    print("subsumption " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    row("CodeSystemData.subsumes cold p50 / p95", f"{pct(cold, .5) * 1000:.1f} / {pct(cold, .95) * 1000:.1f} us "
        f"(cpu p50 {pct(cold_cpu, .5) * 1000:.1f})", "target <= 1 ms")
    row("CodeSystemData.subsumes warm p50 / p95", f"{pct(warm, .5) * 1000:.1f} / {pct(warm, .95) * 1000:.1f} us")
    row("$subsumes operation (cold closures) p50 / p95", f"{pct(op, .5) * 1000:.0f} / {pct(op, .95) * 1000:.0f} us")

    # ------------------------------------------------------------------ $expand 1,000 codes
    # A concept with about 1,000 descendants (is-a includes itself).
    # The smallest subtree of at least 1,000 codes, so the figure is not flattering.
    target_code, best = None, None
    for c in codes[: len(codes) // 20]:
        n = len(cs.descendants(c)) + 1
        if n >= 1000 and (best is None or n < best):
            target_code, best = c, n
    enum_codes = rng.sample(codes, 1000)
    vs_enum = {"resourceType": "ValueSet", "url": "http://example.org/vs/enum", "version": "1",
               "compose": {"include": [{"system": URL, "concept": [{"code": c} for c in enum_codes]}]}}
    vs_isa = {"resourceType": "ValueSet", "url": "http://example.org/vs/isa", "version": "1",
              "compose": {"include": [{"system": URL, "filter": [
                  {"property": "concept", "op": "is-a", "value": target_code}]}]}}
    provider.add(vs_enum)
    provider.add(vs_isa)
    print(f"$expand (valueset_expand.expand), is-a value set of {best:,} codes, enumerated one of 1,000")
    reps = max(5, min(50, args.repeat // 40))
    for label, url in (("enumerated 1,000 codes", vs_enum["url"]), (f"is-a {target_code} ({best:,} codes)", vs_isa["url"])):
        cs.descendants.cache_clear()
        valueset_expand.clear_cache()
        t_cold_closure, out = timed(valueset_expand.expand, provider, url=url)
        assert out["expansion"]["total"] in (1000, best)
        c_first = cpu_last()[0]
        colds = []
        for _ in range(reps):
            valueset_expand.clear_cache()
            colds.append(timed(valueset_expand.expand, provider, url=url)[0])
        c_cold = statistics.median(cpu_last(reps))
        warms = [timed(valueset_expand.expand, provider, url=url)[0] for _ in range(reps)]
        row(f"{label}: first (closures cold)", f"{t_cold_closure:.1f} ms (cpu {c_first:.1f})", "target <= 50 ms")
        row(f"{label}: uncached expansion p50", f"{statistics.median(colds):.1f} ms (cpu {c_cold:.1f})",
            "target <= 50 ms")
        row(f"{label}: cached expansion p50", f"{statistics.median(warms):.1f} ms")
    page = [timed(valueset_expand.expand, provider, url=vs_isa["url"], count=20, offset=100, filter="concept")[0]
            for _ in range(reps)]
    row("is-a, text filter + count 20 (cached definition) p50", f"{statistics.median(page):.1f} ms")

    # ------------------------------------------------------------------ validate-code, expand_codes
    members = list(cs.descendants(target_code))[:100] + rng.sample(codes, 100)
    lat = [timed(validate_code, provider, url=vs_isa["url"], system=URL, code=c)[0] for c in members]
    print("ValueSet/$validate-code (rule by rule, no expansion)")
    row("is-a value set p50 / p95", f"{pct(lat, .5) * 1000:.0f} / {pct(lat, .95) * 1000:.0f} us")
    valueset_expand.clear_cache()
    t_codes, got = timed(valueset_expand.expand_codes, provider, vs_isa["url"])
    t_codes2, _ = timed(valueset_expand.expand_codes, provider, vs_isa["url"])
    print("expand_codes (search :in / :not-in)")
    row(f"is-a value set ({len(got):,} codes) cold / cached", f"{t_codes:.1f} ms / {t_codes2 * 1000:.0f} us")
    root_vs = {"resourceType": "ValueSet", "url": "http://example.org/vs/all", "compose": {"include": [
        {"system": URL, "filter": [{"property": "concept", "op": "descendent-of", "value": "100000"}]}]}}
    provider.add(root_vs)
    t_all, got = timed(valueset_expand.expand_codes, provider, root_vs["url"])
    row(f"descendent-of root ({len(got):,} codes) cold", f"{t_all:.0f} ms (cpu {cpu_last()[0]:.0f})")

    if args.rf2:
        rf2_import(concepts)

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
