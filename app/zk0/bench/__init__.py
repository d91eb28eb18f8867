"""Benchmarks (zk0 bench ...): run from the installed package, never sent with flwr run."""
