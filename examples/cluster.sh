#!/usr/bin/env bash
# Scale-out on one machine: a three-node NATS JetStream cluster (nats-server from Debian,
# client ports 4222-4224, routes 6222-6224) and two wasmq nodes on it (API on 7701 and 7702,
# storage replicated 3 times), all on 127.0.0.1, state under ./data-cluster (recreated each run).
# Any node accepts every API call; the subscription queues are divided between the nodes by
# leases, and the other node takes a dead node's queues, timers and check-backs over within ~3 s.
# Try: `wasmq --server http://127.0.0.1:7702 status`, `curl 127.0.0.1:7701/v1/cluster`, then
# kill one wasmq or one nats-server and watch /v1/cluster. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
. .ci/env
cargo build --release -p wasmq --bin wasmq
wasmq="$CARGO_TARGET_DIR/release/wasmq"
nats=$(command -v nats-server || echo /usr/sbin/nats-server)
root="$PWD/data-cluster"
rm -rf "$root"
mkdir -p "$root"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT INT TERM

for i in 0 1 2; do
  routes=""
  for j in 0 1 2; do
    [ "$j" = "$i" ] || routes="$routes nats-route://127.0.0.1:$((6222 + j)),"
  done
  cat > "$root/nats-$i.conf" <<EOF
server_name: n$i
listen: 127.0.0.1:$((4222 + i))
max_payload: 8MB
jetstream { store_dir: "$root/nats-$i" }
cluster { name: wasmq-example, listen: 127.0.0.1:$((6222 + i)), routes: [${routes%,}] }
EOF
  "$nats" -c "$root/nats-$i.conf" > "$root/nats-$i.log" 2>&1 &
  pids+=($!)
done
sleep 3 # the cluster elects its JetStream meta leader

for i in 1 2; do
  cat > "$root/wasmq-$i.toml" <<EOF
[server]
listen = "127.0.0.1:$((7700 + i))"
data_dir = "$root/wasmq-$i"
node_id = "wasmq-$i"

[storage]
backend = "jetstream"
urls = ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223", "nats://127.0.0.1:4224"]
replicas = 3
EOF
  "$wasmq" serve --config "$root/wasmq-$i.toml" > "$root/wasmq-$i.log" 2>&1 &
  pids+=($!)
done
for i in 1 2; do
  for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$((7700 + i))/healthz" > /dev/null 2>&1 && break
    sleep 0.1
  done
done
curl -fsS http://127.0.0.1:7701/v1/cluster
echo
echo "wasmq nodes: http://127.0.0.1:7701 and http://127.0.0.1:7702 (logs in $root); Ctrl-C stops"
wait
