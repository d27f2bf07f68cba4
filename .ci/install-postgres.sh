#!/usr/bin/env bash
# PostgreSQL server binaries for the fleet tests and benchmark (Debian's packages). The tests
# start their own throwaway cluster with initdb/pg_ctl on a free port (tests/host/fleet/server/pgcluster.py):
# nothing here starts a server, and the packaged cluster, if any, is stopped so it does not hold
# port 5432 for nothing. Idempotent: does nothing when initdb is already there.
set -euo pipefail
have_initdb() {
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1
}
if ! have_initdb; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  # the package starts a cluster on 5432 where systemd/policy-rc.d allow it; tests do not use it
  if command -v pg_lsclusters >/dev/null 2>&1; then
    pg_lsclusters --no-header 2>/dev/null | while read -r ver name _; do
      $SUDO pg_ctlcluster "$ver" "$name" stop >/dev/null 2>&1 || true
    done
  fi
fi
# PostgreSQL refuses to run as root: as root the tests run the server as the 'postgres' user
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  echo "error: running as root, but there is no 'postgres' user to run the test cluster" >&2
  exit 1
fi
ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -1
