"""Systems under load: the broker (gRPC) and peers it is compared with (OpenBao over HTTP)."""
