#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine, then run it.
#   - Debian packages: postfix (the real downstream, and smtp-sink/smtp-source for the
#     benchmark), dnsmasq-base (the tests' own DNS server), openssl (test certificates), swaks,
#     prometheus (promtool for deploy/prometheus and deploy/grafana, and a live scrape)
#     clamav-daemon, spamd and rspamd (the content scanners)
#   - a virtualenv .venv with relayproxy and its test dependencies
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
# haproxy and redis-server: the PROXY protocol and shared-state tests start their own
command -v /usr/sbin/haproxy >/dev/null || need+=(haproxy)
command -v /usr/bin/redis-server >/dev/null || need+=(redis-server)
command -v /usr/sbin/postfix >/dev/null || need+=(postfix)
command -v /usr/sbin/dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v openssl >/dev/null || need+=(openssl)
command -v swaks >/dev/null || need+=(swaks)
# promtool (alerting rules, dashboard queries) and prometheus (scrapes a live proxy)
command -v promtool >/dev/null || need+=(prometheus)
# content scanners, run by the tests as private daemons on loopback (none starts by itself)
[ -x /usr/sbin/clamd ] || need+=(clamav-daemon)
[ -x /usr/sbin/spamd ] || need+=(spamd)
[ -x /usr/bin/rspamd ] || need+=(rspamd)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "tests/run.sh: missing ${need[*]}; run as root (apt-get) or install them" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # No MTA configuration: the tests run their own private Postfix on loopback ports.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get -o DPkg::Lock::Timeout=120 update -q
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q -e '.[test]'

.venv/bin/ruff check relayproxy tests
.venv/bin/mypy --strict relayproxy
exec .venv/bin/python -m pytest -q "$@"
