#!/usr/bin/env bash
# One node of the local mesh (docker-compose.yml uses it as the containers' entrypoint,
# scripts/mesh runs it in network namespaces): start `eidetica-node run` in the background,
# do this role's part of the setup, then stay with the node until it stops.
#
#   mesh-node.sh relay [RUN ARGS...]   offer circuit relay v2 (--relay-service) and publish our
#                                      libp2p addresses in $MESH_DIR/relay.addrs
#   mesh-node.sh seed  [RUN ARGS...]   reserve a slot on the relay; create the shared database
#                                      (once: a restart keeps it) and publish its ticket in
#                                      $MESH_DIR/ticket
#   mesh-node.sh peer  [RUN ARGS...]   reserve a slot on the relay; join the shared database
#                                      from $MESH_DIR/ticket (once: a restart keeps it)
#
# RUN ARGS go to `eidetica-node run` as they are (--name, --log-level, --p2p-listen ...).
# Environment: the node's own EIDETICA_* settings (EIDETICA_DATA_DIR above all), and
#   MESH_DIR      the directory every node of the mesh shares (default /mesh)
#   MESH_DB       the shared database's name (default mesh)
#   MESH_PUBLIC   what any key may do in it (default write:10: every node of the mesh writes)
#   MESH_WAIT_S   how long to wait for the node, the relay's addresses, the ticket, a join (default 300)
#   MESH_REACHABILITY_S  how long the seed waits to learn whether it is reachable before it
#                 shares (default 20): a private node's ticket lists its circuit addresses first,
#                 so joiners behind other NATs do not spend their first attempts on its private ones
#   MESH_PYTHON   a python3 for reading JSON (default python3)
#
# The relay's addresses go through the shared directory because its peer ID comes from a key
# made on its first start (eidetica-node init takes no key). The relay lists one address per
# network it is on; the other nodes reserve on every one: only the address on their own network
# connects, the others fail at once (no route), and the ticket then carries a circuit address
# through the relay for every network, so a node on any LAN can use it.
#
# Prints "mesh-node[ROLE]: ready: ..." once the role's setup is done; exits with the node's status,
# or 1 if the setup failed. SIGTERM/SIGINT stop the node as `eidetica-node stop` does.
set -uo pipefail

ROLE="${1:-}"
case "$ROLE" in
relay | seed | peer) shift ;;
*)
    echo "usage: mesh-node.sh relay|seed|peer [eidetica-node run arguments...]" >&2
    exit 2
    ;;
esac

MESH_DIR="${MESH_DIR:-/mesh}"
MESH_DB="${MESH_DB:-mesh}"
MESH_PUBLIC="${MESH_PUBLIC:-write:10}"
MESH_WAIT_S="${MESH_WAIT_S:-300}"
MESH_REACHABILITY_S="${MESH_REACHABILITY_S:-20}"
PY="${MESH_PYTHON:-python3}"
RELAY_ADDRS="$MESH_DIR/relay.addrs"
TICKET="$MESH_DIR/ticket"

node_pid=""

say() { echo "mesh-node[$ROLE]: $*"; }
fail() {
    echo "mesh-node[$ROLE]: error: $*" >&2
    stop_node
    exit 1
}

stop_node() {
    if [ -n "$node_pid" ] && kill -0 "$node_pid" 2>/dev/null; then
        kill -TERM "$node_pid" 2>/dev/null
        wait "$node_pid" 2>/dev/null
    fi
}

# shellcheck disable=SC2317  # invoked by the trap
on_signal() {
    say "stopping the node"
    stop_node
    exit 143
}
trap on_signal TERM INT

# Run a command so that a signal still interrupts the wait for it (bash runs traps only
# between foreground commands; `wait` is interruptible).
interruptible() {
    "$@" &
    local pid=$!
    wait "$pid"
}

deadline=$((SECONDS + MESH_WAIT_S))
time_left() { [ "$SECONDS" -lt "$deadline" ]; }

node_alive() {
    [ -n "$node_pid" ] && kill -0 "$node_pid" 2>/dev/null
}

wait_for_file() { # PATH WHAT
    until [ -s "$1" ]; do
        time_left || fail "no $2 ($1) after ${MESH_WAIT_S} s"
        sleep 1
    done
}

wait_for_node() {
    until eidetica-node health >/dev/null 2>&1; do
        node_alive || {
            wait "$node_pid"
            echo "mesh-node[$ROLE]: error: eidetica-node run exited ($?) before it answered" >&2
            exit 1
        }
        time_left || fail "the node did not answer in ${MESH_WAIT_S} s"
        sleep 0.5
    done
}

publish() { # DEST: stdin -> DEST, atomically (readers never see half a file)
    local tmp="$1.tmp.$$"
    cat >"$tmp" && mv -f "$tmp" "$1"
}

# The id of the database named $1 (or with ID $1) on this node; empty if it holds none.
database_id() {
    eidetica-node db list --json | "$PY" -c '
import json, sys
want = sys.argv[1]
for db in json.load(sys.stdin)["databases"]:
    if want in (db["id"], db["name"]):
        print(db["id"])
        break
' "$1"
}

# "public", "private" or "unknown": what the relay's dial-back found.
reachability() {
    eidetica-node info --json | "$PY" -c '
import json, sys
for transport in json.load(sys.stdin)["transports"]:
    if transport["name"] == "p2p":
        print((transport.get("status") or {}).get("reachability") or "unknown")
'
}

run_args=("$@")
mkdir -p "$MESH_DIR" 2>/dev/null || true

if [ "$ROLE" = relay ]; then
    rm -f "$RELAY_ADDRS" # a previous run's addresses must not be read as ours
    run_args=(--relay-service "${run_args[@]}")
else
    wait_for_file "$RELAY_ADDRS" "relay addresses"
    while read -r address; do
        [ -n "$address" ] && run_args=(--relay "$address" "${run_args[@]}")
    done <"$RELAY_ADDRS"
fi
[ "$ROLE" = seed ] && rm -f "$TICKET"

say "eidetica-node run ${run_args[*]}"
eidetica-node run "${run_args[@]}" &
node_pid=$!
wait_for_node

case "$ROLE" in
relay)
    eidetica-node info --json | "$PY" -c '
import json, sys
for address in json.load(sys.stdin)["addresses"]:
    transport, _, addr = address.partition(":")
    if transport == "p2p" and "/p2p-circuit" not in addr and not addr.startswith("/ip4/127."):
        print(addr)
' | publish "$RELAY_ADDRS" || fail "cannot write $RELAY_ADDRS"
    [ -s "$RELAY_ADDRS" ] || fail "the relay listens on no libp2p address"
    say "ready: relay at $(tr '\n' ' ' <"$RELAY_ADDRS")"
    ;;
seed)
    db="$(database_id "$MESH_DB")"
    if [ -z "$db" ]; then
        db="$(eidetica-node db create "$MESH_DB" --public "$MESH_PUBLIC")" || fail "cannot create $MESH_DB"
        say "created database $MESH_DB ($db)"
    fi
    until=$((SECONDS + MESH_REACHABILITY_S))
    while [ "$(reachability)" = unknown ] && [ "$SECONDS" -lt "$until" ]; do
        sleep 1
    done
    eidetica-node share "$db" | publish "$TICKET" || fail "cannot write $TICKET"
    say "ready: database $MESH_DB ($db), ticket in $TICKET"
    ;;
peer)
    wait_for_file "$TICKET" "ticket"
    db="$(sed -n 's/.*[?&]db=\([^&]*\).*/\1/p' "$TICKET")"
    [ -n "$db" ] || fail "$TICKET holds no database ID"
    until [ -n "$(database_id "$db")" ]; do
        # Read the ticket again each time: a restarted seed publishes a fresh one.
        interruptible eidetica-node join "$(cat "$TICKET")" && break
        time_left || fail "could not join $db in ${MESH_WAIT_S} s"
        sleep 2
    done
    say "ready: joined database $MESH_DB ($db)"
    ;;
esac

# Stay with the node; a signal runs on_signal, which stops it.
wait "$node_pid"
status=$?
say "eidetica-node run exited ($status)"
exit "$status"
