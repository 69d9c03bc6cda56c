"""Recording one served request: its choices' sampled tokens and log-probs, gathered from the engine's outputs as they
stream, turned into `TrafficRecord`s when the request finishes (`preft-rl serve --record DIR`).

The record's id is the response id the client sees, so feedback can name it: vLLM's completions route sends each of a
request's prompts to the engine as `<response id>-<prompt index>` and numbers the response's choices
`prompt index * n + choice`; the chat route sends `<response id>` itself.
"""

from __future__ import annotations

import re
import time
from typing import Any

from .store import TrafficRecord

FEEDBACK_RANGE = (0.0, 1.0)  # a reward as the tenant's reward functions give it: 1 good (thumbs up), 0 bad (thumbs down)
_PROMPT_INDEX = re.compile(r"^(cmpl-.+)-(\d+)$")


def response_id(engine_request_id: str, n: int) -> tuple[str, int]:
    """(the response id the client sees, the first choice index of this engine request)."""
    found = _PROMPT_INDEX.match(engine_request_id)
    if found is None:
        return engine_request_id, 0
    return found.group(1), int(found.group(2)) * n


class RequestRecorder:
    """Collects one engine request's outputs (`add`, each output as vLLM yields it) and gives its records (`records`)
    once it finished. `delta`: each output carries only its new tokens (vLLM's streaming); else all so far."""

    def __init__(self, *, engine_request_id: str, n: int, tenant: str, adapter: str, version: int,
                 prompt_ids: list[int], messages: list[dict[str, Any]] | None, delta: bool,
                 sampled_spans: list[list[int]] | None = None) -> None:
        self.id, self.first_choice = response_id(engine_request_id, n)
        self.tenant, self.adapter, self.version = tenant, adapter, version
        self.prompt_ids, self.messages, self.delta = list(prompt_ids), messages, delta
        self.sampled_spans = [list(span) for span in sampled_spans or []]  # the assistant turns the server kept plain
        self.started = time.time()
        self.tokens: dict[int, list[int]] = {}
        self.logprobs: dict[int, list[float]] = {}
        self.finish: dict[int, str | None] = {}

    def add(self, output: Any) -> None:
        for completion in output.outputs:
            index = completion.index
            ids = list(completion.token_ids)
            lps = completion.logprobs
            if lps is None or len(lps) < len(ids):
                raise RuntimeError(f"request {self.id!r}: the engine returned {0 if lps is None else len(lps)} log-probs "
                                   f"for {len(ids)} tokens; recording needs sampling params with logprobs >= 0")
            sampled = [float(lps[k][token].logprob) for k, token in enumerate(ids)]
            if self.delta:
                self.tokens.setdefault(index, []).extend(ids)
                self.logprobs.setdefault(index, []).extend(sampled)
            else:
                self.tokens[index], self.logprobs[index] = ids, sampled
            self.finish[index] = completion.finish_reason

    def records(self) -> list[TrafficRecord]:
        return [TrafficRecord(id=self.id, choice=self.first_choice + index, tenant=self.tenant, time=self.started,
                              adapter=self.adapter, version=self.version, prompt_ids=self.prompt_ids,
                              completion_ids=self.tokens[index], logprobs=self.logprobs[index],
                              finish_reason=self.finish[index], messages=self.messages,
                              sampled_spans=self.sampled_spans)
                for index in sorted(self.tokens)]


def feedback_reward(body: dict[str, Any]) -> float:
    """The reward of a feedback body: "reward" (a number in FEEDBACK_RANGE) or "thumbs" ("up" = 1, "down" = 0)."""
    low, high = FEEDBACK_RANGE
    if ("reward" in body) == ("thumbs" in body):
        raise ValueError('give one of "reward" (a number from 0 to 1) or "thumbs" ("up" or "down")')
    if "thumbs" in body:
        if body["thumbs"] not in ("up", "down"):
            raise ValueError(f'thumbs={body["thumbs"]!r} must be "up" or "down"')
        return high if body["thumbs"] == "up" else low
    reward = body["reward"]
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not low <= reward <= high:
        raise ValueError(f"reward={reward!r} must be a number from {low:g} (bad) to {high:g} (good)")
    return float(reward)
