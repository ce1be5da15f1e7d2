#!/bin/sh
# Writes the pool's upstream: pgsse-upstream.conf with its `server` lines replaced by one line
# per address (host:port), each keeping the first line's parameters (max_fails, fail_timeout).
#
#   upstream.sh TEMPLATE TARGET ADDRESS...
#       deploy/cluster.sh render uses it so, with 127.0.0.1:PORT for each instance.
#   upstream.sh
#       As deploy/compose.yaml's nginx container runs it before nginx starts (from
#       /docker-entrypoint.d/): /etc/nginx/pgsse-upstream.template to
#       /etc/nginx/pgsse/pgsse-upstream.conf, the addresses from PGSSE_BROKERS
#       (space-separated); PGSSE_UPSTREAM_TEMPLATE and PGSSE_UPSTREAM_TARGET change the paths.
#       nginx resolves the names once, as it starts.
set -eu
if [ $# -gt 0 ]; then
    [ $# -ge 3 ] || { echo "usage: $0 TEMPLATE TARGET ADDRESS..." >&2; exit 2; }
    template=$1 target=$2
    shift 2
    addresses=$*
else
    template=${PGSSE_UPSTREAM_TEMPLATE:-/etc/nginx/pgsse-upstream.template}
    target=${PGSSE_UPSTREAM_TARGET:-/etc/nginx/pgsse/pgsse-upstream.conf}
    addresses=${PGSSE_BROKERS:-}
    [ -n "$addresses" ] || { echo "$0: PGSSE_BROKERS is empty" >&2; exit 1; }
fi
mkdir -p "$(dirname "$target")"
awk -v addresses="$addresses" '
    /^[ \t]*server[ \t]+[^ \t;]+:[0-9]+/ {
        if (!done) {
            n = split(addresses, list, " ")
            for (i = 1; i <= n; i++) {
                line = $0
                sub(/server[ \t]+[^ \t;]+/, "server " list[i], line)
                print line
            }
            done = 1
        }
        next
    }
    { print }
' "$template" >"$target"
echo "$0: $target: servers $addresses"
