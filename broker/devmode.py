"""`broker serve --dev`: everything embedded in one data directory.

    DIR/broker.db          SQLite storage (WAL)
    DIR/hsm/               a SoftHSM2 token of our own (softhsm2.conf, tokens/, pin 0600)
    DIR/keys/              software key backend instead, when SoftHSM2 is not installed
    DIR/operator/          the operator identity for the CLI (svid.pem, key.pem 0600)
    DIR/bundle.pem         the trust bundle

Restarting with the same DIR keeps the same CA and data: the key backend that DIR was created
with is kept (a DIR made with SoftHSM2 refuses to start without it, rather than silently
making a new CA). hsm/softhsm2.conf is rewritten at every start from DIR's actual location, so
a moved, copied or restored DIR uses its own token, never the original's; a DIR whose token
directory is missing or resolves outside it is refused.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

from broker.config import (
    DEFAULT_LISTEN,
    Config,
    KeysConfig,
    ServerConfig,
    StorageConfig,
    apply_env,
)
from broker.errors import FailedPrecondition
from broker.files import write_private_file
from broker.softhsm import configure_process, init_token, softhsm_available, write_config
from ca.keys.pkcs11 import DEFAULT_PKCS11_MODULE

__all__ = ["DEV_OPERATOR", "DEV_TRUST_DOMAIN", "prepare"]

DEV_TRUST_DOMAIN = "broker.local"
DEV_OPERATOR = f"spiffe://{DEV_TRUST_DOMAIN}/broker/operator/dev"
TOKEN_LABEL = "broker"  # noqa: S105 - a token label, not a secret


def _keys_for(data_dir: Path, warn: Callable[[str], None]) -> KeysConfig:
    hsm, soft = data_dir / "hsm", data_dir / "keys"
    conf = hsm / "softhsm2.conf"
    if conf.exists() or conf.is_symlink():
        if not softhsm_available():
            raise FailedPrecondition(
                f"{data_dir} keeps its CA keys in a SoftHSM2 token, but SoftHSM2 is not "
                "installed (apt-get install softhsm2)"
            )
        conf = _own_token_conf(data_dir, hsm, warn)
    elif soft.exists() or not softhsm_available():
        if not soft.exists():
            warn(
                "SoftHSM2 is not installed: using the software key backend "
                f"(keys encrypted under {soft}); apt-get install softhsm2 for an HSM token"
            )
        pin_file = data_dir / "keys.pin"
        if not pin_file.exists():
            write_private_file(pin_file, secrets.token_hex(24).encode())
        soft.mkdir(mode=0o700, exist_ok=True)
        return KeysConfig(uri=f"software:path={soft}", pin_source=f"file:{pin_file}")
    else:
        hsm.mkdir(mode=0o700, parents=True, exist_ok=True)
        pin, so_pin = secrets.token_hex(16), secrets.token_hex(16)
        write_private_file(hsm / "pin", pin.encode())
        write_private_file(hsm / "so-pin", so_pin.encode())
        conf = init_token(hsm, TOKEN_LABEL, pin.encode(), so_pin.encode())
    configure_process(conf)
    return KeysConfig(
        uri=f"pkcs11:token={TOKEN_LABEL}?module-path={DEFAULT_PKCS11_MODULE}",
        pin_source=f"file:{hsm / 'pin'}",
    )


def _tokendir(conf: Path) -> str | None:
    try:
        lines = conf.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and key.strip() == "directories.tokendir":
            return value.strip()
    return None


def _own_token_conf(data_dir: Path, hsm: Path, warn: Callable[[str], None]) -> Path:
    """The data dir's SoftHSM2 configuration, regenerated at every start from where the data
    dir actually is (SoftHSM2 needs an absolute token directory, so a copied or restored data
    dir would otherwise keep using the original's token). Refuses (FailedPrecondition) when the
    data dir has no token of its own, or when its token directory resolves outside it."""
    tokens = hsm / "tokens"
    try:
        inside = tokens.resolve(strict=True).is_relative_to(data_dir)
    except OSError:
        raise FailedPrecondition(
            f"{data_dir} was made with a SoftHSM2 token but {tokens} is missing: restore the "
            "whole data dir (with hsm/tokens), or start with a new, empty one"
        ) from None
    if not inside or tokens.is_symlink():
        raise FailedPrecondition(
            f"{tokens} points outside {data_dir} (to {tokens.resolve()}): refusing to use "
            "another data dir's token; copy the token files into the data dir"
        )
    if not any(child.is_dir() for child in tokens.iterdir()):
        raise FailedPrecondition(
            f"{tokens} holds no token: restore the data dir's hsm/tokens, or start with a new, "
            "empty data dir"
        )
    conf = hsm / "softhsm2.conf"
    before = _tokendir(conf) if not conf.is_symlink() else None
    if conf.is_symlink():
        conf.unlink()  # never write through a link to somewhere else
    written = write_config(hsm)
    after = _tokendir(written)
    if after is None or not Path(after).resolve().is_relative_to(data_dir):
        raise FailedPrecondition(f"{written} does not point inside {data_dir}: refusing to start")
    if before is not None and before != after:
        warn(
            f"{written} pointed at {before} (the data dir was moved, copied or restored); "
            f"it now uses this data dir's own token in {after}"
        )
    return written


def prepare(data_dir: Path, listen: str | None, warn: Callable[[str], None]) -> Config:
    """Create (or reopen) the dev data dir and return its configuration."""
    data_dir = data_dir.resolve()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = _keys_for(data_dir, warn)
    config = Config(
        trust_domain=DEV_TRUST_DOMAIN,
        data_dir=data_dir,
        storage=StorageConfig(dsn=f"sqlite:///{data_dir / 'broker.db'}"),
        keys=keys,
        server=ServerConfig(listen=listen or DEFAULT_LISTEN, operators=(DEV_OPERATOR,)),
        dev=True,
    )
    config = apply_env(config)
    if listen:
        from dataclasses import replace

        config = replace(config, server=replace(config.server, listen=listen))
    return config.validate()
