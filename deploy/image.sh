#!/usr/bin/env bash
# Builds the pgsse container image from ./Containerfile (`make image`): docs/container.md.
#
#   deploy/image.sh [NAME]
#       Builds NAME (default pgsse:VERSION, also tagged pgsse:latest) with podman, or docker
#       when there is no podman (CONTAINER_ENGINE chooses). Prints the image's size.
#   deploy/image.sh base
#       Only makes sure the base image (the Containerfile's FROM) is there.
#
# The base, debian:bookworm-slim, is pulled as usual. Where no registry answers and
# debootstrap is installed (as root), it is made here instead: `debootstrap --variant=minbase
# bookworm`, slimmed as the official -slim image is (no documentation, manual pages or
# locales; apt's lists and caches emptied), imported and tagged with the FROM name. Its file
# system is cached as a tarball in $PGSSE_IMAGE_CACHE (default ~/.cache/pgsse-image), so
# debootstrap runs once per machine even when the engine's store is emptied.
#
# With podman, the build also gets:
#   - runc as the OCI runtime when it is installed (PGSSE_PODMAN_RUNTIME overrides): crun, the
#     default on some distributions, refuses cgroup layouts runc accepts (nested containers);
#   - pip's settings of this machine, when /etc/pip.conf exists (an index mirror, or a proxy's
#     certificate authority in the bundle it names): that file and the bundle its `cert`
#     names are mounted read-only under /run/pip in the build, never copied into a layer;
#   - the host network (apt and pip reach their mirrors wherever the host does);
#   - explicit limits of open files and processes: podman's usual values (1048576 and
#     32768), or this shell's hard limits where they are lower, since they cannot be raised
#     (podman's implicit defaults fail on such hosts).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ENGINE=${CONTAINER_ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
CACHE=${PGSSE_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pgsse-image}
SUITE=bookworm
MIRROR=${PGSSE_DEBIAN_MIRROR:-http://deb.debian.org/debian}

# The first FROM of the Containerfile: its ARG BASE default.
base_name() {
    sed -n 's/^ARG BASE=\(.*\)$/\1/p' "$ROOT/Containerfile" | head -n 1
}

version() {
    sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/broker/__init__.py"
}

engine_flags=()
limits=()
if [ "$ENGINE" = podman ]; then
    runtime=${PGSSE_PODMAN_RUNTIME:-$(command -v runc || true)}
    [ -z "$runtime" ] || engine_flags+=(--runtime "$runtime")
    for limit in nofile:n:1048576 nproc:u:32768; do
        IFS=: read -r name option value <<<"$limit"
        hard=$(ulimit -H"$option")
        if [ "$hard" != unlimited ] && [ "$hard" -lt "$value" ]; then
            value=$hard
        fi
        limits+=(--ulimit "$name=$value:$value")
    done
fi

# The root file system of a minimal Debian, as the official -slim image trims it.
make_rootfs() {
    local rootfs=$1
    debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >&2
    # What the official image configures (debuerreotype's slimification and apt settings).
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
    cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    printf 'Acquire::Languages "none";\n' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
    printf 'Acquire::GzipIndexes "true";\n' >"$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes"
    printf 'Apt::AutoRemove::SuggestsImportant "false";\n' \
        >"$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
    rm -f "$rootfs/etc/apt/sources.list"
    cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$rootfs"/usr/share/{man,groff,info,lintian,linda}/*
    find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias \
        -exec rm -rf {} +
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/*.log \
        "$rootfs"/var/cache/ldconfig/aux-cache "$rootfs"/tmp/* "$rootfs"/root/.bash_history
    : >"$rootfs/etc/machine-id"
}

ensure_base() {
    local name tarball rootfs
    name=$(base_name)
    [ -n "$name" ] || { echo "image.sh: no ARG BASE= in Containerfile" >&2; exit 1; }
    if "$ENGINE" image inspect "$name" >/dev/null 2>&1; then
        return
    fi
    if "$ENGINE" pull "$name" >/dev/null 2>&1; then
        echo "image.sh: pulled $name"
        return
    fi
    if ! command -v debootstrap >/dev/null || [ "$(id -u)" != 0 ]; then
        echo "image.sh: cannot pull $name, and cannot make it here (that needs root and" \
            "debootstrap: apt-get install debootstrap)" >&2
        exit 1
    fi
    tarball="$CACHE/debian-$SUITE-slim.tar"
    if [ ! -s "$tarball" ]; then
        echo "image.sh: cannot pull $name; making it with debootstrap (once, into $CACHE)" >&2
        mkdir -p "$CACHE"
        rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
        trap 'rm -rf "$rootfs"' EXIT
        make_rootfs "$rootfs"
        tar --numeric-owner -C "$rootfs" -cf "$tarball.partial" .
        mv "$tarball.partial" "$tarball"
        rm -rf "$rootfs"
        trap - EXIT
    fi
    "$ENGINE" import --change 'CMD ["bash"]' "$tarball" "$name" >/dev/null
    echo "image.sh: made $name from $tarball"
}

build() {
    local name=$1 version source cert flags=()
    version=$(version)
    flags+=(--build-arg "VERSION=$version")
    # The source label: the repository's URL, when this checkout was cloned over https.
    source=$(git -C "$ROOT" remote get-url origin 2>/dev/null || true)
    case $source in
        https://*) flags+=(--build-arg "SOURCE=${source%.git}") ;;
    esac
    if [ "$ENGINE" = podman ]; then
        # HEALTHCHECK is kept only in the docker image format (OCI has no such field).
        flags+=(--format docker --network host)
        if [ -f /etc/pip.conf ]; then
            flags+=(-v /etc/pip.conf:/run/pip/pip.conf:ro
                --build-arg PIP_CONFIG_FILE=/run/pip/pip.conf)
            cert=$(sed -n 's/^[[:space:]]*cert[[:space:]]*=[[:space:]]*\(.*[^[:space:]]\)[[:space:]]*$/\1/p' \
                /etc/pip.conf | head -n 1)
            if [ -n "$cert" ] && [ -f "$cert" ]; then
                flags+=(-v "$cert:/run/pip/ca.crt:ro" --build-arg PIP_CERT=/run/pip/ca.crt)
            fi
        fi
        flags+=("${limits[@]}")
    fi
    "$ENGINE" "${engine_flags[@]}" build "${flags[@]}" -f "$ROOT/Containerfile" -t "$name" "$ROOT"
}

case "${1:-}" in
    base)
        ensure_base
        ;;
    *)
        ensure_base
        name=${1:-pgsse:$(version)}
        build "$name"
        [ -n "${1:-}" ] || "$ENGINE" tag "$name" pgsse:latest
        size=$("$ENGINE" image inspect --format '{{.Size}}' "$name")
        echo "image.sh: built $name, $((size / 1000000)) MB"
        ;;
esac
