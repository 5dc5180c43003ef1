#!/usr/bin/env bash
# System tools the test suite needs beyond the virtualenv. Idempotent and quiet: each block
# checks first and installs only what is missing. Other helpers append their own blocks.
set -euo pipefail

apt_updated=""
apt_install() {
  # apt-get as root, or through sudo when available; a clear message otherwise. On a fresh
  # machine the package lists may be empty or stale: refresh them once, then retry.
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "install_tools: please install $* (Debian: apt-get install $*)" >&2
      return 1
    fi
  fi
  if $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1; then
    return 0
  fi
  if [ -z "$apt_updated" ]; then
    $sudo apt-get update -q >/dev/null 2>&1 || true
    apt_updated=1
  fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
}

# Headless Chromium: tests/e2e/test_report_html.py loads report.html in a real browser.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  apt_install chromium || apt_install chromium-browser || true
fi

# Redis: the test session starts its own redis-server on a free port.
if ! command -v redis-server >/dev/null 2>&1; then
  apt_install redis-server || true
fi

# Prometheus and promtool: the scrape test and the alert-rule checks.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  apt_install prometheus || true
fi

# qemu-user: tests/unit/engine/test_int8_encoding.py runs ONNX Runtime on an emulated AVX2-only
# x86 CPU (qemu-x86_64 -cpu EPYC-Rome), so int8 encodings are checked against the saturating
# kernels whatever CPU the suite runs on.
if [ "$(uname -m)" = "x86_64" ] && ! command -v qemu-x86_64 >/dev/null 2>&1; then
  apt_install qemu-user || true
fi
