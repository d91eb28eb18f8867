"""Deployment: zk0 local, zk0 supernode, zk0 submit, the flwr CLI, preflight checks and process ownership."""
