"""The broker's Python clients: `base` (one mTLS connection, `BrokerClient`, its error mapping,
and the `FeatureClient` every feature client builds on), one module per feature (`ca`,
`audit`, `identity`, `database`, `secrets`, `access`, `operators`), and the secrets
runtime SDK (`sdk`, grpc-free: any `SecretSource` feeds it). Imports nothing from
`broker.api.server`. Kept empty so that importing the grpc-free `sdk` loads no grpc."""
