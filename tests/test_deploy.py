"""Deployment files, validated offline: KubeRay manifests against the CRDs' OpenAPI schemas (strict:
an unknown field is an error, not silently pruned), built-in kinds with kubernetes-validate, the
Ray cluster launcher YAML against Ray's schema, and the references between them."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
CRDS = REPO.parent / "shared" / "schemas" / "kuberay"
K8S_VERSION = "1.33.0"


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def strict(schema: dict) -> dict:
    """The schema with additionalProperties: false wherever it lists properties and allows no others."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schema(kind: str, version: str) -> dict:
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            for v in crd["spec"]["versions"]:
                if v["name"] == version:
                    schema = v["schema"]["openAPIV3Schema"]
                    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by Kubernetes
                    return strict(schema)
    raise AssertionError(f"no CRD for {kind} {version} in {CRDS}")


def test_every_manifest_validates():
    docs = documents()
    kinds = sorted({d["kind"] for _, d in docs})
    assert {"RayCluster", "StatefulSet", "Secret", "Service", "Deployment"} <= set(kinds), kinds
    for name, doc in docs:
        group, _, version = doc["apiVersion"].rpartition("/")
        if group == "ray.io":
            try:
                jsonschema.validate(doc, crd_schema(doc["kind"], version))
            except jsonschema.ValidationError as e:
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.absolute_path)}")
        else:
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")


def test_the_strict_check_catches_a_misspelt_field():
    (doc,) = [d for _, d in documents() if d["kind"] == "RayCluster"]
    bad = copy.deepcopy(doc)
    bad["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        jsonschema.validate(bad, crd_schema("RayCluster", "v1"))
    (redis,) = [d for _, d in documents() if d["kind"] == "StatefulSet"]
    bad = copy.deepcopy(redis)
    bad["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_manifests_agree_with_each_other_and_the_code():
    docs = documents()
    secrets = {d["metadata"]["name"]: set(d.get("stringData", {})) for _, d in docs if d["kind"] == "Secret"}
    text = "\n".join(p.read_text() for p in K8S.glob("*.yaml"))
    for name, key in re.findall(r"secretKeyRef: \{name: ([\w-]+), key: ([\w-]+)\}", text):
        assert key in secrets.get(name, set()), f"secret {name} has no key {key}"
    (cluster,) = [d for _, d in docs if d["kind"] == "RayCluster"]
    assert cluster["spec"]["rayVersion"] == ray.__version__
    assert "auth_token" in secrets[cluster["spec"]["authOptions"]["secretName"]]
    groups = cluster["spec"]["workerGroupSpecs"]
    assert all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in groups)
    gpu = next(g for g in groups if "num-gpus" in g["rayStartParams"])
    assert json.loads(json.loads(gpu["rayStartParams"]["resources"])) == {"editstream_replica": 1}
    (redis,) = [d for _, d in docs if d["kind"] == "StatefulSet"]
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and "--requirepass" in args
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert f"RAY_VERSION={ray.__version__}" in dockerfile
    for src in re.findall(r"^COPY --chown=\S+ (.+) \S+$", dockerfile, re.M):
        for item in src.split():
            assert (REPO / item).exists(), f"Dockerfile copies {item}, which is not in the repo"


def test_cluster_launcher_yaml_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert any(t["resources"].get("GPU") and t["resources"].get("editstream_replica") for t in types.values())
