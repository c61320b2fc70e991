#!/usr/bin/env bash
# Set up a fresh machine and run linkd's test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    # Tools the fault tests use: openssl (certificates), strace (crash injection),
    # iproute2 + nftables (network namespaces, partitions), util-linux (setpriv, mount).
    missing=()
    for tool in openssl:openssl strace:strace ip:iproute2 nft:nftables setpriv:util-linux; do
        command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
fi
venv="${LINKD_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
exec "$venv/bin/python" -m pytest "$@"
