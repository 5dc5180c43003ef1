"""Deployment artefacts: the Dockerfile, the kustomize tree, the dashboard and the alert rules.

The tool checks run the steps of ``scripts/validate_deploy.sh`` (kustomize render, strict
Kubernetes schemas, checkov, hadolint, promtool) as subprocesses and assert each passes; the
structural checks read the rendered manifests and assert what no generic tool knows: probes on
the service's health endpoints, the worker's command and grace period against the job time
limits, selectors and references that resolve, and metric names that the service exports.

The first run on a fresh machine installs the validators (``validate_deploy.sh tools``: a pip
virtualenv and Debian's ``prometheus`` for promtool), which takes a minute or two; afterwards
the module runs in about 20 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "validate_deploy.sh"
K8S = ROOT / "k8s"
MONITORING = K8S / "monitoring"
OVERLAYS = ("dev", "prod", "prod-cpu-hpa")

# The metric names fixed by the service contract (service/metrics.py); the dashboard and the
# alert rules may use these and nothing else.
CONTRACT_METRICS = {
    "edgepress_http_requests_total",
    "edgepress_http_request_duration_seconds",
    "edgepress_jobs_submitted_total",
    "edgepress_jobs_finished_total",
    "edgepress_job_duration_seconds",
    "edgepress_compression_ratio",
    "edgepress_queue_depth",
    "edgepress_worker_jobs_in_progress",
    "edgepress_worker_busy_seconds_total",
    "edgepress_job_stage_seconds",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "inf",
    "nan",
}

Obj = dict[str, Any]


# -- helpers --------------------------------------------------------------------------------


def run_step(
    *steps: str, render_dir: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``validate_deploy.sh STEP...`` with its render directory at ``render_dir``."""
    env = dict(os.environ, EDGEPRESS_RENDER_DIR=str(render_dir))
    return subprocess.run(  # noqa: S603 - fixed script
        ["bash", str(SCRIPT), *steps],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (histogram suffixes kept).

    Strings, label matchers, range selectors and grouping clauses are removed first; what is
    left that looks like an identifier and is not a function call or a keyword is a metric.
    """
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        token = match.group(0)
        if e[match.end() :].lstrip().startswith("(") or token.lower() in PROMQL_KEYWORDS:
            continue
        names.add(token)
    return names


def base_metric(name: str) -> str:
    """``x_bucket``/``x_sum``/``x_count`` -> ``x`` when ``x`` is a contract histogram."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in CONTRACT_METRICS:
            return name[: -len(suffix)]
    return name


def dashboard_targets() -> list[tuple[str, str]]:
    dashboard = json.loads((MONITORING / "edgepress-dashboard.json").read_text())

    def walk(panels: list[Obj]) -> Iterator[Obj]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    return [
        (panel["title"], target["expr"])
        for panel in walk(dashboard["panels"])
        for target in panel.get("targets", [])
    ]


def alert_rules() -> list[Obj]:
    groups = yaml.safe_load((MONITORING / "edgepress-rules.yaml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def find(objs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(workload: Obj) -> Obj:
    return workload["spec"]["template"]["spec"]


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def config_data(objs: list[Obj]) -> dict[str, str]:
    maps = [
        o for o in find(objs, "ConfigMap") if o["metadata"]["name"].startswith("edgepress-config")
    ]
    assert len(maps) == 1
    return maps[0]["data"]


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tools() -> None:
    proc = run_step("tools", render_dir=ROOT / "build" / "unused", timeout=900)
    if proc.returncode != 0:
        pytest.fail("validate_deploy.sh tools failed:\n" + output(proc)[-4000:])


@pytest.fixture(scope="module")
def render_dir(tools: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every overlay rendered once for this module, in a private directory."""
    directory = tmp_path_factory.mktemp("deploy-render")
    proc = run_step("render", render_dir=directory)
    assert proc.returncode == 0, output(proc)
    return directory


@pytest.fixture(scope="module")
def rendered(render_dir: Path) -> dict[str, list[Obj]]:
    return {
        path.stem: [o for o in yaml.safe_load_all(path.read_text()) if o]
        for path in sorted(render_dir.glob("*.yaml"))
    }


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def dockerfile_stages(text: str) -> dict[str, str]:
    """Stage name -> its instructions (continuation lines joined)."""
    joined = re.sub(r"\\\n", " ", text)
    stages: dict[str, str] = {}
    current = None
    for line in joined.splitlines():
        match = re.match(r"^FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = match.group(1)
            stages[current] = ""
        elif current and line.strip() and not line.lstrip().startswith("#"):
            stages[current] += line.strip() + "\n"
    return stages


# -- the tools ------------------------------------------------------------------------------


def test_every_overlay_renders(rendered: dict[str, list[Obj]]) -> None:
    assert set(rendered) == {*OVERLAYS, "monitoring"}
    for overlay in OVERLAYS:
        kinds = {o["kind"] for o in rendered[overlay]}
        assert {
            "Deployment",
            "Service",
            "Ingress",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "ConfigMap",
            "NetworkPolicy",
            "ServiceMonitor",
            "PodMonitor",
            "ServiceAccount",
        } <= kinds, overlay
    for overlay in ("dev", "prod"):
        assert find(rendered[overlay], "ScaledObject", "edgepress-worker"), overlay
    # Without KEDA: a CPU HPA for the workers and no KEDA object left behind.
    fallback = rendered["prod-cpu-hpa"]
    assert not find(fallback, "ScaledObject") and not find(fallback, "TriggerAuthentication")
    assert (
        one(fallback, "HorizontalPodAutoscaler", "edgepress-worker")["spec"]["scaleTargetRef"][
            "name"
        ]
        == "edgepress-worker"
    )
    assert {o["kind"] for o in rendered["monitoring"]} == {"ConfigMap", "PrometheusRule"}


def test_schemas_accept_every_rendered_object(render_dir: Path) -> None:
    proc = run_step("schemas", render_dir=render_dir)
    assert proc.returncode == 0, output(proc)
    assert re.search(r"\d+ objects checked, 0 failing", proc.stdout), proc.stdout


def test_schemas_reject_typos(render_dir: Path, tmp_path: Path) -> None:
    """The schema step is strict: an unknown field in a built-in kind or in a CRD fails."""
    objs = [o for o in yaml.safe_load_all((render_dir / "prod.yaml").read_text()) if o]
    one(objs, "Deployment", "edgepress-api")["spec"]["template"]["spec"]["containers"][0][
        "livenesProbe"
    ] = {"httpGet": {"path": "/healthz", "port": "http"}}
    one(objs, "ScaledObject", "edgepress-worker")["spec"]["minReplicas"] = 1
    (tmp_path / "prod.yaml").write_text(yaml.safe_dump_all(objs))
    proc = run_step("schemas", render_dir=tmp_path)
    assert proc.returncode != 0
    assert "livenesProbe" in proc.stdout and "minReplicas" in proc.stdout, proc.stdout


def test_prod_overlays_fail_closed(render_dir: Path) -> None:
    proc = run_step("auth", render_dir=render_dir)
    assert proc.returncode == 0, output(proc)
    assert "prod: checked" in proc.stdout and "prod-cpu-hpa: checked" in proc.stdout


def _api_container(objs: list[Obj]) -> Obj:
    return pod_spec(one(objs, "Deployment", "edgepress-api"))["containers"][0]


def _drop_keys_file(objs: list[Obj]) -> None:
    c = _api_container(objs)
    c["env"] = [e for e in c["env"] if e["name"] != "EDGEPRESS_API_KEYS_FILE"]


def _say_open(objs: list[Obj]) -> None:
    config = next(o for o in objs if o["kind"] == "ConfigMap"
                  and o["metadata"]["name"].startswith("edgepress-config"))
    config["data"]["EDGEPRESS_AUTH"] = "open"


def _optional_secret(objs: list[Obj]) -> None:
    for volume in pod_spec(one(objs, "Deployment", "edgepress-api"))["volumes"]:
        if "secret" in volume:
            volume["secret"]["optional"] = True


def _keys_file_outside_the_secret(objs: list[Obj]) -> None:
    for e in _api_container(objs)["env"]:
        if e["name"] == "EDGEPRESS_API_KEYS_FILE":
            e["value"] = "/tmp/keys.json"


def _route_everything(objs: list[Obj]) -> None:
    paths = one(objs, "Ingress", "edgepress-api")["spec"]["rules"][0]["http"]["paths"]
    paths[0]["path"] = "/"


def _route_metrics(objs: list[Obj]) -> None:
    paths = one(objs, "Ingress", "edgepress-api")["spec"]["rules"][0]["http"]["paths"]
    paths.append({**paths[0], "path": "/metrics", "pathType": "Exact"})


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_drop_keys_file, "no API keys from a Secret"),
        (_say_open, "EDGEPRESS_AUTH=open"),
        (_optional_secret, "not in a mounted (non-optional) Secret"),
        (_keys_file_outside_the_secret, "not in a mounted (non-optional) Secret"),
        (_route_everything, "routes / (Prefix)"),
        (_route_metrics, "routes /metrics (Exact)"),
    ],
)
def test_auth_step_fails_an_open_prod_overlay(
    render_dir: Path, tmp_path: Path, mutate: Any, message: str
) -> None:
    objs = [o for o in yaml.safe_load_all((render_dir / "prod.yaml").read_text()) if o]
    mutate(objs)
    (tmp_path / "prod.yaml").write_text(yaml.safe_dump_all(objs))
    proc = run_step("auth", render_dir=tmp_path)
    assert proc.returncode != 0, output(proc)
    assert message in proc.stdout, proc.stdout


@pytest.mark.slow
def test_checkov_finds_no_failing_check(render_dir: Path) -> None:
    proc = run_step("checkov", render_dir=render_dir)
    assert proc.returncode == 0, output(proc)[-6000:]
    assert "Failed checks: 0" in proc.stdout


def test_checkov_exceptions_are_justified() -> None:
    skips = []
    for path in K8S.rglob("*.yaml"):
        for match in re.finditer(r"checkov\.io/skip\d+:\s*(.+)", path.read_text()):
            skips.append((path.name, match.group(1)))
    assert skips
    for name, value in skips:
        check, _, reason = value.partition("=")
        assert re.fullmatch(r"CKV2?_K8S_\d+", check), (name, value)
        # checkov splits on "=": a second one breaks its parser.
        assert "=" not in reason and len(reason) >= 30, (name, value)


def test_hadolint_passes() -> None:
    proc = run_step("hadolint", render_dir=ROOT / "build" / "unused")
    assert proc.returncode == 0, output(proc)


def test_promtool_checks_rules_tests_and_dashboard_queries() -> None:
    proc = run_step("promtool", render_dir=ROOT / "build" / "unused")
    assert proc.returncode == 0, output(proc)
    assert "SUCCESS: 6 rules found" in proc.stdout
    assert re.search(r"SUCCESS: \d+ rules found", proc.stdout.split("dashboard queries")[-1])


# -- the workloads --------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_is_hardened_probed_and_sized(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    workloads = [o for o in rendered[overlay] if o["kind"] in ("Deployment", "Job")]
    assert workloads
    for workload in workloads:
        name = f"{overlay}: {workload['kind']}/{workload['metadata']['name']}"
        spec = pod_spec(workload)
        pod_sc = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, name
        for container in spec["containers"]:
            sc = container.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, name
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) >= 10000, name
            assert sc.get("readOnlyRootFilesystem") is True, name
            assert sc.get("allowPrivilegeEscalation") is False, name
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), (name, bound)
            if workload["kind"] == "Deployment":
                assert "livenessProbe" in container and "readinessProbe" in container, name
        if workload["metadata"]["labels"].get("app.kubernetes.io/name") == "edgepress":
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for container in spec["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
                assert "emptyDir" in volumes[mounts["/tmp"]], name
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                if "PROMETHEUS_MULTIPROC_DIR" in env:
                    # Multiprocess metrics need a writable directory that is empty at start.
                    assert "emptyDir" in volumes[mounts[env["PROMETHEUS_MULTIPROC_DIR"]]], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_contract(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = rendered[overlay]
    api = one(objs, "Deployment", "edgepress-api")
    (container,) = pod_spec(api)["containers"]
    assert container["command"] == [
        "gunicorn",
        "-c",
        "service/api/gunicorn_conf.py",
        "service.api:create_app()",
    ]
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["EDGEPRESS_BIND"] == "0.0.0.0:8080"
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # preStop + gunicorn's graceful_timeout (30 s) fit in the grace period.
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod_spec(api)["terminationGracePeriodSeconds"] >= sleep + 30


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_contract_and_graceful_shutdown(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objs = rendered[overlay]
    worker = one(objs, "Deployment", "edgepress-worker")
    assert "replicas" not in worker["spec"], "the autoscaler owns the replica count"
    (container,) = pod_spec(worker)["containers"]
    assert container["command"] == [
        "celery",
        "-A",
        "service.worker.entry",
        "worker",
        "--loglevel=INFO",
        "--concurrency=1",
        "--prefetch-multiplier=1",
        "-Q",
        "edgepress.jobs",
    ]
    config = config_data(objs)
    port = int(config["EDGEPRESS_WORKER_METRICS_PORT"])
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in container["ports"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    soft, hard = (
        int(config["EDGEPRESS_JOB_SOFT_TIME_LIMIT"]),
        int(config["EDGEPRESS_JOB_TIME_LIMIT"]),
    )
    assert soft < hard
    # Celery's own hard limit on the task is the job limit + 180 s (limits_for in
    # service/config.py); the grace period lets a running job finish within it.
    assert pod_spec(worker)["terminationGracePeriodSeconds"] >= hard + 180


@pytest.mark.parametrize("overlay", ("dev", "prod"))
def test_keda_scales_the_worker_on_the_celery_queue(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objs = rendered[overlay]
    scaled = one(objs, "ScaledObject", "edgepress-worker")
    target = scaled["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment" and one(objs, "Deployment", target["name"])
    assert scaled["spec"]["minReplicaCount"] >= 1  # the NoWorkers alert treats 0 as an outage
    triggers = {t["type"]: t for t in scaled["spec"]["triggers"]}
    redis = triggers["redis"]
    assert redis["metadata"]["listName"] == "edgepress.jobs"
    auth = one(objs, "TriggerAuthentication", redis["authenticationRef"]["name"])
    assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {"address", "password"}
    query = triggers["prometheus"]["metadata"]["query"]
    assert {base_metric(n) for n in promql_metric_names(query)} == {
        "edgepress_worker_jobs_in_progress",
        "edgepress_queue_depth",
    }
    assert f'namespace="{scaled["metadata"]["namespace"]}"' in query
    # Nothing else autoscales the worker at the same time.
    assert not [
        h
        for h in find(objs, "HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] == "edgepress-worker"
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_and_targets_resolve(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = rendered[overlay]
    deployments = {d["metadata"]["name"]: d for d in find(objs, "Deployment")}
    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    for name, deployment in deployments.items():
        assert labels_match(deployment["spec"]["selector"]["matchLabels"], pod_labels[name])
    for hpa in find(objs, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    for pdb in find(objs, "PodDisruptionBudget"):
        selected = [
            n
            for n, lab in pod_labels.items()
            if labels_match(pdb["spec"]["selector"]["matchLabels"], lab)
        ]
        assert selected == [pdb["metadata"]["name"]], pdb["metadata"]["name"]

    api_labels = pod_labels["edgepress-api"]
    service = one(objs, "Service", "edgepress-api")
    assert labels_match(service["spec"]["selector"], api_labels)
    ingress = one(objs, "Ingress", "edgepress-api")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "edgepress-api"
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}

    monitor = one(objs, "ServiceMonitor", "edgepress-api")
    assert labels_match(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
        p["name"] for p in service["spec"]["ports"]
    }
    pod_monitor = one(objs, "PodMonitor", "edgepress-worker")
    assert labels_match(
        pod_monitor["spec"]["selector"]["matchLabels"], pod_labels["edgepress-worker"]
    )
    worker_ports = {
        p["name"] for p in pod_spec(deployments["edgepress-worker"])["containers"][0]["ports"]
    }
    assert {e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]} <= worker_ports

    # Every EdgePress pod is isolated by a NetworkPolicy that admits its serving port.
    policies = find(objs, "NetworkPolicy")
    for name in ("edgepress-api", "edgepress-worker"):
        covering = [
            p
            for p in policies
            if labels_match(p["spec"]["podSelector"]["matchLabels"], pod_labels[name])
        ]
        assert covering, name
        container = pod_spec(deployments[name])["containers"][0]
        allowed = {
            port["port"]
            for p in covering
            for rule in p["spec"].get("ingress", [])
            for port in rule.get("ports", [])
        }
        assert {p["containerPort"] for p in container["ports"]} <= allowed, name
        assert all({"Ingress", "Egress"} <= set(p["spec"]["policyTypes"]) for p in covering)


def _referenced_secrets(objs: list[Obj]) -> dict[str, set[str]]:
    refs: dict[str, set[str]] = {}
    for workload in [o for o in objs if o["kind"] in ("Deployment", "Job")]:
        for container in pod_spec(workload)["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.setdefault(ref["name"], set()).add(ref["key"])
    for auth in find(objs, "TriggerAuthentication"):
        for ref in auth["spec"]["secretTargetRef"]:
            refs.setdefault(ref["name"], set()).add(ref["key"])
    return refs


def test_dev_references_resolve_to_generated_objects(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["dev"]
    secrets = {s["metadata"]["name"]: s for s in find(objs, "Secret")}
    for name, keys in _referenced_secrets(objs).items():
        assert name in secrets, name
        assert keys <= set(secrets[name]["data"]), name
    config = {c["metadata"]["name"] for c in find(objs, "ConfigMap")}
    for workload in [o for o in objs if o["kind"] in ("Deployment", "Job")]:
        for container in pod_spec(workload)["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config
    assert config_data(objs)["EDGEPRESS_S3_ENDPOINT_URL"] == "http://seaweedfs:8333"


def test_prod_commits_no_secret_and_documents_the_ones_it_needs(
    rendered: dict[str, list[Obj]],
) -> None:
    objs = rendered["prod"]
    assert not find(objs, "Secret"), "prod must not ship secrets (they would be overwritten)"
    instructions = (K8S / "overlays" / "prod" / "kustomization.yaml").read_text()
    for name, keys in _referenced_secrets(objs).items():
        assert f"create secret generic {name}" in instructions, name
        for key in keys:
            assert f"--from-literal={key}=" in instructions, (name, key)
    tls = one(objs, "Ingress", "edgepress-api")["spec"]["tls"][0]["secretName"]
    assert f"create secret tls {tls}" in instructions


# -- the image ------------------------------------------------------------------------------


def test_dockerfile_targets_pins_and_users(dockerfile: str) -> None:
    stages = dockerfile_stages(dockerfile)
    assert {"base", "build-api", "build-worker", "runtime", "api", "worker"} <= set(stages)
    assert re.search(r"^FROM python:\d+\.\d+\.\d+-slim-\w+ AS base", dockerfile, re.MULTILINE)

    # The API environment has neither torch nor onnxruntime; the worker's torch is the CPU one.
    assert not re.search(r"\b(torch|onnxruntime)\b", stages["build-api"])
    assert "COPY --from=build-api /opt/venv" in stages["api"]
    assert "COPY --from=build-worker /opt/venv" in stages["worker"]
    assert re.search(
        r"--index-url https://download\.pytorch\.org/whl/cpu torch==2\.13\.0",
        stages["build-worker"],
    )

    # Every dependency of pyproject.toml is pinned (==) in the stage that installs it.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def pinned(stage: str) -> set[str]:
        return {m.lower() for m in re.findall(r'"?([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==[\w.]+', stage)}

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower() for r in requirements}

    assert names(project["dependencies"]) <= pinned(stages["build-api"])
    assert names(project["optional-dependencies"]["worker"]) <= pinned(stages["build-worker"])

    for target, port, path in (("api", 8080, "/healthz"), ("worker", 9808, "/metrics")):
        stage = stages[target]
        assert re.search(r"^USER 10001:10001$", stage, re.MULTILINE), target
        assert f"127.0.0.1:{port}{path}" in stage and "HEALTHCHECK" in stage, target
    assert (
        'CMD ["gunicorn", "-c", "service/api/gunicorn_conf.py", "service.api:create_app()"]'
        in stages["api"]
    )
    assert '"-A", "service.worker.entry", "worker"' in stages["worker"]


def test_dockerignore_admits_exactly_what_the_build_copies(dockerfile: str) -> None:
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: everything is excluded unless named"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied: set[str] = set()
    for args in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.MULTILINE):
        parts = [p for p in args.split() if not p.startswith("--")]
        copied.update(p.rstrip("/").removeprefix("./") for p in parts[:-1])
    assert copied == allowed
    for path in copied:
        assert (ROOT / path).exists(), path


# -- monitoring -----------------------------------------------------------------------------


def test_contract_metrics_are_what_the_service_exports() -> None:
    from service.metrics import QueueDepthCollector, ServiceMetrics

    families = {f.name for f in ServiceMetrics().registry.collect()}
    families |= {f.name for f in QueueDepthCollector(lambda: 0).collect()}
    exported = {n + "_total" if n + "_total" in CONTRACT_METRICS else n for n in families}
    assert exported >= CONTRACT_METRICS


def test_dashboard_uses_only_contract_metrics_and_covers_them() -> None:
    targets = dashboard_targets()
    used = set()
    for title, expr in targets:
        names = promql_metric_names(expr)
        assert names, (title, expr)
        for name in names:
            assert base_metric(name) in CONTRACT_METRICS, (title, name)
        used |= {base_metric(n) for n in names}
    assert used == CONTRACT_METRICS
    titles = " | ".join(t for t, _ in targets).lower()
    for topic in (
        "request rate",
        "latency",
        "error",
        "queue",
        "throughput",
        "duration",
        "outcomes",
        "compression ratio",
        "utilisation",
    ):
        assert topic in titles, topic


def test_metric_name_extraction_is_not_vacuous() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(foo_bucket{route!~"/v1/(x|y)"}[5m])))'
        " / on(job) group_left(pod) bar_total and up offset 5m"
    )
    assert promql_metric_names(expr) == {"foo_bucket", "bar_total", "up"}


def test_alert_rules_cover_the_incidents_and_use_contract_metrics() -> None:
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert {
        "EdgePressQueueBacklogGrowing",
        "EdgePressJobFailureRatioHigh",
        "EdgePressApiLatencyP99High",
        "EdgePressNoWorkers",
    } <= names
    for rule in rules:
        metrics = {base_metric(n) for n in promql_metric_names(rule["expr"])}
        assert metrics and metrics <= CONTRACT_METRICS, (rule["alert"], metrics)
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_prometheusrule_carries_the_tested_rules() -> None:
    rules = yaml.safe_load((MONITORING / "edgepress-rules.yaml").read_text())
    wrapped = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert wrapped["kind"] == "PrometheusRule"
    assert wrapped["spec"]["groups"] == rules["groups"]


def test_validate_script_fails_on_an_unknown_step() -> None:
    assert shutil.which("bash")
    proc = run_step("no-such-step", render_dir=ROOT / "build" / "unused", timeout=30)
    assert proc.returncode != 0 and "unknown step" in proc.stderr


def _mib(quantity: str) -> int:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 * 1024}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity) // (1024 * 1024)


@pytest.mark.parametrize("overlay", ("dev", "prod"))
def test_memory_limits_of_jobs_and_inspections_fit_their_pods(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    # What the service lets its children use (the settings as the pods get them) must be
    # below the pod's limit, or the OOM killer acts before our own limits do.
    from service.config import Settings

    objs = rendered[overlay]
    config = config_data(objs)
    settings = Settings(**{k[len("EDGEPRESS_"):].lower(): v for k, v in config.items()
                           if k.startswith("EDGEPRESS_")})
    overhead = 512  # MiB: Celery's main + pool process (~200), gunicorn's master + a worker
    (worker,) = pod_spec(one(objs, "Deployment", "edgepress-worker"))["containers"]
    assert settings.job_memory_limit_mb + overhead <= _mib(worker["resources"]["limits"]["memory"])
    (api,) = pod_spec(one(objs, "Deployment", "edgepress-api"))["containers"]
    inspections = settings.api_workers * settings.inspect_concurrency
    assert (inspections * settings.inspect_memory_limit_mb + overhead
            <= _mib(api["resources"]["limits"]["memory"]))
