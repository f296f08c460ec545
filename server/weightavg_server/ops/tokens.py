"""The tokens file of `weightavg serve --tokens FILE`: tokens to tenants and roles, tenants' quotas.

TOML (or JSON, for a name ending in .json)::

    # Reloaded on SIGHUP: removed tokens stop working at once; their tenants' objects stay.
    [tenants.vision]                 # quotas; a tenant without a table has none
    max_device_bytes = 8_000_000_000 # tensor bytes its handles may reach on any one device ("8GB" too)
    max_handles = 10_000             # live handles it may own
    max_sessions = 100               # sessions it may hold open at once

    [[tokens]]
    token = "kq3…"                   # at least 16 characters; or sha256 = "<hex digest of the token>"
    tenant = "vision"
    role = "user"                    # admin, user or reader

Every mistake is refused with where it is and the rule it breaks, never the value that breaks it (a
token put in the wrong field would land in the log): an unknown key, a role or a tenant name that is
not valid, a quota that is not a whole number (max_device_bytes also takes a size string, "8GiB"),
a token given twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import stat
import sys
from pathlib import Path
from typing import Any

from .config import parse_bytes, sendable_token
from ..store.tenants import DEFAULT_TENANT, Caller, Quota, Role, check_tenant_name
from ..transport.tenancy import TokenTable, token_digest
from ..domain.errors import InvalidArgument

log = logging.getLogger("weightavg.server")

MIN_TOKEN_LENGTH = 16
"""Shorter tokens are refused: a token is a password; make one with
`python -c "import secrets; print(secrets.token_urlsafe(32))"`."""
_TOKEN_KEYS = {"token", "sha256", "tenant", "role"}
_QUOTA_KEYS = {"max_device_bytes", "max_handles", "max_sessions"}


class TokensFileError(ValueError):
    """The tokens file cannot be read or is not valid; the message says where and why."""


def _warn_if_others_can_read(path: Path, data: dict[str, Any]) -> None:
    """A file of plain tokens that other users of the host can read lends them every tenant's access
    (it was read without a word; found by review). Files of sha256 digests alone are no secret. A
    warning, not a refusal: a Kubernetes secret volume is 0644 unless its defaultMode says otherwise."""
    entries = data.get("tokens")
    plain = isinstance(entries, list) and any(isinstance(e, dict) and "token" in e for e in entries)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if plain and mode & stat.S_IROTH:
        log.warning(
            "the tokens file %s is readable by every user of this host (mode %04o): anyone here can read its "
            "tokens; chmod o-r %s (or 0600), or list the tokens by their sha256 instead", path, mode, path,
        )


def _refuse_if_others_can_write(path: Path) -> None:
    """A tokens file every user of the host can write lets any of them add an admin token of their
    own, taken at the next SIGHUP or start (it was read without a word; found by review), digests
    and plain tokens alike. Refused, as a state directory every user can write is."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return  # reading it says why
    if mode & stat.S_IWOTH:
        raise TokensFileError(
            f"the tokens file {path} is writable by every user of this host (mode {mode:04o}): anyone here could "
            f"give themselves an admin token; chmod o-w {path} (or 0600)"
        )


def _parse(path: Path) -> dict[str, Any]:
    _refuse_if_others_can_write(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TokensFileError(f"cannot read the tokens file {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(raw)
        else:
            if sys.version_info < (3, 11):
                raise TokensFileError(f"{path}: reading TOML needs Python 3.11 or later; write the file as JSON (.json)")
            import tomllib

            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise TokensFileError(f"{path} does not parse: {exc}") from None
    except RecursionError:  # arrays nested thousands deep: it escaped the reload and ended the server unsaved
        raise TokensFileError(f"{path} does not parse: its arrays or tables nest too deeply") from None
    if not isinstance(data, dict):
        raise TokensFileError(f"{path}: expecting a table with 'tokens' (and optionally 'tenants')")
    _warn_if_others_can_read(path, data)
    return data


MAX_QUOTA = 2**63 - 1
"""Largest quota: GetServerStats reports each tenant's quotas as int64 (one above it was loaded, and
made every GetServerStats that showed the tenant INTERNAL; found by review)."""


def _whole(value: Any, where: str) -> int:
    """A quota's value, checked; the error says what was given by its type alone, never the value."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_QUOTA:
        given = (
            type(value).__name__ if isinstance(value, bool) or not isinstance(value, int)
            else "a negative number" if value < 0 else f"a number over {MAX_QUOTA}"
        )
        raise TokensFileError(f"{where} must be a whole number of 0 or more (0: no quota), not {given}")
    return value


def _size(value: Any, where: str) -> Any:
    """A byte quota: a number, or a string with a unit as the --*-bytes flags take (`"8GiB"`,
    `"500GB"`; config.parse_bytes), so the file and the flags read sizes alike. Other values go on
    to `_whole` as they are. The error never quotes the string (a misplaced token would land in the log)."""
    if not isinstance(value, str):
        return value
    try:
        return parse_bytes(value)
    except ValueError:
        raise TokensFileError(
            f"{where} must be a whole number of bytes of 0 or more (0: no quota) or a size string such as \"8GiB\" "
            "(K, M, G, T, KiB... powers of 1024; KB, MB, GB, TB powers of 1000), not a str that is none of these"
        ) from None


def load_tokens(path: str | Path, token: str = "") -> TokenTable:
    """The token table of a tokens file, plus `token` (the single --token) as the default tenant's
    admin when given.

    Raises:
        TokensFileError: the file cannot be read or is not valid (nothing of it is used then).
    """
    path = Path(path)
    data = _parse(path)
    unknown = set(data) - {"tokens", "tenants"}
    if unknown:
        raise TokensFileError(f"{path}: unknown top-level key(s) {sorted(unknown)}; expecting 'tokens' and 'tenants'")
    quotas: dict[str, Quota] = {}
    tenants = data.get("tenants", {})
    if not isinstance(tenants, dict):
        raise TokensFileError(f"{path}: 'tenants' must be a table of tenant name -> quotas")
    for position, (name, table) in enumerate(tenants.items()):
        try:
            check_tenant_name(name)
        except InvalidArgument as exc:  # the name may be a misplaced token: say where it is instead
            raise TokensFileError(f"{path}: tenants, table {position} (counting from 0): {exc}") from None
        where = f"{path}: tenants.{name}"
        if not isinstance(table, dict) or set(table) - _QUOTA_KEYS:
            raise TokensFileError(f"{where} may set only {sorted(_QUOTA_KEYS)}")
        quotas[name] = Quota(
            max_device_bytes=_whole(_size(table.get("max_device_bytes", 0), f"{where}.max_device_bytes"),
                                    f"{where}.max_device_bytes"),
            max_handles=_whole(table.get("max_handles", 0), f"{where}.max_handles"),
            max_sessions=_whole(table.get("max_sessions", 0), f"{where}.max_sessions"),
        )
    entries = data.get("tokens", [])
    if not isinstance(entries, list):
        raise TokensFileError(f"{path}: 'tokens' must be a list of tables ([[tokens]] in TOML)")
    callers: dict[bytes, Caller] = {}
    for i, entry in enumerate(entries):
        where = f"{path}: tokens[{i}]"  # never the token: the file's positions are enough to find a mistake
        if not isinstance(entry, dict):
            raise TokensFileError(f"{where} must be a table with token (or sha256), tenant and role")
        unknown = set(entry) - _TOKEN_KEYS
        if unknown:
            raise TokensFileError(f"{where}: unknown key(s) {sorted(unknown)}; expecting {sorted(_TOKEN_KEYS)}")
        if ("token" in entry) == ("sha256" in entry):
            raise TokensFileError(f"{where}: give exactly one of 'token' and 'sha256'")
        if "token" in entry:
            secret = entry["token"]
            # Printable ASCII too: a token of other characters was loaded, and no client could send it.
            if not isinstance(secret, str) or len(secret) < MIN_TOKEN_LENGTH or not sendable_token(secret):
                raise TokensFileError(
                    f"{where}: a token must be a string of at least {MIN_TOKEN_LENGTH} characters, printable ASCII "
                    "without surrounding spaces "
                    "(e.g. from python -c \"import secrets; print(secrets.token_urlsafe(32))\")"
                )
            digest = token_digest(secret)
        else:
            hexdigest = entry["sha256"]
            try:
                digest = bytes.fromhex(hexdigest) if isinstance(hexdigest, str) else b""
            except ValueError:
                digest = b""
            if len(digest) != hashlib.sha256().digest_size:
                raise TokensFileError(f"{where}: sha256 must be the 64 hex digits of the token's SHA-256")
        try:
            tenant = check_tenant_name(entry.get("tenant", ""))
        except InvalidArgument as exc:
            raise TokensFileError(f"{where}: {exc}") from None
        try:
            role = Role(entry.get("role"))
        except ValueError:  # never the value given: it may be a misplaced token
            raise TokensFileError(
                f"{where} (tenant '{tenant}'): role must be one of {[r.value for r in Role]}"
            ) from None
        if digest in callers:
            raise TokensFileError(f"{where}: the same token is given twice; each token stands for one tenant and role")
        callers[digest] = Caller(tenant, role)
    if token:
        digest = token_digest(token)
        if digest in callers and callers[digest] != Caller(DEFAULT_TENANT, Role.ADMIN):
            raise TokensFileError(f"{path}: --token is also in the file with another tenant or role")
        callers[digest] = Caller(DEFAULT_TENANT, Role.ADMIN)
    if not callers:
        raise TokensFileError(f"{path} has no token: every call would be refused")
    return TokenTable(callers, quotas)


def token_table(tokens_file: str, token: str) -> TokenTable:
    """The table for a server's configuration: the file's (with --token), --token's alone, or open."""
    return load_tokens(tokens_file, token) if tokens_file else TokenTable.single(token)
