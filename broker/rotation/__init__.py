"""Scheduled rotation (issue 12 item 3): leader-held jobs that rotate what the broker can
remake itself -- secrets created with `--generate` (`schedule.SecretRotationJob`) and the
envelope's data keys (`datakeys.DataKeyRotationJob`) -- and report the rest as due.

Static database roles rotate in `broker.database.scheduler`, KMS keys and KEKs in
`broker.kms.lifecycle`. This package imports the domain; nothing in the domain imports it
(the application wires it)."""
