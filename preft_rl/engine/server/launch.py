"""`preft-rl serve`: vLLM's own OpenAI-compatible server (`vllm serve`) with preft-rl's plugins.

    preft-rl serve MODEL --adapters user-7=./adapters/user-7 [NAME=DIR ...] --method lora --max-adapters 64 \\
        --max-rank 16 [--enable-adapter-updates --api-key KEY] [any vllm serve flag]

This checks preft-rl's own flags and the start-up adapters (in seconds, before vLLM starts), then runs `vllm serve`
in this process with:
- `--hf-overrides` naming the PreFT model class of the base architecture, and `--worker-extension-cls`;
- the plugins allowlisted (VLLM_PLUGINS) and their settings in PREFT_RL_SERVE;
- preft-rl's engine defaults where the user gave none: the model's own dtype, eager mode, the served name as typed,
  and, for a chat template without a tool format of its own, tool calls read in the trainer's `<tool_call>` format
  (`--enable-auto-tool-choice --tool-call-parser hermes`; preft_rl/trainers/tools.py).
Everything else (chat templates, streaming, /health, /metrics, the usual flags) is vLLM's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from importlib.metadata import entry_points
from typing import Any

from preft_rl.adapters.methods import method_names

from ..vllm_compat_serve import run_vllm_serve
from .adapters import NAME_PATTERN, AdapterError, ServeSettings, read_adapter
from .plugins import ENDPOINT_PLUGIN, GENERAL_PLUGIN, LOAD_ROUTE, SETTINGS_ENV, UNLOAD_ROUTE

# vllm serve flags preft-rl serve sets itself, or that would bypass the PreFT adapters.
_REFUSED = {
    "--hf-overrides": "preft-rl serve sets the architecture override itself (the PreFT model class)",
    "--worker-extension-cls": "preft-rl serve uses its own worker extension",
    "--enable-lora": "vLLM's LoRA serves every token; PreFT adapters go in --adapters",
    "--lora-modules": "vLLM's LoRA serves every token; PreFT adapters go in --adapters",
    "--headless": "the adapters are routed by the API server, which headless mode does not run",
    "--grpc": "the adapters are routed by the HTTP API server",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preft-rl serve", allow_abbrev=False,
        description="Serve many prefill-only adapters with vLLM's OpenAI-compatible server. Flags not listed here go "
                    "to `vllm serve` (e.g. --port, --host, --api-key, --max-model-len, --tensor-parallel-size).")
    parser.add_argument("model", help="base model: a hub id, a local directory or an offline name")
    parser.add_argument("--adapters", nargs="*", default=[], metavar="NAME=DIR",
                        help="adapters to load at start-up; a request selects one with \"model\": NAME")
    parser.add_argument("--method", choices=method_names(), default="lora",
                        help="the adapters' method; one per server (default: %(default)s)")
    parser.add_argument("--max-adapters", type=int, default=64, help="adapter slots (default: %(default)s)")
    parser.add_argument("--max-rank", type=int, default=16, help="largest adapter rank (default: %(default)s)")
    parser.add_argument("--max-cpu-adapters", type=int, default=None,
                        help="adapters the server holds at most, those beyond --max-adapters waiting in host memory for a "
                             "slot (slots as a cache, as vLLM's --max-cpu-loras; default: --max-adapters)")
    parser.add_argument("--adapter-dir", default=None, metavar="DIR",
                        help="a directory of adapter folders: a request for NAME loads DIR/NAME on first use (when the "
                             "server is full, the least recently requested adapter loaded this way is unloaded)")
    parser.add_argument("--enable-adapter-updates", action="store_true",
                        help=f"add POST {LOAD_ROUTE} and {UNLOAD_ROUTE} (needs --api-key or VLLM_API_KEY)")
    parser.add_argument("--adapter-scope", choices=["prompt", "all"], default="prompt",
                        help="prompt: PreFT, adapters on prompt tokens only (default); all: on every token, the same "
                             "server as an all-token baseline for benchmarks")
    parser.add_argument("--load-peft-lora-as-prefill-only", action="store_true",
                        help="the --adapters may be plain PEFT LoRA directories, served on prompt tokens only (they were "
                             "trained on every token, so this changes what they do)")
    parser.add_argument("--tenant-keys", default=None, metavar="FILE",
                        help="YAML or JSON: each tenant's key hashes and the adapters it may use; a tenant's key reaches "
                             "only its own adapters (preft_rl/engine/server/tenants.py). --api-key stays the admin key")
    parser.add_argument("--record", default=None, metavar="DIR",
                        help="keep the served requests of tenants whose --tenant-keys entry says record: true (prompt, "
                             "sampled tokens and log-probs; DIR/traffic.sqlite), and take POST /v1/feedback on them")
    parser.add_argument("--record-max-age-days", type=float, default=None,
                        help="with --record: drop records older than this (default: keep)")
    parser.add_argument("--record-max-records", type=int, default=None,
                        help="with --record: keep each tenant's newest N records (default: all)")
    parser.add_argument("--cpu-kv-cache-gib", type=int, default=1,
                        help="CPU KV cache size when VLLM_CPU_KVCACHE_SPACE is unset (default: %(default)s)")
    return parser


def parse_adapters(specs: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise ValueError(f"--adapters {spec!r}: write NAME=DIR, e.g. user-7=./adapters/user-7")
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"--adapters {spec!r}: the name {name!r} must be 1-128 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        if name in adapters:
            raise ValueError(f"--adapters: {name!r} is given twice")
        adapters[name] = os.path.abspath(path)
    return adapters


def _flag_given(argv: list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _take_api_keys(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without its --api-key flags, the keys they gave): `--api-key K [K ...]` or `--api-key=K`."""
    rest, keys, i = [], [], 0
    while i < len(argv):
        if argv[i].startswith("--api-key="):
            keys.append(argv[i].split("=", 1)[1])
        elif argv[i] == "--api-key":
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):
                keys.append(argv[i])
                i += 1
            continue
        else:
            rest.append(argv[i])
        i += 1
    return rest, keys


def plan(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """(the `vllm serve` argv, the environment to add) for `preft-rl serve` arguments; raises ValueError with the fix
    for any bad flag or start-up adapter. Nothing is started."""
    from transformers import AutoConfig

    from preft_rl.engine.common import default_vllm_settings
    from preft_rl.engine.model import SUPPORTED_ARCHITECTURES, preft_architecture
    from preft_rl.engine.worker import WORKER_EXTENSION
    from preft_rl.models import resolve_model

    args, vllm_argv = build_parser().parse_known_args(argv)
    for flag, why in _REFUSED.items():
        if _flag_given(vllm_argv, flag):
            raise ValueError(f"{flag} cannot be used with preft-rl serve: {why}")
    for flag in ("--api-server-count", "--data-parallel-size"):
        value = _flag_value(vllm_argv, flag)
        if value not in (None, "1"):
            raise ValueError(f"{flag} {value}: preft-rl serve runs one API server (it holds the adapter table); "
                             "scale out with --tensor-parallel-size, or run several servers behind a load balancer")
    if args.max_adapters < 1 or args.max_rank < 1:
        raise ValueError(f"--max-adapters {args.max_adapters} and --max-rank {args.max_rank} must both be >= 1")
    if args.max_cpu_adapters is not None and args.max_cpu_adapters < args.max_adapters:
        raise ValueError(f"--max-cpu-adapters {args.max_cpu_adapters} must be >= --max-adapters {args.max_adapters} (it "
                         "counts every adapter the server holds, those in device slots included)")
    if args.adapter_dir is not None and not os.path.isdir(args.adapter_dir):
        raise ValueError(f"--adapter-dir {args.adapter_dir}: not a directory; pass a directory holding one adapter "
                         "folder per name (DIR/NAME/adapter_config.json)")
    if args.enable_adapter_updates and not (_flag_given(vllm_argv, "--api-key") or os.environ.get("VLLM_API_KEY")):
        raise ValueError("--enable-adapter-updates lets clients load files of the server's machine: it needs an API "
                         "key (--api-key KEY or VLLM_API_KEY), as vLLM's own runtime LoRA updates do")
    admin_hashes: list[str] = []
    tenant_keys = None
    if args.tenant_keys is not None:  # this server's middleware checks every key, the admin's included (not vLLM's)
        from .tenants import TenantKeys, hash_key

        vllm_argv, admin = _take_api_keys(vllm_argv)
        admin = admin or ([os.environ["VLLM_API_KEY"]] if os.environ.get("VLLM_API_KEY") else [])
        admin_hashes = [hash_key(key) for key in admin if key]
        tenant_keys = os.path.abspath(args.tenant_keys)
        TenantKeys.read(tenant_keys, admin_hashes)  # every refusal now, before vLLM starts
    if args.record is not None and tenant_keys is None:
        raise ValueError("--record keeps each tenant's traffic, so it needs --tenant-keys FILE (a tenant opts in with "
                         "record: true in its entry)")
    if args.record is None and (args.record_max_age_days is not None or args.record_max_records is not None):
        raise ValueError("--record-max-age-days and --record-max-records bound what --record DIR keeps: pass --record DIR")
    for flag, value in (("--record-max-age-days", args.record_max_age_days), ("--record-max-records", args.record_max_records)):
        if value is not None and not value > 0:
            raise ValueError(f"{flag} {value} must be > 0")
    adapters = parse_adapters(args.adapters)
    limit = max(args.max_cpu_adapters or 0, args.max_adapters)
    if len(adapters) > limit:
        raise ValueError(f"{len(adapters)} --adapters but the server holds at most {limit}; raise --max-adapters or "
                         "--max-cpu-adapters")

    path = resolve_model(args.model)
    hf_config = AutoConfig.from_pretrained(path)
    arch = (getattr(hf_config, "architectures", None) or [None])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{args.model}: architecture {arch!r} is not supported; supported: {list(SUPPORTED_ARCHITECTURES)}")
    settings = ServeSettings(method=args.method, max_adapters=args.max_adapters, max_rank=args.max_rank,
                             model_class=preft_architecture(arch, args.method), adapters=adapters,
                             runtime_updates=args.enable_adapter_updates, adapter_scope=args.adapter_scope,
                             peft_lora_as_prefill_only=args.load_peft_lora_as_prefill_only,
                             max_cpu_adapters=args.max_cpu_adapters or 0,
                             adapter_dir=os.path.abspath(args.adapter_dir) if args.adapter_dir else None,
                             tenant_keys=tenant_keys, admin_key_hashes=admin_hashes,
                             record_dir=os.path.abspath(args.record) if args.record else None,
                             record_max_age_s=args.record_max_age_days * 86400 if args.record_max_age_days else None,
                             record_max_records=args.record_max_records)
    for name, adapter_dir in adapters.items():  # every start-up adapter read and checked before vLLM starts
        try:
            read_adapter(name, adapter_dir, settings, settings.peft_lora_as_prefill_only)
        except AdapterError as exc:
            raise ValueError(exc.message) from None

    defaults = default_vllm_settings(hf_config, args.cpu_kv_cache_gib)  # also sets VLLM_CPU_KVCACHE_SPACE if unset
    out = ["serve", path]
    if not _flag_given(vllm_argv, "--served-model-name"):
        out += ["--served-model-name", str(args.model)]
    if not _flag_given(vllm_argv, "--dtype"):
        out += ["--dtype", defaults["dtype"]]
    if not any(_flag_given(vllm_argv, f) for f in ("--enforce-eager", "--no-enforce-eager", "--compilation-config", "-cc", "-O")):
        out += ["--enforce-eager"]
    if args.record is not None and not _flag_given(vllm_argv, "--logprobs-mode"):
        out += ["--logprobs-mode", "processed_logprobs"]  # records keep the log-probs the trainer's loss uses
    if not _flag_given(vllm_argv, "--tool-call-parser") and not _template_has_tool_format(path, vllm_argv):
        out += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]  # the trainer's documented call format
    out += vllm_argv
    out += ["--hf-overrides", json.dumps({"architectures": [settings.model_class]}),
            "--worker-extension-cls", WORKER_EXTENSION]
    env = {SETTINGS_ENV: json.dumps(dataclasses.asdict(settings)), "VLLM_PLUGINS": _plugins_allowlist(),
           "VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"]}
    if tenant_keys is not None:
        env["VLLM_API_KEY"] = ""  # vLLM's own key check would refuse every tenant key
    return out, env


def _template_has_tool_format(path: str, vllm_argv: list[str]) -> bool:
    """Whether the chat template the server will use renders tools itself (the trainer's rule: it mentions `tools`).
    Without one, `preft-rl serve` reads tool calls in the trainer's format (`<tool_call>` JSON, vLLM's hermes parser)."""
    from transformers import AutoTokenizer

    from ..server.chat import template_shows_tools

    given = _flag_value(vllm_argv, "--chat-template")
    if given is not None:
        return template_shows_tools(open(given).read() if os.path.isfile(given) else given)
    template = getattr(AutoTokenizer.from_pretrained(path), "chat_template", None)
    return template_shows_tools(template if isinstance(template, str) else json.dumps(template))


def _plugins_allowlist() -> str:
    """VLLM_PLUGINS with preft-rl's two plugins added. Endpoint plugins load only when named there; and when it was
    unset, every installed general plugin is named too, so none that loaded before stops loading."""
    current = os.environ.get("VLLM_PLUGINS")
    names = [n for n in current.split(",") if n] if current is not None else [p.name for p in entry_points(group="vllm.general_plugins")]
    for name in (GENERAL_PLUGIN, ENDPOINT_PLUGIN):
        if name not in names:
            names.append(name)
    return ",".join(names)


def main(argv: list[str]) -> int:
    try:
        vllm_argv, env = plan(argv)
    except (ValueError, OSError) as exc:
        print(f"preft-rl serve: {exc}", file=sys.stderr)
        return 2
    os.environ.update(env)
    print("preft-rl serve: vllm " + " ".join(vllm_argv), file=sys.stderr, flush=True)
    return run_vllm_serve(vllm_argv)


if __name__ == "__main__":  # `python -m preft_rl.engine.server.launch serve MODEL ...`: plain `vllm serve` (benchmarks' baselines)
    sys.exit(run_vllm_serve(sys.argv[1:]))
