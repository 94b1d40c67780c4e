"""The broker's gRPC server: the request pipeline every RPC passes (`pipeline`), what each
feature declares (`binding`), the registry of served services (`services`), one servicer module
per feature, and the servers themselves (`serving`). Imports nothing from `broker.api.client`
or `broker.api.workload`."""
