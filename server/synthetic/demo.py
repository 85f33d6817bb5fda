"""``synthport demo``: from an empty data dir to a served cohort.

The "real" population is made up on the spot (``generators.events.synthetic``: a small
rule-based generator of patients with hypertension, diabetes, asthma, sinusitis, their
encounters, labs, medications, immunisations and chest radiographs), turned into FHIR
records with ``mappings.reverse.to_fhir_record`` and loaded into the store through its
ordinary transaction path. Nothing is downloaded. ``synthport demo --load PATH`` loads
real files instead (e.g. ``../shared/data``), as ``synthport load`` does.
"""
from __future__ import annotations

from typing import Callable

from server.source import RequestContext


def demo_population(n: int = 60, seed: int = 1) -> list[list[dict]]:
    """``n`` made-up patient records (FHIR R4, Patient first)."""
    from generators.events.synthetic import make_synthetic_tables
    from mappings.reverse import to_fhir_record

    patients, events = make_synthetic_tables(n, seed=seed)
    groups = {pid: g for pid, g in events.groupby("patient_id", sort=False)}
    empty = events.iloc[0:0]
    records = []
    for _, row in patients.iterrows():
        pid = str(row["patient_id"])
        row = row.copy()
        row["sex"] = {"F": "female", "M": "male"}.get(row.get("sex"), row.get("sex"))
        rec = to_fhir_record(row.drop(labels=["patient_id"]), groups.get(row["patient_id"], empty),
                             f"demo-{pid}")
        records.append(rec)
    return records


def load_records(store, records: list[list[dict]]) -> int:
    """PUT every resource of the records in one transaction per record batch."""
    n = 0
    for k in range(0, len(records), 50):
        entries = [{"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r,
                    "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                   for rec in records[k:k + 50] for r in rec]
        store.bundle(RequestContext(caller="synthport-demo"),
                     {"resourceType": "Bundle", "type": "transaction", "entry": entries})
        n += len(entries)
    return n


def run_demo(store, dicom, registry, *, patients: int = 60, cohort: str = "demo",
             size: int = 1000, seed: int = 42, model: str = "demo", fast: bool = True,
             echo: Callable[[str], None] = print):
    """Load the made-up population (when the store has no Patient yet), train a tiny model,
    create the cohort. Returns the cohort info."""
    from server.synthetic.cohort import create_cohort
    from server.synthetic.training import TrainSettings, train

    existing = store.search(RequestContext(), "Patient", [("_count", "1")]).total or 0
    if existing == 0:
        n = load_records(store, demo_population(patients))
        echo(f"loaded a made-up population of {patients} patients ({n} resources)")
    else:
        echo(f"the store holds {existing} patients: training on them")
    settings = TrainSettings(epochs=30 if fast else 200, event_epochs=2 if fast else 20,
                             image_epochs=5 if fast else 60, hidden=64 if fast else 256,
                             event_hidden=32 if fast else 192, min_count=1, progress=True)
    try:
        info = registry.model(model)
        echo(f"using model {info.name} v{info.version}")
    except Exception:  # noqa: BLE001 - NotFound: train it
        info = train(registry, store, dicom, model, settings, echo=echo)
    try:
        c = registry.cohort(cohort)
        echo(f"cohort {cohort} exists already")
        return c
    except Exception:  # noqa: BLE001 - NotFound: create it
        pass
    c = create_cohort(registry, cohort, info.name, size, seed, info.version)
    echo(f"cohort {cohort}: {size} virtual patients (seed {seed}) "
         f"indexed in {c.settings.get('build_seconds')} s")
    return c
