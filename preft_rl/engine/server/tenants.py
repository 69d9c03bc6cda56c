"""Tenant keys for `preft-rl serve --tenant-keys FILE`: each API key belongs to one tenant, and a tenant's key reaches
only that tenant's adapters.

The file (YAML or JSON) names each tenant, the SHA-256 hashes of its keys, and the adapters it may use:

    tenants:
      alice:
        keys: ["sha256:<64 hex digits>"]   # `preft-rl tenant-key` makes a key and its hash
        adapters: ["alice", "alice-*"]     # names, or patterns with * (default: the tenant's own name)
        base: false                        # may it call the base model (default: false)
        record: false                      # with --record DIR: keep its served requests for training (default: false)

Who may do what (`TenantAuthMiddleware`, in front of every route vLLM and preft-rl add):
- the admin key (`--api-key` or VLLM_API_KEY, which with --tenant-keys this middleware checks instead of vLLM):
  everything, as without tenant keys;
- a tenant's key: `GET /v1/models` (only its adapters, and the base where allowed), `POST /v1/completions` and
  `/v1/chat/completions` naming one of them, and `POST /v1/feedback` on its own recorded responses. Any other model answers 404 exactly as a name that exists nowhere, and
  every error lists only the tenant's own adapters. Any other route answers 403 (the Responses API among them: its
  stored responses are not kept per key);
- no key, or an unknown one: 401, except /health, /ping and /version.

Reload without a restart: edit the file, then `POST /v1/tenant-keys/reload` with the admin key (`TenantKeyring`). The
new file is read and checked whole; a bad one is refused (400, naming what is wrong) and the keys in use stay. Requests
already running finish as the tenant they started as.

Keys are never stored: the file and the server hold SHA-256 digests. A presented key is hashed, and its digest is
compared with every stored digest by `hmac.compare_digest`, so the time taken depends on neither which key matched nor
how much of it.
"""

from __future__ import annotations

import contextvars
import dataclasses
import fnmatch
import hashlib
import hmac
import json
import re
import secrets
from pathlib import Path
from typing import Any

from .adapters import NAME_PATTERN

HASH_PREFIX = "sha256:"
_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_PATTERN = re.compile(r"[A-Za-z0-9*][A-Za-z0-9._*-]{0,127}")
OPEN_PATHS = ("/health", "/ping", "/version")  # no key needed, as with vLLM's own --api-key
TENANT_ROUTES = {("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                 ("POST", "/v1/feedback")}
MODEL_ROUTES = {"/v1/completions", "/v1/chat/completions"}  # the body's "model" is checked against the tenant's list


def hash_key(key: str) -> str:
    """The form a key is stored in: "sha256:" and the hex digest of its UTF-8 bytes."""
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random API key (256 bits), for `preft-rl tenant-key`."""
    return "sk-preft-" + secrets.token_urlsafe(32)


@dataclasses.dataclass(frozen=True)
class Tenant:
    """One tenant: its name, the adapters (names or * patterns) it may use, and whether it may call the base model."""

    name: str
    adapters: tuple[str, ...]
    base: bool = False
    record: bool = False  # --record DIR keeps this tenant's served requests

    def may_use(self, adapter: str) -> bool:
        return any(fnmatch.fnmatchcase(adapter, pattern) for pattern in self.adapters)


ADMIN = Tenant(name="<admin>", adapters=("*",), base=True)  # the admin key's principal: every adapter and route

# Who sent the request being served: set by the middleware for the request's task (so for vLLM's handlers and the
# engine-client wrapper it calls), read where an error message would otherwise list other tenants' adapters.
current_tenant: contextvars.ContextVar[Tenant | None] = contextvars.ContextVar("preft_rl_tenant", default=None)


# Notes about the request being served, shared by the tasks serving it: vLLM runs a route's handler in a task of its
# own (so a context variable set there is not seen where the answer streams); a dict set here, before the handler,
# is the same object in every task. The chat render hook writes "messages" for the request's traffic record.
request_notes: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("preft_rl_notes", default=None)


def visible(names: list[str]) -> list[str]:
    """The adapter names the current request's tenant may see (all of them for the admin and without tenant keys)."""
    tenant = current_tenant.get()
    return names if tenant is None or tenant is ADMIN else [n for n in names if tenant.may_use(n)]


@dataclasses.dataclass(frozen=True)
class TenantKeys:
    """Key digests -> tenants, read and checked from a --tenant-keys file; `admin` holds the admin keys' digests."""

    tenants: dict[str, Tenant]
    digests: tuple[tuple[bytes, Tenant], ...]

    @classmethod
    def read(cls, path: str | Path, admin_hashes: list[str] = ()) -> TenantKeys:
        """Read and check FILE; every refusal names the file, the tenant and the field, and says what to write."""
        path = Path(path)
        where = f"--tenant-keys {path}"
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"{where}: {exc.strerror or exc}") from None
        import yaml

        kind = "JSON" if path.suffix == ".json" else "YAML"
        try:
            data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise ValueError(f"{where}: not valid {kind}: {exc}") from None
        if not isinstance(data, dict) or set(data) - {"tenants"} or not isinstance(data.get("tenants"), dict) \
                or not data["tenants"]:
            raise ValueError(f"{where}: write one top-level field, tenants: a mapping of tenant name -> "
                             "{keys: [sha256:...], adapters: [...], base: false}")
        tenants: dict[str, Tenant] = {}
        digests: list[tuple[bytes, Tenant]] = []
        seen: dict[bytes, str] = {}
        for name, entry in data["tenants"].items():
            tenant, hashes = _tenant(where, name, entry)
            tenants[tenant.name] = tenant
            for text_hash in hashes:
                digest = bytes.fromhex(text_hash.removeprefix(HASH_PREFIX))
                if digest in seen:
                    raise ValueError(f"{where}: tenant {name!r} has a key that tenant {seen[digest]!r} has too; a key "
                                     "belongs to one tenant (make a new one with `preft-rl tenant-key`)")
                seen[digest] = tenant.name
                digests.append((digest, tenant))
        for text_hash in admin_hashes:
            digest = bytes.fromhex(text_hash.removeprefix(HASH_PREFIX))
            if digest in seen:
                raise ValueError(f"{where}: tenant {seen[digest]!r} has the admin key (--api-key) as its key; give the "
                                 "tenant a key of its own")
            digests.append((digest, ADMIN))
        return cls(tenants=tenants, digests=tuple(digests))

    def who(self, authorization: str | None) -> Tenant | None:
        """The tenant (or ADMIN) whose key is in an Authorization header ("Bearer KEY"); None for none or a wrong one."""
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key:
            return None
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found = None
        for stored, tenant in self.digests:  # every digest compared, whichever matches
            if hmac.compare_digest(digest, stored):
                found = tenant
        return found


class TenantKeyring:
    """The keys in force: `TenantKeys.read(path, admin_hashes)`, swapped whole by `reload()` (one attribute assignment,
    so a request sees either the old keys or the new ones, never a mix)."""

    def __init__(self, path: str | Path, admin_hashes: list[str] = ()) -> None:
        self.path, self.admin_hashes = Path(path), list(admin_hashes)
        self.keys = TenantKeys.read(self.path, self.admin_hashes)

    def who(self, authorization: str | None) -> Tenant | None:
        return self.keys.who(authorization)

    def reload(self) -> dict[str, int]:
        """Read the file again; ValueError (naming what is wrong) leaves the keys in force as they were."""
        keys = TenantKeys.read(self.path, self.admin_hashes)
        self.keys = keys
        return {"tenants": len(keys.tenants), "keys": sum(tenant is not ADMIN for _, tenant in keys.digests)}


def _tenant(where: str, name: Any, entry: Any) -> tuple[Tenant, list[str]]:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{where}: tenant name {name!r}: use 1-128 letters, digits, '.', '_' or '-'")
    fields = {"keys", "adapters", "base", "record"}
    if not isinstance(entry, dict) or set(entry) - fields:
        extra = sorted(set(entry) - fields) if isinstance(entry, dict) else None
        raise ValueError(f"{where}: tenant {name!r}: " + (f"unknown fields {extra}; " if extra else "")
                         + "write {keys: [sha256:...], adapters: [names or patterns], base: true|false, "
                           "record: true|false}")
    keys = entry.get("keys")
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{where}: tenant {name!r}: keys must be a non-empty list of key hashes (sha256:<64 hex>); "
                         "`preft-rl tenant-key` makes a key and its hash")
    for key in keys:
        if not _HASH.fullmatch(key):
            raise ValueError(f"{where}: tenant {name!r}: {key[:12]!r}... is not a key hash; store keys hashed, as "
                             "sha256:<64 lowercase hex digits> (`preft-rl tenant-key` prints one; never the key itself)")
    adapters = entry.get("adapters", [name])
    if not isinstance(adapters, list) or not all(isinstance(a, str) and _PATTERN.fullmatch(a) for a in adapters):
        raise ValueError(f"{where}: tenant {name!r}: adapters={adapters!r} must be a list of adapter names or patterns "
                         "with * (letters, digits, '.', '_', '-')")
    flags = {flag: entry.get(flag, False) for flag in ("base", "record")}
    for flag, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{where}: tenant {name!r}: {flag}={value!r} must be true or false")
    return Tenant(name=name, adapters=tuple(adapters), **flags), keys


def refuses(model: str | None, base_names: list[str]) -> bool:
    """Whether the current request's tenant may not call `model` (None or a base name: the base model)."""
    tenant = current_tenant.get()
    if tenant is None or tenant is ADMIN:
        return False
    if not model or model in base_names:
        return not tenant.base
    return not tenant.may_use(model)


def _error_body(status: int, message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()


class TenantAuthMiddleware:
    """ASGI middleware: who sent each request (`current_tenant`), and the routes a tenant's key may call (see the module
    docstring). Which models a tenant may call is checked where vLLM checks the model (plugins.install_request_routing),
    so a refused model gets vLLM's own 404, word for word the answer for a name that exists nowhere."""

    def __init__(self, app: Any, keys: TenantKeys | TenantKeyring, base_names: Any) -> None:
        self.app, self.keys, self.base_names = app, keys, base_names  # base_names(): the served base model's names

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "") or "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        tenant = self.keys.who(headers.get("authorization"))
        if path in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if tenant is None:
            return await self._reply(scope, send, 401, "a valid API key is required: send the header "
                                                       "'Authorization: Bearer KEY' with your tenant key", "Unauthorized")
        token, notes = current_tenant.set(tenant), request_notes.set({})
        try:
            if tenant is ADMIN:
                return await self.app(scope, receive, send)
            if (scope.get("method"), path) not in TENANT_ROUTES:
                allowed = ", ".join(f"{m} {p}" for m, p in sorted(TENANT_ROUTES, key=lambda r: r[1]))
                return await self._reply(scope, send, 403, f"{scope.get('method', '')} {path} is not open to tenant keys "
                                                           f"(tenant {tenant.name!r} may call: {allowed})", "Forbidden")
            if path == "/v1/models":
                return await self.app(scope, receive, self._filtered_models(send, tenant))
            return await self.app(scope, receive, send)
        finally:
            current_tenant.reset(token)
            request_notes.reset(notes)

    @staticmethod
    async def _reply(scope: dict, send: Any, status: int, message: str, kind: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = _error_body(status, message, kind + "Error" if not kind.endswith("Error") else kind)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _filtered_models(self, send: Any, tenant: Tenant) -> Any:
        """A `send` that buffers /v1/models' answer and keeps only the models `tenant` may call."""
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def filtered(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            if start.get("status") == 200:
                data = json.loads(body)
                base = self.base_names()
                data["data"] = [m for m in data.get("data", [])
                                if not refuses(None if m.get("id") in base else m.get("id"), base)]
                body = json.dumps(data).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        return filtered
