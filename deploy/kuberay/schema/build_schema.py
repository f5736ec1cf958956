"""Writes kuberay-v1.schema.json: a JSON Schema (2020-12) for the RayCluster and RayJob
manifests of deploy/kuberay/, strict like a KubeRay CRD under `kubectl apply`'s strict field
validation (an unknown or misspelled field is an error).

Why not KubeRay's CRD files themselves: no package this project can install ships them (not
the `ray` wheel; no KubeRay package on PyPI), and they are large (700 kB of YAML for the
RayCluster CRD even in an early release), mostly the Kubernetes pod template they embed. The
schema is built the way the CRDs are generated (controller-gen: KubeRay's Go API types around
the Kubernetes core types they embed), from two sources:

- KubeRay's own fields: `KUBERAY_DEFS` below, written field by field from KubeRay's Go API
  types (Apache-2.0), `ray-operator/apis/ray/v1/raycluster_types.go` at commit 3275ee09 and
  `rayjob_types.go` at commit 0057210e of ray-project/kuberay (recent ones; which release
  each is in was not checked): the same JSON names, types, enums and required fields (a
  field without `omitempty` or `+optional`). KubeRay's defaults and CEL rules are not
  checked; fields a later KubeRay adds are refused until added here.
- The Kubernetes core types they embed (PodTemplateSpec, Service, ResourceRequirements,
  EnvVar, ...): Kubernetes v1.33's OpenAPI schema as converted to strict JSON Schema by the
  `kubernetes-validate` package (1.37.0, Apache-2.0, `v1.33.0-local-strict/_definitions.json`;
  IntOrString and Quantity are its `oneOf` of string and number), only the definitions these
  reach (and PersistentVolumeClaim and Pod, for storage.yaml), with every `description`
  removed: 100 kB instead of 1.5 MB for all 707 definitions, and nothing that validates is
  removed.

Regenerate (needs the package, which the project does not depend on):
    uv run --with kubernetes-validate==1.37.0 python deploy/kuberay/schema/build_schema.py
"""

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("kuberay-v1.schema.json")
K8S_VERSION = "v1.33.0"
CORE = "io.k8s.api.core.v1."
META = "io.k8s.apimachinery.pkg.apis.meta.v1."


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/$defs/{name}"}


def obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A Go struct: its JSON fields, nothing else."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = list(required)
    return schema


EXTRA_CORE_ROOTS = (CORE + "PersistentVolumeClaim", CORE + "Pod")
"""Core types validated on their own: deploy/kuberay/storage.yaml's claim and loader pod."""

INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
BOOL = {"type": "boolean"}
STRING = {"type": "string"}
NUMBER = {"type": "number"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
MANAGED_BY = {"type": "string", "enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]}
DELETION_POLICY = obj(
    {
        "policy": {
            "type": "string",
            "enum": ["DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"],
        }
    },
    required=("policy",),
)


def resource(kind: str) -> dict[str, Any]:
    """A ray.io/v1 object of `kind`, whose spec is the definition `<kind>Spec`."""
    return obj(
        {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": ref(META + "ObjectMeta"),
            "spec": ref(f"{kind}Spec"),
        },
        required=("apiVersion", "kind", "metadata", "spec"),
    )


KUBERAY_DEFS: dict[str, Any] = {
    "RayCluster": resource("RayCluster"),
    "RayJob": resource("RayJob"),
    "RayClusterSpec": obj(
        {
            "suspend": BOOL,
            "managedBy": MANAGED_BY,
            "autoscalerOptions": ref("AutoscalerOptions"),
            "headServiceAnnotations": STRING_MAP,
            "enableInTreeAutoscaling": BOOL,
            "gcsFaultToleranceOptions": ref("GcsFaultToleranceOptions"),
            "headGroupSpec": ref("HeadGroupSpec"),
            "rayVersion": STRING,
            "workerGroupSpecs": {"type": "array", "items": ref("WorkerGroupSpec")},
        },
        required=("headGroupSpec",),
    ),
    "GcsFaultToleranceOptions": obj(
        {
            "redisUsername": ref("RedisCredential"),
            "redisPassword": ref("RedisCredential"),
            "externalStorageNamespace": STRING,
            "redisAddress": STRING,
        },
        required=("redisAddress",),
    ),
    "RedisCredential": obj({"valueFrom": ref(CORE + "EnvVarSource"), "value": STRING}),
    "HeadGroupSpec": obj(
        {
            "template": ref(CORE + "PodTemplateSpec"),
            "headService": ref(CORE + "Service"),
            "enableIngress": BOOL,
            "rayStartParams": STRING_MAP,
            "serviceType": STRING,
        },
        required=("template", "rayStartParams"),
    ),
    "WorkerGroupSpec": obj(
        {
            "suspend": BOOL,
            "groupName": STRING,
            "replicas": INT32,
            "minReplicas": INT32,
            "maxReplicas": INT32,
            "idleTimeoutSeconds": INT32,
            "rayStartParams": STRING_MAP,
            "template": ref(CORE + "PodTemplateSpec"),
            "scaleStrategy": obj({"workersToDelete": {"type": "array", "items": STRING}}),
            "numOfHosts": INT32,
        },
        required=("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"),
    ),
    "AutoscalerOptions": obj(
        {
            "resources": ref(CORE + "ResourceRequirements"),
            "image": STRING,
            "imagePullPolicy": STRING,
            "securityContext": ref(CORE + "SecurityContext"),
            "idleTimeoutSeconds": INT32,
            "upscalingMode": {"type": "string", "enum": ["Default", "Aggressive", "Conservative"]},
            "env": {"type": "array", "items": ref(CORE + "EnvVar")},
            "envFrom": {"type": "array", "items": ref(CORE + "EnvFromSource")},
            "volumeMounts": {"type": "array", "items": ref(CORE + "VolumeMount")},
        }
    ),
    "RayJobSpec": obj(
        {
            "activeDeadlineSeconds": INT32,
            "backoffLimit": INT32,
            "rayClusterSpec": ref("RayClusterSpec"),
            "submitterPodTemplate": ref(CORE + "PodTemplateSpec"),
            "metadata": STRING_MAP,
            "clusterSelector": STRING_MAP,
            "submitterConfig": obj({"backoffLimit": INT32}),
            "managedBy": MANAGED_BY,
            "deletionStrategy": obj(
                {"onSuccess": DELETION_POLICY, "onFailure": DELETION_POLICY},
                required=("onSuccess", "onFailure"),
            ),
            "entrypoint": STRING,
            "runtimeEnvYAML": STRING,
            "jobId": STRING,
            "submissionMode": {
                "type": "string",
                "enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"],
            },
            "entrypointResources": STRING,
            "entrypointNumCpus": NUMBER,
            "entrypointNumGpus": NUMBER,
            "ttlSecondsAfterFinished": INT32,
            "shutdownAfterJobFinishes": BOOL,
            "suspend": BOOL,
            "schedule": STRING,
        }
    ),
}


def without_descriptions(schema: Any) -> Any:
    """The schema less its `description` annotations (a property named so is kept)."""
    if isinstance(schema, list):
        return [without_descriptions(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    kept = {}
    for key, value in schema.items():
        if key == "description" and isinstance(value, str):
            continue
        if key == "properties":
            kept[key] = {name: without_descriptions(sub) for name, sub in value.items()}
        else:
            kept[key] = without_descriptions(value)
    return kept


def referenced(schema: Any) -> set[str]:
    """The `#/$defs/NAME` names `schema` refers to."""
    found: set[str] = set()
    if isinstance(schema, dict):
        target = schema.get("$ref")
        if isinstance(target, str) and target.startswith("#/$defs/"):
            found.add(target.removeprefix("#/$defs/"))
        for value in schema.values():
            found |= referenced(value)
    elif isinstance(schema, list):
        for item in schema:
            found |= referenced(item)
    return found


def core_definitions() -> dict[str, Any]:
    folder = files("kubernetes_validate") / "kubernetes-json-schema" / f"{K8S_VERSION}-local-strict"
    return json.loads((folder / "_definitions.json").read_text())["$defs"]


def build() -> dict[str, Any]:
    core = core_definitions()
    defs = dict(KUBERAY_DEFS)
    pending = (referenced(KUBERAY_DEFS) | set(EXTRA_CORE_ROOTS)) - set(defs)
    while pending:
        name = pending.pop()
        defs[name] = without_descriptions(core[name])
        pending |= referenced(defs[name]) - set(defs)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (
            "Generated by deploy/kuberay/schema/build_schema.py, which says where each part "
            "comes from: KubeRay's ray.io/v1 RayCluster and RayJob fields (from KubeRay's Go "
            "API types, Apache-2.0) and the Kubernetes " + K8S_VERSION + " core types they "
            "embed (Kubernetes' OpenAPI schema via kubernetes-validate 1.37.0, Apache-2.0, "
            "descriptions removed). Do not edit by hand."
        ),
        "$defs": dict(sorted(defs.items())),
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(build(), indent=1, sort_keys=False) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
