#!/usr/bin/env python3
"""Validates the deployment manifests under deploy/ against schemas, offline.

  .venv/bin/python deploy/checks/validate_manifests.py [--k8s-version 1.37 ...] [FILE ...]

Needs (PyPI, pinned in .ci/run): kubernetes-validate (bundles the Kubernetes JSON schemas, so no
network is used), cloudcoil-models-keda (pydantic models generated from KEDA's CRDs).

What is checked, per kind:
  * core Kubernetes kinds (Deployment, Service, ...): the whole object against the strict schema
    (unknown fields are errors) of every --k8s-version;
  * serving.kserve.io InferenceService: metadata against ObjectMeta; each component's KServe
    fields (minReplicas, scaleMetric, ...) by type; everything else in the component is the
    inlined PodSpec and is checked against the strict core PodSpec schema (so a misspelt
    container field fails); probe ports against the container's ports;
  * keda.sh ScaledObject: against KEDA's CRD models (cloudcoil-models-keda), with fields the
    models do not know reported as errors; prometheus triggers carry serverAddress, query and
    a numeric threshold, and do not average twice (avg() query with metricType AverageValue);
  * ray.io RayService / RayCluster / RayJob: metadata, and every embedded pod template
    (headGroupSpec.template, workerGroupSpecs[].template, ...) against the strict core
    PodTemplateSpec schema; rayStartParams values are strings; serveConfigV2 is YAML text.
    No schema for the Ray CRDs themselves is available offline, so their own fields are only
    checked as listed here;
  * across files: a KEDA ScaledObject targeting an InferenceService's raw Deployment
    (<name>-predictor) agrees with it on the replica bounds.

Before the real files, negative controls run: broken copies of the manifests must be rejected,
so a pass cannot come from a checker that accepts everything. Exit status 0 when every file
passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_K8S_VERSIONS = ["1.29", "1.37"]
RAY_FILE = ROOT / "deploy" / "ray" / "rayservice.yaml"

try:
    import jsonschema
    import yaml
    from kubernetes_validate import utils as kv
    from referencing import Registry, Resource
except ImportError as e:  # pragma: no cover - environment problem, reported plainly
    print(
        f"FATAL: {e}. Install the pinned checkers: pip install kubernetes-validate==1.37.0 "
        "cloudcoil==0.6.0 cloudcoil-models-keda==2.16.1.0",
        file=sys.stderr,
    )
    sys.exit(1)


# ---------------------------------------------------------------- core schemas (offline)

_DEFS_CACHE: dict[str, Resource] = {}
_VALIDATORS: dict[tuple[str, str], Any] = {}
DEFS_ID = "https://kubernetes.io/api/_definitions.json"


def schema_version(wanted: str) -> str:
    """The bundled schema version used for `wanted` (major.minor), e.g. '1.37.0'."""
    mm = kv.major_minor(wanted.lstrip("v"))
    have = [v for v in kv.all_versions() if kv.major_minor(v) == mm]
    if not have:
        raise SystemExit(
            f"FATAL: kubernetes-validate {kv.__version__} bundles no schemas for Kubernetes {mm} "
            f"(it has {', '.join(kv.major_minor(v) for v in kv.all_versions())})"
        )
    return have[-1]


def _defs(version: str) -> Resource:
    if version not in _DEFS_CACHE:
        contents = kv.schema_contents(
            f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version
        )
        if contents.get("$id") != DEFS_ID:
            raise SystemExit(f"FATAL: unexpected schema layout in kubernetes-validate {kv.__version__}")
        _DEFS_CACHE[version] = Resource.from_contents(contents)
    return _DEFS_CACHE[version]


def definition_errors(obj: Any, definition: str, k8s: str) -> list[str]:
    """Errors of `obj` against the strict core definition (e.g. io.k8s.api.core.v1.PodSpec)."""
    version = schema_version(k8s)
    key = (version, definition)
    if key not in _VALIDATORS:
        defs = _defs(version)
        if definition not in defs.contents["$defs"]:
            raise SystemExit(f"FATAL: no definition {definition} in the Kubernetes {version} schemas")
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://kubernetes.io/api/star-deploy-check.json",
            "$ref": f"/api/_definitions.json#/$defs/{definition}",
        }
        registry = defs @ Registry()
        _VALIDATORS[key] = jsonschema.Draft202012Validator(schema, registry=registry)
    errors = sorted(_VALIDATORS[key].iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_path(e.absolute_path)}: {_message(e)}" for e in errors]


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _message(e) -> str:
    # oneOf/anyOf failures: name the branch errors, which say what was wrong.
    if e.context:
        inner = "; ".join(sorted({c.message for c in e.context}))
        return f"{e.message} ({inner})"
    return e.message


# Kubernetes resource quantities ("2", "500m", "1Gi", "1e3"): the schemas only say string/number.
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?$")
PULL_POLICIES = {"Always", "IfNotPresent", "Never"}
PROTOCOLS = {"TCP", "UDP", "SCTP"}


def container_semantics(c: dict, where: str, probe_ports_declared: bool = False) -> list[str]:
    """What the schema leaves open for a container: quantities, enums, probe ports (a named
    port must be declared; a numeric one too where `probe_ports_declared`: Kubernetes allows
    probing an undeclared port, but a single-server container's probe must hit its server)."""
    errs = []
    res = c.get("resources") or {}
    for section in ("requests", "limits"):
        for name, q in (res.get(section) or {}).items():
            if not QUANTITY.match(str(q)):
                errs.append(f"{where}.resources.{section}.{name}: {q!r} is not a Kubernetes quantity")
    req, lim = res.get("requests") or {}, res.get("limits") or {}
    for name in set(req) & set(lim):
        a, b = _quantity_value(req[name]), _quantity_value(lim[name])
        if a is not None and b is not None and a > b:
            errs.append(f"{where}.resources: request {name}={req[name]} exceeds limit {lim[name]}")
    if "imagePullPolicy" in c and c["imagePullPolicy"] not in PULL_POLICIES:
        errs.append(f"{where}.imagePullPolicy: {c['imagePullPolicy']!r} not one of {sorted(PULL_POLICIES)}")
    ports = c.get("ports") or []
    numbers = {p.get("containerPort") for p in ports}
    names = {p.get("name") for p in ports if p.get("name")}
    for i, p in enumerate(ports):
        if p.get("protocol", "TCP") not in PROTOCOLS:
            errs.append(f"{where}.ports[{i}].protocol: {p['protocol']!r} not one of {sorted(PROTOCOLS)}")
        if not isinstance(p.get("containerPort"), int) or not 0 < p["containerPort"] < 65536:
            errs.append(f"{where}.ports[{i}].containerPort: {p.get('containerPort')!r} is not a port")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        action = (c.get(probe) or {}).get("httpGet") or (c.get(probe) or {}).get("tcpSocket")
        if action is None or "port" not in action:
            continue
        port = action["port"]
        if (isinstance(port, int) and probe_ports_declared and port not in numbers) or (
            isinstance(port, str) and port not in names
        ):
            errs.append(f"{where}.{probe}: port {port!r} is none of the container's ports")
    return errs


def _quantity_value(q) -> float | None:
    m = QUANTITY.match(str(q))
    if not m:
        return None
    num = float(m.group(1))
    suffix = m.group(3) or ""
    binary = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
    decimal = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
    if suffix in binary:
        return num * binary[suffix]
    if suffix in decimal:
        return num * decimal[suffix]
    if suffix[:1] in ("e", "E"):
        return num * 10 ** int(suffix[1:])
    return num


def pod_spec_errors(spec: dict, where: str, versions: list[str], probe_ports_declared: bool = False) -> list[str]:
    errs = []
    for k8s in versions:
        errs += [f"{where}{e} [Kubernetes {k8s} PodSpec]" for e in definition_errors(spec, "io.k8s.api.core.v1.PodSpec", k8s)]
    for field in ("containers", "initContainers"):
        for i, c in enumerate(spec.get(field) or []):
            if isinstance(c, dict):
                errs += container_semantics(c, f"{where}.{field}[{i}]", probe_ports_declared)
    return errs


def metadata_errors(doc: dict, versions: list[str]) -> list[str]:
    md = doc.get("metadata")
    if not isinstance(md, dict) or not md.get("name"):
        return [".metadata.name: required"]
    errs = []
    for k8s in versions:
        errs += [
            f".metadata{e} [Kubernetes {k8s} ObjectMeta]"
            for e in definition_errors(md, "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta", k8s)
        ]
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", md["name"]) or len(md["name"]) > 63:
        errs.append(f".metadata.name: {md['name']!r} is not a DNS-1123 label")
    return errs


# ---------------------------------------------------------------- InferenceService (KServe)

def _int(minimum=None, maximum=None):
    def check(v):
        if not isinstance(v, int) or isinstance(v, bool):
            return f"{v!r} is not an integer"
        if minimum is not None and v < minimum:
            return f"{v} < {minimum}"
        if maximum is not None and v > maximum:
            return f"{v} > {maximum}"
        return None
    return check


def _str_map(v):
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        return f"{v!r} is not a map of strings to strings"
    return None


def _enum(*allowed):
    return lambda v: None if v in allowed else f"{v!r} not one of {list(allowed)}"


def _object(v):
    return None if isinstance(v, dict) else f"{v!r} is not an object"


def _str(v):
    return None if isinstance(v, str) else f"{v!r} is not a string"


# The v1beta1 component extension fields KServe adds next to the inlined PodSpec (KServe API
# reference, ComponentExtensionSpec / PredictorSpec); deploymentStrategy is checked against the
# core apps/v1 DeploymentStrategy schema below.
KSERVE_COMPONENT_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "minReplicas": _int(0),
    "maxReplicas": _int(0),
    "scaleTarget": _int(1),
    "scaleMetric": _enum("cpu", "memory", "concurrency", "rps"),
    "scaleMetricType": _enum("Utilization", "AverageValue"),
    "autoScaling": _object,
    "containerConcurrency": _int(0),
    "timeout": _int(0),
    "canaryTrafficPercent": _int(0, 100),
    "labels": _str_map,
    "annotations": _str_map,
    "logger": _object,
    "batcher": _object,
    "deploymentStrategy": _object,
    "storageUris": lambda v: None if isinstance(v, list) else f"{v!r} is not a list",
    "storageContainerName": _str,
    "workerSpec": _object,
}
# Predictor model-server shorthands: a Container plus storageUri and friends.
KSERVE_FRAMEWORKS = {
    "sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml",
    "lightgbm", "paddle", "model",
}
KSERVE_FRAMEWORK_EXTRAS = {"storageUri", "runtimeVersion", "protocolVersion", "modelFormat", "runtime", "storage"}


def check_inference_service(doc: dict, versions: list[str]) -> list[str]:
    errs = []
    if doc.get("apiVersion") != "serving.kserve.io/v1beta1":
        errs.append(f".apiVersion: {doc.get('apiVersion')!r}, expected serving.kserve.io/v1beta1")
    errs += metadata_errors(doc, versions)
    spec = doc.get("spec")
    if not isinstance(spec, dict) or "predictor" not in spec:
        return errs + [".spec.predictor: required"]
    for key in spec:
        if key not in ("predictor", "transformer", "explainer"):
            errs.append(f".spec.{key}: unknown InferenceService component")
    for comp_name in ("predictor", "transformer", "explainer"):
        comp = spec.get(comp_name)
        if comp is None:
            continue
        where = f".spec.{comp_name}"
        if not isinstance(comp, dict):
            errs.append(f"{where}: not an object")
            continue
        pod: dict = {}
        frameworks = []
        for key, value in comp.items():
            if key in KSERVE_COMPONENT_FIELDS:
                problem = KSERVE_COMPONENT_FIELDS[key](value)
                if problem:
                    errs.append(f"{where}.{key}: {problem}")
            elif comp_name == "predictor" and key in KSERVE_FRAMEWORKS:
                frameworks.append(key)
            else:
                pod[key] = value
        if isinstance(comp.get("deploymentStrategy"), dict):
            for k8s in versions:
                errs += [
                    f"{where}.deploymentStrategy{e} [Kubernetes {k8s}]"
                    for e in definition_errors(comp["deploymentStrategy"], "io.k8s.api.apps.v1.DeploymentStrategy", k8s)
                ]
        lo, hi = comp.get("minReplicas"), comp.get("maxReplicas")
        if isinstance(lo, int) and isinstance(hi, int) and hi > 0 and lo > hi:
            errs.append(f"{where}: minReplicas {lo} > maxReplicas {hi}")
        for fw in frameworks:
            c = {k: v for k, v in (comp[fw] or {}).items() if k not in KSERVE_FRAMEWORK_EXTRAS}
            c.setdefault("name", "kserve-container")
            for k8s in versions:
                errs += [f"{where}.{fw}{e} [Kubernetes {k8s} Container]" for e in definition_errors(c, "io.k8s.api.core.v1.Container", k8s)]
        if "containers" not in pod:
            if not frameworks:
                errs.append(f"{where}: neither containers nor a model-server spec")
            pod["containers"] = []
        # star-run serves everything on one port: the probes must target a declared one.
        errs += pod_spec_errors(pod, where, versions, probe_ports_declared=True)
        containers = pod.get("containers") or []
        if comp_name == "predictor" and containers and not frameworks:
            # KServe's storage initializer and its defaults target the container of this name.
            if isinstance(containers[0], dict) and containers[0].get("name") != "kserve-container":
                errs.append(f"{where}.containers[0].name: {containers[0].get('name')!r}, KServe expects 'kserve-container'")
    return errs


# ---------------------------------------------------------------- ScaledObject (KEDA)

def _unknown_fields(given: Any, kept: Any, path: str) -> list[str]:
    """Keys present in the manifest that the model dropped (pydantic ignores unknown fields)."""
    out = []
    if isinstance(given, dict):
        kept = kept if isinstance(kept, dict) else {}
        for k, v in given.items():
            if k not in kept:
                out.append(f"{path}.{k}: field not in KEDA's ScaledObject schema")
            else:
                out += _unknown_fields(v, kept[k], f"{path}.{k}")
    elif isinstance(given, list) and isinstance(kept, list):
        for i, (a, b) in enumerate(zip(given, kept)):
            out += _unknown_fields(a, b, f"{path}[{i}]")
    return out


def check_scaled_object(doc: dict, versions: list[str]) -> list[str]:
    try:
        import pydantic
        from cloudcoil.models.keda.v1alpha1 import ScaledObject
    except ImportError as e:
        return [f"cannot validate against KEDA's CRD models: {e} (pip install cloudcoil==0.6.0 cloudcoil-models-keda==2.16.1.0)"]
    errs = metadata_errors(doc, versions)
    if doc.get("apiVersion") != "keda.sh/v1alpha1":
        errs.append(f".apiVersion: {doc.get('apiVersion')!r}, expected keda.sh/v1alpha1")
    try:
        # strict: no coercion ("30" is not an integer), as the API server's schema would say.
        model = ScaledObject.model_validate(doc, strict=True)
    except pydantic.ValidationError as e:
        for item in e.errors():
            loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in item["loc"])
            errs.append(f"{loc}: {item['msg']} [KEDA ScaledObject]")
        return errs
    kept = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    errs += _unknown_fields(doc, kept, "")
    spec = doc.get("spec") or {}
    lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
        errs.append(f".spec: minReplicaCount {lo} > maxReplicaCount {hi}")
    for i, t in enumerate(spec.get("triggers") or []):
        md = t.get("metadata") or {}
        if t.get("type") == "prometheus":
            for key in ("serverAddress", "query", "threshold"):
                if not md.get(key):
                    errs.append(f".spec.triggers[{i}].metadata.{key}: required by the prometheus scaler")
            try:
                if float(md.get("threshold", "x")) <= 0:
                    errs.append(f".spec.triggers[{i}].metadata.threshold: must be > 0")
            except ValueError:
                errs.append(f".spec.triggers[{i}].metadata.threshold: {md.get('threshold')!r} is not a number")
            if not str(md.get("serverAddress", "")).startswith(("http://", "https://")):
                errs.append(f".spec.triggers[{i}].metadata.serverAddress: not an http(s) URL")
            # KEDA's default metricType AverageValue has the HPA divide the query's value by the
            # replica count: a query that already averages over the replicas is divided twice
            # (desired = ceil(avg / threshold), so the scale-out stalls at a fraction of the load).
            if t.get("metricType", "AverageValue") == "AverageValue" and re.match(r"\s*avg\s*\(", str(md.get("query", ""))):
                errs.append(
                    f".spec.triggers[{i}]: avg(...) with metricType AverageValue (the default) divides by the "
                    "replicas twice; query sum(...) for a per-replica threshold, or set metricType: Value"
                )
    return errs


# ---------------------------------------------------------------- Ray (KubeRay) CRDs

def _pod_templates(node: Any, path: str):
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{path}.{k}"
            if k == "template" and isinstance(v, dict) and isinstance(v.get("spec"), dict) and "containers" in v["spec"]:
                yield p, v
            else:
                yield from _pod_templates(v, p)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _pod_templates(v, f"{path}[{i}]")


def check_ray(doc: dict, versions: list[str]) -> list[str]:
    errs = metadata_errors(doc, versions)
    if not str(doc.get("apiVersion", "")).startswith("ray.io/"):
        errs.append(f".apiVersion: {doc.get('apiVersion')!r}, expected ray.io/v1")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return errs + [".spec: required"]
    templates = list(_pod_templates(spec, ".spec"))
    if not templates:
        errs.append(".spec: no pod template (headGroupSpec.template) found")
    for where, tpl in templates:
        for k8s in versions:
            errs += [f"{where}{e} [Kubernetes {k8s} PodTemplateSpec]" for e in definition_errors(tpl, "io.k8s.api.core.v1.PodTemplateSpec", k8s)]
        for i, c in enumerate(tpl["spec"].get("containers") or []):
            if isinstance(c, dict):
                errs += container_semantics(c, f"{where}.spec.containers[{i}]")
    cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or (spec if doc.get("kind") == "RayCluster" else {})
    groups = []
    if isinstance(cluster, dict):
        if "headGroupSpec" not in cluster:
            errs.append(".spec: headGroupSpec missing from the cluster spec")
        groups = [("headGroupSpec", cluster.get("headGroupSpec") or {})]
        groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(cluster.get("workerGroupSpecs") or [])]
    for name, g in groups:
        params = g.get("rayStartParams")
        if params is not None and _str_map(params):
            errs.append(f".{name}.rayStartParams: KubeRay requires string values: {_str_map(params)}")
        if name.startswith("worker"):
            if not isinstance(g.get("groupName"), str):
                errs.append(f".{name}.groupName: required string")
            for key in ("replicas", "minReplicas", "maxReplicas"):
                if key in g and _int(0)(g[key]):
                    errs.append(f".{name}.{key}: {_int(0)(g[key])}")
    if "serveConfigV2" in spec:
        text = spec["serveConfigV2"]
        if not isinstance(text, str):
            errs.append(".spec.serveConfigV2: must be a string (a YAML document)")
        else:
            try:
                serve = yaml.safe_load(text)
                if not isinstance(serve, dict) or not isinstance(serve.get("applications"), list):
                    errs.append(".spec.serveConfigV2: no 'applications' list")
            except yaml.YAMLError as e:
                errs.append(f".spec.serveConfigV2: not YAML: {e}")
    return errs


# ---------------------------------------------------------------- dispatch

CRD_CHECKS = {
    ("serving.kserve.io", "InferenceService"): check_inference_service,
    ("keda.sh", "ScaledObject"): check_scaled_object,
    ("ray.io", "RayService"): check_ray,
    ("ray.io", "RayCluster"): check_ray,
    ("ray.io", "RayJob"): check_ray,
}


def check_document(doc: Any, versions: list[str]) -> tuple[str, list[str]]:
    if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
        return "?", ["not a Kubernetes object (apiVersion and kind required)"]
    group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
    label = f"{doc['kind']}/{(doc.get('metadata') or {}).get('name', '?')}"
    check = CRD_CHECKS.get((group, doc["kind"]))
    if check:
        return label, check(doc, versions)
    errs = []
    for k8s in versions:
        try:
            kv.validate(doc, k8s, strict=True)
        except kv.ValidationError as e:
            errs.append(f"{_path(e.path) or '.'}: {e.message} [Kubernetes {k8s} {doc['kind']}]")
        except kv.SchemaNotFoundError:
            return label, [f"no schema for {doc['apiVersion']} {doc['kind']} (not a core kind, no CRD check here)"]
    for tpl_where, tpl in _pod_templates(doc.get("spec") or {}, ".spec"):
        for i, c in enumerate(tpl["spec"].get("containers") or []):
            errs += container_semantics(c, f"{tpl_where}.spec.containers[{i}]")
    return label, errs


def cross_checks(docs: list[dict]) -> tuple[list[str], int]:
    """Errors, and how many ScaledObject -> InferenceService pairs were compared."""
    errs = []
    pairs = 0
    isvcs = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "InferenceService"}
    for so in (d for d in docs if d.get("kind") == "ScaledObject"):
        target = ((so.get("spec") or {}).get("scaleTargetRef") or {}).get("name", "")
        isvc = isvcs.get(target.removesuffix("-predictor")) if target.endswith("-predictor") else None
        if isvc is None:
            continue
        pairs += 1
        pred = isvc["spec"]["predictor"]
        ann = (isvc.get("metadata") or {}).get("annotations") or {}
        where = f"ScaledObject/{so['metadata']['name']} -> InferenceService/{isvc['metadata']['name']}"
        if ann.get("serving.kserve.io/deploymentMode") != "RawDeployment":
            errs.append(f"{where}: KEDA scales the raw Deployment; the InferenceService is not in RawDeployment mode")
        if ann.get("serving.kserve.io/autoscalerClass") != "external":
            errs.append(f"{where}: the InferenceService's autoscalerClass is not 'external' (KServe's HPA would fight KEDA)")
        for so_key, is_key in (("minReplicaCount", "minReplicas"), ("maxReplicaCount", "maxReplicas")):
            if so_key in so["spec"] and is_key in pred and so["spec"][so_key] != pred[is_key]:
                errs.append(f"{where}: {so_key} {so['spec'][so_key]} != predictor {is_key} {pred[is_key]}")
        for t in so["spec"].get("triggers") or []:
            q = (t.get("metadata") or {}).get("query", "")
            m = re.search(r'service="([^"]+)"', q)
            if m and m.group(1) != target:
                errs.append(f"{where}: the query selects service={m.group(1)!r}, the predictor's Service is {target!r}")
    return errs, pairs


def check_files(files: list[Path], versions: list[str], explicit: bool = False) -> tuple[int, list[str]]:
    """`explicit`: the files were named on the command line, so each must be a Kubernetes object."""
    failures = 0
    lines = []
    docs_all = []
    for f in files:
        rel = f.relative_to(ROOT) if f.is_relative_to(ROOT) else f
        try:
            docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        except (OSError, yaml.YAMLError) as e:
            lines.append(f"FAIL {rel}: {e}")
            failures += 1
            continue
        if not docs:
            lines.append(f"FAIL {rel}: no YAML documents")
            failures += 1
        for doc in docs:
            if isinstance(doc, dict) and "apiVersion" not in doc and "kind" not in doc and not explicit:
                lines.append(f"skip {rel}: not a Kubernetes object (no apiVersion, no kind)")
                continue
            label, errs = check_document(doc, versions)
            if errs:
                failures += 1
                lines.append(f"FAIL {rel} {label}:")
                lines += [f"    {e}" for e in errs]
            else:
                lines.append(f"ok   {rel} {label}")
            if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict) and isinstance(doc.get("spec"), dict):
                docs_all.append(doc)
    try:
        cross, pairs = cross_checks(docs_all)
    except (KeyError, TypeError, AttributeError) as e:
        cross, pairs = [f"cross-file check could not run: {e!r}"], 0
    if cross:
        failures += 1
        lines.append("FAIL cross-file:")
        lines += [f"    {e}" for e in cross]
    elif pairs:
        lines.append(f"ok   cross-file: {pairs} ScaledObject/InferenceService pair(s) agree (target, mode, replica bounds, query's service label)")
    return failures, lines


# ---------------------------------------------------------------- negative controls

def negative_controls(files: list[Path], versions: list[str]) -> tuple[int, list[str]]:
    """Broken copies of the real documents that must fail: how many ran, and those that passed."""
    docs = []
    for f in files:
        try:
            docs += [d for d in yaml.safe_load_all(f.read_text()) if isinstance(d, dict)]
        except (OSError, yaml.YAMLError):
            pass
    by_kind = {d.get("kind"): d for d in docs}
    mutations: list[tuple[str, str, Callable[[dict], None]]] = [
        ("InferenceService", "misspelt container field", lambda d: d["spec"]["predictor"]["containers"][0].update(imagePullPolicyy="Always")),
        ("InferenceService", "port as a string", lambda d: d["spec"]["predictor"]["containers"][0]["ports"][0].update(containerPort="8080")),
        ("InferenceService", "unknown PodSpec field", lambda d: d["spec"]["predictor"].update(terminationGracePeriod=60)),
        ("InferenceService", "bad memory quantity", lambda d: d["spec"]["predictor"]["containers"][0]["resources"]["limits"].update(memory="2 GB")),
        ("InferenceService", "minReplicas as a string", lambda d: d["spec"]["predictor"].update(minReplicas="1")),
        ("ScaledObject", "misspelt spec field", lambda d: d["spec"].update(maxReplicas=8)),
        ("ScaledObject", "numeric threshold", lambda d: d["spec"]["triggers"][0]["metadata"].update(threshold=4)),
        ("ScaledObject", "no triggers", lambda d: d["spec"].pop("triggers")),
        ("RayService", "misspelt container field", lambda d: next(_pod_templates(d["spec"], ""))[1]["spec"]["containers"][0].update(imagee="x")),
        ("RayService", "numeric rayStartParams", lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"].update(rayStartParams={"num-cpus": 2})),
    ]
    survived = []
    ran = 0
    for kind, what, mutate in mutations:
        if kind not in by_kind:
            continue
        broken = copy.deepcopy(by_kind[kind])
        try:
            mutate(broken)
        except (KeyError, IndexError, TypeError, StopIteration):
            continue  # the manifest has no such field to break
        ran += 1
        _, errs = check_document(broken, versions[-1:])
        if not errs:
            survived.append(f"{kind}: {what}")
    return ran, survived


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="manifests (default: deploy/**/*.yaml)")
    ap.add_argument("--k8s-version", action="append", dest="versions",
                    help=f"Kubernetes version(s) to validate against (default: {' and '.join(DEFAULT_K8S_VERSIONS)})")
    args = ap.parse_args()
    versions = args.versions or DEFAULT_K8S_VERSIONS
    for v in versions:
        schema_version(v)
    files = [f.resolve() for f in args.files] or sorted(
        p for p in (ROOT / "deploy").rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()
    )
    print(f"kubernetes-validate {kv.__version__}: schemas {', '.join(schema_version(v) for v in versions)} (strict)")
    if not args.files and not RAY_FILE.exists():
        print(f"note: {RAY_FILE.relative_to(ROOT)} does not exist (nothing to check there)")
    if not files:
        print("FAIL: no manifests found")
        return 1
    ran, survived = negative_controls(files, versions)
    failures, lines = check_files(files, versions, explicit=bool(args.files))
    print("\n".join(lines))
    if survived:
        print("FAIL negative controls: these broken manifests were accepted:")
        print("\n".join(f"    {s}" for s in survived))
        failures += 1
    else:
        print(f"ok   negative controls: {ran} broken copies of the manifests, all rejected")
    print(f"{'FAILED' if failures else 'passed'}: {len(files)} file(s), {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
