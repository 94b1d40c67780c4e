"""Command groups of the `broker` CLI beyond the CA core, one module per feature.

Each module builds on the shared helpers of `broker.cli` (connection options, `--output`,
one-line refusals, durations) and is imported at the end of `broker.cli`, which attaches its
groups to the root group. Import `broker.cli` (not these modules) to get the whole tree.
"""
