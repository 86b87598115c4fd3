#!/bin/sh
# The browser the playground's tests drive (tests/test_playground.py): the distribution's Chromium, since Playwright's
# own browser downloads are not reachable everywhere. Installs it with apt when it is missing (through sudo unless
# root); does nothing when it is there. Debian names the package chromium; Ubuntu chromium-browser.
set -e
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi
$SUDO apt-get update -q
$SUDO apt-get install -y -q chromium || $SUDO apt-get install -y -q chromium-browser
