#!/usr/bin/env bash
# make demo: the whole edgefleet story on one box, with real parts, printed step by step.
#   a private Mosquitto with mutual TLS and per-device ACLs · edge-fleet init · two enrolled agents with
#   different RAM budgets · the real SmolLM2 model quantized into variants, signed (TUF) and published as one
#   release · a rollout in waves that gives each agent the variant that fits it, installed over MQTT,
#   health-checked and activated · a chat answered over each agent's unix socket · the audit trail verified on
#   the controller · a tampered model refused. Everything lives in a temporary directory removed at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/.venv/bin"
model="$root/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
name=smollm2-135m-instruct
work=$(mktemp -d /tmp/edgefleet-demo.XXXXXX)
pids=()
cleanup() {
  # fleet/agent are shell functions: a "fleet serve &" pid is a subshell, the daemon its child; stop both.
  for pid in "${pids[@]}"; do pkill -TERM -P "$pid" 2>/dev/null || true; kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
step=0
say() { step=$((step + 1)); printf '\n\033[1m[%d] %s\033[0m\n' "$step" "$*"; }
ok() { printf '    \033[32mpassed\033[0m: %s\n' "$*"; }
fail() { printf '    \033[31mFAILED\033[0m: %s\n' "$*"; for f in "$work"/*.log; do echo "--- $f"; tail -20 "$f"; done; exit 1; }
port=$("$bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fleet() { "$bin/edge-fleet" --home "$work/fleet" "$@"; }
agent() {
  local d=$1; shift
  "$bin/edge-agent" --config "$work/$d.toml" --state-dir "$work/$d" --socket "$work/$d/api.sock" "$@"
}
# Each device's RAM budget for models (reported to the controller; the rollout picks a variant that fits it).
declare -A budget=([kiosk-1]=1073741824 [kiosk-2]=4294967296)
# A device's active models as NAME:VARIANT (not merely loaded: the health check loads before activating).
active_models() {
  local status
  status=$(agent "$1" status --json 2>/dev/null || echo '{}')
  "$bin/python" -c 'import json, sys; print(" ".join(m["name"] + ":" + m["variant"] for m in json.loads(sys.argv[1]).get("active_models", [])))' \
    "$status"
}

say "edge-fleet init: CA, broker certificate and config, TUF keys, assignment key (in $work/fleet)"
user=()
[ "$(id -u)" = 0 ] && user=(--broker-user root)
fleet init --broker-host 127.0.0.1 --broker-port "$port" --bind 127.0.0.1 "${user[@]}" | sed 's/^/    /'
ok "controller home created"

say "a private Mosquitto on 127.0.0.1:$port with mutual TLS and per-device ACLs"
mosquitto -c "$work/fleet/broker/mosquitto.conf" >"$work/broker.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do "$bin/python" -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null && break; sleep 0.1; done
grep -E '^(listener|require_certificate|use_identity_as_username|acl_file)' "$work/fleet/broker/mosquitto.conf" | sed 's/^/    /'
ok "broker listening (TLS only)"

say "edge-fleet serve: the controller daemon"
fleet serve >"$work/serve.log" 2>&1 &
pids+=($!)
ok "controller running"

for dev in kiosk-1 kiosk-2; do
  say "enroll $dev (RAM budget $((budget[$dev] / 1048576)) MiB): edge-fleet device enroll, edge-agent enroll, run"
  printf '[inference]\nmemory_budget_bytes = %s\nn_ctx = 1024\nn_parallel = 1\n' "${budget[$dev]}" >"$work/$dev.toml"
  fleet device enroll "$dev" --out "$work/$dev.bundle" | sed 's/^/    /'
  agent "$dev" enroll "$work/$dev.bundle" 2>&1 | sed 's/^/    /'
  agent "$dev" run >"$work/$dev.log" 2>&1 &
  pids+=($!)
done
for _ in $(seq 60); do
  listing=$(fleet devices 2>/dev/null || true)
  online=$(grep -c online <<<"$listing" || true)
  [ "$online" -ge 2 ] && break
  sleep 1
done
fleet devices | sed 's/^/    /'
[ "$online" -ge 2 ] || fail "both devices online"
ok "both devices online"

say "quantize the real SmolLM2-135M-Instruct (Q4_1, 98 MB) into q4_0 and q5_1 (llama.cpp's quantizer)"
fleet model quantize "$model" --to q4_0,q5_1 --out-dir "$work/variants" --allow-requantize 2>&1 | sed 's/^/    /'
q4="$work/variants/SmolLM2-135M-Instruct.Q4_0.gguf"
q5="$work/variants/SmolLM2-135M-Instruct.Q5_1.gguf"
[ -f "$q4" ] && [ -f "$q5" ] || fail "both variants written"
ok "two variants"

say "sign and publish both as one release, $name@1, each with the RAM budget it needs (TUF targets)"
fleet model add "$q4" --name "$name" --variant q4_0 --version 1 --min-ram 512M | sed 's/^/    /'
fleet model add "$q5" --name "$name" --variant q5_1 --version 1 --min-ram 2G | sed 's/^/    /'
fleet model publish | sed 's/^/    /'
ok "published"

say "plan the rollout: the variant each device would get, and why (nothing sent)"
fleet deploy "$name" --to all --waves 50%,100% --dry-run | sed 's/^/    /'
ok "planned"

say "roll it out in two waves behind health gates (signed desired state over MQTT; chunks verified as they arrive)"
started=$(fleet deploy "$name" --to all --waves 50%,100% --wave-timeout 5m)
sed 's/^/    /' <<<"$started"
rollout=$(grep -oE 'rollout r-[a-z0-9._-]+' <<<"$started" | cut -d' ' -f2)
[ -n "$rollout" ] || fail "a rollout started"
timeout 300 "$bin/edge-fleet" --home "$work/fleet" rollout show "$rollout" --follow | sed 's/^/    /'
fleet rollout show "$rollout" --json >"$work/rollout.json"
status=$("$bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["status"])' "$work/rollout.json")
[ "$status" = completed ] || fail "the rollout completed (status: $status)"
declare -A want=([kiosk-1]=q4_0 [kiosk-2]=q5_1)
for dev in kiosk-1 kiosk-2; do
  for _ in $(seq 30); do
    active=$(active_models "$dev")
    [[ " $active " == *" $name:${want[$dev]} "* ]] && break
    sleep 1
  done
  agent "$dev" status | sed 's/^/    /'
  [[ " $active " == *" $name:${want[$dev]} "* ]] || fail "$dev runs $name ${want[$dev]} (active: $active)"
done
ok "kiosk-1 (1 GiB) runs q4_0, kiosk-2 (4 GiB) runs q5_1: installed, health-checked and active"

say "a chat request over each agent's unix socket (OpenAI-compatible)"
for dev in kiosk-1 kiosk-2; do
  answer=$(curl -s --unix-socket "$work/$dev/api.sock" http://localhost/v1/chat/completions \
    -H 'content-type: application/json' \
    -d "{\"model\": \"$name\", \"temperature\": 0, \"max_tokens\": 16, \"messages\": [
         {\"role\": \"system\", \"content\": \"You are a helpful assistant.\"},
         {\"role\": \"user\", \"content\": \"What is the capital of France?\"}]}")
  text=$("$bin/python" -c 'import json, sys; print(json.loads(sys.argv[1])["choices"][0]["message"]["content"])' \
    "$answer" 2>/dev/null) || fail "$dev answered: $answer"
  echo "    $dev: $text"
  [[ "$text" == *Paris* ]] || fail "$dev answered"
done
ok "both answered"

say "the audit trail, verified on the controller (hash chains and signed checkpoints)"
for _ in $(seq 30); do
  verified=$(fleet audit verify 2>/dev/null || true)
  [ "$(grep -cE '^kiosk-[12] .* ok$' <<<"$verified")" = 2 ] && break
  sleep 1
done
sed 's/^/    /' <<<"$verified"
[ "$(grep -cE '^kiosk-[12] .* ok$' <<<"$verified")" = 2 ] || fail "both devices' audit chains verify"
ok "audit chains verified"

say "a tampered model is refused: one flipped byte, imported with the published sha256"
tampered="$work/tampered.gguf"
cp "$q4" "$tampered"
chmod u+w "$tampered"
printf '\x01' | dd of="$tampered" bs=1 seek=50000000 count=1 conv=notrunc status=none
sha=$(sha256sum "$q4" | cut -d' ' -f1)
if agent kiosk-1 models import "$tampered" --name "$name" --variant q4_0 --version 2 --sha256 "$sha" >"$work/tamper.out" 2>&1; then
  fail "the tampered file was refused"
fi
sed 's/^/    /' "$work/tamper.out"
status=$(agent kiosk-1 status --json)
[[ "$status" == *"\"sha256\": \"$sha\""* ]] || fail "the active model is unchanged"
ok "refused; the active model is unchanged"

printf '\n\033[1mdemo: every step passed\033[0m\n'
