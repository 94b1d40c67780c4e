"""SoftHSM2 tokens kept in a directory of our own (`broker dev`, tests, CI).

Token provisioning is no key custody: it lives beside dev mode (`broker.devmode`), which the
test fixtures and load tests share, not in the CA library.

Layout: ``DIR/softhsm2.conf`` and ``DIR/tokens/``. SoftHSM2 finds its configuration through the
``SOFTHSM2_CONF`` environment variable, which it reads in C_Initialize; it also enumerates the
token directory only then. python-pkcs11 loads and initialises a module once per process and
caches it, so:

- `configure_process()` sets ``SOFTHSM2_CONF``; do it before the first PKCS#11 use. If the
  module is already loaded and the value changed, it re-initialises the module
  (`ca.keys.pkcs11.refresh_module`), which makes the new configuration take effect.
- tokens created with `init_token()` after the module was loaded are NOT visible until the
  module is re-initialised. `Pkcs11Backend` does that by itself, once, when it does not find its
  token; `refresh_module()` can also be called directly.

`init_token()` runs ``softhsm2-util``, which takes PINs only on its command line; they are
never logged, and are scrubbed from any error message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ca.errors import InvalidInput, KeyBackendError
from ca.keys.backend import DEFAULT_PKCS11_MODULE

__all__ = [
    "SOFTHSM_MODULE",
    "configure_process",
    "init_token",
    "softhsm_available",
    "softhsm_missing",
    "softhsm_util",
    "write_config",
]

SOFTHSM_MODULE = DEFAULT_PKCS11_MODULE
_UTIL_FALLBACK = "/usr/bin/softhsm2-util"
_CONF_NAME = "softhsm2.conf"


def softhsm_util() -> str:
    """Path of ``softhsm2-util`` (on PATH, else the Debian location)."""
    return shutil.which("softhsm2-util") or _UTIL_FALLBACK


def softhsm_missing(module_path: str = SOFTHSM_MODULE) -> list[str]:
    """What is missing for SoftHSM2 to be usable here (empty when all is present)."""
    missing = []
    if not Path(module_path).is_file():
        missing.append(f"PKCS#11 module {module_path} (Debian package softhsm2)")
    if not Path(softhsm_util()).is_file():
        missing.append("softhsm2-util (Debian package softhsm2)")
    return missing


def softhsm_available(module_path: str = SOFTHSM_MODULE) -> bool:
    """True when the SoftHSM2 module and ``softhsm2-util`` are installed."""
    return not softhsm_missing(module_path)


def write_config(directory: Path) -> Path:
    """Create ``DIR/tokens`` and ``DIR/softhsm2.conf`` (file object store, errors-only log).

    Idempotent; returns the path of the configuration file.
    """
    directory = Path(directory).absolute()
    tokens = directory / "tokens"
    tokens.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = directory / _CONF_NAME
    text = f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    if not conf.is_file() or conf.read_text() != text:
        tmp = conf.with_name(conf.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(0o600)
        tmp.replace(conf)
    return conf


def _check_pin(pin: bytes, what: str) -> str:
    try:
        text = bytes(pin).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"the {what} must be UTF-8") from None
    if not 4 <= len(text) <= 255:
        raise InvalidInput(f"SoftHSM2 needs a {what} of 4 to 255 characters")
    if text.startswith("-") or "\x00" in text:
        raise InvalidInput(f"the {what} must not start with '-' or contain NUL")
    return text


def init_token(directory: Path, label: str, pin: bytes, so_pin: bytes) -> Path:
    """Initialise a new SoftHSM2 token `label` in `DIR/tokens`; return ``DIR/softhsm2.conf``.

    Runs ``softhsm2-util --init-token --free`` with ``SOFTHSM2_CONF`` pointing at our
    configuration. A process that already loaded the module sees the token only after a
    re-initialisation (see the module docstring).
    """
    if not label or len(label.encode("utf-8")) > 32 or label.startswith("-"):
        raise InvalidInput(
            f"invalid SoftHSM2 token label {label!r}: 1 to 32 bytes, not starting with '-'"
        )
    pin_text = _check_pin(pin, "user PIN")
    so_text = _check_pin(so_pin, "SO PIN")
    missing = softhsm_missing()
    if missing:
        raise KeyBackendError(f"SoftHSM2 is not installed: missing {', '.join(missing)}")
    conf = write_config(directory)
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    argv = [
        softhsm_util(),
        "--init-token",
        "--free",
        "--label",
        label,
        "--pin",
        pin_text,
        "--so-pin",
        so_text,
    ]
    try:
        result = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KeyBackendError(f"softhsm2-util could not run: {type(exc).__name__}") from None
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        for secret in (pin_text, so_text):
            detail = detail.replace(secret, "***")
        raise KeyBackendError(
            f"softhsm2-util failed to initialise token {label!r} (exit {result.returncode}): "
            f"{detail[:500]}"
        )
    return conf


def configure_process(conf_path: Path) -> None:
    """Point this process's SoftHSM2 at `conf_path` (sets ``SOFTHSM2_CONF``).

    Call before the module is first loaded. If it is loaded already and the value changes, the
    module is re-initialised so the new configuration is read (open backends reconnect).
    """
    conf = str(Path(conf_path).absolute())
    if not Path(conf).is_file():
        raise InvalidInput(f"SoftHSM2 configuration {conf} does not exist")
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = conf
    if previous == conf:
        return
    import pkcs11  # python-pkcs11's per-process cache of loaded modules

    if SOFTHSM_MODULE in getattr(pkcs11, "_loaded", {}):
        from ca.keys.pkcs11 import refresh_module

        refresh_module(SOFTHSM_MODULE)
