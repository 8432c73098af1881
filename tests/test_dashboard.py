"""The Grafana dashboard (deploy/grafana/dashboards/qkvcomm.json) against the live pair: every
series a panel reads is one the services export, and every panel follows the service and instance
variables (Prometheus labels each target with `service`; deploy/prometheus/prometheus.yml)."""
import json
import re
import urllib.request
from pathlib import Path

from conftest import ask

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "qkvcomm.json").read_text())


def _exported(port: int) -> set[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_every_panel_reads_series_the_services_export_and_follows_the_variables(services):
    ask(services.sender, "The museum opens at 9:30. Entry costs 12 euros.", "How much is entry?", codec="kivi-4")
    exported = _exported(services.receiver_metrics) | _exported(services.sender_metrics)
    assert {v["name"] for v in DASHBOARD["templating"]["list"]} == {"service", "instance"}
    titles = [p["title"] for p in DASHBOARD["panels"]]
    for wanted in ("Requests by method and status", "Error ratio by method", "Codec auto: choices"):
        assert wanted in titles
    for panel in DASHBOARD["panels"]:
        for target in panel["targets"]:
            selectors = re.findall(r"(qkvcomm_[a-z0-9_]+)\{([^}]*)\}", target["expr"])
            assert selectors, (panel["title"], target["expr"])
            for name, matchers in selectors:
                assert 'service=~"$service"' in matchers and 'instance=~"$instance"' in matchers, panel["title"]
                family = re.sub(r"_(bucket|sum|count)$", "", name)
                assert name in exported or family in exported, f"{panel['title']}: {name} is not exported"
