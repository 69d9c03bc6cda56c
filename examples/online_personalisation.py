"""Online personalisation: one server, the online loop, and simulated users whose adapters learn what they like from
their own traffic and feedback, while they use them.

    .venv/bin/python examples/online_personalisation.py            # about 17 minutes on 2 CPU cores
    .venv/bin/python examples/online_personalisation.py --minutes 6 --out outputs/online   # a shorter look

What runs:
- `preft-rl serve` on the offline model with 16 tenants, each with its own key and adapter (all start as the base
  model), recording every request (`--tenant-keys`, `--record`, `--enable-adapter-updates`).
- 16 simulated users, one per tenant (each waits about --think-s seconds between requests), in pairs: each pair shares
  a hidden preference, an answer style from
  rewards/style.py (terse, explained, 'the answer is N', an equation, the number first, paragraphs, no preamble, and
  no preamble with the number first). Each user asks short arithmetic questions through the openai client, with its
  key and its adapter, and gives feedback on each answer: its style reward, 0 or 1.
- `preft-rl online` over the first user of each pair (the treated tenants): each time a tenant has enough new
  traffic, it trains it on its recorded prompts and its rated answers and pushes the new adapter into the server. The
  second user of each pair is the control: the same preference, the same server, the same traffic, no loop.

Measured from the server's own answers, the ones the users actually received: the mean reward per time window, treated
against control, with 95% intervals (normal approximation over requests), per preference and over all eight. Written
to --out: online.json (every request: time, tenant, reward), online.md (the tables) and online.png (reward over time
per preference).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

PREFERENCES = {  # tenant pair -> (reward names, weights): the users' hidden preferences
    "alice": (["style_terse"], None),
    "bob": (["style_explained"], None),
    "carol": (["style_answer_is"], None),
    "dave": (["style_equation"], None),
    "erin": (["style_number_first"], None),
    "grace": (["style_paragraphs"], None),
    "heidi": (["style_direct"], None),
    "ivan": (["style_direct", "style_number_first"], [0.5, 0.5]),
}
SYSTEM_PROMPT = "You are a helpful assistant."
ADMIN_KEY = "sk-online-demo-admin"


def user_reward(name: str, text: str) -> float:
    from preft_rl.rewards import get_reward_func

    funcs, weights = PREFERENCES[name]
    weights = weights or [1.0 / len(funcs)] * len(funcs)
    values = [get_reward_func(f)([None], [text])[0] for f in funcs]
    return float(sum(w * (v or 0.0) for w, v in zip(weights, values)))


async def users(url: str, keys: dict[str, str], questions: list[list[dict]], minutes: float, max_tokens: int,
                temperature: float, seed: int, t0: float, think_s: float) -> list[dict]:
    """Every tenant's user, until the deadline: ask, read the answer, rate it (feedback), again."""
    import httpx
    from openai import AsyncOpenAI

    rows: list[dict] = []
    deadline = t0 + minutes * 60

    async def user(tenant: str, pair: str, arm: str) -> None:
        client = AsyncOpenAI(base_url=url + "/v1", api_key=keys[tenant], max_retries=2, timeout=600)
        rng = random.Random(f"{seed}:{tenant}")
        # no kept-alive connections: an answer can take longer than the server keeps an idle connection open
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            while time.monotonic() < deadline:
                await asyncio.sleep(think_s * rng.uniform(0.5, 1.5))  # a user reads the answer before asking again
                messages = questions[rng.randrange(len(questions))]
                sent = time.monotonic()
                try:
                    reply = await client.chat.completions.create(model=tenant, messages=messages, max_tokens=max_tokens,
                                                                 temperature=temperature)
                except Exception as exc:  # a busy server's timeout: counted, not fatal
                    rows.append({"tenant": tenant, "pair": pair, "arm": arm, "t": sent - t0, "error": str(exc)[:200]})
                    continue
                text = reply.choices[0].message.content or ""
                reward = user_reward(pair, text)
                try:
                    rated = await http.post(url + "/v1/feedback", json={"id": reply.id, "reward": reward},
                                            headers={"Authorization": f"Bearer {keys[tenant]}"})
                    feedback = rated.status_code
                except httpx.HTTPError as exc:
                    feedback = f"{type(exc).__name__}"
                rows.append({"tenant": tenant, "pair": pair, "arm": arm, "t": time.monotonic() - t0, "reward": reward,
                             "id": reply.id, "text": text[:200], "feedback": feedback})
        await client.close()

    await asyncio.gather(*(user(f"{arm[0]}-{pair}", pair, arm) for pair in PREFERENCES for arm in ("treated", "control")))
    return rows


def summarise(rows: list[dict], minutes: float, windows: int) -> dict:
    """Mean reward of the answers received per window, treated vs control, with 95% normal intervals."""
    def stats(values: list[float]) -> dict:
        n = len(values)
        if n == 0:
            return {"n": 0, "mean": None, "low": None, "high": None}
        mean = sum(values) / n
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        half = 1.96 * sd / math.sqrt(n) if n > 1 else float("nan")
        return {"n": n, "mean": mean, "low": mean - half, "high": mean + half}

    width = minutes * 60 / windows
    scored = [r for r in rows if "reward" in r]
    out = {"windows": [], "per_pair": {}}
    for w in range(windows):
        inside = [r for r in scored if w * width <= r["t"] < (w + 1) * width]
        entry = {"start_s": w * width, "end_s": (w + 1) * width}
        for arm in ("treated", "control"):
            entry[arm] = stats([r["reward"] for r in inside if r["arm"] == arm])
        out["windows"].append(entry)
        for pair in PREFERENCES:
            out["per_pair"].setdefault(pair, []).append(
                {arm: stats([r["reward"] for r in inside if r["pair"] == pair and r["arm"] == arm]) for arm in ("treated", "control")})
    return out


def plot(summary: dict, pushes: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(12, 9), sharex=True, sharey=True)
    mids = [(w["start_s"] + w["end_s"]) / 120 for w in summary["windows"]]
    panels = [("all eight", summary["windows"])] + [(pair, summary["per_pair"][pair]) for pair in PREFERENCES]
    for ax, (title, series) in zip(axes.flat, panels):
        for arm, colour in (("treated", "tab:blue"), ("control", "tab:grey")):
            means = [s[arm]["mean"] for s in series]
            lows = [s[arm]["low"] if s[arm]["low"] is not None else math.nan for s in series]
            highs = [s[arm]["high"] if s[arm]["high"] is not None else math.nan for s in series]
            ax.plot(mids, [m if m is not None else math.nan for m in means], marker="o", color=colour, label=arm)
            ax.fill_between(mids, lows, highs, color=colour, alpha=0.2)
        for t in pushes:
            ax.axvline(t / 60, color="tab:green", alpha=0.3, linewidth=1)
        ax.set_title(title if title == "all eight" else f"{title}: {'+'.join(PREFERENCES[title][0])}", fontsize=9)
        ax.set_ylim(-0.05, 1.05)
    axes[0][0].legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("minutes")
    for row in axes:
        row[0].set_ylabel("reward of answers received")
    fig.suptitle("Online personalisation: treated (the loop trains them) vs control; green: adapter pushes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_markdown(result: dict, path: Path) -> None:
    s, cfg = result["summary"], result["config"]
    fmt = lambda x: "" if x["mean"] is None else f"{x['mean']:.2f} [{x['low']:.2f}, {x['high']:.2f}] (n={x['n']})"  # noqa: E731
    lines = ["# Online personalisation on 2 CPU cores", "", f"Command: `{result['command']}`", "",
             f"{cfg['minutes']} minutes of traffic from 16 users (8 preferences x treated / control), answers of at most "
             f"{cfg['max_tokens']} tokens at temperature {cfg['temperature']}; {result['requests']} answers "
             f"({result['feedback_ok']} rated), {result['errors']} errors; {len(result['pushes'])} rounds pushed (at "
             f"{', '.join(f'{t / 60:.1f}' for t in result['pushes'])} min); the loop started at "
             f"{cfg.get('loop_after', 0.0)} min.", "",
             "Mean reward of the answers the users received, per window (95% interval, normal approximation):", "",
             "| window (min) | treated | control |", "| --- | --- | --- |"]
    for w in s["windows"]:
        lines.append(f"| {w['start_s'] / 60:.1f}-{w['end_s'] / 60:.1f} | {fmt(w['treated'])} | {fmt(w['control'])} |")
    lines += ["", "Per preference, first and last window:", "", "| preference | treated first | treated last | control first | control last |",
              "| --- | --- | --- | --- | --- |"]
    for pair, series in s["per_pair"].items():
        lines.append(f"| {pair} ({'+'.join(PREFERENCES[pair][0])}) | {fmt(series[0]['treated'])} | {fmt(series[-1]['treated'])} | "
                     f"{fmt(series[0]['control'])} | {fmt(series[-1]['control'])} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--minutes", type=float, default=14.0, help="minutes of user traffic (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--think-s", type=float, default=10.0, help="mean seconds a user waits between requests "
                        "(the trainer shares the 2 cores with the server)")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--min-new", type=int, default=8, help="new rows a tenant needs for a round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loop-after", type=float, default=0.0, help="minutes of traffic before the loop starts: a "
                        "baseline window in which treated and control are served alike (default: %(default)s)")
    parser.add_argument("--out", default="outputs/online-personalisation")
    parser.add_argument("--workdir", default=None, help="server and loop files (default: a temporary folder)")
    args = parser.parse_args(argv)

    from preft_rl.adapters import PreftConfig, PreftModel
    from preft_rl.data.generated import load_generated_task
    from preft_rl.engine.server.tenants import hash_key, new_key
    from preft_rl.models import resolve_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="preft-online-"))
    if work.is_dir() and any(work.iterdir()):  # a previous run's traffic and checkpoints would be resumed, not redone
        raise SystemExit(f"--workdir {work} holds files (a previous run's?); give a new or empty folder")
    work.mkdir(parents=True, exist_ok=True)
    path = resolve_model(args.model)
    questions = [row["prompt"] for row in load_generated_task("chain_sum", "train", num_examples=500, seed=args.seed,
                                                             system_prompt=SYSTEM_PROMPT)]
    tenants = [f"{arm[0]}-{pair}" for pair in PREFERENCES for arm in ("treated", "control")]

    from transformers import AutoModelForCausalLM

    start_adapter = work / "start-adapter"  # every tenant starts as the base model (LoRA's B is zero)
    PreftModel(AutoModelForCausalLM.from_pretrained(path), PreftConfig(method="lora", r=8, alpha=16)).save_pretrained(start_adapter)
    keys = {name: new_key() for name in tenants}
    (work / "keys.json").write_text(json.dumps({"tenants": {
        name: {"keys": [hash_key(keys[name])], "adapters": [name], "record": True} for name in tenants}}))
    with open(work / "online-tenants.jsonl", "w") as f:
        for pair, (rewards, weights) in PREFERENCES.items():
            f.write(json.dumps({"name": f"t-{pair}", "rewards": rewards, **({"reward_weights": weights} if weights else {})}) + "\n")

    from preft_rl.reports.serve import Process, Server

    env = {"TOKENIZERS_PARALLELISM": "false"}
    # the server and the loop each on their own half of the cores
    cores = sorted(os.sched_getaffinity(0))
    server_cores, loop_cores = (cores[: len(cores) // 2], cores[len(cores) // 2:]) if len(cores) > 1 else (cores, cores)
    server = Server("server", [
        sys.executable, "-m", "preft_rl.cli", "serve", path, "--served-model-name", "base", "--host", "127.0.0.1",
        "--tenant-keys", str(work / "keys.json"), "--record", str(work / "traffic"), "--enable-adapter-updates",
        "--api-key", ADMIN_KEY, "--max-adapters", "16", "--max-rank", "8", "--max-model-len", "512",
        "--disable-uvicorn-access-log", "--adapters", *(f"{n}={start_adapter}" for n in tenants)],
        work / "server.log", env, server_cores)
    url, started, timer = server.url, [], None
    try:
        print(f"starting the server ({work / 'server.log'}) ...", flush=True)
        server.wait_ready(900)

        def start_loop() -> None:
            started.append(Process("online", [
                sys.executable, "-m", "preft_rl.cli", "online", "--tenants", str(work / "online-tenants.jsonl"),
                "--record", str(work / "traffic"), "--push-to-server", url, "--push-api-key", ADMIN_KEY, "--model", path,
                "--output-dir", str(work / "online"), "--min-new", str(args.min_new), "--prompts-per-step", "4",
                "--num-generations", "4", "--learning-rate", str(args.learning_rate), "--max-completion-length",
                str(args.max_tokens), "--temperature", str(args.temperature), "--rank", "8", "--interval", "2",
                "--beta", "0.04", "--seed", str(args.seed)],
                work / "online.log", env, loop_cores))

        timer = threading.Timer(args.loop_after * 60, start_loop)
        print(f"{len(tenants)} users for {args.minutes} minutes; the loop ({work / 'online.log'}) starts after "
              f"{args.loop_after} min ...", flush=True)
        t0 = time.monotonic()
        timer.start()
        rows = asyncio.run(users(url, keys, questions, args.minutes, args.max_tokens, args.temperature, args.seed, t0,
                                 args.think_s))
    finally:
        if timer is not None:
            timer.cancel()
            timer.join()
        for loop in started:
            loop.close(signal.SIGTERM, wait_s=30)  # the loop stops after its round in progress
        server.close(wait_s=120)
    pushes = []
    loop_log = work / "online.log"
    for line in loop_log.read_text().splitlines() if loop_log.is_file() else []:  # the loop's rounds: when each one's push landed
        if "online: {" in line and "'failed'" not in line:
            pushes.append(line)
    push_times = _push_times(rows, work)
    summary = summarise(rows, args.minutes, args.windows)
    result = {"config": vars(args), "command": "python examples/online_personalisation.py " + " ".join(argv or sys.argv[1:]),
              "requests": sum("reward" in r for r in rows), "errors": sum("error" in r for r in rows),
              "feedback_ok": sum(r.get("feedback") == 200 for r in rows),
              "pushes": push_times, "rounds": pushes, "summary": summary, "rows": rows}
    (out / "online.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, out / "online.md")
    plot(summary, push_times, out / "online.png")
    print((out / "online.md").read_text())
    return result


def _push_times(rows: list[dict], work: Path) -> list[float]:
    """Seconds (from the users' start) at which the treated tenants' adapters changed version on the server: the first
    answer carrying a new version, read from the server's traffic store."""
    from preft_rl.traffic import SqliteTrafficStore

    store = SqliteTrafficStore(work / "traffic")
    seen_at = {r["id"]: r["t"] for r in rows if "id" in r}
    times, last = [], 1
    treated = [f"t-{pair}" for pair in PREFERENCES]
    records = sorted((r for name in treated for r in store.read(name) if r.id in seen_at), key=lambda r: seen_at[r.id])
    store.close()
    for record in records:
        if record.version > last:
            last = record.version
            times.append(seen_at[record.id])
    return times


if __name__ == "__main__":
    main()
