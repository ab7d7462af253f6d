"""Validate KubeRay manifests in cluster/ strictly against KubeRay's own CRD schema, offline.

    python cluster/validate_manifests.py [FILE ...]      # default: every RayJob in cluster/

The schema is the RayJob CRD of KubeRay v1.7 (cluster/crd/ray.io_rayjobs.v1.7.yaml.gz, copied from
ray-project/kuberay `helm-chart/kuberay-operator/crds/ray.io_rayjobs.yaml`, controller-gen v0.16.5).
Stricter than `kubectl apply`, which prunes unknown fields silently: here an object that lists its
properties rejects any other (a misspelt or misplaced key), and types, enums and int-or-string
quantities are checked as the API server would.
"""

from __future__ import annotations

import copy
import gzip
import sys
from functools import cache
from pathlib import Path

import jsonschema
import yaml

CLUSTER = Path(__file__).resolve().parent
CRDS = {"RayJob": CLUSTER / "crd" / "ray.io_rayjobs.v1.7.yaml.gz"}
KUBERAY_VERSION = "v1.7"


def strict(schema: dict) -> dict:
    """An OpenAPI v3 schema of a CRD as a JSON schema that rejects unknown fields."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("x-kubernetes-int-or-string"):
                node.pop("anyOf", None)
                node["type"] = ["integer", "string"]
            if node.get("nullable"):
                kind = node.get("type")
                if isinstance(kind, str):
                    node["type"] = [kind, "null"]
            preserve = node.get("x-kubernetes-preserve-unknown-fields")
            if "properties" in node and "additionalProperties" not in node and not preserve:
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@cache
def crd_schema(kind: str) -> dict:
    crd = yaml.safe_load(gzip.decompress(CRDS[kind].read_bytes()))
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return strict(version["schema"]["openAPIV3Schema"])


def errors(manifest: dict) -> list[str]:
    """Every schema violation of one manifest, as `path: message`; [] when it is valid."""
    kind = manifest.get("kind")
    if kind not in CRDS:
        return [f"kind {kind!r}: no vendored CRD (have {sorted(CRDS)})"]
    validator = jsonschema.Draft7Validator(crd_schema(kind))
    found = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in found]


def main(argv: list[str] | None = None) -> int:
    files = [Path(a) for a in (sys.argv[1:] if argv is None else argv)] or sorted(CLUSTER.glob("kuberay-*.yaml"))
    bad = 0
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            problems = errors(doc)
            bad += len(problems)
            for problem in problems:
                print(f"{path}: {problem}", file=sys.stderr)
            if not problems:
                print(f"{path}: {doc['kind']} {doc['metadata']['name']} is valid (KubeRay {KUBERAY_VERSION} CRD)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
