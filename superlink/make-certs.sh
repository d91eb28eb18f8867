#!/usr/bin/env bash
# Make the TLS and SuperNode-authentication files for a zk0 federation.
#
#   superlink/make-certs.sh [-n NODES] DIR [NAME ...]
#
# DIR/ca.crt, ca.key              a private CA (keep ca.key off the SuperLink host if you can)
# DIR/superlink.crt, .key         the SuperLink's certificate; its SANs are localhost, 127.0.0.1, ::1
#                                 and every NAME given (the public DNS names or IPs SuperNodes dial)
# DIR/supernodes/node-<i>, .pub   one ECDSA P-384 key pair per SuperNode, in OpenSSH format as
#                                 `flwr supernode register` and --auth-supernode-private-key expect
#
# Give each robot host ca.crt and its own node-<i>; register each node-<i>.pub with the SuperLink
# (`flwr supernode register DIR/supernodes/node-<i>.pub CONNECTION`; `zk0 local --tls DIR` does it).
# Existing files are kept, so the command can be rerun to add nodes.
set -euo pipefail
nodes=4
while getopts "n:h" opt; do
  case $opt in
    n) nodes=$OPTARG ;;
    *) sed -n '2,14s/^# \{0,1\}//p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { sed -n '2,14s/^# \{0,1\}//p' "$0"; exit 2; }
dir=$1; shift
command -v openssl >/dev/null || { echo "make-certs: openssl not found (apt-get install openssl)" >&2; exit 1; }
command -v ssh-keygen >/dev/null || { echo "make-certs: ssh-keygen not found (apt-get install openssh-client)" >&2; exit 1; }
mkdir -p "$dir/supernodes"
umask 077

if [ ! -f "$dir/ca.crt" ]; then
  openssl req -x509 -newkey rsa:3072 -nodes -sha256 -days 3650 -subj "/CN=zk0 federation CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
fi

sans="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then sans+=",IP:$name"; else sans+=",DNS:$name"; fi
done
# A new name needs a new certificate: reissue when the SANs differ from the existing one's.
if [ ! -f "$dir/superlink.crt" ] || [ "$(cat "$dir/superlink.sans" 2>/dev/null)" != "$sans" ]; then
  openssl req -newkey rsa:3072 -nodes -sha256 -subj "/CN=${1:-localhost}" \
    -keyout "$dir/superlink.key" -out "$dir/superlink.csr" 2>/dev/null
  openssl x509 -req -in "$dir/superlink.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 825 -sha256 -out "$dir/superlink.crt" \
    -extfile <(printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" "$sans") \
    2>/dev/null
  rm -f "$dir/superlink.csr"
  echo "$sans" > "$dir/superlink.sans"
fi

for ((i = 0; i < nodes; i++)); do
  key="$dir/supernodes/node-$i"
  [ -f "$key" ] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "zk0 node-$i" -f "$key"
done
chmod 644 "$dir/ca.crt" "$dir/superlink.crt" "$dir"/supernodes/*.pub
echo "make-certs: $dir (SANs $sans; $nodes SuperNode key pairs)"
