"""GRPO with a tool: a prefill-only adapter learns to use a calculator, rolled out turn by turn on PreftEngine.

CPU (the offline default model, 2 cores):
    .venv/bin/python examples/grpo_tools.py               # with the calculator tool
    .venv/bin/python examples/grpo_tools.py --no-tools    # the same run without it, for comparison

The task: sums of several multi-digit numbers (reasoning-gym's chain_sum, --terms and --digits), which the 135M model
gets wrong when it adds by itself. With `tools=[calculate]` each rollout is a conversation: the model may call
`calculate` in the documented format (`<tool_call>{"name": "calculate", "arguments": {"expression": "..."}}</tool_call>`),
the trainer runs it and appends its result as a tool message, and the model answers with a line '#### N'. The adapter
acts on every token the model did not sample (the prompt, the tool results, the template's glue) and never on what it
sampled; the loss is on the sampled tokens only (DESIGN invariant 9).

Held-out protocol (before and after training, the same problems): --eval-problems chain_sum problems from the test
seeds, greedy, the same tools as in training. Reported: strict accuracy ('#### N' equals the sum), the format rate, and
the tool-call rate (a calculate call that ran), each with the change and a 95% paired-bootstrap interval. Results go to
output_dir: heldout.json, heldout_completions.jsonl, report.md, log.jsonl and the adapter.

Why these defaults (the offline SmolLM2-135M-Instruct on 2 CPU cores; docs/benchmarks/tools-example-cpu.md):
- One worked example, as earlier turns of every prompt (a call, its result, the answer): the model follows
  demonstrations, not descriptions. With the call format only described in the system text it made no call in 30
  problems; with two worked tool examples it already solved every one (nothing left to learn); with one it calls the
  tool in 5% of held-out problems (greedy), and its sampled calls are mostly malformed (unknown names, unquoted
  expressions).
- Rewards: strict accuracy (1.0) plus 0.5 for a calculate call that ran (--tool-reward). With accuracy alone the run
  never moved (9 steps, reward 0.0 at every step: of 32 samples a step, 1-13 called the tool and nearly every call
  failed, so no group had a right answer and every advantage was zero). The call reward gives the rare good call an
  advantage; by step 3 every sample called the tool and accuracy followed.
- 4 prompts x 8 completions per step, 12 steps, lr 2e-3, temperature 0.7, beta 0.04 (as the GSM8K job): about
  9-10 minutes on 2 cores with both evaluations of 100 problems.
- Measured with these defaults (100 held-out problems): strict accuracy 0.020 -> 0.850 (+0.830, 95% CI [+0.760,
  +0.900]), tool-call rate 0.050 -> 0.920 (+0.870 [+0.800, +0.930]), 9.5 minutes. The same run without the tool
  (--no-tools: both examples worked by hand, accuracy reward): strict accuracy 0.000 -> 0.010 (+0.010 [+0.000,
  +0.030]); the model cannot add these numbers itself.
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import sys
from pathlib import Path

from preft_rl.console import quiet_libraries

# Two worked examples as earlier turns of the conversation (a 135M model follows demonstrations, not a described
# format: with the format only described in the system text it made no call and no '#### N' line in 30 problems).
# --no-tools gets the same examples worked without the tool.
EXAMPLES = (("812 - 57 + 39", 794), ("46 + 305 - 118 - 27", 206))
SYSTEM = "Answer with a line '#### <number>'."


def _question(expression: str) -> str:
    return f"State the final answer to the following arithmetic problem: {expression} ="


def _worked(expression: str, result: int) -> str:
    """The example worked step by step, left to right (the plain run's demonstration)."""
    terms = expression.split(" ")
    steps, total = [], int(terms[0])
    for op, number in zip(terms[1::2], terms[2::2]):
        new = total + int(number) if op == "+" else total - int(number)
        steps.append(f"{total} {op} {number} = {new}")
        total = new
    assert total == result, (expression, total, result)
    return ", ".join(steps) + f".\n#### {result}"


def demonstrations(style: str) -> list[dict]:
    """The example turns every prompt starts with, after the system text: "tool" works both EXAMPLES with the tool (a
    call, its result, the answer), "one-tool" only the first, with the tool, "hand" both by hand."""
    from preft_rl.trainers.tools import tool_call_text

    turns: list[dict] = [{"role": "system", "content": SYSTEM}]
    for k, (expression, result) in enumerate(EXAMPLES[:1] if style == "one-tool" else EXAMPLES):
        turns.append({"role": "user", "content": _question(expression)})
        if style in ("tool", "one-tool"):
            turns += [{"role": "assistant", "content": tool_call_text("calculate", {"expression": expression})},
                      {"role": "tool", "content": str(result)}, {"role": "assistant", "content": f"#### {result}"}]
        else:
            turns.append({"role": "assistant", "content": _worked(expression, result)})
    return turns


EXAMPLE_DEFAULTS = dict(
    output_dir="outputs/grpo-tools", save_steps=6, max_steps=12, num_generations=8, per_device_train_batch_size=32,
    gradient_accumulation_steps=1, max_prompt_length=384, max_completion_length=96, learning_rate=2e-3,
    temperature=0.7, beta=0.04, max_tool_calling_iterations=2, max_tool_response_length=32,
)
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression of numbers, + - * / and parentheses.

    Args:
        expression: The expression, e.g. "812 - 57 + 39".
    """
    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"only numbers, + - * / and parentheses are allowed, not {ast.unparse(node)!r}")

    if len(expression) > 200:
        raise ValueError("the expression is longer than 200 characters")
    result = value(ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval").body)
    return str(int(result)) if float(result).is_integer() else f"{result:.6g}"


def with_demonstrations(dataset, style: str):
    """Each problem's prompt: the demonstrations, then its question."""
    turns = demonstrations(style)
    return dataset.map(lambda row: {"prompt": [*turns, {"role": "user", "content": row["question"].strip()}]})


def called_the_tool(prompts, completions, **_) -> list[float]:
    """1.0 where a calculate call ran (a tool message without an error), else 0.0 (held-out protocol only)."""
    return [float(any(m.get("role") == "tool" and not m["content"].startswith("error:") for m in c))
            if isinstance(c, list) else 0.0 for c in completions]


def parse_args(argv: list[str] | None = None):
    from preft_rl import PreftGRPOConfig
    from preft_rl.models import DEFAULT_MODEL
    from preft_rl.trainers.cli_args import add_dataclass_arguments, dataclass_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--no-tools", action="store_true", help="the same run without the calculator (the comparison)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--terms", type=int, nargs=2, default=(3, 4), metavar=("MIN", "MAX"), help="numbers per sum")
    parser.add_argument("--digits", type=int, nargs=2, default=(2, 3), metavar=("MIN", "MAX"), help="digits per number")
    parser.add_argument("--demonstrations", default="one-tool", choices=["one-tool", "tool", "hand"],
                        help="the worked examples at the start of every prompt: one with the tool, two with the tool, or "
                             "two by hand (always, with --no-tools)")
    parser.add_argument("--tool-reward", type=float, default=0.5,
                        help="reward weight of a calculate call that ran (0: accuracy alone)")
    parser.add_argument("--train-problems", type=int, default=1000)
    parser.add_argument("--eval-problems", type=int, default=100, help="held-out problems (0: skip)")
    parser.add_argument("--verbose", action="store_true", help="show vLLM's and the other libraries' logging")
    add_dataclass_arguments(parser, PreftGRPOConfig, EXAMPLE_DEFAULTS)
    args = parser.parse_args(argv)
    return args, dataclass_from_args(PreftGRPOConfig, args)


def main(argv: list[str] | None = None) -> dict:
    quiet_libraries(verbose="--verbose" in (argv if argv is not None else sys.argv))  # before vLLM is imported
    from preft_rl import PreftConfig, PreftGRPOTrainer
    from preft_rl.data.generated import load_generated_task
    from preft_rl.reports.stats import paired_bootstrap
    from preft_rl.reports.training import heldout_table, render_training_report, write_heldout
    from preft_rl.rewards import format_reward, gsm8k_accuracy_reward

    args, config = parse_args(argv)
    style = "hand" if args.no_tools else args.demonstrations
    task = dict(min_terms=args.terms[0], max_terms=args.terms[1], min_digits=args.digits[0], max_digits=args.digits[1])
    held_out = (with_demonstrations(load_generated_task("chain_sum", "test", args.eval_problems, seed=config.seed,
                                                        settings=task), style)
                if args.eval_problems else None)
    train = with_demonstrations(load_generated_task("chain_sum", "train", args.train_problems, seed=config.seed, settings=task,
                                                    exclude=held_out["question"] if held_out is not None else ()),
                                style)
    tools = {} if args.no_tools else {"tools": [calculate]}
    rewards, weights = [gsm8k_accuracy_reward], [1.0]
    if args.tool_reward and not args.no_tools:
        rewards, weights = rewards + [called_the_tool], weights + [args.tool_reward]
    config.reward_weights = weights
    trainer = PreftGRPOTrainer(args.model, rewards, args=config, train_dataset=train,
                               preft_config=PreftConfig(method="lora", r=args.r), **tools)
    protocol = [gsm8k_accuracy_reward, format_reward, called_the_tool]
    try:
        before = trainer.evaluation_scores(protocol, held_out) if held_out is not None else None
        metrics = trainer.train()
        after = trainer.evaluation_scores(protocol, held_out) if held_out is not None else None
    finally:
        trainer.close()
    if not trainer.accelerator.is_main_process:
        return metrics
    print(f"\nstep {metrics['step']}: train reward {metrics['reward']:.3f}; adapter in {config.output_dir}")
    if before is not None:
        names = {"strict accuracy": "gsm8k_accuracy_reward", "format rate": "format_reward", "tool-call rate": "called_the_tool"}
        changes = {label: paired_bootstrap(before[key], after[key], seed=config.seed) for label, key in names.items()}
        description = (f"{len(before['format_reward'])} chain_sum test problems ({task}), "
                       f"{'no tools' if args.no_tools else 'the calculate tool'}, greedy, at most "
                       f"{config.max_completion_length} tokens after the prompt")
        write_heldout(config.output_dir, description, changes)
        with open(Path(config.output_dir) / "heldout_completions.jsonl", "w") as f:
            for i, row in enumerate(held_out.select(range(len(before["completion"])))):
                f.write(json.dumps({"question": row["question"], "answer": row["answer"], "before": before["completion"][i],
                                    "after": after["completion"][i]}) + "\n")
        print(f"held-out: {description}")
        print("\n".join(heldout_table({"metrics": {k: c.to_dict() for k, c in changes.items()}})))
    print(f"report: {render_training_report(config.output_dir)}")
    return metrics


if __name__ == "__main__":
    main()
