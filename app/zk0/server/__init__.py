"""The server: the ServerApp, its round loop, strategy, records, tracking, plots and publishing."""
