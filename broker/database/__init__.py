"""Dynamic database credentials, split as OpenBao splits its database engine: engines
(`engine`, `postgres`, `mysql`) and statement templates (`template`); connections with root
rotation and recovery (`connections`), roles (`roles`), credentials under leases (`leases`),
the `CredentialService` facade over those three (`credentials`), and the lease reaper
(`reaper`)."""
