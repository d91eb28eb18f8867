#!/usr/bin/env bash
# Join a zk0 federation from a robot's host: one `docker run` of the zk0 image as a SuperNode.
#
#   supernodes/join.sh --superlink PUBLIC_ADDR:8000 --dataset PATH_OR_HUB_ID [options]
#
#   --superlink HOST:PORT   the SuperLink's public address (its host publishes port 8000)
#   --dataset X             a local LeRobot dataset folder (mounted read-only) or a Hub id
#   --cameras MAP           the dataset's cameras onto the policy's slots, e.g. top=camera1,wrist=camera2
#                           (`zk0 check` or a refused start prints the line for your dataset)
#   --name NAME             this node's name in records and WandB (default: the host's name)
#   --gpu N                 pin the node to GPU N (NVIDIA container runtime); default: CPU
#   --tls DIR --key NAME    TLS and authentication: DIR holds ca.crt and supernodes/NAME
#                           (from superlink/make-certs.sh on the SuperLink's host)
#   --image IMAGE           default zk0:latest (build it with `docker compose build`, or load it)
#   --env-file FILE         more node settings (ZK0_HELDOUT_EPISODES, ZK0_TORCH_THREADS, ...)
#   --container NAME        container name (default zk0-supernode)
#   --fast-loop             zk0's fast loop (0.25 s polls, forked ClientApps) instead of Flower's own
#                           flower-supernode and SuperExec (default)
#   -- ARGS...              extra `docker run` arguments (e.g. -v, --network)
#
# The container restarts with the host (--restart unless-stopped) and reconnects to the SuperLink
# by itself. Only outbound connections to the SuperLink's port are needed on the robot's side.
set -euo pipefail
usage() { sed -n '2,24s/^# \{0,1\}//p' "$0"; exit 2; }
superlink="" dataset="" cameras="" name="$(hostname)" gpu="" tls="" key="" image="${ZK0_IMAGE:-zk0:latest}" env_file="" container=zk0-supernode fast=""
while [ $# -gt 0 ]; do
    case "$1" in
        --superlink) superlink=$2; shift 2 ;;
        --dataset) dataset=$2; shift 2 ;;
        --cameras) cameras=$2; shift 2 ;;
        --name) name=$2; shift 2 ;;
        --gpu) gpu=$2; shift 2 ;;
        --tls) tls=$2; shift 2 ;;
        --key) key=$2; shift 2 ;;
        --image) image=$2; shift 2 ;;
        --env-file) env_file=$2; shift 2 ;;
        --container) container=$2; shift 2 ;;
        --fast-loop) fast=1; shift ;;
        --) shift; break ;;
        -h|--help) usage ;;
        *) echo "join.sh: unknown option $1" >&2; usage ;;
    esac
done
[ -n "$superlink" ] && [ -n "$dataset" ] || { echo "join.sh: --superlink and --dataset are required" >&2; usage; }
if [ -n "$tls" ] && { [ -z "$key" ] || [ ! -f "$tls/ca.crt" ] || [ ! -f "$tls/supernodes/$key" ]; }; then
    echo "join.sh: --tls $tls needs --key NAME with $tls/ca.crt and $tls/supernodes/NAME (superlink/make-certs.sh)" >&2; exit 2
fi

args=(run -d --name "$container" --restart unless-stopped --init
      -v zk0-hf-cache:/home/zk0/.cache/huggingface -v zk0-cache:/home/zk0/.cache/zk0
      -e "ZK0_NAME=$name" -e HF_TOKEN -e HF_HUB_OFFLINE)
[ -n "$cameras" ] && args+=(-e "ZK0_CAMERAS=$cameras")
if [ -e "$dataset" ]; then  # a local folder: mount it where the node looks
    args+=(-v "$(cd "$dataset" && pwd):/work/datasets/local:ro" -e "ZK0_DATASET=datasets/local")
else
    args+=(-e "ZK0_DATASET=$dataset")
fi
node=(zk0 supernode --superlink "$superlink")
[ -n "$fast" ] && node+=(--fast-loop)
if [ -n "$gpu" ]; then args+=(--gpus "device=$gpu" -e ZK0_DEVICE=cuda); else args+=(-e ZK0_DEVICE=cpu); fi
if [ -n "$tls" ]; then
    tls="$(cd "$tls" && pwd)"
    args+=(-v "$tls/ca.crt:/tls/ca.crt:ro" -v "$tls/supernodes/$key:/tls/node.key:ro")
    node+=(--root-certificates /tls/ca.crt --auth-key /tls/node.key)
fi
[ -n "$env_file" ] && args+=(--env-file "$env_file")
exec docker "${args[@]}" "$@" "$image" "${node[@]}"
