"""Online personalisation: push saved adapters into a running `preft-rl serve` (its load route with load_inplace).

The trainer calls `check_server` once before training (a wrong URL or key fails before any work) and `push_adapters`
after each save: each adapter folder is loaded under its served name; an adapter the server does not hold yet is
added. The server checks the files in full before it switches, so a refused push leaves the old version serving;
requests already running finish on the version they started with. A push that fails (server down, refused) is
logged and training goes on: the adapter is saved on disk either way, and the next save pushes again.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
LOAD_ROUTE = "/v1/load_preft_adapter"  # preft_rl.engine.server.plugins.LOAD_ROUTE (not imported: that pulls in vLLM)


def api_key(key: str | None) -> str | None:
    return key if key is not None else os.environ.get("VLLM_API_KEY")


def _request(url: str, key: str | None, body: dict | None = None, timeout: float = 30) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, {"error": text[:300]}


def check_served_names(names: Any) -> None:
    """Raise, before any work, where a name the trainer would push under is one the server refuses."""
    from preft_rl.adapters.serialization import SERVED_NAME

    for name in names:
        if not SERVED_NAME.fullmatch(name):
            raise ValueError(f"push_to_server: the served adapter name {name!r} (push_adapter_name, by default output_dir's "
                             "folder name) is not one `preft-rl serve` accepts: 1-128 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit; set push_adapter_name")


def check_server(url: str, key: str | None) -> list[str]:
    """The model and adapter names the server lists; raises naming the problem when it does not answer as a server."""
    try:
        status, reply = _request(url.rstrip("/") + "/v1/models", api_key(key), timeout=10)
    except OSError as exc:
        raise ValueError(f"push_to_server={url!r}: no server answers there ({exc}); start `preft-rl serve ... "
                         "--enable-adapter-updates` first, or unset push_to_server") from None
    if status == 401:
        raise ValueError(f"push_to_server={url!r} refused the API key (401): set push_api_key or VLLM_API_KEY to the "
                         "server's --api-key")
    if status != 200 or not isinstance(reply, dict) or not isinstance(reply.get("data"), list):
        raise ValueError(f"push_to_server={url!r}: GET /v1/models gave {status} {str(reply)[:200]}; is it a `preft-rl serve`?")
    return [m.get("id") for m in reply["data"] if isinstance(m, dict)]


def push_adapters(url: str, adapters: dict[str, Path], key: str | None) -> dict[str, int | None]:
    """Load each {served name: adapter folder} into the server in place: {name: the version now served, or None where
    the push failed (logged as a warning)}."""
    versions: dict[str, int | None] = {}
    for name, folder in adapters.items():
        body = {"adapter_name": name, "adapter_path": str(Path(folder).resolve()), "load_inplace": True}
        try:
            status, reply = _request(url.rstrip("/") + LOAD_ROUTE, api_key(key), body, timeout=600)
        except OSError as exc:
            status, reply = None, {"error": str(exc)}
        if status == 200:
            versions[name] = reply.get("version")
        else:
            versions[name] = None
            message = reply.get("error", reply) if isinstance(reply, dict) else reply
            if isinstance(message, dict):
                message = message.get("message", message)
            hint = " (start the server with --enable-adapter-updates)" if status == 404 else ""
            logger.warning("pushing adapter %r from %s to %s failed (%s): %s%s; the server keeps its previous version, "
                           "the next save pushes again", name, folder, url, status, str(message)[:300], hint)
    return versions
