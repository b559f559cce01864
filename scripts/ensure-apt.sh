#!/bin/sh
# Installs one Debian package that a test needs: `ensure-apt.sh COMMAND PACKAGE WHAT-NEEDS-IT`.
# Idempotent: does nothing when COMMAND is already on PATH (or GEODE_SKIP_APT is set). Installs
# with apt-get only where that is possible (root, apt-get present), as in CI on a fresh machine;
# otherwise it says so. Never fails `make test` by itself: the tests that need the command report
# its absence (they fail with CI=true).
cmd=$1 pkg=$2 why=$3
if [ -n "${GEODE_SKIP_APT:-}" ] || command -v "$cmd" >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure-apt: installing Debian's $pkg (apt-get) for $why"
    export DEBIAN_FRONTEND=noninteractive
    if { apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null; }; } \
        && command -v "$cmd" >/dev/null 2>&1; then
        exit 0
    fi
    echo "ensure-apt: apt-get could not install $pkg; $why will fail (CI) or skip" >&2
else
    echo "ensure-apt: no $cmd on PATH and not root with apt-get, so not installing $pkg:" \
        "$why will fail (CI) or skip. Install it with 'sudo apt-get install $pkg'." >&2
fi
exit 0
