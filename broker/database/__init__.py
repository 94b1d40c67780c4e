"""Dynamic database credentials: engines (PostgreSQL, MySQL/MariaDB), statement templates,
the credential service with its leases, and the lease reaper."""
