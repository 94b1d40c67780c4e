"""The certificate authority: a library with no gRPC and no dependency on `broker`.

Public surface: SPIFFE IDs (`ca.spiffeid`), the identity layout (`ca.layout`), key custody
(`ca.keys`), certificate and JWT profiles (`ca.x509svid`, `ca.jwtsvid`), CSR checks (`ca.csr`),
trust bundles (`ca.bundle`), CA policy (`ca.policy`), rotation thresholds (`ca.rotation`) and the
error tree (`ca.errors`).
"""
