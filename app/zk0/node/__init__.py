"""The node: the ClientApp, its per-node session, the warm worker and personalisation."""
