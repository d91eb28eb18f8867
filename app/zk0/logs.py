"""One log format for every zk0 process, so node and server logs read alike."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Send the `zk0` logger to stderr once per process."""
    logger = logging.getLogger("zk0")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s zk0 %(levelname)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    # Flower's logger has its own handler; a root handler added by a library would print twice.
    logging.getLogger("flwr").propagate = False
    return logger
