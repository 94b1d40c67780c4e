"""Load tests for the broker: scenarios, a multi-process load generator, HDR latency histograms,
JSON reports, and side-by-side comparison with a peer (OpenBao) on the same machine.

Entry point: ``python -m loadtests run --scenario NAME ...`` (see loadtests/README.md).
"""
