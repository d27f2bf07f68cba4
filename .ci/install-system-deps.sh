#!/usr/bin/env bash
# System packages the test suite and demo use: a real Mosquitto broker (and its clients for the
# transfer benchmark's baseline), and Java for the PMML tests' reference evaluator. Idempotent: does nothing when they are already there.
set -euo pipefail
need=()
command -v mosquitto >/dev/null 2>&1 || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v java >/dev/null 2>&1 || need+=(default-jre-headless)
if [ "${EDGEPACK_BROWSER:-1}" = 1 ]; then
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
fi
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The Debian package starts a system broker on 1883; tests start their own on free ports.
mosquitto -h 2>&1 | head -1 || true
