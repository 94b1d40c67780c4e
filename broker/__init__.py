"""The credential broker service. Domain code here never imports grpc; only `broker.api` does."""
