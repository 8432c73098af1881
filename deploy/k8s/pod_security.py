"""Check rendered manifests against Pod Security "restricted", plus this project's own rules.

    python deploy/k8s/pod_security.py build/k8s-cpu.yaml ...   (make k8s-validate runs it)

Restricted (https://kubernetes.io/docs/concepts/security/pod-security-standards/): no host
namespaces, ports or paths; only the allowed volume types; non-root; seccomp RuntimeDefault or
Localhost; no privilege escalation; capabilities dropped (ALL; only NET_BIND_SERVICE may be
added); not privileged. This project also requires a read-only root filesystem and a startup
probe on every container. Prints each violation; exits 1 if there is any.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                   "secret"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


def pod_specs(docs: list[dict]) -> Iterator[tuple[str, dict]]:
    for doc in docs:
        kind = doc.get("kind")
        name = f"{kind}/{doc.get('metadata', {}).get('name')}"
        if kind == "Pod":
            yield name, doc["spec"]
        elif kind in WORKLOADS:
            yield name, doc["spec"]["template"]["spec"]
        elif kind == "CronJob":
            yield name, doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def violations(name: str, spec: dict) -> Iterator[str]:
    pod = spec.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            yield f"{name}: {field} is set"
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            yield (f"{name}: volume {volume['name']} is of a type restricted does not allow: "
                   f"{sorted(kinds - ALLOWED_VOLUMES)}")
    for container in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        where = f"{name} container {container['name']}"
        sc = container.get("securityContext") or {}
        if not sc.get("runAsNonRoot", pod.get("runAsNonRoot")):
            yield f"{where}: runAsNonRoot is not true"
        if sc.get("runAsUser", pod.get("runAsUser")) == 0:
            yield f"{where}: runs as uid 0"
        seccomp = (sc.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            yield f"{where}: seccompProfile.type is {seccomp!r}, not RuntimeDefault or Localhost"
        if sc.get("allowPrivilegeEscalation") is not False:
            yield f"{where}: allowPrivilegeEscalation is not false"
        if sc.get("privileged"):
            yield f"{where}: privileged"
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            yield f"{where}: capabilities.drop does not hold ALL"
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            yield f"{where}: adds capabilities {sorted(set(caps['add']) - {'NET_BIND_SERVICE'})}"
        if any(port.get("hostPort") for port in container.get("ports") or []):
            yield f"{where}: uses a hostPort"
        if not sc.get("readOnlyRootFilesystem"):
            yield f"{where}: readOnlyRootFilesystem is not true (this project's rule)"
        if container in (spec.get("containers") or []) and "startupProbe" not in container:
            yield f"{where}: has no startupProbe (this project's rule)"


def check(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        for name, spec in pod_specs(docs):
            found += [f"{path}: {v}" for v in violations(name, spec)]
    return found


def main(argv: list[str]) -> int:
    found = check([Path(p) for p in argv])
    for line in found:
        print(line, file=sys.stderr)
    if not found:
        print(f"pod security restricted: {len(argv)} file(s) pass")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
