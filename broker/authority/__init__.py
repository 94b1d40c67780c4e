"""The CA as a service: bootstrap, rotation, issuance, the trust bundle, status and CA policy.

The package's parts: `manager` (the root, the issuing generations, their rotation and the
request path's snapshot, over the small `AuthorityStore` it declares), `issuing` (SVIDs under
CA policy, the broker's own identities outside it), `policies` (CA policy versions), `views`
(configuration and what is handed out), and `service` (`CAService`, the one object the rest of
the broker uses). The names below are the package's public face.

The X.509 bundle holds the root(s); an issuing CA generation pairs an intermediate with a JWT
signing key. A generation is prepared (its JWT key published in the bundle) well before it
signs, and stays published after retirement until the last SVID it signed has expired.
"""

from broker.authority.service import CAService
from broker.authority.views import (
    AuthorityView,
    BundleView,
    CAServiceConfig,
    CAStatus,
    IssuedJWT,
    IssuedX509,
)

__all__ = [
    "AuthorityView",
    "BundleView",
    "CAService",
    "CAServiceConfig",
    "CAStatus",
    "IssuedJWT",
    "IssuedX509",
]
