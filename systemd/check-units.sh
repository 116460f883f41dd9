#!/usr/bin/env bash
# Checks the systemd units: `systemd-analyze verify` passes and `systemd-analyze security --offline=yes` scores
# each at most 2.0 ("OK"). Run by `make check` where systemd-analyze exists; skipped (and says so) elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "systemd-analyze not found: unit checks skipped"
  exit 0
fi
venv_bin="$PWD/.venv/bin"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for unit in systemd/edge-agent.service systemd/edge-fleet.service; do
  name=$(basename "$unit")
  # verify needs ExecStart= to exist: point it at this checkout's venv, nothing else changes.
  sed -e "s#/opt/edge-agent/venv/bin/#$venv_bin/#" -e "s#/opt/edge-fleet/venv/bin/#$venv_bin/#" "$unit" > "$scratch/$name"
  systemd-analyze verify "$scratch/$name"
  score=$(systemd-analyze security --offline=yes "$unit" 2>/dev/null | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
  if ! systemd-analyze security --offline=yes --threshold=20 "$unit" >/dev/null 2>&1; then
    echo "$name: exposure $score is above 2.0"
    exit 1
  fi
  echo "$name: verify ok, exposure $score (at most 2.0)"
done
