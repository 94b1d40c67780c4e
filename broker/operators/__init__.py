"""Operators are people: OpenID Connect login with MFA, roles, the operator registry.

- `oidc`: ID-token verification (JWKS cached, refreshed on an unknown kid).
- `roles`: roles, their actions, the certificate extension that carries them, subjects.
- `service`: login (token -> operator SVID), whoami, logout, list, revoke.
- `flows`: the client side (authorization code + PKCE on a loopback redirect, device flow).
"""
