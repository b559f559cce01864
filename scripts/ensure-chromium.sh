#!/bin/sh
# Debian's chromium for tests/serve/test_browser.py (Python playwright drives it through
# executable_path; no browser is downloaded). Does nothing when GEODE_CHROMIUM names a binary or
# a chromium-browser is there; otherwise installs Debian's chromium as scripts/ensure-apt.sh does.
if [ -n "${GEODE_CHROMIUM:-}" ] || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
exec sh "$(dirname "$0")/ensure-apt.sh" chromium chromium "tests/serve/test_browser.py"
