#!/usr/bin/env python3
"""Checks deploy/ without a container engine (none runs on the development
machine): every file parses; the compose file has Kafka in KRaft mode,
PostgreSQL with the settings docs/operations.md asks for, Traitline split by role, Prometheus and Grafana; the
Kubernetes manifests have one Deployment per role with probes and a
grace period past the shutdown deadline, and autoscalers on CPU (ingest)
and lag (process); every Traitline metric the dashboard, the autoscaler
or the adapter rule names is one the code exports (src/metrics.rs); and,
when docker-compose or `docker compose` is installed, that it accepts the
compose file.

    python3 deploy/check.py
"""
import json
import pathlib
import re
import shutil
import subprocess
import sys

try:
    import yaml
except ImportError:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "pyyaml"], check=True)
    import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent
ROOT = DEPLOY.parent
problems = []


def check(condition, message):
    if not condition:
        problems.append(message)


exported = set(re.findall(r'"(traitline_[a-z_]+)"', (ROOT / "src/metrics.rs").read_text()))
check(len(exported) >= 10, f"src/metrics.rs names only {sorted(exported)}")


def known(metric):
    base = re.sub(r"_(bucket|sum|count)$", "", metric)
    return metric in exported or base in exported


def metrics_in(text):
    return set(re.findall(r"\btraitline_[a-z_]+", text))


# Compose.
compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
services = compose["services"]
for name in ["kafka", "postgres", "traitline-ingest", "traitline-process", "traitline-query", "prometheus", "grafana", "jaeger"]:
    check(name in services, f"compose: no service {name}")
check(not any("zookeeper" in n for n in services), "compose: ZooKeeper is not needed (KRaft)")
postgres_command = " ".join(services["postgres"].get("command", []))
for setting in ["shared_buffers=", "max_wal_size=", "checkpoint_timeout=", "wal_buffers="]:
    check(setting in postgres_command, f"compose: PostgreSQL does not set {setting.rstrip('=')}")
check("synchronous_commit=off" not in postgres_command, "compose: synchronous_commit=off republishes outputs after a crash")
kafka_env = services["kafka"]["environment"]
check("controller" in kafka_env.get("KAFKA_PROCESS_ROLES", ""), "compose: Kafka is not in KRaft mode")
for role, replicas in [("ingest", 2), ("process", 2), ("query", 1)]:
    service = services[f"traitline-{role}"]
    check(service["environment"].get("TRAITLINE_ROLES") == role, f"compose: traitline-{role} does not run role {role}")
    check(service.get("deploy", {}).get("replicas", 1) == replicas, f"compose: traitline-{role} needs {replicas} replicas")
    check("TRAITLINE_KAFKA_BROKERS" in service["environment"], f"compose: traitline-{role} has no Kafka")
    check(service["environment"].get("TRAITLINE_OTLP_ENDPOINT", "").startswith("http://jaeger:4318"), f"compose: traitline-{role} does not send spans to Jaeger")
prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
scraped = prometheus["scrape_configs"][0]["dns_sd_configs"][0]["names"]
check(set(scraped) == {"traitline-ingest", "traitline-process", "traitline-query"}, f"prometheus scrapes {scraped}")
for path in (DEPLOY / "grafana/provisioning").rglob("*.yml"):
    yaml.safe_load(path.read_text())

# The dashboard.
dashboard = json.loads((DEPLOY / "grafana/dashboards/traitline.json").read_text())
check(dashboard.get("uid") == "traitline" and dashboard["panels"], "dashboard: no uid or no panels")
titles = " ".join(p["title"].lower() for p in dashboard["panels"])
for topic in ["events stored", "latency", "lag", "rejected"]:
    check(topic in titles, f"dashboard: no panel about {topic}")
for panel in dashboard["panels"]:
    for target in panel["targets"]:
        for metric in metrics_in(target["expr"]):
            check(known(metric), f"dashboard panel {panel['title']!r}: {metric} is not exported")

# Kubernetes.
manifests = list(yaml.safe_load_all((DEPLOY / "k8s/traitline.yaml").read_text()))
kinds = {(d["kind"], d["metadata"]["name"]): d for d in manifests}
for role in ["ingest", "process", "query"]:
    deployment = kinds.get(("Deployment", f"traitline-{role}"))
    check(deployment is not None, f"k8s: no Deployment traitline-{role}")
    if deployment:
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        check(env.get("TRAITLINE_ROLES") == role, f"k8s: traitline-{role} does not run role {role}")
        check(container["readinessProbe"]["httpGet"]["path"] == "/readyz", f"k8s: traitline-{role} readiness")
        check(container["livenessProbe"]["httpGet"]["path"] == "/healthz", f"k8s: traitline-{role} liveness")
        check(pod["terminationGracePeriodSeconds"] > 30, f"k8s: traitline-{role} grace period is not past the 30 s shutdown deadline")
        check(deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items(), f"k8s: traitline-{role} selector does not match its pods")
hpa_ingest = kinds.get(("HorizontalPodAutoscaler", "traitline-ingest"))
hpa_process = kinds.get(("HorizontalPodAutoscaler", "traitline-process"))
check(hpa_ingest and hpa_ingest["spec"]["metrics"][0]["resource"]["name"] == "cpu", "k8s: ingest does not scale on CPU")
check(hpa_process and hpa_process["spec"]["metrics"][0]["pods"]["metric"]["name"] == "traitline_processor_lag_records", "k8s: process does not scale on lag")
for hpa in [hpa_ingest, hpa_process]:
    if hpa:
        target = hpa["spec"]["scaleTargetRef"]["name"]
        check(("Deployment", target) in kinds, f"k8s: {hpa['metadata']['name']} targets no Deployment {target}")
adapter = (DEPLOY / "k8s/prometheus-adapter-rules.yaml").read_text()
yaml.safe_load(adapter)
for metric in metrics_in(json.dumps(manifests)) | metrics_in(adapter):
    check(known(metric), f"k8s: {metric} is not exported")

# The Dockerfile builds the binary and runs it as a non-root user.
dockerfile = (DEPLOY / "Dockerfile").read_text()
check(dockerfile.count("FROM ") == 2, "Dockerfile: not two stages")
check("USER traitline" in dockerfile, "Dockerfile: runs as root")

# The compose tool itself, when there is one.
for tool in (["docker-compose"], ["docker", "compose"]):
    if shutil.which(tool[0]) and subprocess.run(tool + ["version"], capture_output=True).returncode == 0:
        result = subprocess.run(tool + ["-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True)
        check(result.returncode == 0, f"{' '.join(tool)} config: {result.stderr.strip()}")
        print(f"{' '.join(tool)} config: accepted")
        break
else:
    print("no docker-compose here: the compose file was checked as YAML only")

if problems:
    print("deploy/ has problems:")
    for problem in problems:
        print(f"  - {problem}")
    sys.exit(1)
print(f"deploy/ checked: compose ({len(services)} services), dashboard ({len(dashboard['panels'])} panels), {len(manifests)} Kubernetes objects")
