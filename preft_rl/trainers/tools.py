"""Tools for multi-turn rollouts: the tool-call format, running a call safely, and the tokens a tool result adds.

Format (documented for users and for the model): the offline model's chat template has no tool format of its own, so
calls are Hermes-style JSON between tags, the format vLLM's `hermes` tool parser reads:

    <tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>

Any number of calls may appear in one assistant turn; each becomes one `tool` message, in order. A call that cannot be
parsed, names an unknown tool, raises, runs past `timeout` or returns more than `max_response_tokens` tokens becomes a
tool message that says so: never a crash, never a silent drop.

Tokens: a conversation is never re-tokenised. After a turn, the tokens the model sampled stay as they are; what the
chat template adds after them (the glue after the end-of-turn token, each tool message, the next generation prompt) is
rendered as text from the template and tokenised on its own (`TemplateDelta`). That is exact only for templates that
keep earlier text unchanged when a message is appended, which `TemplateDelta` checks once, at start.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="preft-tool")


@dataclass
class ToolResult:
    """One tool message: its text, whether it reports an error, and the seconds the call took."""

    content: str
    error: bool = False
    seconds: float = 0.0


@dataclass
class ToolUse:
    """Counts of one trajectory's tool use (summed into the step's log)."""

    calls: int = 0
    errors: int = 0
    seconds: float = 0.0
    results: list[ToolResult] = field(default_factory=list)


def parse_tool_calls(text: str) -> list[tuple[str, dict[str, Any]] | str]:
    """Each `<tool_call>` of `text` in order: (name, arguments) or, for one that cannot be used, the error to report.

    >>> parse_tool_calls('sure <tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')
    [('add', {'a': 1})]
    >>> parse_tool_calls('<tool_call>{"name": 3}</tool_call>')
    ['error: a tool call needs {"name": <string>, "arguments": <object>}, got {"name": 3}']
    """
    calls: list[tuple[str, dict[str, Any]] | str] = []
    for body in TOOL_CALL.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError as exc:
            calls.append(f"error: the tool call is not valid JSON ({exc.msg} at character {exc.pos}): {body.strip()[:200]}")
            continue
        if (not isinstance(call, dict) or not isinstance(call.get("name"), str)
                or not isinstance(call.get("arguments", {}), dict)):
            calls.append('error: a tool call needs {"name": <string>, "arguments": <object>}, got ' + body.strip()[:200])
            continue
        calls.append((call["name"], call.get("arguments", {})))
    return calls


def tool_call_text(name: str, arguments: dict[str, Any]) -> str:
    """One call in the documented format, as a model writes it (and as `preft-rl serve` renders an OpenAI `tool_calls`
    entry back into an assistant message's text).

    >>> tool_call_text("add", {"a": 2, "b": 3})
    '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    """
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "</tool_call>"


def environment_tools(environment: Any) -> dict[str, Callable]:
    """An environment's tools, as TRL takes them: its public methods other than `reset`."""
    return {name: member for name, member in inspect.getmembers(environment, inspect.ismethod)
            if not name.startswith("_") and name != "reset"}


def tools_by_name(tools: Sequence[Callable]) -> dict[str, Callable]:
    """{name: function} of a tools list; names must be unique identifiers."""
    named: dict[str, Callable] = {}
    for tool in tools:
        if not callable(tool):
            raise TypeError(f"tools must be callables (functions with type hints and a docstring), got {tool!r}")
        name = getattr(tool, "__name__", None)
        if not isinstance(name, str) or not name.isidentifier() or name == "<lambda>":
            raise ValueError(f"tool {tool!r} has no usable name; give each tool a def with a name (not a lambda)")
        if name in named:
            raise ValueError(f"two tools are named {name!r}; tool names must be unique")
        named[name] = tool
    return named


def call_tool(tools: dict[str, Callable], call: tuple[str, dict[str, Any]] | str, timeout: float,
              count_tokens: Callable[[str], list[int]], max_response_tokens: int, decode: Callable[[list[int]], str]) -> ToolResult:
    """Run one parsed call. Its result (str() of what the tool returns) or a message saying what went wrong."""
    if isinstance(call, str):  # a call that could not be parsed
        return ToolResult(call, error=True)
    name, arguments = call
    if name not in tools:
        return ToolResult(f"error: unknown tool {name!r}; the tools are {sorted(tools)}", error=True)
    start = time.perf_counter()
    future = _EXECUTOR.submit(tools[name], **arguments)
    try:
        value = future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        # a thread cannot be killed: it finishes in the background, and its result is dropped
        return ToolResult(f"error: tool {name!r} did not answer within {timeout:g} s", True, time.perf_counter() - start)
    except Exception as exc:  # the tool raised: the model reads why
        return ToolResult(f"error: tool {name!r} raised {type(exc).__name__}: {exc}", True, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    ids = count_tokens(text)
    if len(ids) > max_response_tokens:
        return ToolResult(f"{decode(ids[:max_response_tokens])} [error: tool {name!r} returned {len(ids)} tokens; cut at "
                          f"{max_response_tokens} (max_tool_response_length)]", True, seconds)
    return ToolResult(text, False, seconds)


class TemplateDelta:
    """The token ids a chat template adds after an assistant turn whose tokens were sampled: the glue after the sampled
    end-of-turn token, the tool messages, and the next generation prompt. Checked once at construction: a template
    that rewrites earlier text when a message is appended (so earlier tokens would change) is refused."""

    def __init__(self, tokenizer: Any, tools: list[dict] | None = None) -> None:
        self.tokenizer, self.tools = tokenizer, tools
        self.eos_text = tokenizer.decode([tokenizer.eos_token_id]) if tokenizer.eos_token_id is not None else None
        probe = [{"role": "user", "content": "What is 2 + 3?"}]
        turn = {"role": "assistant", "content": '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'}
        opened = self._render(probe, True)
        closed = self._render([*probe, turn], False)
        extended = self._render([*probe, turn, {"role": "tool", "content": "5"}], True)
        if not closed.startswith(opened + turn["content"]) or not extended.startswith(closed):
            raise ValueError(
                "this chat template changes earlier text when a message is appended (rendering [user, assistant] and then "
                "[user, assistant, tool] does not extend the first), so a multi-turn conversation cannot keep its sampled "
                "tokens; use a template that renders each message independently of later ones (e.g. ChatML), or set "
                "tokenizer.chat_template to one")
        after_content = closed[len(opened) + len(turn["content"]):]
        if not self.eos_text or self.eos_text not in after_content:
            raise ValueError(
                f"this chat template ends an assistant message with {after_content!r}, which does not hold the tokenizer's "
                f"eos token {self.eos_text!r}: a turn would never end by itself; use a template whose assistant messages "
                "end with the eos token, or set tokenizer.eos_token to the template's end-of-turn token")
        self._glue_after_eos = after_content[after_content.index(self.eos_text) + len(self.eos_text):]

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        kwargs = {"tools": self.tools} if self.tools else {}
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)

    def after_turn(self, messages: list[dict], tool_messages: list[dict]) -> list[int]:
        """Ids the template adds after an assistant turn that ended with its sampled eos token (the turn is the last of
        `messages`): the glue after the eos token, the tool messages and the next generation prompt."""
        closed = self._render(messages, False)
        extended = self._render([*messages, *tool_messages], True)
        if not extended.startswith(closed):
            raise ValueError("the chat template changed earlier text when tool messages were appended; see TemplateDelta")
        return self.tokenizer.encode(self._glue_after_eos + extended[len(closed):], add_special_tokens=False)


@dataclass
class Toolset:
    """One task's tools (a run's, or one tenant's): functions by name, an environment factory (one environment per
    trajectory, its public methods added to the tools), the schemas the model is shown, whether the chat template shows
    them itself, and the template's tokens after a turn."""

    tools: dict[str, Callable]
    environment_factory: Callable[[], Any] | None
    schemas: list[dict]
    template_shows_tools: bool
    delta: TemplateDelta

    @classmethod
    def build(cls, tokenizer: Any, tools: Sequence[Callable] | None, environment_factory: Callable[[], Any] | None,
              dataset: Any, owner: str = "") -> Toolset | None:
        """The checked toolset (None without tools): unique tool names, an environment with reset(**row), a chat
        dataset, a chat template that keeps earlier tokens. `owner` (e.g. "tenant 'alice': ") starts every error."""
        named = tools_by_name(tools or [])
        if not named and environment_factory is None:
            return None
        if environment_factory is not None and not callable(environment_factory):
            raise TypeError(f"{owner}environment_factory must be a class or function that makes an environment, got "
                            f"{environment_factory!r}")
        first = dataset[0]["prompt"]
        if not (isinstance(first, list) and first and isinstance(first[0], dict)):
            raise ValueError(f"{owner}tools need a conversational dataset: each 'prompt' a list of chat messages such as "
                             "[{'role': 'user', 'content': ...}], so that tool results can be added as messages")
        every_tool = dict(named)
        if environment_factory is not None:
            probe = environment_factory()
            if not callable(getattr(probe, "reset", None)):
                raise TypeError(f"{owner}the environment {type(probe).__name__} needs a reset(**row) method (TRL's "
                                "environment API)")
            every_tool.update(environment_tools(probe))
            if not every_tool:
                raise ValueError(f"{owner}the environment {type(probe).__name__} has no public method besides reset: no tools")
        schemas = [tool_schema(fn) for fn in every_tool.values()]
        shows = "tools" in (tokenizer.chat_template or "")
        return cls(named, environment_factory, schemas, shows, TemplateDelta(tokenizer, schemas if shows else None))

    def shown(self, prompt: list[dict]) -> list[dict]:
        """The prompt with the tools shown (by the template, or as a system text)."""
        return with_tools(prompt, self.schemas, self.template_shows_tools)

    def prompt_ids(self, tokenizer: Any, prompt: list[dict]) -> list[int]:
        """The first turn's prompt ids."""
        kwargs = {"tools": self.schemas} if self.template_shows_tools else {}
        return tokenizer.apply_chat_template(self.shown(prompt), add_generation_prompt=True, tokenize=True,
                                             return_dict=False, **kwargs)

    def start(self, trajectory: Any, prompt: list[dict], row: dict) -> None:
        """Give a new trajectory its conversation, its tools and, with an environment factory, its own environment
        reset with its dataset row (TRL's API)."""
        trajectory.messages, trajectory.tools, trajectory.delta = self.shown(prompt), dict(self.tools), self.delta
        if self.environment_factory is not None:
            trajectory.environment = self.environment_factory()
            trajectory.environment.reset(**row)
            trajectory.tools.update(environment_tools(trajectory.environment))


def tool_schema(tool: Callable) -> dict[str, Any]:
    """The JSON schema a chat template (or the tools system text) shows the model: transformers' from the type hints and
    the docstring's Args section, else a plain one from the signature."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(tool)
    except Exception:  # no docstring or hints: what the signature says
        params = inspect.signature(tool).parameters
        return {"type": "function", "function": {
            "name": tool.__name__, "description": (inspect.getdoc(tool) or "").split("\n")[0],
            "parameters": {"type": "object", "properties": {name: {"type": "string"} for name in params},
                           "required": [n for n, p in params.items() if p.default is inspect.Parameter.empty]}}}


def tools_system_text(schemas: list[dict]) -> str:
    """How the tools and the call format are shown to a model whose chat template has no tool format of its own: each
    tool's name, description and parameters (what an OpenAI `tools=` entry holds, so `preft-rl serve` shows a request's
    tools exactly as the trainer showed them)."""
    shown = [schema.get("function", schema) for schema in schemas]
    listed = "\n".join(json.dumps({key: f[key] for key in ("name", "description", "parameters") if f.get(key) is not None})
                       for f in shown)
    return ("You may call tools. Available tools:\n" + listed + "\nTo call one, write <tool_call>{\"name\": <tool name>, "
            "\"arguments\": {<argument>: <value>}}</tool_call>; its result comes back in a tool message.")


def with_tools(messages: list[dict], schemas: list[dict], template_shows_tools: bool) -> list[dict]:
    """A chat prompt with the tools shown: through the template's own `tools` (it renders them), or else as a system
    text (added to the first system message, or as a new first one)."""
    if template_shows_tools or not schemas:
        return list(messages)
    text = tools_system_text(schemas)
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
