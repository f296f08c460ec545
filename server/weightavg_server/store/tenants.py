"""Tenants: who a call is made for, what its role lets it do, and the quotas its objects count against.

A tenant is a team (the tokens file names one per token). Every handle belongs to the tenant whose
token created it; another tenant's handle does not exist for a caller (NOT_FOUND, so its existence
is not revealed), except for admins, who see every tenant's. The caller of the call being served is
a context variable, set by the transport's tenant interceptor from the call's token, as the session
is: everything the store does for the call knows whose it is without any servicer passing it.
"""

from __future__ import annotations

import contextvars
import enum
import re
from dataclasses import dataclass

from ..domain.errors import InvalidArgument, PermissionDenied

DEFAULT_TENANT = "default"
"""The tenant of a server without a tokens file (open, or one --token), and of handles restored from
a snapshot written before tenants existed."""

TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Tenant names: short, printable, safe in logs, metrics labels and JSON without escaping."""


class Role(enum.Enum):
    """What a token may do; the values are the names the tokens file uses."""

    ADMIN = "admin"
    """Everything, on every tenant's objects: server-wide snapshots, listings and purges included."""
    USER = "user"
    """Create, change, fetch, list and free its own tenant's objects."""
    READER = "reader"
    """Fetch and list its own tenant's objects; change nothing."""


@dataclass(frozen=True)
class Caller:
    """The tenant and role a call is made with."""

    tenant: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def may_see(self, tenant: str) -> bool:
        """Whether this caller may use (and learn of) an object of `tenant`."""
        return self.role is Role.ADMIN or tenant == self.tenant

    def require_writer(self, what: str) -> None:
        """PermissionDenied for a reader: it may fetch and list, never change anything."""
        if self.role is Role.READER:
            raise PermissionDenied(
                f"{what}: the token of tenant '{self.tenant}' is a reader token (fetch and list only); "
                "use a user or admin token to change anything"
            )

    def require_admin(self, what: str) -> None:
        """PermissionDenied unless an admin: server-wide operations span every tenant."""
        if self.role is not Role.ADMIN:
            raise PermissionDenied(
                f"{what} spans every tenant: it needs an admin token (this call's token is tenant "
                f"'{self.tenant}', role {self.role.value})"
            )


ANONYMOUS = Caller(DEFAULT_TENANT, Role.ADMIN)
"""The caller where no token table says otherwise: a server without tokens is one admin tenant."""

CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("weightavg_caller", default=ANONYMOUS)
"""The caller of the call being served (set by the tenant interceptor from the call's token)."""


@dataclass(frozen=True)
class Quota:
    """What one tenant's objects may hold; 0 means no quota (the server's caps still apply).

    Args:
        max_device_bytes: most tensor bytes its handles reach on any one device.
        max_handles: most live handles it owns.
        max_sessions: most sessions it holds open at once.
    """

    max_device_bytes: int = 0
    max_handles: int = 0
    max_sessions: int = 0


def check_tenant_name(name: str) -> str:
    """The name, if it is a valid tenant name; InvalidArgument saying what is allowed otherwise. The
    message never quotes the name: a token written in the tenant's place of a tokens file would land
    in the log (found by review); callers say which entry it was."""
    if not isinstance(name, str) or not TENANT_NAME.fullmatch(name):
        raise InvalidArgument(
            "tenant name is not valid: use 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name
