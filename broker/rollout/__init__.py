"""Staged rollout of a new secret version (issue 12): stages placed by a hash of each
consumer's SPIFFE ID, bake timers on the injected clock, consumers' and the operator's health
checks, automatic rollback. `rollout.pml` is the Promela model of the state machine."""
