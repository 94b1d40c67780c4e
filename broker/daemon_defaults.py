"""Defaults shared by the CLI, dev mode and the daemon."""

DEFAULT_LISTEN = "127.0.0.1:8443"
DEFAULT_DATA_DIR = ".broker"
