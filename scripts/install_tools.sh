#!/usr/bin/env bash
# System tools the test suite needs beyond the virtualenv. Idempotent and quiet: each block
# checks first and installs only what is missing. Other helpers append their own blocks.
set -euo pipefail

apt_install() {
  # apt-get as root, or through sudo when available; a clear message otherwise.
  if [ "$(id -u)" -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
  elif command -v sudo >/dev/null 2>&1; then
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
  else
    echo "install_tools: please install $* (Debian: apt-get install $*)" >&2
    return 1
  fi
}

# Headless Chromium: tests/e2e/test_report_html.py loads report.html in a real browser.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  apt_install chromium || apt_install chromium-browser || true
fi
