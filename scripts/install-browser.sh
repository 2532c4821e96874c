#!/usr/bin/env bash
# Debian's Chromium and chromedriver for the browser test (tests/test_playground.py); `make test` runs this.
# Idempotent: does nothing when both are installed. Without root it only says what to install, so a
# developer's `make test` still runs (the browser test then skips; under CI it fails instead).
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: the browser test needs /usr/bin/chromium and /usr/bin/chromedriver;" \
         "install them as root: apt-get install chromium chromium-driver" >&2
    exit 0
fi
echo "install-browser: installing chromium and chromium-driver with apt-get" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
