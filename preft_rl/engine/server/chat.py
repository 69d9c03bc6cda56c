"""Chat requests with history on a PreFT adapter: DESIGN invariant 9 as served.

The rule (the same as in training): the adapter acts on every token the policy did not sample. A chat request does
not say which tokens were sampled, so the server takes the tokens of each assistant message, as the chat template
renders them from the generation prompt to the end of that message (its end-of-turn token included), as sampled; every
other token (system, user and tool messages, template glue, generation prompts) is adapted.

Before vLLM renders a chat request for an adapter:
1. Tools, for a chat template without a tool format of its own (it never mentions `tools`): the request's tools are
   shown as the trainer shows them (`with_tools`), and each assistant message's OpenAI `tool_calls` are written back
   into its text in the documented format (`tool_call_text`, the format vLLM's `hermes` tool parser reads). A template
   with its own tool format renders both itself.
2. After rendering, each assistant message's tokens are found in the prompt: from the end of the messages before it,
   rendered with the generation prompt, to its first end-of-turn token. A template whose earlier messages do not render
   to a prefix of the whole prompt is refused with a 400 that says so (its tokens cannot be attributed).

The served prompt then equals the trainer's rollout token for token wherever the re-rendered assistant text tokenises
to what the model sampled: text followed by its tool calls, written as `tool_call_text` writes them (vLLM's parser keeps
the text before the first call and the calls, not what follows them). Clients that need the exact sampled tokens of
arbitrary text should keep them: the completions route takes token prompts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from preft_rl.trainers.tools import tool_call_text, with_tools


def template_shows_tools(template_text: str) -> bool:
    """Whether a chat template renders tools itself (the trainer's test: it mentions `tools`)."""
    return "tools" in (template_text or "")


def messages_with_tools_as_text(messages: list[dict], tools: list[dict] | None, shows_tools: bool) -> list[dict]:
    """The messages a template without a tool format renders: the tools shown in the system text, and each assistant
    message's `tool_calls` appended to its content in the documented format (arguments parsed from their JSON string).

    >>> calls = [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]
    >>> messages_with_tools_as_text([{"role": "assistant", "content": None, "tool_calls": calls}], None, False)
    [{'role': 'assistant', 'content': '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'}]
    """
    if shows_tools:
        return messages
    out = []
    for index, message in enumerate(messages):
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and calls:
            text = message.get("content") or ""
            if not isinstance(text, str):
                raise ValueError(f"messages[{index}]: an assistant message with tool_calls needs text content")
            for call in calls:
                function = call.get("function") or {}
                try:
                    arguments = json.loads(function.get("arguments") or "{}")
                except json.JSONDecodeError as exc:
                    raise ValueError(f"messages[{index}].tool_calls: arguments of {function.get('name')!r} are not JSON "
                                     f"({exc.msg}): {function.get('arguments')!r}") from None
                text += tool_call_text(function.get("name"), arguments)
            message = {key: value for key, value in message.items() if key != "tool_calls"} | {"content": text}
        out.append(message)
    return with_tools(out, tools or [], template_shows_tools=False)


def assistant_token_spans(prompt_ids: Sequence[int], prefixes: Sequence[Sequence[int]], end_ids: set[int],
                          open_last: bool = False) -> list[tuple[int, int]]:
    """[start, end) of each assistant message's tokens in `prompt_ids`: `prefixes[k]` are the ids of the messages before
    the k-th assistant message rendered with the generation prompt, so the message starts where its prefix ends and runs
    to its first end-of-turn token (included). `open_last`: the last assistant message is continued by this request
    (continue_final_message) and runs to the end of the prompt.

    >>> assistant_token_spans([1, 5, 6, 7, 3, 8, 9], [[1, 5]], {3})
    [(2, 5)]
    """
    spans: list[tuple[int, int]] = []
    prompt = list(prompt_ids)
    for k, prefix in enumerate(prefixes):
        start = len(prefix)
        if prompt[:start] != list(prefix):
            raise ValueError(
                f"assistant message {k + 1}: the messages before it render to tokens that are not a prefix of the whole "
                "conversation's, so its tokens cannot be told apart (this chat template changes earlier text when a "
                "message is appended); use a template that renders each message independently of later ones")
        if spans and start < spans[-1][1]:
            raise ValueError(f"assistant message {k + 1} starts inside the one before it")
        if open_last and k == len(prefixes) - 1:
            end = len(prompt)
        else:
            end = next((i + 1 for i in range(start, len(prompt)) if prompt[i] in end_ids), None)
            if end is None:
                raise ValueError(
                    f"assistant message {k + 1} has no end-of-turn token (ids {sorted(end_ids)}) after it: this chat "
                    "template does not end assistant messages with the eos token, so where the sampled tokens end is "
                    "unknown; set tokenizer.eos_token to the template's end-of-turn token")
        if end > start:
            spans.append((start, end))
    return spans


def responses_history_error(model: str, items: Any, continues: bool) -> str | None:
    """Why a Responses API request for adapter `model` is refused, or None: the Responses route renders earlier output
    (assistant messages, function calls, reasoning, or a previous response) without marking it as sampled, so the
    adapter would act on tokens the model sampled. A single turn (text, or user, system and tool items) is served.

    >>> responses_history_error("a", [{"role": "assistant", "content": "hi"}], False)[:40]
    "adapter 'a': the Responses API cannot ma"
    """
    def field(item: Any, key: str) -> Any:
        return item.get(key) if isinstance(item, dict) else getattr(item, key, None)

    earlier = continues or (isinstance(items, list) and any(
        field(item, "role") == "assistant" or field(item, "type") in ("function_call", "reasoning") for item in items))
    if not earlier:
        return None
    return (f"adapter {model!r}: the Responses API cannot mark which tokens of earlier turns the model sampled, so a "
            "conversation with earlier output (assistant messages, function calls, reasoning or previous_response_id) "
            "would have the adapter act on them; send it to /v1/chat/completions, which keeps each assistant message "
            "plain (DESIGN invariant 9)")


async def render_adapter_chat(chat: Any, is_adapter: bool) -> Any:
    """The chat route's render for one request (`chat`: vllm_compat_serve.ChatRendering): unchanged for the base
    model; for an adapter, the messages prepared (tools as text) and the assistant messages' tokens marked as sampled
    in the prompt (`sampled_spans`, which the wrapped generate hands to the worker). A request whose tokens cannot be
    attributed gets a 400 before anything runs."""
    from preft_rl.engine.vllm_compat import SAMPLED_SPANS_KEY

    if not is_adapter:
        return await chat.render()
    messages = chat.messages
    try:
        messages = messages_with_tools_as_text(messages, chat.tools, template_shows_tools(chat.template_text))
    except ValueError as exc:
        return chat.error(str(exc))
    chat.messages = messages
    result = await chat.render()
    assistant_at = [i for i, message in enumerate(messages) if message.get("role") == "assistant"]
    if chat.is_error(result) or not assistant_at:
        return result
    try:
        if assistant_at[0] == 0:
            raise ValueError("the conversation starts with an assistant message; put a system or user message first")
        prefixes = [await chat.prefix_ids(i) for i in assistant_at]
        open_last = chat.continues_final_message and assistant_at[-1] == len(messages) - 1
        spans = assistant_token_spans(chat.prompt_ids(result), prefixes, chat.end_ids, open_last)
    except ValueError as exc:
        return chat.error(f"adapter {chat.model!r}: {exc}")
    if spans:
        chat.set_prompt_field(result, SAMPLED_SPANS_KEY, [list(span) for span in spans])
    return result
