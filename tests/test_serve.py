"""`preft-rl serve`: vLLM's OpenAI-compatible server with prefill-only adapters, driven by the `openai` client.

The server tests (marked slow) start one real server on 127.0.0.1 for the module, on the tiny Llama, and compare
every greedy output with the HF reference (`PreftModel.generate`, which the engine tests pin PreftEngine to). The
first tests check the launcher and the adapter table without a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import TOOL_QUESTION, add
from preft_rl.engine.server.adapters import AdapterError, ServedAdapters, ServeSettings, base_cache_salt, cache_salt
from preft_rl.engine.server.launch import plan

API_KEY = "test-key"
MAX_RANK = 8


def make_adapter(base_dir: Path, out: Path, seed: int, method: str = "lora", r: int = 4, scale: float = 0.5) -> Path:
    from transformers import AutoModelForCausalLM

    from preft_rl.adapters import PreftConfig, PreftModel

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = PreftConfig(method=method, r=r, alpha=2 * r) if method == "lora" else PreftConfig(method=method, r=r)
    model = PreftModel(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.adapter_named_parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-adapters")
    return {
        "a": make_adapter(tiny_llama_dir, root / "a", seed=1),
        "b": make_adapter(tiny_llama_dir, root / "b", seed=2),
        "c": make_adapter(tiny_llama_dir, root / "c", seed=3),
        "loreft": make_adapter(tiny_llama_dir, root / "loreft", seed=4, method="loreft"),
        "rank16": make_adapter(tiny_llama_dir, root / "rank16", seed=5, r=16),
        "rank2": make_adapter(tiny_llama_dir, root / "rank2", seed=6, r=2),
    }


# ------------------------------------------------------------------------------------------ the launcher
def test_plan_builds_vllm_serve_with_the_plugins(tiny_llama_dir, adapter_dirs):
    argv, env = plan([str(tiny_llama_dir), "--adapters", f"a={adapter_dirs['a']}", "--max-rank", "8", "--port", "9"])
    assert argv[:2] == ["serve", str(tiny_llama_dir)]
    assert argv[argv.index("--hf-overrides") + 1] == json.dumps({"architectures": ["PreftLoraLlamaForCausalLM"]})
    assert argv[argv.index("--worker-extension-cls") + 1] == "preft_rl.engine.worker.PreftWorkerExtension"
    assert argv[argv.index("--dtype") + 1] == "float32"  # the model's own dtype, never a silent downcast
    assert "--port" in argv and "--enforce-eager" in argv
    settings = json.loads(env["PREFT_RL_SERVE"])
    assert settings["adapters"] == {"a": str(adapter_dirs["a"])} and settings["runtime_updates"] is False
    assert {"preft_rl", "preft_rl_serve"} <= set(env["VLLM_PLUGINS"].split(","))
    # the tiny template has no tool format: tool calls are read in the trainer's <tool_call> format
    assert argv[argv.index("--tool-call-parser") + 1] == "hermes" and "--enable-auto-tool-choice" in argv
    argv, _ = plan([str(tiny_llama_dir), "--tool-call-parser", "llama3_json"])
    assert argv.count("--tool-call-parser") == 1 and "--enable-auto-tool-choice" not in argv


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--enable-lora"], "--enable-lora cannot be used"),
        (["--lora-modules", "x=y"], "--lora-modules cannot be used"),
        (["--api-server-count", "2"], "one API server"),
        (["--enable-adapter-updates"], "needs an API key"),
        (["--adapters", "a"], "write NAME=DIR"),
        (["--adapters", "bad:name=/x"], "'bad:name' must be"),
        (["--max-adapters", "0"], "must both be >= 1"),
    ],
)
def test_plan_refuses_bad_flags(tiny_llama_dir, extra, message, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        plan([str(tiny_llama_dir), *extra])


def test_plan_checks_startup_adapters_before_vllm_starts(tiny_llama_dir, adapter_dirs, tmp_path):
    with pytest.raises(ValueError, match=r"is a loreft adapter but this server serves lora adapters .*--method loreft"):
        plan([str(tiny_llama_dir), "--adapters", f"x={adapter_dirs['loreft']}"])
    with pytest.raises(ValueError, match=r"has rank 16 .*--max-rank 16 or more"):
        plan([str(tiny_llama_dir), "--adapters", f"x={adapter_dirs['rank16']}", "--max-rank", "8"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter_dirs["a"] / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes((adapter_dirs["a"] / "adapter_model.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors cannot be read .*truncated or corrupt"):
        plan([str(tiny_llama_dir), "--adapters", f"x={broken}"])


def test_a_plain_peft_lora_needs_the_servers_own_opt_in(adapter_dirs, tmp_path):
    from safetensors.torch import load_file

    from preft_rl.adapters import PreftConfig
    from preft_rl.engine.baselines import write_peft_lora
    from preft_rl.engine.server.adapters import read_adapter

    state = load_file(str(adapter_dirs["a"] / "adapter_model.safetensors"))
    peft_dir = write_peft_lora(state, PreftConfig(method="lora", r=4, alpha=8), tmp_path / "peft")
    settings = ServeSettings("lora", 4, 8, "X")
    with pytest.raises(AdapterError, match='plain PEFT LoRA.*"load_peft_lora_as_prefill_only": true.*'
                                           "--load-peft-lora-as-prefill-only"):
        read_adapter("p", str(peft_dir), settings)
    _, config = read_adapter("p", str(peft_dir), settings, peft_lora_as_prefill_only=True)
    assert config.adapter_scope == "prompt" and config.r == 4


def test_cache_salts_never_collide():
    from preft_rl.engine.registry import AdapterEntry

    entry = AdapterEntry(name="u", slot=0, version=3, rank=4, config=None, keys=frozenset())
    assert cache_salt(entry, None) == "preft:u:v3"
    assert cache_salt(entry, "mine") == "preft:u:v3:client:mine"
    # a base request's own salt can never equal an adapter's: a client cannot reach an adapter's cached prompt KV
    assert base_cache_salt("preft:u:v3") == "client:preft:u:v3"
    assert base_cache_salt(None) is None


# ------------------------------------------------------------------------------------------ the adapter table
class FakeEngineClient:
    """collective_rpc of one rank, with the worker extension's replies (a registry of names and versions)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.swaps: list[tuple[list[str], list[str]]] = []  # preft_swap_adapters: (removed, added names)
        self.versions: dict[str, int] = {}
        self.gate: asyncio.Event | None = None  # set: RPCs wait for it (one engine step)

    @staticmethod
    def entry(name, version, config):
        return {"name": name, "slot": 0, "version": version, "rank": 4, "config": config, "keys": []}

    async def collective_rpc(self, method, args=()):
        self.calls.append(method)
        if self.gate is not None:
            await self.gate.wait()
        if method == "preft_swap_adapters":
            remove, add = args
            added = {}
            for name, _state, config in add:
                self.versions[name] = self.versions.get(name, 0) + 1
                added[name] = self.entry(name, self.versions[name], config)
            self.swaps.append((list(remove), [name for name, _, _ in add]))
            return [{"removed": list(remove), "added": added}]
        name = args[0]
        if method == "preft_add_adapter":
            self.versions[name] = self.versions.get(name, 0) + 1
        elif method in ("preft_update_adapter", "preft_replace_adapter"):
            self.versions[name] += 1
        elif method == "preft_remove_adapter":
            return [{"removed": name}]
        config = args[2] if method in ("preft_add_adapter", "preft_replace_adapter") else {"method": "lora", "r": 4}
        return [self.entry(name, self.versions[name], config)]


def test_updates_wait_for_the_requests_using_the_adapter(adapter_dirs):
    """A request is pinned to the version it started with: an update waits for it, and a request arriving during the
    update waits and then gets the new version. Requests for other adapters are not held up."""

    async def scenario():
        served = ServedAdapters(FakeEngineClient(), ServeSettings("lora", 4, 8, "X"), ["base"])
        await served.load("a", str(adapter_dirs["a"]))
        await served.load("b", str(adapter_dirs["b"]))
        events = []
        first_started, release_first = asyncio.Event(), asyncio.Event()

        async def long_request():
            async with served.serving("a") as entry:
                first_started.set()
                await release_first.wait()
                events.append(("first request done", entry.version))

        async def later_request():
            async with served.serving("a") as entry:
                events.append(("later request", entry.version))

        async def other_adapter():
            async with served.serving("b") as entry:
                events.append(("b", entry.version))

        first = asyncio.create_task(long_request())
        await first_started.wait()
        update = asyncio.create_task(served.load("a", str(adapter_dirs["c"]), replace=True))
        await asyncio.sleep(0.05)
        assert not update.done() and served.entries["a"].version == 1  # waits for the request that holds version 1
        later = asyncio.create_task(later_request())
        await other_adapter()  # another adapter is served meanwhile
        await asyncio.sleep(0.05)
        assert not later.done()  # a new request for "a" waits for the update
        release_first.set()
        await asyncio.gather(first, update, later)
        return events, served

    events, served = asyncio.run(scenario())
    assert events == [("b", 1), ("first request done", 1), ("later request", 2)]
    assert served.entries["a"].version == 2 and served.in_flight("a") == 0


def test_adapter_table_errors_change_nothing(adapter_dirs, tmp_path):
    async def scenario():
        client = FakeEngineClient()
        served = ServedAdapters(client, ServeSettings("lora", 2, 8, "X"), ["base"])
        await served.load("a", str(adapter_dirs["a"]))
        checks = [
            (served.load("a", str(adapter_dirs["b"])), 400, "already loaded"),
            (served.load("x", str(tmp_path / "missing")), 400, "is not a directory"),
            (served.load("x", str(adapter_dirs["loreft"])), 400, "--method loreft"),
            (served.load("x", str(adapter_dirs["rank16"])), 400, "--max-rank 16"),
            (served.load("base", str(adapter_dirs["b"])), 400, "base model's name"),
            (served.load("a:b", str(adapter_dirs["b"])), 400, "letters, digits"),
            (served.unload("nope"), 404, "'nope' is not loaded on this server. Loaded adapters: 'a'"),
        ]
        for coro, status, message in checks:
            with pytest.raises(AdapterError, match=message.replace("(", r"\(")) as info:
                await coro
            assert info.value.status == status
        await served.load("b", str(adapter_dirs["b"]))
        with pytest.raises(AdapterError, match="all 2 adapters this server holds are loaded"):
            await served.load("c", str(adapter_dirs["c"]))
        with pytest.raises(AdapterError, match="not loaded"):
            async with served.serving("c"):
                pass
        return client, served

    client, served = asyncio.run(scenario())
    assert client.calls == ["preft_add_adapter", "preft_add_adapter"]  # no refused change reached the worker
    assert sorted(served.entries) == ["a", "b"] and served.entries["a"].version == 1


def test_first_requests_from_the_adapter_dir_load_in_batches(adapter_dirs, tmp_path):
    """--adapter-dir loads: the adapters that first requests wait for go to the worker in one RPC (one engine step on
    a busy server, not one per adapter), with the idle adapters unloaded to make room in the same RPC. Each request
    gets its hold in the step that loaded its adapter; a bad directory fails its own requests only; with every
    adapter in use the batch waits for a request to end; a client that goes away leaves no hold behind."""
    library = tmp_path / "library"
    library.mkdir()
    for i in range(6):
        (library / f"u{i}").symlink_to(adapter_dirs["abc"[i % 3]])
    (library / "bad").symlink_to(adapter_dirs["rank16"])

    async def scenario():
        client = FakeEngineClient()
        settings = ServeSettings("lora", 2, 8, "X", max_cpu_adapters=3, adapter_dir=str(library))
        served = ServedAdapters(client, settings, ["base"])
        client.gate = asyncio.Event()
        release = asyncio.Event()
        got = {}

        async def request(name):
            async with served.serving(name) as entry:
                got[name] = entry.version
                await release.wait()

        first = [asyncio.create_task(request(n)) for n in ("u0", "u1", "u2", "bad")]
        await asyncio.sleep(0.05)
        client.gate.set()  # the engine step ends: every waiting first request is answered by one RPC
        with pytest.raises(AdapterError, match="rank 16") as info:
            await first[3]
        assert info.value.status == 400
        await asyncio.sleep(0.05)
        assert client.swaps == [([], ["u0", "u1", "u2"])] and got == {"u0": 1, "u1": 1, "u2": 1}
        assert [served.in_flight(n) for n in ("u0", "u1", "u2")] == [1, 1, 1]
        # all 3 held and in use: u3 waits for a request to end, then takes the least recently used idle one's place
        waiting = asyncio.create_task(request("u3"))
        await asyncio.sleep(0.05)
        assert not waiting.done() and len(client.swaps) == 1
        release.set()
        await asyncio.gather(*first[:3], waiting)
        assert client.swaps[1] == (["u0"], ["u3"]) and set(served.entries) == {"u1", "u2", "u3"}
        # two misses at once, two idle victims: one RPC swaps both; u0 comes back under a new version
        release.clear()
        client.gate.clear()
        both = [asyncio.create_task(request(n)) for n in ("u0", "u4")]
        await asyncio.sleep(0.05)
        client.gate.set()
        await asyncio.sleep(0.05)
        assert client.swaps[2] == (["u1", "u2"], ["u0", "u4"]) and got["u0"] == 2
        # a client that goes away while its adapter loads: no hold is left behind
        client.gate.clear()
        gone = asyncio.create_task(request("u5"))
        await asyncio.sleep(0.05)
        gone.cancel()
        client.gate.set()
        release.set()
        await asyncio.gather(*both)
        with pytest.raises(asyncio.CancelledError):
            await gone
        await asyncio.sleep(0.05)
        assert client.swaps[3] == (["u3"], ["u5"])
        assert {n: served.in_flight(n) for n in served.entries} == {"u0": 0, "u4": 0, "u5": 0}
        assert await served.resolve("u9") is False and served.dir_loads == 7 and served.dir_unloads == 4
        return client

    client = asyncio.run(scenario())
    assert "preft_add_adapter" not in client.calls and "preft_remove_adapter" not in client.calls


def test_chat_history_marks_each_assistant_message_from_its_generation_prompt_to_its_end(tokenizer):
    """Serving's side of DESIGN invariant 9, without a server: the tokens of each assistant message, from its generation
    prompt to its end-of-turn token, are the sampled spans; tool calls are written back in the trainer's format."""
    from preft_rl.engine.server.chat import assistant_token_spans, messages_with_tools_as_text
    from preft_rl.trainers.tools import tool_call_text, tool_schema, with_tools

    calls = [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]
    history = [*TOOL_QUESTION, {"role": "assistant", "content": "let me see", "tool_calls": calls},
               {"role": "tool", "tool_call_id": "c1", "content": "5"}, {"role": "assistant", "content": "it is 5"},
               {"role": "user", "content": "and 4 and 4?"}]
    schema = tool_schema(add)
    prepared = messages_with_tools_as_text(history, [schema], shows_tools=False)
    assert prepared[:2] == with_tools(TOOL_QUESTION, [schema], template_shows_tools=False)  # as the trainer shows tools
    assert prepared[2] == {"role": "assistant", "content": "let me see" + tool_call_text("add", {"a": 2, "b": 3})}
    assert messages_with_tools_as_text(history, [schema], shows_tools=True) == history  # the template renders them

    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False)

    ids = render(prepared, True)
    assistant_at = [i for i, m in enumerate(prepared) if m["role"] == "assistant"]
    spans = assistant_token_spans(ids, [render(prepared[:i], True) for i in assistant_at], {tokenizer.eos_token_id})
    eos = tokenizer.eos_token
    assert [tokenizer.decode(ids[s:e]) for s, e in spans] == [prepared[2]["content"] + eos, "it is 5" + eos]
    # the last message continued (continue_final_message): to the end of the prompt
    open_ids = tokenizer.apply_chat_template(prepared[:5], continue_final_message=True, tokenize=True, return_dict=False)
    spans = assistant_token_spans(open_ids, [render(prepared[:i], True) for i in assistant_at], {tokenizer.eos_token_id},
                                  open_last=True)
    assert tokenizer.decode(open_ids[spans[-1][0]:spans[-1][1]]) == "it is 5"
    # refused, naming why: earlier messages that do not render to a prefix; no end-of-turn token; bad arguments
    with pytest.raises(ValueError, match="not a prefix"):
        assistant_token_spans(ids, [[*render(prepared[:2], True), 0]], {tokenizer.eos_token_id})
    with pytest.raises(ValueError, match="no end-of-turn token"):
        assistant_token_spans(ids, [render(prepared[:2], True)], {99999})
    with pytest.raises(ValueError, match="not JSON"):
        messages_with_tools_as_text([{"role": "assistant", "content": None, "tool_calls": [
            {"function": {"name": "add", "arguments": "{a: 2"}}]}], None, shows_tools=False)


def test_endpoint_routes_are_off_by_default(monkeypatch):
    from fastapi import FastAPI

    from preft_rl.engine.server.plugins import LOAD_ROUTE, SETTINGS_ENV, PreftEndpointPlugin

    settings = ServeSettings("lora", 4, 8, "X")
    for updates, expected in ((False, set()), (True, {LOAD_ROUTE, "/v1/unload_preft_adapter"})):
        monkeypatch.setenv(SETTINGS_ENV, json.dumps({**settings.__dict__, "runtime_updates": updates}))
        app = FastAPI()
        PreftEndpointPlugin().attach_router(app)
        assert {route.path for route in app.routes} & expected == expected
        assert ({route.path for route in app.routes} & {LOAD_ROUTE}) == (expected & {LOAD_ROUTE})


# ------------------------------------------------------------------------------------------ a real server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(tiny_llama_dir, adapters: dict[str, Path], log: Path, *extra: str, env: dict[str, str] | None = None,
                   procs: list | None = None):
    """A `preft-rl serve` subprocess on 127.0.0.1 (its base URL), stopped on exit; `env` is added to its environment;
    the process is appended to `procs` (to kill it in a test)."""
    port = free_port()
    cmd = [sys.executable, "-m", "preft_rl.cli", "serve", str(tiny_llama_dir),
           "--adapters", *(f"{name}={path}" for name, path in adapters.items()), "--max-adapters", "6",
           "--max-rank", str(MAX_RANK), "--api-key", API_KEY, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "tiny", "--max-model-len", "512", "--max-num-seqs", "32", "--max-num-batched-tokens", "512",
           *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    if procs is not None:
        procs.append(proc)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"preft-rl serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(base_url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"preft-rl serve did not come up in 600 s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield base_url
    finally:
        with contextlib.suppress(ProcessLookupError):  # a test may have killed it
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_llama_dir, adapter_dirs, tmp_path_factory):
    """One `preft-rl serve` on 127.0.0.1 with adapters a and b, runtime updates on; stopped at the end."""
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with running_server(tiny_llama_dir, {"a": adapter_dirs["a"], "b": adapter_dirs["b"]}, log, "--enable-adapter-updates") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """Greedy token ids of the HF reference: the base model or a PreftModel loaded from an adapter directory."""
    from transformers import AutoModelForCausalLM

    from preft_rl.adapters import PreftModel

    cache: dict = {}

    def generate(adapter_dir: Path | None, prompt_ids: list[int], max_tokens: int) -> list[int]:
        key = (str(adapter_dir), tuple(prompt_ids), max_tokens)
        if key not in cache:
            model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
            model.generation_config.eos_token_id = None
            if adapter_dir is not None:
                model = PreftModel.from_pretrained(model, adapter_dir)
            with torch.no_grad():
                out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False)
            cache[key] = out[0, len(prompt_ids):].tolist()
        return cache[key]

    return generate


PROMPTS = ["the apples and two books", "how many cats has she", "five birds buy more coins than 12 pears", "what is 7 plus"]
GREEDY = {"temperature": 0, "max_tokens": 8}
TOKENS = {"return_token_ids": True, "ignore_eos": True}


def complete(client, model: str, prompt: str, **kwargs):
    params = {**GREEDY, **kwargs}
    response = client.completions.create(model=model, prompt=prompt, extra_body={**TOKENS, **params.pop("extra_body", {})},
                                         **params)
    choice = response.choices[0]
    return response, choice.prompt_token_ids, choice.token_ids


def post(server: str, route: str, body: dict, key: str | None = API_KEY) -> tuple[int, dict]:
    request = urllib.request.Request(server + route, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_for_requests_in_engine(server: str, count: int, timeout: float = 120) -> None:
    """Block until vLLM's /metrics counts at least `count` requests running or waiting (each one already admitted
    and so pinned to an adapter version)."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(server + "/metrics", timeout=10) as response:
            text = response.read().decode()
        in_engine = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                        if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{")))
        if in_engine >= count:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"only {in_engine:.0f} of {count} requests reached the engine in {timeout} s")
        time.sleep(0.05)


def served_dir(adapter_dirs, model: str) -> Path | None:
    return None if model == "tiny" else adapter_dirs[model]


@pytest.mark.slow
def test_models_lists_the_base_and_every_adapter(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", "a", "b"}
    assert models["a"].model_extra.get("parent") == "tiny"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "a", "b"])
def test_completions_equal_the_reference(client, reference, adapter_dirs, model):
    for prompt in PROMPTS:
        response, prompt_ids, ids = complete(client, model, prompt)
        assert response.model == model
        assert ids == reference(served_dir(adapter_dirs, model), prompt_ids, GREEDY["max_tokens"]), (model, prompt)
        # streamed: the same text, chunk by chunk
        stream = client.completions.create(model=model, prompt=prompt, stream=True, extra_body={"ignore_eos": True}, **GREEDY)
        assert "".join(chunk.choices[0].text for chunk in stream) == response.choices[0].text
    if model != "tiny":  # the adapter really acts
        _, prompt_ids, ids = complete(client, model, PROMPTS[0])
        assert ids != reference(None, prompt_ids, GREEDY["max_tokens"])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "a"])
def test_chat_equals_the_reference(client, reference, adapter_dirs, tokenizer, model):
    messages = [{"role": "user", "content": "how many books has the sister"}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    response = client.chat.completions.create(model=model, messages=messages, extra_body=TOKENS, **GREEDY)
    assert response.model == model
    assert response.prompt_token_ids == list(prompt_ids)
    assert response.choices[0].token_ids == reference(served_dir(adapter_dirs, model), list(prompt_ids), GREEDY["max_tokens"])
    stream = client.chat.completions.create(model=model, messages=messages, stream=True, extra_body={"ignore_eos": True}, **GREEDY)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == response.choices[0].message.content


@pytest.mark.slow
def test_concurrent_clients_over_two_adapters_and_the_base(server, reference, adapter_dirs, tokenizer):
    """32 clients x 8 requests, spread over a, b and the base, within a time limit: every response is complete and equal
    to its reference, and none is dropped."""
    from openai import AsyncOpenAI

    expected = {}
    for model in ("tiny", "a", "b"):
        for prompt in PROMPTS:
            expected[model, prompt] = reference(served_dir(adapter_dirs, model), tokenizer.encode(prompt), GREEDY["max_tokens"])

    async def run():
        client = AsyncOpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

        async def one_client(i: int):
            results = []
            for j in range(8):
                model, prompt = ("tiny", "a", "b")[(i + j) % 3], PROMPTS[(i * 8 + j) % len(PROMPTS)]
                response = await client.completions.create(model=model, prompt=prompt, extra_body=TOKENS, **GREEDY)
                results.append((model, prompt, response))
            return results

        return await asyncio.wait_for(asyncio.gather(*(one_client(i) for i in range(32))), timeout=600)

    start = time.monotonic()
    results = [item for client_results in asyncio.run(run()) for item in client_results]
    assert len(results) == 32 * 8
    for model, prompt, response in results:
        choice = response.choices[0]
        assert response.model == model and choice.finish_reason == "length"
        assert choice.token_ids == expected[model, prompt], (model, prompt)
    print(f"256 requests in {time.monotonic() - start:.1f} s")


@pytest.mark.slow
def test_a_client_salt_never_reaches_an_adapters_cached_prompt(client, reference, adapter_dirs, tokenizer):
    """A long prompt (several KV blocks) served under adapter a is cached with a's salt. A base request that sends
    that very salt as its own `cache_salt` must still get the base model's answer, not a's cached prompt KV."""
    prompt = " ".join(["the sister buys five more apples than the brother and then sells them at the market"] * 12)
    prompt_ids = tokenizer.encode(prompt)
    assert 150 < len(prompt_ids) < 480
    _, _, adapted = complete(client, "a", prompt)
    assert adapted == reference(adapter_dirs["a"], prompt_ids, 8)
    version = 1  # a is never updated before this test (runtime updates use their own names)
    _, _, base = complete(client, "tiny", prompt, extra_body={"cache_salt": f"preft:a:v{version}"})
    assert base == reference(None, prompt_ids, 8)
    _, _, again = complete(client, "a", prompt, extra_body={"cache_salt": "mine"})
    assert again == adapted


@pytest.mark.slow
def test_errors_name_the_problem_and_the_server_keeps_serving(server, client, reference, adapter_dirs, tmp_path):
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="user-404", prompt="hi", max_tokens=2)
    assert "'user-404' is not loaded" in str(info.value) and "'a', 'b'" in str(info.value)

    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "adapter_config.json").write_text("{not json")
    cases = [
        ({"adapter_name": "x", "adapter_path": str(tmp_path / "missing")}, 400, "is not a directory"),
        ({"adapter_name": "x", "adapter_path": str(tmp_path / "corrupt")}, 400, "adapter_config.json is not valid JSON"),
        ({"adapter_name": "x", "adapter_path": str(adapter_dirs["loreft"])}, 400, "a server started with --method loreft"),
        ({"adapter_name": "x", "adapter_path": str(adapter_dirs["rank16"])}, 400, "--max-rank 16 or more"),
        ({"adapter_name": "a", "adapter_path": str(adapter_dirs["c"])}, 400, "already loaded"),
        ({"adapter_name": "x"}, 400, "adapter_path=None"),
    ]
    for body, status, message in cases:
        code, reply = post(server, "/v1/load_preft_adapter", body)
        assert code == status and message in reply["error"]["message"], (body, reply)
    code, reply = post(server, "/v1/unload_preft_adapter", {"adapter_name": "nope"})
    assert code == 404 and "Loaded adapters: 'a', 'b'" in reply["error"]["message"]
    code, _ = post(server, "/v1/load_preft_adapter", {"adapter_name": "x", "adapter_path": str(adapter_dirs["c"])}, key=None)
    assert code == 401  # the routes need the API key

    assert {m.id for m in client.models.list().data} == {"tiny", "a", "b"}  # nothing changed
    for model in ("tiny", "a", "b"):
        _, prompt_ids, ids = complete(client, model, PROMPTS[1])
        assert ids == reference(served_dir(adapter_dirs, model), prompt_ids, 8)


@pytest.mark.slow
def test_load_update_unload_at_run_time(server, client, reference, adapter_dirs, tokenizer, tmp_path):
    """Outputs change exactly when the adapter changes; a name removed and loaded again with other weights never gets
    the old weights' cached prompt KV (a prompt of several KV blocks, cached before the unload)."""
    import openai

    long_prompt = " ".join(["how many coins has the friend at the school farm and how many birds"] * 12)
    long_ids = tokenizer.encode(long_prompt)
    code, reply = post(server, "/v1/load_preft_adapter", {"adapter_name": "user-7", "adapter_path": str(adapter_dirs["c"])})
    assert code == 200 and reply["version"] == 1
    assert "user-7" in {m.id for m in client.models.list().data}
    for prompt in (PROMPTS[0], long_prompt):
        _, prompt_ids, ids = complete(client, "user-7", prompt)
        assert ids == reference(adapter_dirs["c"], prompt_ids, 8)

    # update in place: new weights (b's), same name, next version
    code, reply = post(server, "/v1/load_preft_adapter",
                       {"adapter_name": "user-7", "adapter_path": str(adapter_dirs["b"]), "load_inplace": True})
    assert code == 200 and reply["version"] == 2
    for prompt in (PROMPTS[0], long_prompt):
        _, prompt_ids, ids = complete(client, "user-7", prompt)
        assert ids == reference(adapter_dirs["b"], prompt_ids, 8)

    # an update whose files disagree (a rank-2 config over rank-4 tensors) is refused as a whole: b's weights stay
    mismatch = tmp_path / "mismatch"
    mismatch.mkdir()
    config = json.loads((adapter_dirs["c"] / "adapter_config.json").read_text())
    (mismatch / "adapter_config.json").write_text(json.dumps({**config, "r": 2, "lora_alpha": 4}))
    (mismatch / "adapter_model.safetensors").write_bytes((adapter_dirs["c"] / "adapter_model.safetensors").read_bytes())
    code, reply = post(server, "/v1/load_preft_adapter", {"adapter_name": "user-7", "adapter_path": str(mismatch), "load_inplace": True})
    assert code == 400 and "shape" in reply["error"]["message"], reply
    _, prompt_ids, ids = complete(client, "user-7", PROMPTS[0])
    assert ids == reference(adapter_dirs["b"], prompt_ids, 8)
    # an update to other settings (rank 2) replaces the adapter in its slot
    code, reply = post(server, "/v1/load_preft_adapter",
                       {"adapter_name": "user-7", "adapter_path": str(adapter_dirs["rank2"]), "load_inplace": True})
    assert code == 200 and reply["version"] == 3 and reply["rank"] == 2
    _, prompt_ids, ids = complete(client, "user-7", PROMPTS[0])
    assert ids == reference(adapter_dirs["rank2"], prompt_ids, 8)

    code, _ = post(server, "/v1/unload_preft_adapter", {"adapter_name": "user-7"})
    assert code == 200 and "user-7" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="user-7", prompt="hi", max_tokens=2)

    # the same name again, with c's weights: never b's cached prompt
    code, reply = post(server, "/v1/load_preft_adapter", {"adapter_name": "user-7", "adapter_path": str(adapter_dirs["c"])})
    assert code == 200 and reply["version"] == 4
    _, _, ids = complete(client, "user-7", long_prompt)
    assert ids == reference(adapter_dirs["c"], long_ids, 8)
    for model in ("a", "b"):  # the others are untouched
        _, prompt_ids, ids = complete(client, model, PROMPTS[2])
        assert ids == reference(adapter_dirs[model], prompt_ids, 8)
    post(server, "/v1/unload_preft_adapter", {"adapter_name": "user-7"})


@pytest.mark.slow
def test_an_update_while_requests_run_pins_each_request_to_one_version(server, reference, adapter_dirs, tokenizer):
    """Long requests for one adapter are running, and more are queued (80 requests, 32 sequences at a time), when its
    update arrives: each of them finishes with the old weights' output, every request sent after the update returns
    gets the new weights', and the engine keeps serving. (Without the pinning, a queued request reached the worker
    after the update, for a version it no longer held, and the engine core died.)"""
    from openai import AsyncOpenAI

    code, _ = post(server, "/v1/load_preft_adapter", {"adapter_name": "pinned", "adapter_path": str(adapter_dirs["a"])})
    assert code == 200
    prompt_ids = tokenizer.encode(PROMPTS[3])
    old, new = reference(adapter_dirs["a"], prompt_ids, 128), reference(adapter_dirs["c"], prompt_ids, 128)
    assert old != new

    async def run():
        client = AsyncOpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=300)

        async def request():
            response = await client.completions.create(model="pinned", prompt=PROMPTS[3], temperature=0, max_tokens=128,
                                                       extra_body=TOKENS)
            return response.choices[0].token_ids

        before = [asyncio.create_task(request()) for _ in range(80)]
        await asyncio.to_thread(wait_for_requests_in_engine, server, 80)  # a fixed sleep raced a slow machine (CI)
        update = asyncio.to_thread(post, server, "/v1/load_preft_adapter",
                                   {"adapter_name": "pinned", "adapter_path": str(adapter_dirs["c"]), "load_inplace": True})
        status, reply = await update
        after = await asyncio.gather(*(request() for _ in range(4)))
        return await asyncio.gather(*before), (status, reply), after

    before, (status, reply), after = asyncio.run(run())
    assert status == 200 and reply["version"] == 2
    assert all(ids == old for ids in before)
    assert all(ids == new for ids in after)
    post(server, "/v1/unload_preft_adapter", {"adapter_name": "pinned"})


@pytest.mark.slow
def test_compiled_serving_equals_the_reference(tiny_llama_dir, adapter_dirs, reference, tmp_path):
    """`preft-rl serve --no-enforce-eager` (torch.compile): the adapter ops are opaque custom ops that read each step's
    selection when they run (and the general plugin makes vLLM split its graph at them where it captures CUDA graphs;
    vLLM-CPU captures none); the greedy tokens equal the HF reference's, as in eager mode."""
    from openai import OpenAI

    cache = tmp_path / "vllm-cache"  # its own cache: torch.compile must run here, not load an earlier test's graph
    with running_server(tiny_llama_dir, {"a": adapter_dirs["a"]}, tmp_path / "server.log", "--no-enforce-eager",
                        env={"VLLM_CACHE_ROOT": str(cache)}) as url:
        client = OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
        for model in ("a", "tiny"):
            for prompt in PROMPTS[:2]:
                _, prompt_ids, ids = complete(client, model, prompt)
                assert ids == reference(served_dir(adapter_dirs, model), prompt_ids, GREEDY["max_tokens"]), (model, prompt)
        _, prompt_ids, ids = complete(client, "a", PROMPTS[0])
        assert ids != reference(None, prompt_ids, GREEDY["max_tokens"])  # the adapter really acts in the compiled graph
    compiled = [path for path in (cache / "torch_compile_cache").rglob("*") if path.is_file()]  # the compiled model
    log = (tmp_path / "server.log").read_text()
    assert compiled, "no torch.compile artifacts: " + "\n".join(line[:300] for line in log.splitlines() if "ompil" in line)


@pytest.mark.slow
def test_a_bad_adapter_fails_alone_while_good_clients_stream(server, reference, adapter_dirs, tokenizer, tiny_llama_dir, tmp_path):
    """DESIGN invariant 8 in the server: while 24 clients stream from a, b and the base, an adapter whose B is 1e30
    (finite, so the load route accepts it) is loaded and called. Its requests get a 422 naming it (streamed: an error
    event, no token); every good client's tokens equal the reference; the server stays up; the bad adapter keeps
    getting a 422 until it is updated, then serves its new weights exactly. Before: HTTP 500 for everyone and a dead
    engine core."""
    import openai
    from openai import AsyncOpenAI

    from preft_rl.adapters import PreftModel

    huge_dir = tmp_path / "huge"
    from transformers import AutoModelForCausalLM

    model = PreftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), adapter_dirs["c"], is_trainable=True)
    with torch.no_grad():
        for name, param in model.adapter_named_parameters():
            if "lora_B" in name:
                param.mul_(1e30)
    model.save_pretrained(huge_dir)
    expected = {(m, p): reference(served_dir(adapter_dirs, m), tokenizer.encode(p), GREEDY["max_tokens"])
                for m in ("tiny", "a", "b") for p in PROMPTS}

    async def run():
        client = AsyncOpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=300)

        async def good_client(i: int):
            results = []
            for j in range(6):
                model_name, prompt = ("tiny", "a", "b")[(i + j) % 3], PROMPTS[(i + 2 * j) % len(PROMPTS)]
                stream = await client.completions.create(model=model_name, prompt=prompt, stream=True,
                                                         extra_body={**TOKENS}, **GREEDY)
                ids = [t for chunk in [c async for c in stream] for choice in chunk.choices for t in (choice.token_ids or [])]
                results.append((model_name, prompt, ids))
            return results

        async def bad_client():
            await asyncio.sleep(0.5)  # the good clients are streaming by now
            code, reply = await asyncio.to_thread(post, server, "/v1/load_preft_adapter", {"adapter_name": "huge", "adapter_path": str(huge_dir)})
            assert code == 200, reply
            errors = []
            for prompt in PROMPTS[:2]:
                try:
                    await client.completions.create(model="huge", prompt=prompt, extra_body=TOKENS, **GREEDY)
                except openai.APIStatusError as exc:
                    errors.append((exc.status_code, str(exc)))
            stream_error = None
            try:
                stream = await client.completions.create(model="huge", prompt=PROMPTS[2], stream=True, extra_body=TOKENS, **GREEDY)
                tokens = [t for chunk in [c async for c in stream] for choice in chunk.choices for t in (choice.token_ids or [])]
            except openai.APIError as exc:
                stream_error, tokens = str(exc), []
            return errors, stream_error, tokens

        return await asyncio.wait_for(asyncio.gather(bad_client(), *(good_client(i) for i in range(24))), timeout=900)

    (errors, stream_error, bad_tokens), *good = asyncio.run(run())
    assert [code for code, _ in errors] == [422, 422], errors
    assert all("adapter 'huge' (version 1) produced non-finite activations" in message for _, message in errors), errors
    assert stream_error is not None and "non-finite" in stream_error and bad_tokens == []
    results = [item for client_results in good for item in client_results]
    assert len(results) == 24 * 6
    for model_name, prompt, ids in results:
        assert ids == expected[model_name, prompt], (model_name, prompt)
    with urllib.request.urlopen(server + "/health", timeout=10) as response:
        assert response.status == 200
    # fixed by an in-place update: a new version, served exactly
    code, reply = post(server, "/v1/load_preft_adapter", {"adapter_name": "huge", "adapter_path": str(adapter_dirs["c"]), "load_inplace": True})
    assert code == 200 and reply["version"] == 2, reply
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    _, prompt_ids, ids = complete(client, "huge", PROMPTS[0])
    assert ids == reference(adapter_dirs["c"], prompt_ids, GREEDY["max_tokens"])
    code, _ = post(server, "/v1/unload_preft_adapter", {"adapter_name": "huge"})
    assert code == 200


@pytest.mark.slow
def test_a_tool_conversation_through_the_server_equals_the_trainers_rollout(tool_model_dir, tokenizer, tmp_path):
    """DESIGN invariant 9 in the server: a 2-turn tool conversation through the openai client (tools=, the tool call
    read by the hermes parser, the history sent back with tool_calls and a tool message) gives the trainer's rollout
    token for token: the same prompts, the same sampled tokens and the same log-probs as `run_turns` on PreftEngine.
    The second turn's log-probs are those of the first turn's tokens kept plain, not adapted."""
    from openai import OpenAI
    from vllm import SamplingParams

    from preft_rl.engine import PreftEngine
    from preft_rl.trainers.agent import AgentSettings, Trajectory, run_turns
    from preft_rl.trainers.tools import TemplateDelta, tool_schema, with_tools

    adapter = make_adapter(tool_model_dir, tmp_path / "agent", seed=7, scale=0.05)  # 0.1 loses the call
    schema = tool_schema(add)
    shown = with_tools(TOOL_QUESTION, [schema], template_shows_tools=False)
    prompt_ids = tokenizer.apply_chat_template(shown, add_generation_prompt=True, tokenize=True, return_dict=False)
    trajectory = Trajectory(prompt_ids=list(prompt_ids), messages=list(shown), tools={"add": add})
    params = SamplingParams(temperature=0, max_tokens=64, logprobs=0)
    engine = PreftEngine(str(tool_model_dir), max_adapters=2, max_rank=MAX_RANK, max_model_len=512, max_num_batched_tokens=512)
    try:
        engine.add_adapter("agent", str(adapter))

        def generate(indices, prompts, round_params):
            return engine.generate(prompts, round_params, adapters=["agent"] * len(prompts), use_tqdm=False)

        run_turns([trajectory], [params], generate, AgentSettings(2, 10.0, 64, 256), tokenizer.eos_token_id,
                  lambda text: tokenizer.encode(text, add_special_tokens=False), tokenizer.decode, TemplateDelta(tokenizer))
        assert trajectory.turns == 2 and trajectory.use.calls == 1 and trajectory.use.errors == 0, trajectory
        first_end = trajectory.sampled.index(False)
        second_start = first_end + trajectory.sampled[first_end:].index(True)
        second_prompt = list(prompt_ids) + trajectory.tail[:second_start]
        # the wrong rule (every prompt token adapted, the first turn's sampled tokens too), for the margin
        [wrong] = engine.generate([second_prompt], params, adapters=["agent"], use_tqdm=False)
    finally:
        engine.close()
    right_logps = trajectory.logps[second_start:]
    wrong_logps = [lp[t].logprob for lp, t in zip(wrong.outputs[0].logprobs, wrong.outputs[0].token_ids)]

    with running_server(tool_model_dir, {"agent": adapter}, tmp_path / "server.log") as url:
        client = OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        ask = dict(model="agent", tools=[schema], temperature=0, max_tokens=64, logprobs=True,
                   extra_body={"return_token_ids": True})
        messages = list(TOOL_QUESTION)
        first = client.chat.completions.create(messages=messages, **ask)
        assert first.prompt_token_ids == list(prompt_ids)  # the tools shown as the trainer shows them
        assert first.choices[0].token_ids == trajectory.tail[:first_end]
        [tool_call] = first.choices[0].message.tool_calls
        assert (tool_call.function.name, json.loads(tool_call.function.arguments)) == ("add", {"a": 2, "b": 3})
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": tool_call.id, "content": str(add(2, 3))}]
        second = client.chat.completions.create(messages=messages, **ask)
        # the Responses route cannot mark sampled tokens: a history on an adapter is refused, naming the route to use
        import openai

        with pytest.raises(openai.BadRequestError, match="send it to /v1/chat/completions"):
            client.responses.create(model="agent", input=[*TOOL_QUESTION, {"role": "assistant", "content": "it is 5"},
                                                          {"role": "user", "content": "and 4 and 4?"}], max_output_tokens=8)
    assert second.prompt_token_ids == second_prompt  # the history re-rendered to the tokens the model sampled
    assert second.choices[0].token_ids == trajectory.tail[second_start:]
    assert "5" in second.choices[0].message.content
    served = [entry.logprob for entry in second.choices[0].logprobs.content]
    right_gap = max(abs(a - b) for a, b in zip(served, right_logps))
    wrong_gap = max(abs(a - b) for a, b in zip(served, wrong_logps))
    # measured: 0.0 and 9.8e-4 (fp32; the server and the engine run the same maths on the same shapes)
    assert right_gap < 1e-5 and wrong_gap > 1e-4, (right_gap, wrong_gap)


@pytest.mark.slow
def test_more_adapters_than_slots_from_an_adapter_dir_each_request_gets_its_own(tiny_llama_dir, reference, tokenizer, tmp_path):
    """Slots as a cache in the server: 6 adapters in --adapter-dir, loaded on their first request, on 2 device slots and
    3 held at most (--max-cpu-adapters): 36 concurrent clients over the 6 adapters and the base, each answer equal to
    its own adapter's reference (never another adapter's output). An adapter unloaded to make room and whose files
    changed meanwhile serves its new weights, not the old version's cached prompt."""
    import openai
    from openai import AsyncOpenAI

    library = tmp_path / "adapters"
    dirs = {f"user-{i}": make_adapter(tiny_llama_dir, library / f"user-{i}", seed=20 + i) for i in range(6)}
    prompts = {name: tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i, name in enumerate([*dirs, "tiny"])}
    expected = {name: reference(dirs.get(name), ids, GREEDY["max_tokens"]) for name, ids in prompts.items()}
    with running_server(tiny_llama_dir, {}, tmp_path / "server.log", "--max-adapters", "2", "--max-cpu-adapters", "3",
                        "--adapter-dir", str(library)) as url:
        async def run():
            client = AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)

            async def ask(name):
                response = await client.completions.create(model=name, prompt=prompts[name], extra_body=TOKENS, **GREEDY)
                return name, response.choices[0].token_ids

            names = [[*dirs, "tiny"][i % 7] for i in range(36)]
            return await asyncio.wait_for(asyncio.gather(*(ask(name) for name in names)), timeout=900)

        for name, ids in asyncio.run(run()):
            assert ids == expected[name], name
        client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        with pytest.raises(openai.NotFoundError, match="not loaded on this server"):
            complete(client, "user-99", PROMPTS[0])  # not in the directory either
        # user-0's files change while it is out of the server (at most 3 held: the last requests pushed it out)
        for name in ("user-3", "user-4", "user-5"):
            complete(client, name, PROMPTS[0])
        import shutil

        new_copy = make_adapter(tiny_llama_dir, tmp_path / "user-0-new", seed=77)
        shutil.rmtree(dirs["user-0"])
        shutil.copytree(new_copy, dirs["user-0"])  # the new files, and a copy of them for the reference
        _, prompt_ids, ids = complete(client, "user-0", PROMPTS[0])
        assert prompt_ids == prompts["user-0"]
        assert ids == reference(new_copy, prompt_ids, GREEDY["max_tokens"]) != expected["user-0"]  # the new weights
        import json
        import urllib.request

        request = urllib.request.Request(url + "/v1/preft/cache", headers={"Authorization": f"Bearer {API_KEY}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            stats = json.loads(response.read())
        # every adapter came from the directory at least once, user-0 twice, and 3 held at most: the others went out
        assert stats["registered"] <= 3 and stats["resident"] <= 2 and stats["dir_loads"] >= 7, stats
        assert stats["dir_unloads"] == stats["dir_loads"] - stats["registered"] and stats["slot_loads"] >= 0


@pytest.mark.slow
def test_tenant_keys_each_tenant_reaches_only_its_own_adapters_on_every_route(tiny_llama_dir, adapter_dirs, reference,
                                                                               tokenizer, tmp_path):
    """--tenant-keys with two tenants and the admin (--api-key): each tenant's key lists and calls only its adapters
    (bob also the base); another tenant's adapter, loaded or in --adapter-dir, answers exactly as a name that exists
    nowhere and is never loaded; the admin's routes answer 403 to tenants; no key answers 401; racing clients of both
    tenants each get their own adapter's tokens."""
    import openai
    from openai import AsyncOpenAI

    from preft_rl.engine.server.tenants import hash_key

    library = tmp_path / "library"
    dirs = {name: make_adapter(tiny_llama_dir, library / name, seed=30 + i) for i, name in enumerate(["alice-x", "bob-x"])}
    keys = {"alice": "sk-alice-1", "bob": "sk-bob-1"}
    tenants = {"alice": {"keys": [hash_key(keys["alice"])], "adapters": ["a", "alice-*"], "record": True},
               "bob": {"keys": [hash_key(keys["bob"])], "adapters": ["b", "bob-*"], "base": True}}
    (tmp_path / "keys.yaml").write_text(json.dumps({"tenants": tenants}))
    with running_server(tiny_llama_dir, {"a": adapter_dirs["a"], "b": adapter_dirs["b"]}, tmp_path / "server.log",
                        "--tenant-keys", str(tmp_path / "keys.yaml"), "--adapter-dir", str(library),
                        "--max-cpu-adapters", "8", "--enable-adapter-updates", "--record", str(tmp_path / "traffic")) as url:
        clients = {who: openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)
                   for who, key in [*keys.items(), ("admin", API_KEY)]}

        def get(route, key):
            request = urllib.request.Request(url + route, headers={"Authorization": f"Bearer {key}"} if key else {})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status, json.loads(response.read() or b"{}")
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read() or b"{}")

        assert sorted(m.id for m in clients["alice"].models.list()) == ["a"]
        assert sorted(m.id for m in clients["bob"].models.list()) == ["b", "tiny"]
        assert sorted(m.id for m in clients["admin"].models.list()) == ["a", "b", "tiny"]
        prompt_ids = tokenizer.encode(PROMPTS[0])
        for who, model, adapter in [("alice", "a", adapter_dirs["a"]), ("bob", "b", adapter_dirs["b"]), ("bob", "tiny", None),
                                    ("admin", "b", adapter_dirs["b"])]:
            assert complete(clients[who], model, PROMPTS[0])[2] == reference(adapter, prompt_ids, GREEDY["max_tokens"])

        def refusal(who, model, chat=False):
            with pytest.raises(openai.NotFoundError) as info:
                if chat:
                    clients[who].chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
                else:
                    complete(clients[who], model, PROMPTS[0])
            return info.value.response.json()

        nowhere = refusal("alice", "alice-zz")  # hers by name, but nowhere: vLLM's own model check answers
        for model in ("zz", "b", "bob-x", "tiny"):  # another tenant's, one in the directory, the base: as if nowhere
            body = refusal("alice", model)
            assert body == json.loads(json.dumps(nowhere).replace("'alice-zz'", repr(model))), (model, body)
        assert refusal("alice", "b", chat=True)["error"]["type"] == nowhere["error"]["type"]
        assert "'b'" not in nowhere["error"]["message"] and "tiny" not in nowhere["error"]["message"]
        assert get("/v1/preft/cache", API_KEY)[1]["dir_loads"] == 0  # bob-x was never loaded for alice
        ids = complete(clients["alice"], "alice-x", PROMPTS[0])[2]  # her own, from the directory
        assert ids == reference(dirs["alice-x"], prompt_ids, GREEDY["max_tokens"])
        assert sorted(m.id for m in clients["alice"].models.list()) == ["a", "alice-x"]
        chat = clients["alice"].chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert chat.model == "a"

        for route in ("/v1/preft/cache", "/metrics", "/v1/responses/x"):
            status, body = get(route, keys["alice"])
            assert status == 403 and "not open to tenant keys" in body["error"]["message"], route
        for route, body in [("/v1/load_preft_adapter", {"adapter_name": "alice-c", "adapter_path": str(adapter_dirs["c"])}),
                            ("/v1/responses", {"model": "a", "input": "hi"}), ("/tokenize", {"model": "a", "prompt": "hi"})]:
            assert post(url, route, body, key=keys["alice"])[0] == 403, route
        for route in ("/v1/models", "/metrics", "/v1/preft/cache"):
            assert get(route, None)[0] == 401 and get(route, "sk-wrong")[0] == 401, route
        assert post(url, "/invocations", {"model": "a", "prompt": "hi"}, key=None)[0] == 401
        assert get("/health", None)[0] == 200
        code, _ = post(url, "/v1/load_preft_adapter", {"adapter_name": "alice-c", "adapter_path": str(adapter_dirs["c"])})
        assert code == 200  # the admin loads; the name fits alice's pattern, so alice may call it
        assert complete(clients["alice"], "alice-c", PROMPTS[0])[2] == reference(adapter_dirs["c"], prompt_ids, GREEDY["max_tokens"])

        async def race():
            async_clients = {who: AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)
                             for who, key in keys.items()}

            async def ask(who, model, prompt):
                try:
                    response = await async_clients[who].completions.create(model=model, prompt=prompt, extra_body=TOKENS,
                                                                           **GREEDY)
                    return who, model, prompt, response.choices[0].token_ids
                except openai.NotFoundError:
                    return who, model, prompt, "404"

            jobs = [(["alice", "bob"][i % 2], ["a", "b", "b", "a"][i % 4], PROMPTS[i % len(PROMPTS)]) for i in range(24)]
            return await asyncio.wait_for(asyncio.gather(*(ask(*job) for job in jobs)), timeout=600)

        own = {"alice": "a", "bob": "b"}
        for who, model, prompt, ids in asyncio.run(race()):
            if model != own[who]:
                assert ids == "404", (who, model)
            else:
                assert ids == reference(adapter_dirs[model], tokenizer.encode(prompt), GREEDY["max_tokens"]), (who, model)
        check_recording_and_feedback(url, clients, keys, tokenizer, tmp_path / "traffic")
        check_tenant_keys_reload(url, clients, keys, tmp_path / "keys.yaml", tenants)


def check_tenant_keys_reload(url, clients, keys, path, tenants):
    """POST /v1/tenant-keys/reload (admin only): carol's new key works and bob's removed one stops at once; a bad file
    is refused and the keys in force stay."""
    import openai

    from preft_rl.engine.server.tenants import hash_key

    route = "/v1/tenant-keys/reload"
    carol = openai.OpenAI(base_url=url + "/v1", api_key="sk-carol-1", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError):
        carol.models.list()
    path.write_text(json.dumps({"tenants": {"alice": tenants["alice"],
                                            "carol": {"keys": [hash_key("sk-carol-1")], "adapters": ["b"]}}}))
    assert post(url, route, {}, key=keys["alice"])[0] == 403  # a tenant may not
    assert post(url, route, {}, key=API_KEY) == (200, {"tenants": 2, "keys": 2})
    assert [m.id for m in carol.models.list()] == ["b"]
    with pytest.raises(openai.AuthenticationError):
        clients["bob"].models.list()
    path.write_text("tenants: {carol: {keys: [sk-carol-1]}}")  # a key itself where its hash belongs
    status, body = post(url, route, {}, key=API_KEY)
    assert status == 400 and "is not a key hash" in body["error"]["message"] and "unchanged" in body["error"]["message"]
    assert [m.id for m in carol.models.list()] == ["b"] and len(clients["alice"].models.list().data) == 3


def check_recording_and_feedback(url, clients, keys, tokenizer, traffic_dir):
    """--record: alice (record: true) has each served request of her adapters recorded under the id her client saw,
    with the tokens it got and their log-probs; bob (not opted in) has none. Feedback goes to her own responses once."""
    from preft_rl.traffic import SqliteTrafficStore

    store = SqliteTrafficStore(traffic_dir)
    before = len(store.read("alice"))
    assert before == 4 + 6  # a, alice-x, the chat, alice-c; 6 of hers in the race (404s and bob's: none)
    assert store.read("bob") == []
    response, prompt_ids, ids = complete(clients["alice"], "a", PROMPTS[1])
    assert response.choices[0].logprobs is None  # recording never adds log-probs to an answer that did not ask
    rec = store.read("alice")[-1]
    assert (rec.id, rec.choice, rec.adapter, rec.version, rec.prompt_ids, rec.completion_ids, rec.finish_reason) == \
        (response.id, 0, "a", 1, prompt_ids, ids, "length")
    # the recorded log-probs are the ones a client asking for them gets (processed: after temperature)
    asked, _, asked_ids = complete(clients["alice"], "a", PROMPTS[1], logprobs=1)
    assert asked_ids == ids and asked.choices[0].logprobs.token_logprobs == pytest.approx(rec.logprobs, abs=1e-5)
    messages = [{"role": "user", "content": "what is 7 plus"}]
    chunks = list(clients["alice"].chat.completions.create(model="a", messages=messages, max_tokens=4, stream=True))
    chat_rec = store.read("alice")[-1]
    assert chat_rec.id == chunks[0].id and chat_rec.messages == messages and len(chat_rec.completion_ids) == 4
    assert chat_rec.sampled_spans == []
    # a later turn: the earlier assistant message's tokens, which the server kept plain, are recorded as sampled spans
    conversation = [*messages, {"role": "assistant", "content": "eight apples"}, {"role": "user", "content": "and 9?"}]
    later = clients["alice"].chat.completions.create(model="a", messages=conversation, max_tokens=3)
    later_rec = store.read("alice")[-1]
    assert later_rec.id == later.id and later_rec.messages == conversation and len(later_rec.sampled_spans) == 1
    start, end = later_rec.sampled_spans[0]
    assert tokenizer.decode(later_rec.prompt_ids[start:end]).startswith("eight apples")
    assert tokenizer.decode(later_rec.prompt_ids[:start]).endswith(tokenizer.decode(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True)))
    chat_rec = later_rec
    two = clients["alice"].completions.create(model="a", prompt=[PROMPTS[0], PROMPTS[2]], n=2, max_tokens=3, temperature=1,
                                              seed=0, extra_body=TOKENS)
    recs = {r.choice: r for r in store.read("alice", after=chat_rec.seq)}
    assert sorted(recs) == [0, 1, 2, 3] and {r.id for r in recs.values()} == {two.id}
    for choice in two.choices:  # choice i*n+j of the response is the record's choice
        assert recs[choice.index].completion_ids == choice.token_ids
        assert recs[choice.index].prompt_ids == tokenizer.encode([PROMPTS[0], PROMPTS[2]][choice.index // 2])

    assert post(url, "/v1/feedback", {"id": response.id, "reward": 0.75}, key=keys["alice"]) == \
        (200, {"id": response.id, "choice": 0, "reward": 0.75})
    assert post(url, "/v1/feedback", {"id": two.id, "choice": 3, "thumbs": "down"}, key=keys["alice"])[0] == 200
    foreign = post(url, "/v1/feedback", {"id": response.id, "reward": 1}, key=keys["bob"])
    unknown = post(url, "/v1/feedback", {"id": "cmpl-nope", "reward": 1}, key=keys["bob"])
    assert foreign[0] == unknown[0] == 404
    assert foreign[1]["error"]["message"].replace(response.id, "cmpl-nope") == unknown[1]["error"]["message"]
    for body, status, message in [({"id": response.id, "reward": 0.1}, 409, "already has feedback"),
                                  ({"id": response.id, "choice": 1, "reward": 1}, 404, "no recorded response"),
                                  ({"id": asked.id, "reward": 2}, 400, "from 0 (bad) to 1 (good)"),
                                  ({"id": asked.id, "reward": True}, 400, "must be a number"),
                                  ({"id": asked.id}, 400, 'give one of "reward"'),
                                  ({"id": asked.id, "thumbs": "sideways"}, 400, "must be \"up\" or \"down\""),
                                  ({"reward": 1}, 400, "must be the id of a response"),
                                  ({"id": asked.id, "reward": 1, "note": "x"}, 400, "unknown fields ['note']")]:
        got = post(url, "/v1/feedback", body, key=keys["alice"])
        assert got[0] == status and message in got[1]["error"]["message"], (body, got)
    assert post(url, "/v1/feedback", {"id": asked.id, "reward": 1}, key=API_KEY)[0] == 403
    assert post(url, "/v1/feedback", {"id": asked.id, "reward": 1}, key=None)[0] == 401
    assert store.feedback("alice", [(response.id, 0), (two.id, 3), (asked.id, 0)]) == {(response.id, 0): 0.75,
                                                                                       (two.id, 3): 0.0}
    store.close()


@pytest.mark.slow
def test_a_server_killed_under_load_keeps_every_answered_request_recorded(tiny_llama_dir, adapter_dirs, tmp_path):
    """--record under 32 concurrent streaming clients, then SIGKILL: every response a client received to its end reads
    back from the store with the tokens the client got; the store opens and takes appends again."""
    from openai import AsyncOpenAI

    from preft_rl.engine.server.tenants import hash_key
    from preft_rl.traffic import SqliteTrafficStore

    tenants = {"alice": {"keys": [hash_key("sk-alice-2")], "adapters": ["a"], "record": True}}
    (tmp_path / "keys.yaml").write_text(json.dumps({"tenants": tenants}))
    procs: list = []
    answered: dict[str, list[int]] = {}
    with running_server(tiny_llama_dir, {"a": adapter_dirs["a"]}, tmp_path / "server.log", "--tenant-keys",
                        str(tmp_path / "keys.yaml"), "--record", str(tmp_path / "traffic"), procs=procs) as url:
        async def load():
            client = AsyncOpenAI(base_url=url + "/v1", api_key="sk-alice-2", max_retries=0, timeout=120)
            enough = asyncio.Event()

            async def user(k):
                while not enough.is_set():
                    stream = await client.completions.create(model="a", prompt=PROMPTS[k % len(PROMPTS)], max_tokens=6,
                                                             temperature=1, stream=True, extra_body=TOKENS)
                    ids, rid, done = [], None, False
                    async for chunk in stream:
                        rid = chunk.id
                        ids += chunk.choices[0].token_ids or []
                        done = done or chunk.choices[0].finish_reason is not None
                    if done:
                        answered[rid] = ids
                    if len(answered) >= 64:
                        enough.set()

            users = [asyncio.create_task(user(k)) for k in range(32)]
            await asyncio.wait_for(enough.wait(), timeout=600)
            os.killpg(procs[0].pid, signal.SIGKILL)  # 32 requests in flight
            await asyncio.gather(*users, return_exceptions=True)

        asyncio.run(load())
    store = SqliteTrafficStore(tmp_path / "traffic")
    stored = {r.id: r for r in store.read("alice")}
    missing = [rid for rid in answered if rid not in stored]
    assert not missing, f"{len(missing)} of {len(answered)} answered requests were not recorded"
    for rid, ids in answered.items():
        assert stored[rid].completion_ids == ids and len(stored[rid].logprobs) == 6
    assert store.append(dataclasses.replace(next(iter(stored.values())), id="after-restart", seq=None)).result(timeout=30)
    store.close()
