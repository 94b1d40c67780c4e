"""Rego policies, compiled and evaluated with regopy (rego-cpp).

A policy is a set of modules (file name -> source) defining `package broker.authz` with two
sets of objects, `allow` and `deny`, each object carrying at least `rule` and `reason`
(see `broker/policies/default.rego`, the shipped policy). `RegoEngine` compiles the modules
once, refuses a policy that does not parse, does not compile or fails on a sample input, and
evaluates one input document per call. It is not thread-safe: the broker calls it from its
event loop only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

from regopy import Interpreter, LogLevel, RegoError

from broker.errors import InvalidArgument

__all__ = [
    "DEFAULT_MODULE",
    "PACKAGE",
    "InvalidRegoPolicy",
    "RegoEngine",
    "RegoResult",
    "default_modules",
]

PACKAGE: Final = "broker.authz"
DEFAULT_MODULE: Final = "default.rego"
_VERDICT_MODULE: Final = "_broker_verdict.rego"
_VERDICT_SOURCE: Final = (
    f'package {PACKAGE}\n\nimport rego.v1\n\nbroker_verdict := {{"allow": allow, "deny": deny}}\n'
)
_ENTRYPOINT: Final = PACKAGE.replace(".", "/") + "/broker_verdict"
_MAX_MODULES: Final = 32
_MAX_MODULE_BYTES: Final = 256 * 1024
_MODULE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# rego-cpp errors: (error 1:<file>|<offset>|<length> (errormsg <n>:<text>) ...)
_ERROR = re.compile(r"\(error \d+:([^|]*)\|(\d+)\|\d+\s*\(errormsg \d+:([^)]*)\)")

# A sample input every policy must evaluate without error before it is accepted.
_SAMPLE_INPUT: Final[dict[str, Any]] = {
    "action": "secrets.get",
    "caller": {
        "id": "spiffe://example.org/acme/prod/web",
        "operator": False,
        "tenant": "acme",
        "environment": "prod",
        "service": "web",
        "attestation": "x509-svid",
        "grants": [],
        "approvals": [],
    },
    "resource": {
        "name": "secret://acme/prod/web/api-key",
        "tenant": "acme",
        "environment": "prod",
        "owner": "web",
        "classification": "pii",
    },
    "context": {"time": "2026-01-01T00:00Z", "justification": "", "ticket": ""},
    "builtin": {"allowed": False, "rule": "operator-only", "reason": "sample"},
    "trust_domain": "example.org",
}


class InvalidRegoPolicy(InvalidArgument):
    """The Rego modules do not parse, compile or evaluate; nothing was changed."""


@dataclass(frozen=True)
class RegoResult:
    """The policy's verdicts for one input: every matching allow and deny object."""

    allow: tuple[Mapping[str, Any], ...]
    deny: tuple[Mapping[str, Any], ...]


def default_modules() -> dict[str, str]:
    """The shipped policy (the standard as code)."""
    text = resources.files("broker.policies").joinpath(DEFAULT_MODULE).read_text("utf-8")
    return {DEFAULT_MODULE: text}


def _describe(exc: RegoError, modules: Mapping[str, str]) -> str:
    """rego-cpp's error sequence as "file:line:col: message; ..."."""
    found = []
    for name, offset, message in _ERROR.findall(str(exc)):
        source = modules.get(name)
        where = name or "policy"
        if source is not None:
            before = source[: int(offset)]
            line = before.count("\n") + 1
            col = int(offset) - (before.rfind("\n") + 1) + 1
            where = f"{name}:{line}:{col}"
        found.append(f"{where}: {message.strip()}")
    if not found:
        return " ".join(str(exc).split())[:500]
    return "; ".join(found[:5])


def _check_shape(modules: Mapping[str, str]) -> None:
    if not modules:
        raise InvalidRegoPolicy("a Rego policy needs at least one module")
    if len(modules) > _MAX_MODULES:
        raise InvalidRegoPolicy(f"a Rego policy may have at most {_MAX_MODULES} modules")
    for name, text in modules.items():
        if not _MODULE_NAME.match(name):
            raise InvalidRegoPolicy(
                f"module name {name!r} must be 1-128 letters, digits, '.', '_' or '-'"
            )
        if len(text.encode("utf-8")) > _MAX_MODULE_BYTES:
            raise InvalidRegoPolicy(f"module {name} is larger than {_MAX_MODULE_BYTES} bytes")


def _verdicts(value: Any, key: str) -> tuple[Mapping[str, Any], ...]:
    items = value.get(key, []) if isinstance(value, dict) else []
    if not isinstance(items, list):
        raise InvalidRegoPolicy(f"data.{PACKAGE}.{key} must be a set of objects")
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("rule"), str):
            raise InvalidRegoPolicy(
                f"every element of data.{PACKAGE}.{key} must be an object with a 'rule' string"
            )
        out.append(item)
    return tuple(out)


class RegoEngine:
    """One compiled Rego policy. Raises InvalidRegoPolicy from the constructor when the modules
    are refused.

    The modules are compiled once into a bundle (rego-cpp's compiled plan) with one entrypoint,
    `data.broker.authz.broker_verdict` (added here: {"allow": allow, "deny": deny}); each
    evaluation runs that plan, about 20 times cheaper than a fresh query.
    """

    def __init__(self, modules: Mapping[str, str]) -> None:
        _check_shape(modules)
        if _VERDICT_MODULE in modules:
            raise InvalidRegoPolicy(f"module name {_VERDICT_MODULE} is reserved")
        self.modules = dict(modules)
        # Helper packages are fine as long as one module defines the decision package.
        if not any(
            re.search(rf"^\s*package\s+{re.escape(PACKAGE)}\s*$", t, re.MULTILINE)
            for t in self.modules.values()
        ):
            raise InvalidRegoPolicy(f"no module declares 'package {PACKAGE}'")
        self._rego = Interpreter()
        self._rego.log_level = LogLevel.NONE  # errors come back in the exception, not on stdout
        try:
            for name, text in self.modules.items():
                self._rego.add_module(name, text)
            self._rego.add_module(_VERDICT_MODULE, _VERDICT_SOURCE)
            self._bundle = self._rego.build(None, [_ENTRYPOINT])
        except RegoError as exc:
            raise InvalidRegoPolicy(
                f"Rego policy refused: {_describe(exc, self.modules)}"
            ) from None
        if not self._bundle.ok():
            raise InvalidRegoPolicy("Rego policy refused: it does not compile")
        # A runtime failure on a plain input, or no verdict at all, refuses the policy.
        if not self._raw(_SAMPLE_INPUT):
            raise InvalidRegoPolicy(
                f"the policy must define both sets data.{PACKAGE}.allow and "
                f"data.{PACKAGE}.deny (either may be empty)"
            )

    def _raw(self, document: Mapping[str, Any]) -> dict[str, Any]:
        try:
            self._rego.set_input(dict(document))
            output = self._rego.query_bundle_entrypoint(self._bundle, _ENTRYPOINT)
        except RegoError as exc:
            raise InvalidRegoPolicy(f"Rego policy failed: {_describe(exc, self.modules)}") from None
        except ValueError:  # regopy could not read rego-cpp's answer (e.g. an undefined set)
            raise InvalidRegoPolicy(
                f"the Rego policy produced no usable verdict (are data.{PACKAGE}.allow and "
                ".deny both defined?)"
            ) from None
        if not output.ok():
            raise InvalidRegoPolicy(
                "the Rego policy failed to evaluate (a runtime error, such as a complete rule "
                "with conflicting values)"
            )
        text = str(output)
        if text == "undefined":
            return {}
        expressions = json.loads(text).get("expressions") or [{}]
        value = expressions[0]
        return value if isinstance(value, dict) else {}

    def evaluate(self, document: Mapping[str, Any]) -> RegoResult:
        """The allow and deny verdicts for `document`. Raises InvalidRegoPolicy when the policy
        fails on this input (the caller fails closed)."""
        value = self._raw(document)
        if not value:
            raise InvalidRegoPolicy(f"data.{PACKAGE}.allow or .deny is undefined for this input")
        return RegoResult(_verdicts(value, "allow"), _verdicts(value, "deny"))
