"""The rollout loop: generate, run the tools the model called, append their results, generate again.

One code path for every rollout: a run without tools is the one-turn case (one engine call, no parsing, the requests
and the returned completions exactly those of a single-turn rollout). With tools, each trajectory is a small state
machine: after a turn that ended with its eos token, the `<tool_call>`s in its text are run (preft_rl.trainers.tools)
and their results, with the template's glue and the next generation prompt, are appended as ids; the next turn's
prompt is the first prompt plus every token since, with the turns' sampled tokens marked as sampled spans (DESIGN
invariant 9: they stay plain in the engine, outside the adapter mask in training, and are the only tokens in the loss).
A trajectory ends when a turn calls no tool, ends without eos (length), reaches max_tool_calling_iterations, or the
tool results would pass max_completion_length (then it is truncated: its last turn is the one that called the tools).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from preft_rl.adapters.masks import spans_from_mask

from .tools import TemplateDelta, ToolUse, call_tool, parse_tool_calls


@dataclass
class AgentSettings:
    """What the loop needs from the config."""

    max_iterations: int  # max_tool_calling_iterations: tool-calling rounds per trajectory at most
    timeout: float  # tool_call_timeout, seconds per call
    max_response_tokens: int  # max_tool_response_length
    max_completion_length: int  # every token after the first prompt (sampled and tool tokens) at most


@dataclass
class Trajectory:
    """One rollout row as it grows: the first prompt's ids (with the spans of it an earlier turn's policy sampled, for
    a recorded conversation), then every later token, which of them were sampled, and the engine's log-prob of each
    sampled token (0.0 at tool tokens)."""

    prompt_ids: list[int]
    messages: list[dict] | None = None  # the conversation so far (chat prompts), for the template and the rewards
    tools: dict[str, Callable] = field(default_factory=dict)
    environment: Any = None
    delta: TemplateDelta | None = None  # with tools: the template's tokens after a turn; None: one turn, no tools
    tail: list[int] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # each turn's text
    completion_messages: list[dict] = field(default_factory=list)  # assistant and tool messages after the prompt
    turns: int = 0
    use: ToolUse = field(default_factory=ToolUse)
    done: bool = False
    prompt_spans: list[tuple[int, int]] = field(default_factory=list)  # of prompt_ids: sampled in earlier turns

    def request(self) -> Any:
        """The next turn's engine prompt: plain ids for a first turn without sampled spans, else ids with them marked."""
        if not self.tail and not self.prompt_spans:
            return self.prompt_ids
        offset = len(self.prompt_ids)
        return {"prompt_token_ids": self.prompt_ids + self.tail, "sampled_spans": list(self.prompt_spans) + [
            (offset + s, offset + e) for s, e in spans_from_mask(self.sampled)]}


def run_turns(trajectories: list[Trajectory], params: list[Any], generate: Callable[[list[int], list[Any], list[Any]], list[Any]],
              settings: AgentSettings, eos_id: int | None, count_tokens: Callable[[str], list[int]] | None = None,
              decode: Callable[[list[int]], str] | None = None, delta: TemplateDelta | None = None,
              keep_going: Callable[[int], bool] | None = None) -> None:
    """Grow every trajectory turn by turn (in place). `generate(indices, prompts, params)` is the engine call for the
    trajectories at `indices` (those still running), made every round, even with none (processes of one run stay in step);
    `keep_going(running)` says whether any process still has trajectories running (default: this one's count > 0).
    A trajectory with tools has its `delta` (`delta` is the default for those without one); one without stops after
    its first turn, so trajectories with and without tools (tenants' tasks) share the loop."""
    if delta is not None:
        for t in trajectories:
            t.delta = t.delta or delta
    with_tools = any(t.delta is not None for t in trajectories)
    for round_index in range(settings.max_iterations + 1 if with_tools else 1):
        running = [i for i, t in enumerate(trajectories) if not t.done]
        if round_index and not (keep_going or bool)(len(running)):
            break
        requests = [trajectories[i].request() for i in running]
        round_params = [_for_round(params[i], round_index, settings.max_completion_length - len(trajectories[i].tail))
                        for i in running]
        for i, out in zip(running, generate(running, requests, round_params)):
            t = trajectories[i]
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            t.tail += ids
            t.sampled += [True] * len(ids)
            t.logps += [lp[token].logprob for lp, token in zip(completion.logprobs or [], ids)]
            t.texts.append(completion.text)
            t.turns += 1
            if t.delta is None:
                t.done = True
                continue
            turn = {"role": "assistant", "content": completion.text}
            t.messages.append(turn)
            t.completion_messages.append(turn)
            ended = bool(ids) and ids[-1] == eos_id
            calls = parse_tool_calls(completion.text) if ended and round_index < settings.max_iterations else []
            if not calls:
                t.done = True
                continue
            results = [call_tool(t.tools, call, settings.timeout, count_tokens, settings.max_response_tokens, decode)
                       for call in calls]
            t.use.calls += len(results)
            t.use.errors += sum(r.error for r in results)
            t.use.seconds += sum(r.seconds for r in results)
            t.use.results += results
            tool_messages = [{"role": "tool", "content": r.content} for r in results]
            suffix = t.delta.after_turn(t.messages, tool_messages)
            if len(t.tail) + len(suffix) >= settings.max_completion_length:
                t.done = True  # no room for the results and another turn: truncated after the call
                continue
            t.tail += suffix
            t.sampled += [False] * len(suffix)
            t.logps += [0.0] * len(suffix)
            t.messages += tool_messages
            t.completion_messages += tool_messages


def _for_round(params: Any, round_index: int, budget: int) -> Any:
    """A trajectory's sampling params for one round: the first round's as given; later rounds get a seed of their own
    (derived from the trajectory's, so a run replays) and the completion budget that is left."""
    if round_index == 0:
        return params
    later = params.clone()
    later.max_tokens = max(1, min(params.max_tokens, budget))
    if params.seed is not None:
        later.seed = (params.seed + 7919 * round_index) & 0x7FFFFFFF
    return later
