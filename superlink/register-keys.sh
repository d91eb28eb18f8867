#!/usr/bin/env bash
# Register SuperNode public keys with a TLS SuperLink that runs --enable-supernode-auth.
#
#   superlink/register-keys.sh HOST:PORT CA_CRT KEY.pub [KEY.pub ...]
#
# A key that is already registered (a restarted SuperLink keeps them in its database) is fine.
# compose.tls.yaml runs this in its one-shot `register` service.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,7s/^# \{0,1\}//p' "$0"; exit 2; }
address=$1 ca=$2; shift 2
home="$(mktemp -d)"
trap 'rm -rf "$home"' EXIT
export FLWR_HOME="$home" FLWR_TELEMETRY_ENABLED=0
printf '[superlink]\ndefault = "zk0"\n\n[superlink.zk0]\naddress = "%s"\nroot-certificates = "%s"\n' "$address" "$ca" \
    > "$FLWR_HOME/config.toml"
for key in "$@"; do
    for attempt in 1 2 3 4 5; do
        if out="$(flwr supernode register "$key" zk0 2>&1)"; then
            echo "registered $key"; continue 2
        fi
        case "$out" in *"already in use"*|*"already registered"*) echo "already registered: $key"; continue 2 ;; esac
        echo "register $key failed (try $attempt): $out" >&2
        sleep 3
    done
    exit 1
done
