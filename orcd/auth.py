"""Principals: who a request acts for, read from an auth file of token digests (CONTRACT §10).

The auth file holds one principal per line::

    # orcd auth file: sha256:<digest of the token> <name> <role>
    sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 alice user
    sha256:60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752 ops admin

Tokens are never stored, only their SHA-256 digests. Names are 1-64 characters of
``[A-Za-z0-9._-]``; ``system`` and ``anonymous`` are reserved. Roles are ``user`` (sees and
cancels only its own jobs) and ``admin`` (sees and cancels every job, may shut down).

:func:`add_token` (``orcd token add NAME [--admin]``) makes a token, appends its digest and
returns the token, which is shown once and cannot be recovered from the file.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import re
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from .errors import ConfigError

Role = Literal["user", "admin"]
ROLES: tuple[Role, ...] = ("user", "admin")
SYSTEM_NAME = "system"
ANONYMOUS_NAME = "anonymous"
RESERVED_NAMES = frozenset({SYSTEM_NAME, ANONYMOUS_NAME})

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DIGEST = re.compile(r"sha256:([0-9a-fA-F]{64})")
# RFC 6750 b64token: the characters a bearer token may hold.
_BEARER = re.compile(r"Bearer +([A-Za-z0-9._~+/-]+=*) *", re.IGNORECASE)


@attrs.frozen
class Principal:
    """Who a request acts for: a name from the auth file and its role."""

    name: str
    role: Role


# The worker itself, as `cancelled_by` for deadlines and shutdown.
SYSTEM = Principal(SYSTEM_NAME, "admin")
# Every request when no auth file is configured (the worker then binds loopback only).
ANONYMOUS = Principal(ANONYMOUS_NAME, "admin")


def is_valid_name(name: object) -> bool:
    """Whether ``name`` has the shape of a principal's name (reserved names included)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def is_admin(principal: Principal) -> bool:
    return principal.role == "admin"


def can_see(principal: Principal, owner: str) -> bool:
    """May ``principal`` see and cancel a job owned by the principal named ``owner``?"""
    return is_admin(principal) or principal.name == owner


def digest_of(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@attrs.frozen
class _Entry:
    digest: bytes
    principal: Principal


@attrs.frozen
class Principals:
    """The principals of one auth file; :meth:`authenticate` maps a header to one of them."""

    entries: tuple[_Entry, ...]

    def __len__(self) -> int:
        return len(self.entries)

    def names(self) -> list[str]:
        return [entry.principal.name for entry in self.entries]

    def authenticate(self, authorization_header: str | None) -> Principal | None:
        """The principal of ``Authorization: Bearer TOKEN``, or None (absent, malformed, unknown).

        The token's digest is compared with every entry in constant time, and the loop never
        exits early, so the time taken says nothing about which entry matched, if any.
        """
        if authorization_header is None:
            return None
        match = _BEARER.fullmatch(authorization_header)
        if match is None:
            return None
        digest = digest_of(match.group(1))
        found: Principal | None = None
        for entry in self.entries:
            same = hmac.compare_digest(entry.digest, digest)
            found = entry.principal if same else found
        return found


class AuthFile:
    """Reads and appends to an auth file."""

    @staticmethod
    def load(path: Path | str) -> Principals:
        """Parse ``path``; a bad file raises :class:`ConfigError` naming the file and line."""
        principals = _parse(Path(path))
        if not principals.entries:
            raise ConfigError(f"{path}: no principals; add one with `orcd token add NAME "
                              f"--auth-file {path}`")
        return principals


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: auth file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: auth file is a directory") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: auth file is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read auth file ({exc.strerror})") from None


def _parse(path: Path) -> Principals:
    entries: list[_Entry] = []
    names: dict[str, int] = {}
    digests: dict[bytes, int] = {}
    for lineno, raw in enumerate(_read(path).splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue

        def bad(problem: str, lineno: int = lineno) -> ConfigError:
            return ConfigError(f"{path}:{lineno}: {problem}")

        fields = line.split()
        if len(fields) != 3:
            raise bad(f"expected 'sha256:<64 hex digits> NAME ROLE', got {len(fields)} fields")
        digest_text, name, role = fields
        digest_match = _DIGEST.fullmatch(digest_text)
        if digest_match is None:
            raise bad("bad digest: expected 'sha256:' and 64 hex digits")
        if _NAME.fullmatch(name) is None:
            raise bad(f"bad name {name!r}: use 1-64 characters of A-Z a-z 0-9 . _ -")
        if name.lower() in RESERVED_NAMES:
            raise bad(f"the name {name!r} is reserved")
        if role not in ROLES:
            raise bad(f"unknown role {role!r}: expected user or admin")
        if name in names:
            raise bad(f"duplicate name {name!r} (first on line {names[name]})")
        digest = bytes.fromhex(digest_match.group(1))
        if digest in digests:
            raise bad(f"duplicate digest (first on line {digests[digest]}): "
                      "two principals cannot share a token")
        names[name] = digests[digest] = lineno
        entries.append(_Entry(digest, Principal(name, role)))
    return Principals(tuple(entries))


def add_token(path: Path | str, name: str, admin: bool = False) -> str:
    """Make a token for a new principal ``name``, append its digest to ``path``, return it.

    The file is created with mode 0600 when missing. The token is returned to be shown once.
    """
    path = Path(path)
    if _NAME.fullmatch(name) is None:
        raise ConfigError(f"bad name {name!r}: use 1-64 characters of A-Z a-z 0-9 . _ -")
    if name.lower() in RESERVED_NAMES:
        raise ConfigError(f"the name {name!r} is reserved")
    existing = _parse(path) if path.exists() else Principals(())
    if name in existing.names():
        raise ConfigError(f"{path}: a principal named {name!r} already exists")
    token = secrets.token_urlsafe(32)
    line = f"sha256:{digest_of(token).hex()} {name} {'admin' if admin else 'user'}\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write auth file ({exc.strerror})") from None
    with os.fdopen(fd, "a", encoding="utf-8") as out:
        if out.tell() > 0 and not path.read_bytes().endswith(b"\n"):
            line = "\n" + line
        out.write(line)
    return token


def add_token_parser(subparsers: Any, parent: argparse.ArgumentParser) -> None:
    """Add ``orcd token add NAME [--admin] [--auth-file PATH]`` to the CLI's subcommands."""
    token = subparsers.add_parser("token", help="manage the bearer tokens of an auth file")
    token.error = parent.error
    actions = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="create a token for a new principal, print it once")
    add.error = parent.error
    add.add_argument("name", metavar="NAME", help="the principal's name, e.g. alice")
    add.add_argument("--admin", action="store_true",
                     help="give the principal the admin role (default: user)")
    add.add_argument("--auth-file", dest="auth_file", default=None, metavar="PATH",
                     help="the auth file to append to, created 0600 if missing "
                          "[env ORCD_AUTH_FILE]")


def run_token_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """``orcd token add``: the token alone on stdout, what was done on stderr."""
    path = args.auth_file or environ.get("ORCD_AUTH_FILE")
    if not path:
        raise ConfigError("no auth file: pass --auth-file PATH or set ORCD_AUTH_FILE")
    role = "admin" if args.admin else "user"
    token = add_token(path, args.name, admin=args.admin)
    print(token, flush=True)
    print(f"orcd: added {role} {args.name!r} to {path}; the token above is shown only once",
          file=sys.stderr)
    return 0
