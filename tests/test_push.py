"""Online personalisation (preft_rl/trainers/push.py): a training run pushes each saved adapter into a running
`preft-rl serve`; users get the new version without a restart, and requests already running finish on the old one."""

from __future__ import annotations

import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from preft_rl import PreftConfig, PreftGRPOConfig, PreftGRPOTrainer, Tenant
from preft_rl.trainers import push

API_KEY = "push-key"


class FakeServer(BaseHTTPRequestHandler):
    """Answers /v1/models, and the load route with 200 for adapter 'good' and 400 for anything else."""

    seen: list[dict] = []

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        if self.headers.get("Authorization") != f"Bearer {API_KEY}":
            return self._reply(401, {"error": "Unauthorized"})
        self._reply(200, {"data": [{"id": "base"}]})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeServer.seen.append(body)
        if body["adapter_name"] == "good":
            return self._reply(200, {"adapter_name": "good", "version": 3})
        self._reply(400, {"error": {"message": "adapter 'bad': rank 64 is above --max-rank 16"}})

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_push_reports_each_adapter_and_a_refusal_is_a_warning(fake_server, tmp_path, caplog):
    FakeServer.seen.clear()
    assert push.check_server(fake_server, API_KEY) == ["base"]
    with pytest.raises(ValueError, match="refused the API key"):
        push.check_server(fake_server, "wrong")
    versions = push.push_adapters(fake_server, {"good": tmp_path / "g", "bad": tmp_path / "b"}, API_KEY)
    assert versions == {"good": 3, "bad": None}
    assert FakeServer.seen[0] == {"adapter_name": "good", "adapter_path": str((tmp_path / "g").resolve()), "load_inplace": True}
    assert "pushing adapter 'bad'" in caplog.text and "rank 64 is above --max-rank 16" in caplog.text


def test_a_wrong_server_url_fails_before_the_model_loads(tiny_llama_dir, tmp_path):
    from test_grpo_distributed import free_port

    with pytest.raises(ValueError, match="must be a server's base URL"):
        PreftGRPOConfig(output_dir=str(tmp_path), push_to_server="localhost:8000")
    args = PreftGRPOConfig(output_dir=str(tmp_path), push_to_server=f"http://127.0.0.1:{free_port()}", max_steps=1,
                           per_device_train_batch_size=4, num_generations=4)
    with pytest.raises(ValueError, match="no server answers there"):
        PreftGRPOTrainer(str(tiny_llama_dir), lambda prompts, completions, **_: [0.0] * len(completions), args=args,
                         train_dataset=Dataset.from_list([{"prompt": "hi"}] * 4))
    assert not (tmp_path / "log.jsonl").exists()
    # a served name the server would refuse fails first: given, or taken from output_dir's folder name
    with pytest.raises(ValueError, match="push_adapter_name='my adapter'"):
        PreftGRPOConfig(output_dir=str(tmp_path), push_to_server=args.push_to_server, push_adapter_name="my adapter")
    odd = PreftGRPOConfig(output_dir=str(tmp_path / "run #1"), push_to_server=args.push_to_server, max_steps=1,
                          per_device_train_batch_size=4, num_generations=4)
    with pytest.raises(ValueError, match="served adapter name 'run #1'.*set push_adapter_name"):
        PreftGRPOTrainer(str(tiny_llama_dir), lambda prompts, completions, **_: [0.0] * len(completions), args=odd,
                         train_dataset=Dataset.from_list([{"prompt": "hi"}] * 4))


def first_token_even(prompts, completions, completion_ids=None, **_):
    return [float(bool(ids) and ids[0] % 2 == 0) for ids in completion_ids]


def first_token_odd(prompts, completions, completion_ids=None, **_):
    return [float(bool(ids) and ids[0] % 2 == 1) for ids in completion_ids]


def greedy_reference(model_dir: Path, adapter_dir: Path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    from preft_rl.adapters import PreftModel

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.generation_config.eos_token_id = None
    model = PreftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.slow
def test_training_pushes_each_tenants_adapter_into_a_running_server(tiny_llama_dir, tmp_path, monkeypatch):
    """Two tenants train 2 steps (a checkpoint after step 1, the final save after step 2) while `preft-rl serve` runs.
    Each save pushes both tenants (new names are added, then updated in place). Requests for t0 running when the final
    push arrives finish on the step-1 adapter; afterwards the server's greedy tokens for each tenant equal its final
    adapter's (HF reference)."""
    from openai import OpenAI
    from test_serve import API_KEY as SERVER_KEY
    from test_serve import make_adapter, running_server, wait_for_requests_in_engine
    from transformers import AutoTokenizer

    from preft_rl.trainers import core

    prompt = "how many apples and pears"
    placeholder = make_adapter(tiny_llama_dir, tmp_path / "placeholder", seed=1)
    pushes, during = [], {}
    real_push = core.push_adapters

    def push_while_requests_run(url, adapters, key):
        if pushes:  # the final push: start long requests for t0 first, push once the engine holds them all
            client = OpenAI(base_url=url + "/v1", api_key=SERVER_KEY, max_retries=0, timeout=300)

            def request(i):
                reply = client.completions.create(model="t0", prompt=prompt, temperature=0, max_tokens=96,
                                                  extra_body={"return_token_ids": True, "ignore_eos": True})
                during[i] = reply.choices[0].token_ids

            threads = [threading.Thread(target=request, args=(i,)) for i in range(8)]
            for thread in threads:
                thread.start()
            wait_for_requests_in_engine(url, 8)
        versions = real_push(url, adapters, key)
        pushes.append((sorted(adapters), versions))
        if len(pushes) == 2:
            for thread in threads:
                thread.join(timeout=300)
        return versions

    monkeypatch.setattr(core, "push_adapters", push_while_requests_run)
    data = Dataset.from_list([{"prompt": f"tenant asks {i} apples?"} for i in range(8)])
    with running_server(tiny_llama_dir, {"placeholder": placeholder}, tmp_path / "server.log", "--enable-adapter-updates") as url:
        args = PreftGRPOConfig(
            output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, gradient_accumulation_steps=1, num_generations=4,
            max_steps=2, save_steps=1, max_completion_length=6, learning_rate=5e-2, disable_tqdm=True,
            engine_kwargs={"max_num_batched_tokens": 256}, push_to_server=url, push_api_key=SERVER_KEY)
        trainer = PreftGRPOTrainer(str(tiny_llama_dir), args=args, preft_config=PreftConfig(method="lora", r=4, alpha=8),
                                   tenants=[Tenant("t0", data, first_token_even), Tenant("t1", data, first_token_odd)])
        try:
            trainer.train()
        finally:
            trainer.close()
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
        prompt_ids = tokenizer.encode(prompt)
        client = OpenAI(base_url=url + "/v1", api_key=SERVER_KEY, max_retries=0, timeout=120)
        served = {name: client.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=96,
                                                  extra_body={"return_token_ids": True, "ignore_eos": True}).choices[0].token_ids
                  for name in ("t0", "t1")}
        with urllib.request.urlopen(urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {SERVER_KEY}"})) as r:
            listed = {m["id"] for m in json.loads(r.read())["data"]}
    assert pushes == [(["t0", "t1"], {"t0": 1, "t1": 1}), (["t0", "t1"], {"t0": 2, "t1": 2})]
    assert {"t0", "t1"} <= listed
    run = tmp_path / "run"
    old = greedy_reference(tiny_llama_dir, run / "checkpoint-1" / "tenants" / "t0", prompt_ids, 96)
    new = {name: greedy_reference(tiny_llama_dir, run / "tenants" / name, prompt_ids, 96) for name in ("t0", "t1")}
    assert old != new["t0"]  # step 2 changed t0, so the two versions are told apart
    assert len(during) == 8 and all(ids == old for ids in during.values())  # running requests kept the old version
    assert served == new
