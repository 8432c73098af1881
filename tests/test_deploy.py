"""The deployment checks themselves: the Pod Security checker that `make k8s-validate` runs."""
import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("pod_security", ROOT / "deploy" / "k8s" / "pod_security.py")
pod_security = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pod_security)


def _violations(manifest: str) -> list[str]:
    docs = list(yaml.safe_load_all(manifest))
    return [v for name, pod in pod_security.pod_specs(docs) for v in pod_security.violations(name, pod)]


def test_the_base_deployments_pass_and_a_loose_one_fails():
    for name in ("receiver", "sender"):
        assert _violations((ROOT / "deploy" / "k8s" / "base" / f"{name}.yaml").read_text()) == []
    loose = """
kind: Deployment
metadata: {name: loose}
spec:
  template:
    spec:
      hostNetwork: true
      securityContext: {runAsUser: 0}
      volumes: [{name: h, hostPath: {path: /}}]
      containers:
        - name: c
          securityContext: {capabilities: {add: [SYS_ADMIN]}}
          ports: [{containerPort: 80, hostPort: 80}]
"""
    found = "\n".join(_violations(loose))
    for words in ("hostNetwork", "hostPath", "runAsNonRoot", "uid 0", "seccompProfile", "allowPrivilegeEscalation",
                  "drop does not hold ALL", "SYS_ADMIN", "hostPort", "readOnlyRootFilesystem", "startupProbe"):
        assert words in found, words
