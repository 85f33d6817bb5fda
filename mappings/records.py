"""Patient records: group a Bundle's, a folder's or an archive's resources per patient.

A *record* is a list of FHIR R4 resource dicts that belong to one patient (the Patient
first or anywhere), the shape ``Patient/$everything`` returns. References inside a record
are resolved by :func:`ref_id`: ``urn:uuid:<id>`` (Synthea, EHDS documents), relative
``Type/id`` and absolute ``http://.../Type/id`` all give ``id``. When a Bundle's
``fullUrl`` is not ``urn:uuid:<resource id>``, the references pointing at it are
rewritten to ``Type/id`` while grouping, so that :func:`ref_id` stays a pure string
operation.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import re
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import orjson

Record = list[dict]

# Where a resource names its patient (FHIR R4 compartmentdefinition-patient, the usual ones).
_PATIENT_REF_FIELDS = ("subject", "patient", "beneficiary", "individual")


def ref_id(ref: Any) -> str | None:
    """The logical id a Reference (dict or string) points at, or None."""
    if isinstance(ref, dict):
        ref = ref.get("reference")
    if not isinstance(ref, str) or not ref:
        return None
    if ref.startswith("urn:uuid:") or ref.startswith("urn:oid:"):
        return ref[9:]
    if "?" in ref:                      # conditional reference: no id to resolve
        return None
    ref = ref.split("/_history/", 1)[0]
    return ref.rsplit("/", 1)[-1] or None


def _read_json(path: Path) -> Any:
    name = path.name
    if name.endswith(".bz2"):
        raw = bz2.decompress(path.read_bytes())
    elif name.endswith(".gz"):
        raw = gzip.decompress(path.read_bytes())
    elif name.endswith(".xz"):
        raw = lzma.decompress(path.read_bytes())
    else:
        raw = path.read_bytes()
    return orjson.loads(raw)


def _rewrite_refs(obj: Any, mapping: dict[str, str]) -> None:
    """Rewrite ``reference`` values found in ``mapping`` in place."""
    if isinstance(obj, dict):
        r = obj.get("reference")
        if isinstance(r, str) and r in mapping:
            obj["reference"] = mapping[r]
        for v in obj.values():
            if isinstance(v, (dict, list)):
                _rewrite_refs(v, mapping)
    elif isinstance(obj, list):
        for v in obj:
            _rewrite_refs(v, mapping)


def bundle_resources(bundle: dict) -> list[dict]:
    """The resources of a Bundle, references to odd ``fullUrl``s rewritten to ``Type/id``."""
    out, mapping = [], {}
    for e in bundle.get("entry") or ():
        r = e.get("resource")
        if not isinstance(r, dict) or "resourceType" not in r:
            continue
        out.append(r)
        full, rid = e.get("fullUrl"), r.get("id")
        if full and rid and full != f"urn:uuid:{rid}" and not full.endswith(f"/{r['resourceType']}/{rid}"):
            mapping[full] = f"{r['resourceType']}/{rid}"
    if mapping:
        for r in out:
            _rewrite_refs(r, mapping)
    return out


def patient_of(resource: dict) -> str | None:
    """The id of the patient a resource belongs to (itself for a Patient)."""
    if resource.get("resourceType") == "Patient":
        return resource.get("id")
    for f in _PATIENT_REF_FIELDS:
        v = resource.get(f)
        if isinstance(v, dict):
            return ref_id(v)
    return None


def group_records(resources: Iterable[dict]) -> list[Record]:
    """Group resources into one record per Patient.

    Resources that name no patient (Practitioner, Organization, Medication, ...) are added
    to every record that references them, so that a record is self-contained. Duplicates
    (the same ``Type/id`` from two documents) are kept once.
    """
    patients: dict[str, list[dict]] = {}
    shared: dict[str, dict] = {}
    seen: set[tuple[str, str]] = set()
    pending: list[tuple[str, dict]] = []
    for r in resources:
        key = (r.get("resourceType"), r.get("id"))
        if key[1] is not None and key in seen:
            continue
        seen.add(key)
        pid = patient_of(r)
        if r.get("resourceType") == "Patient":
            patients.setdefault(pid, []).insert(0, r)
        elif pid:
            pending.append((pid, r))
        elif r.get("id"):
            shared[r["id"]] = r
    for pid, r in pending:
        patients.setdefault(pid, []).append(r)
    out = []
    for pid, rec in patients.items():
        if not rec or rec[0].get("resourceType") != "Patient":
            continue  # resources of a patient that is not in the input
        if shared and len(patients) == 1:
            rec.extend(shared.values())   # one patient per bundle: all of it is theirs
        elif shared:
            wanted = _referenced_ids(rec) & shared.keys()
            rec.extend(shared[i] for i in sorted(wanted))
        out.append(rec)
    return out


_REF = re.compile(rb'"reference"\s*:\s*"([^"]+)"')


def _referenced_ids(rec: list[dict]) -> set[str]:
    ids = set()
    for r in rec:
        for m in _REF.finditer(orjson.dumps(r)):
            i = ref_id(m.group(1).decode())
            if i:
                ids.add(i)
    return ids


def records_from_bundle(bundle: dict) -> list[Record]:
    """Records of one Bundle (transaction, batch, document, searchset, collection)."""
    return group_records(bundle_resources(bundle))


def iter_synthea_folder(folder: str | Path, limit: int | None = None) -> Iterator[Record]:
    """Records of a Synthea output folder (one transaction Bundle per patient, sorted by name).

    The ``0-*`` hospital/practitioner bundles hold no patient and are skipped.
    """
    files = sorted(p for p in Path(folder).iterdir()
                   if p.is_file() and p.name.endswith((".json", ".json.bz2", ".json.gz", ".json.xz"))
                   and not p.name.startswith("0-"))
    n = 0
    for p in files:
        for rec in records_from_bundle(_read_json(p)):
            yield rec
            n += 1
            if limit is not None and n >= limit:
                return


_EHDS_NAME = re.compile(r"^(?P<cat>[^/]+)/(?P<stem>.+)_(?P=cat)\.json$")


def iter_ehds_archive(path: str | Path, limit: int | None = None,
                      categories: tuple[str, ...] = ("patient-summary", "medical-imaging"),
                      complete: bool = True) -> Iterator[Record]:
    """Records of an EHDS archive (``<category>/<patient>_<category>.json`` document Bundles).

    The archive is read as a stream (``tarfile`` mode ``r|*``): nothing is unpacked to disk
    and no random access is needed. Because all ``patient-summary`` members come before all
    ``medical-imaging`` members, the small non-summary documents are collected in a first
    pass and joined to each patient summary in a second one (two decompressions, one
    parse of each document). Patients come in archive order; ``limit`` keeps the first N.

    With ``complete=False`` the archive is read once and each document is yielded as soon
    as it is read, so a patient's record comes in several parts (summary first). That is
    what :func:`mappings.tables.map_records` accepts (it merges parts of one patient) and
    is the fast way to map a whole archive.
    """
    path = Path(path)
    if not complete:
        yield from _iter_ehds_parts(path, limit, categories)
        return
    main_cat = categories[0]
    wanted: list[str] = []
    extra: dict[str, list[bytes]] = {}
    with tarfile.open(path, mode="r|*") as tf:
        for m in tf:
            if not m.isfile():
                continue
            mt = _EHDS_NAME.match(m.name)
            if not mt or mt["cat"] not in categories:
                continue
            if mt["cat"] == main_cat:
                if limit is None or len(wanted) < limit:
                    wanted.append(mt["stem"])
            elif limit is None or mt["stem"] in wanted:
                extra.setdefault(mt["stem"], []).append(tf.extractfile(m).read())
    want = set(wanted)
    done = 0
    with tarfile.open(path, mode="r|*") as tf:
        for m in tf:
            mt = _EHDS_NAME.match(m.name) if m.isfile() else None
            if not mt or mt["cat"] != main_cat or mt["stem"] not in want:
                continue
            resources = bundle_resources(orjson.loads(tf.extractfile(m).read()))
            for raw in extra.pop(mt["stem"], ()):
                resources.extend(bundle_resources(orjson.loads(raw)))
            yield from group_records(resources)
            done += 1
            if done >= len(want):
                return


def _iter_ehds_parts(path: Path, limit: int | None, categories: tuple[str, ...]) -> Iterator[Record]:
    main_cat = categories[0]
    wanted: set[str] = set()
    with tarfile.open(path, mode="r|*") as tf:
        for m in tf:
            mt = _EHDS_NAME.match(m.name) if m.isfile() else None
            if not mt or mt["cat"] not in categories:
                continue
            if mt["cat"] == main_cat:
                if limit is not None and len(wanted) >= limit:
                    continue
                wanted.add(mt["stem"])
            elif limit is not None and mt["stem"] not in wanted:
                continue
            yield from group_records(bundle_resources(orjson.loads(tf.extractfile(m).read())))


def iter_tar_bundles(path: str | Path, limit: int | None = None) -> Iterator[Record]:
    """Records of a tar archive of Bundle files (``*.json``, any layout), in archive order.

    Members named like Synthea's ``0-*`` hospital/practitioner bundles are skipped.
    """
    n = 0
    with tarfile.open(Path(path), mode="r|*") as tf:
        for m in tf:
            base = m.name.rsplit("/", 1)[-1]
            if not m.isfile() or not base.endswith(".json") or base.startswith("0-"):
                continue
            for rec in records_from_bundle(orjson.loads(tf.extractfile(m).read())):
                yield rec
                n += 1
                if limit is not None and n >= limit:
                    return


def iter_records(path: str | Path, limit: int | None = None) -> Iterator[Record]:
    """Records from a Bundle file, a folder of Bundle files, an EHDS ``.tar.*`` archive or
    another tar archive of Bundle files."""
    p = Path(path)
    if p.is_dir():
        yield from iter_synthea_folder(p, limit)
    elif ".tar" in p.name or p.suffix in (".tgz", ".txz"):
        any_ehds = False
        for rec in iter_ehds_archive(p, limit):
            any_ehds = True
            yield rec
        if not any_ehds:
            yield from iter_tar_bundles(p, limit)
    else:
        recs = records_from_bundle(_read_json(p))
        yield from (recs if limit is None else recs[:limit])
