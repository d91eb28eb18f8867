#!/usr/bin/env bash
# Build a local Python 3.12 base image for machines that cannot pull from a registry.
#
#   docker/make-base-image.sh [IMAGE]      (default IMAGE: zk0-base:py3.12-bookworm)
#
# It stands in for `python:3.12-slim-bookworm`: a Debian bookworm rootfs from debootstrap with the
# shared libraries CPython needs, plus this host's CPython 3.12 copied into /usr/local (bookworm's own
# python3 is 3.11, too old for lerobot). Needs root, debootstrap and a Debian mirror (apt's own).
# PYTHON312 may name the interpreter to copy (default: python3.12 on PATH, else pyenv's 3.12).
set -euo pipefail

image="${1:-zk0-base:py3.12-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

python="${PYTHON312:-}"
if [[ -z "$python" ]]; then
    python="$(command -v python3.12 || true)"
    [[ -z "$python" && -x "$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12" ]] \
        && python="$(pyenv root)/versions/3.12.1/bin/python3.12"
fi
[[ -n "$python" ]] || { echo "make-base-image: no Python 3.12 found; set PYTHON312=/path/to/python3.12" >&2; exit 2; }
prefix="$("$python" -c 'import sys; print(sys.base_prefix)')"
version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[[ "$version" == 3.12 ]] || { echo "make-base-image: $python is Python $version, need 3.12" >&2; exit 2; }
[[ -f "$prefix/lib/libpython3.12.so.1.0" ]] || { echo "make-base-image: $prefix has no libpython3.12.so.1.0 (need a --enable-shared build)" >&2; exit 2; }

root="$(mktemp -d /tmp/zk0-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT
echo "make-base-image: debootstrap bookworm into $root" >&2
debootstrap --variant=minbase \
    --include=ca-certificates,libssl3,libffi8,libsqlite3-0,libbz2-1.0,liblzma5,zlib1g,libreadline8,libncursesw6,libuuid1,libexpat1,libgomp1,procps \
    bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
rm -f "$root.log"

echo "make-base-image: copying CPython $("$python" -V 2>&1 | cut -d' ' -f2) from $prefix" >&2
mkdir -p "$root/usr/local/bin" "$root/usr/local/lib"
cp -a "$prefix/bin/python3.12" "$root/usr/local/bin/"
cp -a "$prefix"/lib/libpython3.12.so* "$prefix/lib/libpython3.so" "$root/usr/local/lib/"
# The standard library, without its test suite and without whatever the host installed into it.
tar -C "$prefix/lib" --exclude='python3.12/test' --exclude='python3.12/site-packages/*' \
    --exclude='__pycache__' -cf - python3.12 | tar -C "$root/usr/local/lib" -xf -
ln -s python3.12 "$root/usr/local/bin/python3"
ln -s python3.12 "$root/usr/local/bin/python"
chroot "$root" ldconfig
chroot "$root" /usr/local/bin/python3 -c 'import ssl, sqlite3, ctypes, lzma, bz2, zlib, uuid, readline'
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

tar -C "$root" -c . | docker import \
    -c 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$image" >/dev/null
echo "make-base-image: built $image" >&2
