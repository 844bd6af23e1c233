#!/usr/bin/env python3
"""Checks deploy/ offline where kubernetes-validate cannot, and against the server itself.

    scripts/validate_crds.py [FILE_OR_DIR ...]      (default: deploy/)

Prints one line per finding and exits 1 if there is any. Needs PyYAML and jsonschema
(scripts/validate_deploy.sh installs them).

1. Custom resources, strictly (a field the schema does not declare is an error: the API
   server would silently prune it, and the setting would be lost):
   - KServe's InferenceService, ClusterServingRuntime and ServingRuntime against the
     openAPIV3Schema of KServe's CRDs vendored in deploy/validation/kserve/;
   - KEDA's ScaledObject and the Prometheus Operator's ServiceMonitor and PodMonitor
     against the schemas below: no PyPI package ships those CRDs, so these are written
     from KEDA v2.20's and prometheus-operator's CRDs, for the fields our manifests use
     (a subset: a field they do not list is reported even where upstream would accept
     it; add it here).
2. Kustomizations: every resource they list exists.
3. deploy/ against the server's sources, so a renamed flag or metric fails CI here
   instead of in a cluster:
   - every `--flag` a server container passes, every RESNET_SERVE_* variable in the
     manifests and Dockerfiles, and every key of the resnet-serve.toml ConfigMap is one
     the server declares (server/commands/config/ and the rest of server/);
   - every resnet_serve_* metric in a Prometheus query is one server/process/metrics.rs exports;
   - a ScaledObject scales a Deployment defined here; a ServiceMonitor selects a Service
     here that has the port it scrapes, a PodMonitor pods that have it;
   - an InferenceService's name is a DNS-1035 label, its runtime is defined here and
     supports its model format and protocol; a serving runtime's container is
     `kserve-container`, passes `--model {{.Name}}=/mnt/models` and, for grpc-v2,
     declares a port named h2c;
   - each Dockerfile's build context is an allow-list that holds what it COPYs.
"""

from __future__ import annotations

import copy
import re
import sys
import tomllib
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
KSERVE_CRDS = ROOT / "deploy" / "validation" / "kserve"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

findings: list[str] = []


def finding(where: str, what: str) -> None:
    findings.append(f"{where}: {what}")


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# --- schemas written here (see the module docs) ------------------------------------------

DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
HPA_POLICY = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type", "value", "periodSeconds"],
    "properties": {
        "type": {"enum": ["Pods", "Percent"]},
        "value": {"type": "integer", "minimum": 1},
        "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
    },
}
HPA_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {"type": "array", "items": HPA_POLICY},
    },
}
# keda.sh/v1alpha1 ScaledObject (KEDA v2.20, config/crd/bases/keda.sh_scaledobjects.yaml),
# with the prometheus trigger's metadata keys (pkg/scalers/prometheus_scaler.go).
SCALED_OBJECT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "fallback": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["failureThreshold", "replicas"],
                    "properties": {
                        "failureThreshold": {"type": "integer", "minimum": 1},
                        "replicas": {"type": "integer", "minimum": 0},
                        "behavior": {
                            "enum": [
                                "static",
                                "currentReplicas",
                                "currentReplicasIfHigher",
                                "currentReplicasIfLower",
                            ]
                        },
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {"scaleUp": HPA_RULES, "scaleDown": HPA_RULES},
                                },
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"const": "prometheus"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]},
                                },
                            },
                            "metadata": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["serverAddress", "query", "threshold"],
                                "properties": {
                                    "serverAddress": {"type": "string", "pattern": "^https?://"},
                                    "query": {"type": "string", "minLength": 1},
                                    # KEDA parses these from strings: a YAML number here is
                                    # refused by the CRD (metadata is map[string]string).
                                    "threshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                                    "activationThreshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                                    "namespace": {"type": "string"},
                                    "ignoreNullValues": {"enum": ["true", "false"]},
                                    "unsafeSsl": {"enum": ["true", "false"]},
                                    "timeout": {"type": "string"},
                                    "authModes": {"type": "string"},
                                    "customHeaders": {"type": "string"},
                                    "queryParameters": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
# monitoring.coreos.com/v1 ServiceMonitor (prometheus-operator,
# example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml).
SERVICE_MONITOR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": DURATION,
                            "scrapeTimeout": DURATION,
                            "honorLabels": {"type": "boolean"},
                            "honorTimestamps": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": {"type": "object"}},
                            "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                },
            },
        },
    },
}


# monitoring.coreos.com/v1 PodMonitor (prometheus-operator,
# example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml).
POD_MONITOR = copy.deepcopy(SERVICE_MONITOR)
POD_MONITOR["properties"]["kind"] = {"const": "PodMonitor"}
_pm_spec = POD_MONITOR["properties"]["spec"]
_pm_spec["required"] = ["selector", "podMetricsEndpoints"]
_pm_spec["properties"]["podMetricsEndpoints"] = _pm_spec["properties"].pop("endpoints")
_pm_spec["properties"].pop("targetLabels")


# --- KServe's vendored CRDs -------------------------------------------------------------


def strict(schema):
    """The schema with every object that declares properties closed to others, and
    OpenAPI's `nullable` as JSON Schema's null type."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if schema.get("nullable") and isinstance(schema.get("type"), str):
        out["type"] = [schema["type"], "null"]
    return out


def kserve_schema(kind: str, version: str):
    plural = {
        "InferenceService": "inferenceservices",
        "ClusterServingRuntime": "clusterservingruntimes",
        "ServingRuntime": "servingruntimes",
    }[kind]
    path = KSERVE_CRDS / f"serving.kserve.io_{plural}.yaml"
    if not path.exists():
        return None, f"no vendored CRD {path.relative_to(ROOT)}"
    crd = yaml.load(path.read_text(), Loader=Loader)
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = strict(v["schema"]["openAPIV3Schema"])
            # The CRD leaves metadata open (`type: object`); check what we rely on.
            schema.setdefault("properties", {})["metadata"] = METADATA
            return schema, None
    return None, f"the vendored CRD has no version {version}"


# --- the server's own declarations ------------------------------------------------------


def server_sources() -> str:
    return "\n".join(p.read_text() for p in sorted((ROOT / "server").rglob("*.rs")))


def server_variables(src: str) -> set[str]:
    return set(re.findall(r'"(RESNET_SERVE_[A-Z0-9_]+)"', src))


def flag_variables(src: str) -> set[str]:
    """Variables clap reads for a flag (`env = "RESNET_SERVE_..."`): the config rule makes
    `--foo-bar` read RESNET_SERVE_FOO_BAR and the TOML key foo_bar."""
    return set(re.findall(r'env\s*=\s*"(RESNET_SERVE_[A-Z0-9_]+)"', src))


def server_metrics() -> set[str]:
    text = (ROOT / "server" / "process" / "metrics.rs").read_text()
    names = re.findall(
        r'(?:counter|histogram|Opts::new|IntGauge::new|Gauge::new|HistogramOpts::new)\(\s*"([a-z_]+)"',
        text,
    )
    return {"resnet_serve_" + n for n in names}


def flag_variable(flag: str) -> str:
    return "RESNET_SERVE_" + flag.upper().replace("-", "_")


# --- the checks -------------------------------------------------------------------------


def documents(paths: list[Path]):
    for path in paths:
        try:
            docs = list(yaml.load_all(path.read_text(), Loader=Loader))
        except yaml.YAMLError as e:
            finding(shown(path), f"not YAML: {e}")
            continue
        for doc in docs:
            if isinstance(doc, dict):
                yield path, doc


def validate(where: str, doc, schema) -> None:
    validator = jsonschema.Draft7Validator(schema)
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        at = "/".join(str(p) for p in error.absolute_path) or "(top)"
        finding(where, f"{at}: {error.message[:300]}")


def containers_of(doc) -> list[dict]:
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        return (spec.get("template", {}).get("spec", {}) or {}).get("containers", []) or []
    if kind in ("ClusterServingRuntime", "ServingRuntime"):
        return spec.get("containers", []) or []
    if kind == "InferenceService":
        model = (spec.get("predictor") or {}).get("model")
        return [model] if model else []
    return []


DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def main(argv: list[str]) -> int:
    targets = [Path(a).resolve() for a in argv] or [ROOT / "deploy"]
    files: list[Path] = []
    for t in targets:
        if t.is_dir():
            files += sorted(p for p in t.rglob("*.y*ml") if p.parent != KSERVE_CRDS)
        else:
            files.append(t)

    src = server_sources()
    variables = server_variables(src)
    flag_vars = flag_variables(src)
    metrics = server_metrics()
    if not flag_vars or not metrics:
        finding("scripts/validate_crds.py", "found no flags in server/ or no metrics in server/process/metrics.rs: update its patterns")

    objects: list[tuple[Path, dict]] = list(documents(files))
    by_kind: dict[str, list[tuple[Path, dict]]] = {}
    for path, doc in objects:
        by_kind.setdefault(doc.get("kind", ""), []).append((path, doc))

    def where(path: Path, doc) -> str:
        name = (doc.get("metadata") or {}).get("name", "?")
        return f"{shown(path)} {doc.get('kind')}/{name}"

    for path, doc in objects:
        w = where(path, doc)
        api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
        group, _, version = api.rpartition("/")

        # 1. custom resources
        if group == "serving.kserve.io":
            schema, problem = kserve_schema(kind, version)
            if problem:
                finding(w, problem)
            else:
                validate(w, doc, schema)
        elif kind == "ScaledObject":
            validate(w, doc, SCALED_OBJECT)
        elif kind == "ServiceMonitor":
            validate(w, doc, SERVICE_MONITOR)
        elif kind == "PodMonitor":
            validate(w, doc, POD_MONITOR)
        elif kind == "Kustomization":
            for r in list(doc.get("resources", [])) + list(doc.get("components", [])):
                target = (path.parent / r).resolve()
                if not target.exists():
                    finding(w, f"resource {r} does not exist")
                elif target.is_dir() and not (target / "kustomization.yaml").exists():
                    finding(w, f"resource {r} is a directory without a kustomization.yaml")

        # 3. flags, variables and metrics against the server
        for c in containers_of(doc):
            args = [str(a) for a in (c.get("args") or [])]
            if args and not args[0].startswith("-"):
                continue  # a subcommand (`weights download ...`): not serving flags
            for a in args:
                if a.startswith("--"):
                    flag = a[2:].split("=", 1)[0]
                    if flag_variable(flag) not in flag_vars:
                        finding(w, f"container {c.get('name')}: the server has no flag --{flag}")
            for e in c.get("env") or []:
                name = e.get("name", "")
                if name.startswith("RESNET_SERVE_") and name not in variables:
                    finding(w, f"container {c.get('name')}: the server reads no variable {name}")
        if kind == "ConfigMap":
            for key, text in (doc.get("data") or {}).items():
                if not key.endswith(".toml"):
                    continue
                try:
                    settings = tomllib.loads(text)
                except tomllib.TOMLDecodeError as e:
                    finding(w, f"{key}: not TOML: {e}")
                    continue
                for k, v in settings.items():
                    if isinstance(v, dict):
                        continue  # a table (per-model settings): its keys are the server's to check
                    if k != "models" and flag_variable(k) not in flag_vars:
                        finding(w, f"{key}: the server has no setting {k}")
        for query in queries(doc):
            for m in set(re.findall(r"\bresnet_serve_[a-z_]+", query)):
                base = re.sub(r"_(bucket|sum|count)$", "", m)
                if m not in metrics and base not in metrics:
                    finding(w, f"query uses {m}, which server/process/metrics.rs does not export")

        # 3. references between objects
        if kind == "ScaledObject":
            ref = doc.get("spec", {}).get("scaleTargetRef", {})
            if not any(d["metadata"]["name"] == ref.get("name") for _, d in by_kind.get(ref.get("kind", "Deployment"), [])):
                finding(w, f"scaleTargetRef {ref.get('kind', 'Deployment')}/{ref.get('name')} is not defined in deploy/")
        if kind == "ServiceMonitor":
            sel = doc.get("spec", {}).get("selector", {}).get("matchLabels", {})
            services = [
                d for _, d in by_kind.get("Service", [])
                if all((d["metadata"].get("labels") or {}).get(k) == v for k, v in sel.items())
            ]
            if not services:
                finding(w, "its selector matches no Service in deploy/")
            for ep in doc.get("spec", {}).get("endpoints", []):
                for s in services:
                    if not any(p.get("name") == ep.get("port") for p in s["spec"].get("ports", [])):
                        finding(w, f"Service {s['metadata']['name']} has no port {ep.get('port')}")
        if kind == "PodMonitor":
            sel = doc.get("spec", {}).get("selector", {}).get("matchLabels", {})
            pods = [
                (labels, cs) for labels, cs in pod_templates(objects)
                if all(labels.get(k) == v for k, v in sel.items())
            ]
            if not pods:
                finding(w, "its selector matches no pods of deploy/")
            for ep in doc.get("spec", {}).get("podMetricsEndpoints", []):
                for _, cs in pods:
                    if not any(p.get("name") == ep.get("port") for c in cs for p in c.get("ports") or []):
                        finding(w, f"a pod it selects has no container port {ep.get('port')}")
        if kind in ("ClusterServingRuntime", "ServingRuntime"):
            cs = doc.get("spec", {}).get("containers", [])
            if not cs or cs[0].get("name") != "kserve-container":
                finding(w, "the first container must be named kserve-container")
            if cs and not any(re.fullmatch(r"--model[= ]\{\{\s*\.Name\s*\}\}=/mnt/models", a) for a in cs[0].get("args", [])):
                finding(w, "kserve-container does not pass --model={{.Name}}=/mnt/models")
            if "grpc-v2" in doc.get("spec", {}).get("protocolVersions", []) and cs:
                if not any(p.get("name") == "h2c" for p in cs[0].get("ports", [])):
                    finding(w, "grpc-v2 needs the container port named h2c")
        if kind == "InferenceService":
            name = doc["metadata"]["name"]
            if not DNS_1035.match(name) or len(name) > 45:
                finding(w, "the name must be a DNS-1035 label short enough for KServe's '-predictor' suffixes (45 characters)")
            model = doc.get("spec", {}).get("predictor", {}).get("model", {})
            runtimes = by_kind.get("ClusterServingRuntime", []) + by_kind.get("ServingRuntime", [])
            wanted = model.get("runtime")
            fmt = (model.get("modelFormat") or {}).get("name")
            proto = model.get("protocolVersion", "v1")
            fits = [
                d for _, d in runtimes
                if (wanted is None or d["metadata"]["name"] == wanted)
                and proto in d["spec"].get("protocolVersions", ["v1"])
                and any(
                    f.get("name") == fmt and (wanted is not None or f.get("autoSelect"))
                    for f in d["spec"].get("supportedModelFormats", [])
                )
            ]
            if not fits:
                finding(w, f"no serving runtime in deploy/ serves format {fmt} over {proto}" + (f" as {wanted}" if wanted else ""))

    check_build_contexts(variables)

    for f in findings:
        print(f)
    checked = sum(1 for _, d in objects)
    print(f"validate_crds: {checked} objects in {len(files)} files, {len(findings)} findings")
    return 1 if findings else 0


def pod_templates(objects) -> list[tuple[dict, list[dict]]]:
    """(pod labels, containers) of every pod deploy/ makes: workloads' templates, and an
    InferenceService's predictor (its labels; its model container as the runtime's
    container merged with the InferenceService's fields)."""
    out = []
    for _, d in objects:
        if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            t = d.get("spec", {}).get("template", {})
            out.append(((t.get("metadata") or {}).get("labels") or {}, containers_of(d)))
        elif d.get("kind") == "InferenceService":
            p = d.get("spec", {}).get("predictor", {})
            out.append((p.get("labels") or {}, containers_of(d)))
    return out


def check_build_contexts(variables: set[str]) -> None:
    """Each deploy/Dockerfile* has an allow-list <Dockerfile>.dockerignore (`*`, then
    `!path` lines), and everything it COPYs from the context exists and is allowed: no
    Docker daemon runs here, so this is what stands in for a build's "not found"."""
    for dockerfile in sorted((ROOT / "deploy").glob("Dockerfile*")):
        if dockerfile.suffix == ".dockerignore":
            continue
        w = shown(dockerfile)
        ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
        if not ignore.exists():
            finding(w, f"no {ignore.name}: the build context would be the whole checkout (fuzz/ and target/ hold gigabytes)")
            continue
        lines = [l.strip() for l in ignore.read_text().splitlines() if l.strip() and not l.startswith("#")]
        if not lines or lines[0] != "*":
            finding(shown(ignore), "expected an allow-list: `*` first, then `!path` lines")
            continue
        allowed = [l[1:].rstrip("/") for l in lines if l.startswith("!")]
        text = re.sub(r"\\\n", " ", dockerfile.read_text())
        lines = text.splitlines()
        final = max((i for i, l in enumerate(lines) if l.split()[:1] == ["FROM"]), default=0)
        for at, line in enumerate(lines):
            words = line.split()
            # The final stage's variables are the server's (the build stages' are the
            # build scripts').
            if words and words[0].upper() == "ENV" and at > final:
                for name in re.findall(r"\b(RESNET_SERVE_[A-Z0-9_]+)=", line):
                    if name not in variables:
                        finding(w, f"ENV {name}: the server reads no such variable")
            if not words or words[0].upper() != "COPY" or any(x.startswith("--from") for x in words):
                continue
            for source in [x for x in words[1:-1] if not x.startswith("--")]:
                source = source.rstrip("/")
                if not (ROOT / source).exists():
                    finding(w, f"COPY {source}: not in the repository")
                elif not any(source == a or source.startswith(a + "/") for a in allowed):
                    finding(w, f"COPY {source}: excluded by {ignore.name}")


def queries(doc) -> list[str]:
    """The Prometheus queries an object holds (KEDA triggers, KServe's autoscaling)."""
    out = []
    if doc.get("kind") == "ScaledObject":
        for t in doc.get("spec", {}).get("triggers", []):
            q = (t.get("metadata") or {}).get("query")
            if q:
                out.append(q)
    if doc.get("kind") == "InferenceService":
        for m in ((doc.get("spec", {}).get("predictor", {}).get("autoScaling") or {}).get("metrics") or []):
            q = ((m.get("external") or {}).get("metric") or {}).get("query")
            if q:
                out.append(q)
    return out


# --- smoke test: the manifests' arguments against a built server ---------------------


def write_resnet18(path: Path) -> None:
    """A resnet18-shaped safetensors checkpoint (zero convolutions, identity batch-norm):
    enough for the server to detect the architecture, load and serve."""
    import json
    import struct

    tensors: list[tuple[str, list[int], bytes]] = []

    def zeros(name, shape):
        n = 1
        for d in shape:
            n *= d
        tensors.append((name, shape, bytes(4 * n)))

    def bn(name, c):
        tensors.append((name + ".weight", [c], struct.pack(f"<{c}f", *[1.0] * c)))
        zeros(name + ".bias", [c])
        zeros(name + ".running_mean", [c])
        tensors.append((name + ".running_var", [c], struct.pack(f"<{c}f", *[1.0] * c)))

    zeros("conv1.weight", [64, 3, 7, 7])
    bn("bn1", 64)
    cin = 64
    for layer, c in enumerate([64, 128, 256, 512], 1):
        for block in range(2):
            p = f"layer{layer}.{block}."
            i = cin if block == 0 else c
            zeros(p + "conv1.weight", [c, i, 3, 3])
            bn(p + "bn1", c)
            zeros(p + "conv2.weight", [c, c, 3, 3])
            bn(p + "bn2", c)
            if block == 0 and i != c:
                zeros(p + "downsample.0.weight", [c, i, 1, 1])
                bn(p + "downsample.1", c)
        cin = c
    zeros("fc.weight", [1000, 512])
    zeros("fc.bias", [1000])
    header, offset = {}, 0
    for name, shape, data in tensors:
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for _, _, data in tensors:
            f.write(data)


def smoke(server: Path) -> int:
    """Starts `server` as each pod of deploy/ would start it (the CPU Deployment with its
    ConfigMap, the KServe runtime with an InferenceService's name and /mnt/models), its
    model directory holding a resnet18-shaped checkpoint, on loopback ports; checks
    /livez answers 200 at once, /readyz turns 200, and after SIGTERM /readyz says 503
    or the server has exited, within the drain."""
    import os
    import signal
    import socket
    import subprocess
    import tempfile
    import time
    import urllib.error
    import urllib.request

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def status(url: str) -> int:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def run(label: str, args: list[str], env: dict[str, str]) -> None:
        grpc, metrics = free_port(), free_port()
        env = {**os.environ, **env, "RESNET_SERVE_LISTEN": f"127.0.0.1:{grpc}",
               "RESNET_SERVE_METRICS_LISTEN": f"127.0.0.1:{metrics}"}
        # Flags win over the environment: the loopback addresses replace the pods'.
        args = [a for a in args if not a.startswith(("--listen=", "--metrics-listen="))]
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen([str(server), *args], env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{metrics}"
        try:
            deadline = time.monotonic() + 120
            live = ready = 0
            while time.monotonic() < deadline and proc.poll() is None:
                live, ready = status(base + "/livez"), status(base + "/readyz")
                if ready == 200:
                    break
                time.sleep(0.2)
            if ready != 200 or live != 200:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-1500:]
                finding(f"smoke {label}", f"/livez {live}, /readyz {ready} (exit {proc.poll()}): {tail}")
                return
            proc.send_signal(signal.SIGTERM)
            drained = False
            for _ in range(150):
                if proc.poll() is not None or status(base + "/readyz") == 503:
                    drained = True
                    break
                time.sleep(0.2)
            if not drained:
                finding(f"smoke {label}", "after SIGTERM, /readyz still not 503 and the server still running")
            proc.wait(timeout=60)
            print(f"smoke {label}: /livez 200, /readyz 200 after loading, draining on SIGTERM, exit {proc.returncode}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    objects = list(documents(sorted((ROOT / "deploy").rglob("*.yaml"))))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The CPU Deployment: its args and literal env, the ConfigMap as its --config file.
        for path, doc in objects:
            if doc.get("kind") != "Deployment" or path.parent.name != "cpu":
                continue
            spec = doc["spec"]["template"]["spec"]
            c = spec["containers"][0]
            mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            args = [str(a) for a in c.get("args", [])]
            for name, mount in mounts.items():
                local = tmp / "deployment" / name
                vol = volumes.get(name, {})
                if "configMap" in vol:
                    cm = next(d for _, d in objects if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == vol["configMap"]["name"])
                    local.mkdir(parents=True)
                    for key, text in cm["data"].items():
                        (local / key).write_text(text)
                args = [a.replace(mount, str(local)) for a in args]
                for a in args:
                    m = re.match(r"--model=[^=]+=(.*)", a)
                    if m and m.group(1).startswith(str(local)):
                        Path(m.group(1)).mkdir(parents=True, exist_ok=True)
                        write_resnet18(Path(m.group(1)) / "model.safetensors")
            env = {e["name"]: str(e["value"]) for e in c.get("env", []) if "value" in e}
            env.setdefault("RESNET_SERVE_COMPUTE_THREADS", "2")  # limits.cpu, via the Downward API
            run(f"{shown(path)}", args, env)
        # The KServe runtime, as an InferenceService of deploy/kserve/ makes it.
        for path, doc in objects:
            if doc.get("kind") != "ClusterServingRuntime":
                continue
            isvc = next((d for _, d in objects if d.get("kind") == "InferenceService"), None)
            name = isvc["metadata"]["name"] if isvc else "resnet50-swsl"
            c = doc["spec"]["containers"][0]
            mnt = tmp / "kserve" / "mnt-models"
            mnt.mkdir(parents=True)
            write_resnet18(mnt / "model.safetensors")
            args = [re.sub(r"\{\{\s*\.Name\s*\}\}", name, str(a)).replace("/mnt/models", str(mnt)) for a in c.get("args", [])]
            env = {e["name"]: str(e["value"]) for e in c.get("env", []) if "value" in e}
            run(f"{shown(path)} as {name}", args, env)
    for f in findings:
        print(f)
    return 1 if findings else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--smoke"] and len(sys.argv) == 3:
        sys.exit(smoke(Path(sys.argv[2]).resolve()))
    sys.exit(main(sys.argv[1:]))
