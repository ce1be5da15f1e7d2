#!/usr/bin/env bash
# The pool on one machine: Redis, N broker instances on the bus and nginx least_conn in front,
# one database.
#
#   deploy/cluster.sh [N] [PUBLIC_PORT] [FIRST_PORT]
#       Starts N instances (default 3) on FIRST_PORT, FIRST_PORT+1, ... (default 5001) and
#       nginx on 127.0.0.1:PUBLIC_PORT (default 8080), all in the foreground: Ctrl-C (or
#       SIGTERM) stops them all, and nothing else does. An instance that ends is started
#       again, so its clients' reconnections land on the others meanwhile (failover, as in
#       production); one that ends 3 times in a row within 10 s of starting is left down, and
#       the script says so. DATABASE_URL names the database; unset, the embedded
#       PostgreSQL under .data/ is started (and stopped again at exit if this script started
#       it). The instances share a bus (docs/deployment.md, "When to use the bus"): a
#       redis-server started here on 127.0.0.1:$PGSSE_REDIS_PORT (default 6380), or the one
#       BROKER_BUS_URL names; PGSSE_CLUSTER_BUS=no (or no redis-server installed) runs them
#       without one, each LISTENing. Other BROKER_* variables reach every instance. Files go
#       to $PGSSE_RUN_DIR (default .run/cluster): nginx's configuration and logs, Redis's
#       data and log, one log per instance. All but nginx's is private to the user (umask 077,
#       Redis's directory mode 700): Redis's append-only file holds every row. The Redis started
#       here requires a password, generated once into $PGSSE_RUN_DIR/redis/password (mode
#       600) and given to redis-server in a configuration file, never on a command line.
#
#   deploy/cluster.sh render RUN_DIR PUBLIC_PORT PORT...
#       Only writes the nginx configuration for those instance ports into RUN_DIR, from
#       deploy/nginx/: nginx.conf (nginx-local.conf listening on PUBLIC_PORT),
#       pgsse/pgsse-locations.conf as is, pgsse/pgsse-upstream.conf with one `server` line
#       per port. Start nginx on it with
#           nginx -p RUN_DIR/ -c RUN_DIR/nginx.conf -e stderr -g 'daemon off;'
set -euo pipefail
umask 077  # what this script and what it starts create is the user's alone (nginx: render)

ROOT=$(cd "$(dirname "$0")/.." && pwd)
NGINX_CONF_DIR="$ROOT/deploy/nginx"
NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}

# nginx's files are not private: its workers (`nobody` under a root master) must reach them.
render() (
    umask 022
    local run_dir=$1 public_port=$2
    shift 2
    [ $# -gt 0 ] || { echo "cluster.sh render: no instance ports given" >&2; return 2; }
    mkdir -p "$run_dir/pgsse" "$run_dir/temp"
    sed "s/listen 127\.0\.0\.1:8080;/listen 127.0.0.1:$public_port;/" \
        "$NGINX_CONF_DIR/nginx-local.conf" >"$run_dir/nginx.conf"
    grep -q "listen 127.0.0.1:$public_port;" "$run_dir/nginx.conf"
    cp "$NGINX_CONF_DIR/pgsse-locations.conf" "$run_dir/pgsse/pgsse-locations.conf"
    # The template's first `server host:port params;` line stands for all: one line per port.
    sh "$NGINX_CONF_DIR/upstream.sh" "$NGINX_CONF_DIR/pgsse-upstream.conf" \
        "$run_dir/pgsse/pgsse-upstream.conf" $(printf '127.0.0.1:%s ' "$@") >/dev/null
)

if [ "${1:-}" = "render" ]; then
    shift
    [ $# -ge 3 ] || { echo "usage: cluster.sh render RUN_DIR PUBLIC_PORT PORT..." >&2; exit 2; }
    render "$@"
    exit 0
fi

COUNT=${1:-3}
PUBLIC_PORT=${2:-8080}
FIRST_PORT=${3:-5001}
RUN_DIR=${PGSSE_RUN_DIR:-$ROOT/.run/cluster}
REDIS_PORT=${PGSSE_REDIS_PORT:-6380}
REDIS_SERVER=${REDIS_SERVER:-$(command -v redis-server || echo /usr/bin/redis-server)}
start_redis=""
if [ -z "${BROKER_BUS_URL:-}" ] && [ "${PGSSE_CLUSTER_BUS:-yes}" != "no" ]; then
    if [ -x "$REDIS_SERVER" ]; then
        start_redis=yes
    else
        echo "cluster.sh: redis-server not found (apt-get install redis-server): no bus," \
            "every instance LISTENs" >&2
    fi
fi
[ -x "$NGINX" ] || { echo "cluster.sh: nginx not found (apt-get install nginx)" >&2; exit 1; }
[ -x "$PYTHON" ] || { echo "cluster.sh: no $PYTHON (run make cluster)" >&2; exit 1; }

(umask 022 && mkdir -p "$RUN_DIR")  # for nginx (render); what else goes in it is 600/700
cd "$ROOT"

ports=()
for ((i = 0; i < COUNT; i++)); do
    ports+=("$((FIRST_PORT + i))")
done

# Every port must be free before anything starts (`make run` holds 5001, say): each is bound
# as the instances will (SO_REUSEADDR, so only a listener, not TIME_WAIT, counts as busy).
busy=$("$PYTHON" - "$PUBLIC_PORT" "${ports[@]}" ${start_redis:+"$REDIS_PORT"} <<'EOF'
import socket, sys
for port in sys.argv[1:]:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", int(port)))
        except OSError:
            print(port, end=" ")
EOF
)
if [ -n "$busy" ]; then
    echo "cluster.sh: port(s) ${busy% } already in use (is \`make run\` or another cluster" \
        "running?); stop that, or choose other ports: deploy/cluster.sh N PUBLIC_PORT FIRST_PORT" \
        "(PGSSE_REDIS_PORT for Redis)" >&2
    exit 1
fi

# The last lines of an instance's log, after it failed.
show_log() {
    echo "cluster.sh: last lines of $RUN_DIR/broker-$1.log:" >&2
    tail -n 20 "$RUN_DIR/broker-$1.log" >&2 || true
}

pids=()
redis_pid=""
embedded_started=""
cleanup() {
    trap - INT TERM EXIT
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ -n "$redis_pid" ]; then  # last: the instances drain on the bus
        kill -TERM "$redis_pid" 2>/dev/null || true
        wait "$redis_pid" 2>/dev/null || true
    fi
    if [ -n "$embedded_started" ]; then
        "$PYTHON" -c 'import sys; from pathlib import Path; from broker.database import EmbeddedPostgres as E; E(Path(sys.argv[1])).stop()' \
            "${BROKER_DATA_DIR:-.data}"
    fi
    echo "cluster stopped"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

if [ -z "${DATABASE_URL:-}${PGDATABASE_URL:-}" ]; then
    # Start the embedded PostgreSQL once, here: instances starting it together would race.
    read -r embedded_started DATABASE_URL < <("$PYTHON" - "${BROKER_DATA_DIR:-.data}" <<'EOF'
import sys
from pathlib import Path
from broker.database import EmbeddedPostgres
from broker.log import configure
configure("console")  # logs to stderr: stdout carries only the answer
server = EmbeddedPostgres(Path(sys.argv[1]))
started = not server.is_running()
server.start()
print("yes" if started else "no", server.url)
EOF
)
    [ "$embedded_started" = "yes" ] || embedded_started=""
fi
export DATABASE_URL=${DATABASE_URL:-$PGDATABASE_URL}
"$PYTHON" -m broker migrate
export BROKER_MIGRATE=false

if [ -n "$start_redis" ]; then
    # Persisted as a production bus would be (appendonly): a restart keeps the stream. Only
    # with the password: any local user can connect to 127.0.0.1.
    mkdir -p "$RUN_DIR/redis"
    chmod 700 "$RUN_DIR/redis"
    if [ ! -s "$RUN_DIR/redis/password" ]; then
        "$PYTHON" -c 'import secrets; print(secrets.token_hex(24))' >"$RUN_DIR/redis/password"
    fi
    chmod 600 "$RUN_DIR/redis/password"
    redis_password=$(<"$RUN_DIR/redis/password")
    printf 'requirepass %s\n' "$redis_password" >"$RUN_DIR/redis/redis.conf"
    chmod 600 "$RUN_DIR/redis/redis.conf"
    find "$RUN_DIR/redis" -type d -exec chmod 700 {} + -o -type f -exec chmod 600 {} +
    "$REDIS_SERVER" "$RUN_DIR/redis/redis.conf" --port "$REDIS_PORT" --bind 127.0.0.1 \
        --dir "$RUN_DIR/redis" --save "" --appendonly yes --daemonize no \
        --logfile "$RUN_DIR/redis/redis.log" </dev/null &
    redis_pid=$!
    for ((try = 0; try < 100; try++)); do
        if { exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT"; } 2>/dev/null; then
            printf 'AUTH %s\r\nPING\r\n' "$redis_password" >&3
            read -r -t 1 reply <&3 || reply=""  # +OK to AUTH
            read -r -t 1 reply <&3 || reply=""
            exec 3>&-
            [[ "$reply" == +PONG* ]] && break
        fi
        kill -0 "$redis_pid" 2>/dev/null || break
        sleep 0.1
    done
    if [[ "${reply:-}" != +PONG* ]]; then
        echo "cluster.sh: redis-server on port $REDIS_PORT did not start; its log:" >&2
        tail -n 20 "$RUN_DIR/redis/redis.log" >&2 || true
        exit 1
    fi
    export BROKER_BUS_URL="redis://:$redis_password@127.0.0.1:$REDIS_PORT/0"
fi

declare -A port_of=() started_at=() quick_ends=()
# One instance in the background, its log appended to (a restart keeps what led to it).
start_instance() {
    "$PYTHON" -m broker serve --host 127.0.0.1 --port "$1" >>"$RUN_DIR/broker-$1.log" 2>&1 &
    pids+=("$!")
    port_of[$!]=$1
    started_at[$1]=$SECONDS
}
instances=()
for port in "${ports[@]}"; do
    : >"$RUN_DIR/broker-$port.log"
    start_instance "$port"
    instances+=("$!:$port")
done

# Wait until every instance is ready (its listener connected): GET /readyz answers 200. An
# instance that exits, or is not ready within 30 s, is printed (port and reason) on stdout.
if ! failed=$("$PYTHON" - "${instances[@]}" <<'EOF'
import sys, time, urllib.request

def ended(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        return False

deadline = time.monotonic() + 30
for pid, port in (item.split(":") for item in sys.argv[1:]):
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
                break
        except OSError:
            if ended(pid):
                print(port, "exited")
                sys.exit(1)
            if time.monotonic() > deadline:
                print(port, "was not ready after 30 s")
                sys.exit(1)
            time.sleep(0.1)
EOF
); then
    echo "cluster.sh: the instance on port ${failed:-?}" >&2
    show_log "${failed%% *}"
    exit 1
fi

render "$RUN_DIR/nginx" "$PUBLIC_PORT" "${ports[@]}"
# No separate `nginx -t` first: it binds and listens on the public port while it checks, and a
# client that connects in that moment is reset when it exits (a test caught it). nginx checks
# its configuration as it starts, and one it refuses ends it: "nginx ended" below.
"$NGINX" -p "$RUN_DIR/nginx/" -c "$RUN_DIR/nginx/nginx.conf" -e stderr -g 'daemon off;' &
pids+=("$!")

bus="without a bus (each LISTENs)"
[ -z "${BROKER_BUS_URL:-}" ] || bus="on the bus (BROKER_BUS_URL)"
[ -z "$start_redis" ] || bus="on the bus (redis-server on 127.0.0.1:$REDIS_PORT, password in $RUN_DIR/redis/password)"
echo "pgsse cluster: ${COUNT} instances on ports ${ports[*]} $bus, nginx on http://127.0.0.1:${PUBLIC_PORT}/"
echo "logs in $RUN_DIR; Ctrl-C stops everything"
# Supervise until Ctrl-C: an instance that ends is started again (its clients reconnect to the
# others meanwhile, which is what the pool is for), unless it keeps ending as soon as it
# starts: then it is left down. nginx or Redis ending stops the pool: there is no pool without
# them.
nginx_pid=${pids[-1]}
while true; do
    ended=""
    status=0
    wait -n -p ended "${pids[@]}" $redis_pid || status=$?
    [ -n "$ended" ] || continue
    if [ "$ended" = "$nginx_pid" ]; then
        echo "cluster.sh: nginx ended (status $status); stopping the others" >&2
        exit 1
    fi
    if [ "$ended" = "$redis_pid" ]; then
        echo "cluster.sh: redis-server ended (status $status); stopping the others" >&2
        redis_pid=""
        exit 1
    fi
    port=${port_of[$ended]}
    unset "port_of[$ended]"
    alive=()
    for pid in "${pids[@]}"; do
        [ "$pid" = "$ended" ] || alive+=("$pid")
    done
    pids=("${alive[@]}")
    if ((SECONDS - started_at[$port] < 10)); then
        quick_ends[$port]=$((${quick_ends[$port]:-0} + 1))
    else
        quick_ends[$port]=0
    fi
    if ((quick_ends[$port] >= 3)); then
        echo "cluster.sh: the instance on port $port ended 3 times within 10 s of starting;" \
            "leaving it down, the others keep serving (Ctrl-C stops the cluster)" >&2
        show_log "$port"
        continue
    fi
    echo "cluster.sh: the instance on port $port ended (status $status); the others keep" \
        "serving; starting it again" >&2
    show_log "$port"
    sleep 1  # a crash loop must not spin
    start_instance "$port"
done
