#!/bin/sh
# Debian's chromium for tests/serve/test_browser.py (Python playwright drives it through
# executable_path; no browser is downloaded). Idempotent: does nothing when a chromium is
# already there. Installs it with apt-get only where that is possible (root, apt-get present),
# as in CI on a fresh machine; otherwise it says so and the browser test skips (fails with
# CI=true). Never fails `make test` by itself: the test reports a missing browser.
if [ -n "${GEODE_CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1 \
    || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: installing Debian's chromium (apt-get) for the headless browser test"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null \
        && command -v chromium >/dev/null 2>&1; then
        exit 0
    fi
    echo "ensure-chromium: apt-get could not install chromium;" \
        "tests/serve/test_browser.py will skip (or fail with CI=true)" >&2
else
    echo "ensure-chromium: no chromium on PATH and not root with apt-get, so not installing it:" \
        "tests/serve/test_browser.py will skip (or fail with CI=true)." \
        "Install it with 'sudo apt-get install chromium' or set GEODE_CHROMIUM." >&2
fi
exit 0
