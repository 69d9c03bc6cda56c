"""Tenant keys (`preft-rl serve --tenant-keys FILE`, issue 33): the file's checks, who a key belongs to, the middleware's
routes and model lists, and the 404 that reads the same for another tenant's adapter as for a name that exists
nowhere. The real server with two tenants and an admin is `tests/test_serve.py::test_tenant_keys_*`."""

from __future__ import annotations

import asyncio
import json

import pytest

from preft_rl.engine.server.adapters import ServedAdapters, ServeSettings
from preft_rl.engine.server.tenants import (
    ADMIN,
    TenantAuthMiddleware,
    TenantKeyring,
    TenantKeys,
    current_tenant,
    hash_key,
    refuses,
)

KEYS = {"alice": "sk-alice", "bob": "sk-bob", "admin": "sk-admin"}


def keys_file(tmp_path, tenants=None, name="keys.yaml"):
    tenants = tenants if tenants is not None else {
        "alice": {"keys": [hash_key(KEYS["alice"])], "adapters": ["alice", "alice-*"]},
        "bob": {"keys": [hash_key(KEYS["bob"])], "adapters": ["b"], "base": True},
    }
    path = tmp_path / name
    path.write_text(json.dumps({"tenants": tenants}))  # JSON is YAML too
    return path


def test_each_key_belongs_to_its_tenant_and_wrong_ones_to_nobody(tmp_path):
    keys = TenantKeys.read(keys_file(tmp_path), [hash_key(KEYS["admin"])])
    assert keys.who(f"Bearer {KEYS['alice']}").name == "alice"
    assert keys.who(f"bearer {KEYS['bob']}").name == "bob"
    assert keys.who(f"Bearer {KEYS['admin']}") is ADMIN
    for header in (None, "", "Bearer", "Bearer sk-alicE", f"Basic {KEYS['alice']}", KEYS["alice"], "Bearer  sk-alice"):
        assert keys.who(header) is None, header
    alice = keys.tenants["alice"]
    assert alice.may_use("alice") and alice.may_use("alice-math") and not alice.may_use("alice2") and not alice.may_use("b")
    assert not alice.base and keys.tenants["bob"].base
    default = TenantKeys.read(keys_file(tmp_path, {"carol": {"keys": [hash_key("k")]}}, "c.json"))
    assert default.tenants["carol"].adapters == ("carol",)  # by default a tenant's adapter is its own name


@pytest.mark.parametrize("tenants, message", [
    ({"alice": {"keys": ["sk-alice"]}}, "is not a key hash; store keys hashed"),
    ({"alice": {"keys": []}}, "keys must be a non-empty list of key hashes"),
    ({"alice": {"keys": [hash_key("x")]}, "bob": {"keys": [hash_key("x")]}}, "tenant 'bob' has a key that tenant 'alice'"),
    ({"alice": {"keys": [hash_key("x")], "adapter": ["a"]}}, r"unknown fields \['adapter'\]"),
    ({"alice": {"keys": [hash_key("x")], "adapters": ["a/b"]}}, "must be a list of adapter names or patterns"),
    ({"alice": {"keys": [hash_key("x")], "base": "yes"}}, "base='yes' must be true or false"),
    ({"a:b": {"keys": [hash_key("x")]}}, "tenant name 'a:b'"),
    ({"alice": {"keys": [hash_key(KEYS["admin"])]}}, "tenant 'alice' has the admin key"),
    ({}, "write one top-level field, tenants"),
])
def test_a_bad_keys_file_is_refused_naming_the_tenant_and_the_fix(tmp_path, tenants, message):
    with pytest.raises(ValueError, match=message):
        TenantKeys.read(keys_file(tmp_path, tenants), [hash_key(KEYS["admin"])])


def test_a_reload_swaps_the_keys_whole_or_not_at_all(tmp_path):
    ring = TenantKeyring(keys_file(tmp_path), [hash_key(KEYS["admin"])])
    assert ring.who(f"Bearer {KEYS['bob']}").name == "bob" and ring.who("Bearer sk-carol") is None
    keys_file(tmp_path, {"carol": {"keys": [hash_key("sk-carol"), hash_key("sk-carol-2")]}})
    assert ring.reload() == {"tenants": 1, "keys": 2}
    assert ring.who("Bearer sk-carol").name == "carol" and ring.who(f"Bearer {KEYS['bob']}") is None
    assert ring.who(f"Bearer {KEYS['admin']}") is ADMIN  # the admin key comes from --api-key, not the file
    before = ring.keys
    keys_file(tmp_path, {"carol": {"keys": ["sk-carol"]}})
    with pytest.raises(ValueError, match="is not a key hash"):
        ring.reload()
    assert ring.keys is before and ring.who("Bearer sk-carol").name == "carol"


def test_a_file_that_does_not_parse_is_refused(tmp_path):
    bad = tmp_path / "keys.yaml"
    bad.write_text("tenants: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        TenantKeys.read(bad)
    with pytest.raises(ValueError, match="No such file"):
        TenantKeys.read(tmp_path / "missing.yaml")


class EchoApp:
    """An ASGI app standing in for vLLM: answers /v1/models with the base and three adapters, and any other route with
    the tenant it saw (after yielding to other requests twice, so racing requests interleave)."""

    async def __call__(self, scope, receive, send):
        seen = []
        for _ in range(3):
            tenant = current_tenant.get()
            seen.append(None if tenant is None else tenant.name)
            await asyncio.sleep(0)
        if scope["path"] == "/v1/models":
            body = {"object": "list", "data": [{"id": m} for m in ("tiny", "alice", "alice-math", "b")]}
        else:
            body = {"seen": seen}
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


def call(app, method, path, key=None):
    """One request through the ASGI app: (status, JSON body)."""
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": headers}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    async def run():
        await app(scope, receive, send)
        return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))

    return run()


def test_the_middleware_lets_each_key_reach_its_own_routes_and_models(tmp_path):
    keys = TenantKeys.read(keys_file(tmp_path), [hash_key(KEYS["admin"])])
    app = TenantAuthMiddleware(EchoApp(), keys=keys, base_names=lambda: ["tiny"])

    def ask(method, path, key=None):
        return asyncio.run(call(app, method, path, key))

    assert ask("GET", "/health") == (200, {"seen": [None] * 3})  # open, no tenant
    for path in ("/v1/completions", "/metrics", "/invocations", "/v1/load_preft_adapter", "/tokenize"):
        status, body = ask("POST", path)
        assert status == 401 and "a valid API key is required" in body["error"]["message"], path
        assert ask("POST", path, "sk-nobody")[0] == 401
    assert ask("POST", "/v1/completions", KEYS["alice"]) == (200, {"seen": ["alice"] * 3})
    assert ask("POST", "/v1/chat/completions", KEYS["bob"]) == (200, {"seen": ["bob"] * 3})
    for method, path in [("POST", "/v1/responses"), ("POST", "/v1/load_preft_adapter"), ("GET", "/v1/preft/cache"),
                         ("GET", "/metrics"), ("POST", "/tokenize"), ("POST", "/invocations"), ("GET", "/v1/responses/x")]:
        status, body = ask(method, path, KEYS["alice"])
        assert status == 403 and f"{method} {path} is not open to tenant keys" in body["error"]["message"], path
        assert ask(method, path, KEYS["admin"]) == (200, {"seen": ["<admin>"] * 3})
    models = {who: [m["id"] for m in ask("GET", "/v1/models", KEYS[who])[1]["data"]] for who in KEYS}
    assert models == {"alice": ["alice", "alice-math"], "bob": ["tiny", "b"], "admin": ["tiny", "alice", "alice-math", "b"]}
    assert current_tenant.get() is None  # reset after each request


def test_racing_requests_each_see_their_own_tenant(tmp_path):
    keys = TenantKeys.read(keys_file(tmp_path), [hash_key(KEYS["admin"])])
    app = TenantAuthMiddleware(EchoApp(), keys=keys, base_names=lambda: ["tiny"])
    who = [["alice", "bob", "admin"][i % 3] for i in range(60)]

    async def race():
        return await asyncio.gather(*(call(app, "POST", "/v1/completions", KEYS[w]) for w in who))

    for w, (status, body) in zip(who, asyncio.run(race()), strict=True):
        assert status == 200 and body["seen"] == [{"admin": "<admin>"}.get(w, w)] * 3


def test_another_tenants_adapter_reads_as_one_that_exists_nowhere(tmp_path):
    keys = TenantKeys.read(keys_file(tmp_path), [hash_key(KEYS["admin"])])
    served = ServedAdapters(None, ServeSettings("lora", 4, 8, "X"), ["tiny"])
    served.entries = {name: None for name in ("alice", "alice-math", "b")}
    token = current_tenant.set(keys.tenants["alice"])
    try:
        assert refuses("b", ["tiny"]) and refuses(None, ["tiny"]) and refuses("tiny", ["tiny"])
        assert not refuses("alice-math", ["tiny"])
        foreign, nowhere = served.unknown("b").message, served.unknown("zz").message
        assert foreign.replace("'b'", "'zz'", 1) == nowhere
        assert "'b'" not in nowhere and "tiny" not in nowhere and "load_preft_adapter" not in nowhere
        assert "Loaded adapters: 'alice', 'alice-math'." in nowhere
    finally:
        current_tenant.reset(token)
    assert not refuses("b", ["tiny"])  # no tenant: no tenant keys, or the admin
    assert "'b'" in served.unknown("zz").message and "load_preft_adapter" in served.unknown("zz").message


def test_serve_with_tenant_keys_takes_the_admin_key_from_vllm(tiny_llama_dir, tmp_path, monkeypatch):
    from preft_rl.engine.server.launch import plan

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    path = keys_file(tmp_path)
    argv, env = plan([str(tiny_llama_dir), "--tenant-keys", str(path), "--api-key", KEYS["admin"], "--port", "9",
                      "--enable-adapter-updates"])
    settings = json.loads(env["PREFT_RL_SERVE"])
    assert "--api-key" not in argv and KEYS["admin"] not in " ".join(argv) + json.dumps(env)  # only its hash travels
    assert settings["admin_key_hashes"] == [hash_key(KEYS["admin"])] and settings["tenant_keys"] == str(path)
    assert env["VLLM_API_KEY"] == "" and argv[argv.index("--port") + 1] == "9"
    monkeypatch.setenv("VLLM_API_KEY", KEYS["admin"])
    _, env = plan([str(tiny_llama_dir), "--tenant-keys", str(path)])
    assert json.loads(env["PREFT_RL_SERVE"])["admin_key_hashes"] == [hash_key(KEYS["admin"])]
    with pytest.raises(ValueError, match="is not a key hash"):
        plan([str(tiny_llama_dir), "--tenant-keys", str(keys_file(tmp_path, {"x": {"keys": ["plain"]}}, "bad.yaml"))])
