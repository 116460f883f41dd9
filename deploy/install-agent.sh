#!/usr/bin/env bash
# install-agent.sh — install (or --uninstall) edge-agent on a Debian, Ubuntu or Raspberry Pi OS device.
#
#   sudo deploy/install-agent.sh [--bundle device.bundle [--reenroll]] [--source DIR|WHEEL] [--root DIR] [--no-start]
#   sudo deploy/install-agent.sh --uninstall [--purge] [--root DIR]
#
# What it does (idempotent: running it again changes nothing that is already right):
#   - a system user and group `edge-agent` (no login, home /var/lib/edge-agent);
#   - a venv under /opt/edge-agent/venv with edgefleet installed from --source (default: this checkout);
#   - /etc/edge-agent/agent.toml (written only if absent; mode 0640, group edge-agent);
#   - the hardened unit /etc/systemd/system/edge-agent.service, enabled (and started unless --no-start);
#   - with --bundle: the enrollment bundle from `edge-fleet device enroll` applied (once: the same bundle again is
#     a no-op; a different one is refused unless --reenroll, which drops the old identity's unsent messages).
# --uninstall stops and removes the unit and /opt/edge-agent; --purge also removes the state, the config and
# the user. --root DIR installs into a throwaway root (tests): no systemctl, users written under DIR/etc.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
source_dir=$(cd "$here/.." && pwd)
root=""
bundle=""
uninstall=0
purge=0
start=1
reenroll=0
python=${PYTHON:-python3}

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "install-agent: $*" >&2; exit 1; }
say() { echo "install-agent: $*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) bundle=$(realpath "$2"); shift 2 ;;
    --source) source_dir=$(realpath "$2"); shift 2 ;;
    --root) root=$(realpath "$2"); shift 2 ;;
    --no-start) start=0; shift ;;
    --reenroll) reenroll=1; shift ;;
    --uninstall) uninstall=1; shift ;;
    --purge) purge=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[ "$(id -u)" = 0 ] || die "run as root (it creates a system user and installs a systemd unit)"
opt="$root/opt/edge-agent"
etc="$root/etc/edge-agent"
state="$root/var/lib/edge-agent"
unit="$root/etc/systemd/system/edge-agent.service"
use_systemctl=0
if [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then use_systemctl=1; fi
prefix_args=()
[ -n "$root" ] && prefix_args=(--prefix "$root")

if [ "$uninstall" = 1 ]; then
  if [ "$use_systemctl" = 1 ]; then
    systemctl disable --now edge-agent.service >/dev/null 2>&1 || true
  fi
  rm -f "$unit"
  [ "$use_systemctl" = 1 ] && systemctl daemon-reload
  rm -rf "$opt"
  say "removed the unit and $opt"
  if [ "$purge" = 1 ]; then
    rm -rf "$state" "$etc" "$root/run/edge-agent"
    if getent_user=$(grep -c '^edge-agent:' "$root/etc/passwd" 2>/dev/null) && [ "$getent_user" -gt 0 ]; then
      userdel "${prefix_args[@]}" edge-agent
    fi
    if grep -q '^edge-agent:' "$root/etc/group" 2>/dev/null; then groupdel "${prefix_args[@]}" edge-agent; fi
    say "purged state, configuration and the edge-agent user"
  else
    say "kept $state and $etc (use --purge to remove them)"
  fi
  exit 0
fi

"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || die "Python >= 3.11 is needed ($python is $("$python" --version 2>&1))"
"$python" -m venv --help >/dev/null 2>&1 || die "python3-venv is missing: apt-get install python3-venv"

# 1. the system user and group
if ! grep -q '^edge-agent:' "$root/etc/group" 2>/dev/null; then
  groupadd "${prefix_args[@]}" --system edge-agent
  say "created group edge-agent"
fi
if ! grep -q '^edge-agent:' "$root/etc/passwd" 2>/dev/null; then
  useradd "${prefix_args[@]}" --system --gid edge-agent --home-dir /var/lib/edge-agent --no-create-home \
    --shell /usr/sbin/nologin --comment "edgefleet device agent" edge-agent
  say "created user edge-agent"
fi
uid=$(awk -F: '$1 == "edge-agent" { print $3 }' "$root/etc/passwd")
gid=$(awk -F: '$1 == "edge-agent" { print $3 }' "$root/etc/group")

# 2. the venv (re-installing the same source is a no-op for pip)
install -d -m 0755 "$opt" "$opt/docs"
if [ ! -x "$opt/venv/bin/python" ]; then
  "$python" -m venv "$opt/venv"
  say "created $opt/venv"
fi
"$opt/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$source_dir"
install -m 0644 "$source_dir"/docs/*.md "$opt/docs/" 2>/dev/null || true
say "installed $("$opt/venv/bin/edge-agent" --version)"

# 3. configuration (never overwritten) and state
install -d -m 0750 -o 0 -g "$gid" "$etc"
if [ ! -e "$etc/agent.toml" ]; then
  cat > "$etc/agent.toml" <<'TOML'
# edge-agent configuration: see /opt/edge-agent/docs/agent.md for every setting.
state_dir = "/var/lib/edge-agent"

[api]
socket_path = "/run/edge-agent/api.sock"
socket_mode = 0o660

[inference]
memory_budget_bytes = 2147483648
TOML
  chown "0:$gid" "$etc/agent.toml"
  chmod 0640 "$etc/agent.toml"
  say "wrote $etc/agent.toml"
fi
install -d -m 0750 -o "$uid" -g "$gid" "$state"

# 4. the unit
install -d -m 0755 "$(dirname "$unit")"
install -m 0644 "$source_dir/systemd/edge-agent.service" "$unit"
say "installed $unit"

# 5. enrollment
if [ -n "$bundle" ]; then
  [ -r "$bundle" ] || die "cannot read bundle $bundle"
  digest=$(sha256sum "$bundle" | cut -d' ' -f1)
  if [ -f "$state/.enrolled-bundle" ] && [ "$(cat "$state/.enrolled-bundle")" = "$digest" ]; then
    say "already enrolled with this bundle"
  else
    force=()
    [ "$reenroll" = 1 ] && force=(--force)
    "$opt/venv/bin/edge-agent" --config "$etc/agent.toml" --state-dir "$state" enroll "${force[@]}" "$bundle"
    echo "$digest" > "$state/.enrolled-bundle"
    say "applied enrollment bundle $(basename "$bundle")"
  fi
  chown -R "$uid:$gid" "$state"
fi

if [ "$use_systemctl" = 1 ]; then
  systemctl daemon-reload
  if [ "$start" = 1 ]; then systemctl enable --now edge-agent.service; else systemctl enable edge-agent.service; fi
  say "edge-agent.service enabled$([ "$start" = 1 ] && echo " and started")"
else
  say "no systemd here (or --root given): enable it with 'systemctl enable --now edge-agent' on the device"
fi
