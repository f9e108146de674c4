#!/usr/bin/env bash
# What the page tests need beyond the test extra's Python packages (playwright included):
# Debian's Chromium (Playwright's own browser download needs internet).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if ! command -v chromium >/dev/null; then
    SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo "sudo")
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq chromium
fi

