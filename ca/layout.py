"""Identity layout: how a SPIFFE ID's path maps to tenant, environment and service.

A layout is a template of path segments. `{tenant}`, `{environment}` and `{service}` are
placeholders that each capture exactly one segment; anything else is a literal segment that must
match exactly. Segments past the template are kept in `WorkloadIdentity.rest`.

    IdentityLayout()                                   # "{tenant}/{environment}/{service}"
        spiffe://example.org/acme/prod/web/worker  -> acme, prod, web, rest=("worker",)
    IdentityLayout("ns/{environment}/sa/{service}", default_tenant="default")
        spiffe://example.org/ns/prod/sa/web        -> default, prod, web

`{environment}` and `{service}` must each appear exactly once. `{tenant}` appears once, or not at
all with a `default_tenant` (never both, so the tenant is never ambiguous). In dev mode the broker
keeps the default template and issues IDs under `/default/...`.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from ca.errors import InvalidInput, InvalidSpiffeId
from ca.spiffeid import SpiffeId, TrustDomain, validate_path_segment

__all__ = ["DEFAULT_TEMPLATE", "DEV_TENANT", "IdentityLayout", "WorkloadIdentity"]

DEFAULT_TEMPLATE: Final = "{tenant}/{environment}/{service}"
DEV_TENANT: Final = "default"

_FIELDS: Final = ("tenant", "environment", "service")


@dataclasses.dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    """A SPIFFE ID read through the layout. `rest` holds the segments after the template."""

    spiffe_id: SpiffeId
    tenant: str
    environment: str
    service: str
    rest: tuple[str, ...] = ()


class IdentityLayout:
    """A validated template. Immutable; `parse` and `build` are pure and thread-safe."""

    __slots__ = ("_default_tenant", "_parts", "_template")

    def __init__(self, template: str = DEFAULT_TEMPLATE, default_tenant: str | None = None):
        if not isinstance(template, str):
            raise InvalidInput("identity layout template must be a string")
        context = f"identity layout template {template!r}"
        stripped = template.strip("/")
        if not stripped:
            raise InvalidInput(f"{context} is empty; e.g. {DEFAULT_TEMPLATE!r}")
        parts: list[str] = []
        for segment in stripped.split("/"):
            if segment.startswith("{") or segment.endswith("}"):
                name = segment[1:-1]
                if not (segment.startswith("{") and segment.endswith("}")) or name not in _FIELDS:
                    raise InvalidInput(
                        f"{context}: placeholder {segment!r} is not one of {{tenant}}, "
                        "{environment}, {service} (a placeholder is a whole segment)"
                    )
                parts.append(segment)
            else:
                try:
                    validate_path_segment(segment, context)
                except InvalidSpiffeId as exc:
                    raise InvalidInput(f"{context}: literal segment is invalid: {exc}") from None
                parts.append(segment)
        for name in ("environment", "service"):
            count = parts.count("{" + name + "}")
            if count != 1:
                raise InvalidInput(
                    f"{context}: {{{name}}} must appear exactly once (found {count})"
                )
        tenants = parts.count("{tenant}")
        if tenants > 1:
            raise InvalidInput(f"{context}: {{tenant}} must appear at most once (found {tenants})")
        if tenants == 1 and default_tenant is not None:
            raise InvalidInput(
                f"{context} has {{tenant}}; default_tenant is only for templates without it"
            )
        if tenants == 0:
            if default_tenant is None:
                raise InvalidInput(
                    f"{context} has no {{tenant}}; give default_tenant (e.g. {DEV_TENANT!r})"
                )
            try:
                validate_path_segment(default_tenant, "default_tenant")
            except InvalidSpiffeId as exc:
                raise InvalidInput(f"default_tenant {default_tenant!r} is invalid: {exc}") from None
        self._template = "/".join(parts)
        self._parts = tuple(parts)
        self._default_tenant = default_tenant

    @property
    def template(self) -> str:
        return self._template

    @property
    def default_tenant(self) -> str | None:
        return self._default_tenant

    def __repr__(self) -> str:
        return f"IdentityLayout({self._template!r}, default_tenant={self._default_tenant!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IdentityLayout):
            return NotImplemented
        return (self._parts, self._default_tenant) == (other._parts, other._default_tenant)

    def __hash__(self) -> int:
        return hash((self._parts, self._default_tenant))

    def parse(self, spiffe_id: SpiffeId | str) -> WorkloadIdentity:
        """Read tenant/environment/service from `spiffe_id`.

        Raises `InvalidSpiffeId` if the ID is malformed or does not fit the template (too few
        segments, or a literal segment differs), naming the template.
        """
        sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
        segments = sid.segments
        if len(segments) < len(self._parts):
            raise InvalidSpiffeId(
                f"SPIFFE ID {sid.id_string!r} does not match the identity layout "
                f"'/{self._template}': it has {len(segments)} path segment(s), "
                f"the layout needs at least {len(self._parts)}"
            )
        values: dict[str, str] = {}
        for index, (part, segment) in enumerate(zip(self._parts, segments, strict=False)):
            if part.startswith("{"):
                values[part[1:-1]] = segment
            elif part != segment:
                raise InvalidSpiffeId(
                    f"SPIFFE ID {sid.id_string!r} does not match the identity layout "
                    f"'/{self._template}': segment {index + 1} is {segment!r}, expected {part!r}"
                )
        tenant = values.get("tenant", self._default_tenant)
        assert tenant is not None  # guaranteed by the constructor's checks
        return WorkloadIdentity(
            spiffe_id=sid,
            tenant=tenant,
            environment=values["environment"],
            service=values["service"],
            rest=segments[len(self._parts) :],
        )

    def build(
        self,
        trust_domain: TrustDomain | str,
        *,
        environment: str,
        service: str,
        tenant: str | None = None,
        rest: tuple[str, ...] = (),
    ) -> SpiffeId:
        """The SPIFFE ID for these values; the inverse of `parse`.

        `tenant` defaults to the layout's default tenant; for a template without `{tenant}` it
        must be omitted or equal `default_tenant`. Raises `InvalidSpiffeId` for bad segments.
        """
        if "{tenant}" in self._parts:
            if tenant is None:
                raise InvalidInput(f"identity layout '/{self._template}' needs a tenant")
        elif tenant is not None and tenant != self._default_tenant:
            raise InvalidInput(
                f"identity layout '/{self._template}' has the fixed tenant "
                f"{self._default_tenant!r}; cannot build an ID for tenant {tenant!r}"
            )
        values = {"tenant": tenant or "", "environment": environment, "service": service}
        segments = [values[p[1:-1]] if p.startswith("{") else p for p in self._parts]
        return SpiffeId.from_segments(trust_domain, *segments, *rest)
