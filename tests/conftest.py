"""Shared fixtures: a tiny random Llama with a locally trained tokenizer, saved once per session.

The model is small enough for milliseconds per forward, yet has the shapes vLLM's CPU attention accepts
(head_dim 32), so later engine tests can load the same directory.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The Triton kernel tests run natively on a GPU, or on CPU in a child pytest with TRITON_INTERPRET=1
# (tests/test_kernels.py::test_triton_kernels_under_interpreter); elsewhere they are not collected.
collect_ignore = []
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    collect_ignore.append("test_kernels_triton.py")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
_WORDS = (
    "the a one two three four five six seven eight nine ten apples pears books coins cats birds has "
    "had gets buys sells gives takes more less than each many how what is are and then left total "
    "answer number times plus minus equals she he they we market school farm friend sister brother"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 999)))
        lines.append(" ".join(words) + rng.choice(["?", ".", "!"]))
    return lines


def build_tokenizer(save_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(2000), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(save_dir)
    return hf_tok


def build_tiny_llama(tokenizer, num_layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger-than-default weights so logits are far from uniform and argmax is stable
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(path)
    model = build_tiny_llama(tokenizer)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture
def load_tiny(tiny_llama_dir):
    """Factory: a fresh copy of the tiny Llama in the given dtype (fresh, so adapters never leak between tests)."""
    from transformers import AutoModelForCausalLM

    def load(dtype: torch.dtype = torch.float32):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype).eval()
        model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
        model.generation_config.pad_token_id = model.config.pad_token_id
        return model

    return load


def random_adapter_model(load_tiny, config, seed: int, scale: float = 0.3):
    """A PreftModel of `config` on a fresh tiny Llama whose adapter parameters got N(0, scale^2) noise added: strong
    enough that adapted and plain tokens give other outputs."""
    from preft_rl import get_preft_model

    model = get_preft_model(load_tiny(), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.adapter_named_parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale)
    return model


# Small enough for a 200-token prompt to be prefilled in chunks.
ENGINE_ARGS = dict(max_model_len=512, max_num_batched_tokens=128, max_num_seqs=32)


@pytest.fixture(scope="module")
def engines(tiny_llama_dir):
    """Factory: one PreftEngine per method on the tiny Llama, shared by a test module. Not by the session: while any
    engine is live, closed engines stay parked in memory (engine._release_llm), so session-long engines made every
    trainer test's engine a leak until the end, and the suite ran out of the machine's 24 GiB."""
    created = {}

    def get(method: str):
        from preft_rl.engine import PreftEngine

        if method not in created:
            created[method] = PreftEngine(str(tiny_llama_dir), max_adapters=80, max_rank=8, method=method, **ENGINE_ARGS)
        return created[method]

    yield get
    for engine in created.values():
        engine.close()


# ------------------------------------------------------------------------------ a model that calls a tool
TOOL_QUESTION = [{"role": "user", "content": "add 2 and 3"}]


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def call(name: str, **arguments) -> str:
    """A tool call as the model writes it (preft_rl.trainers.tools.tool_call_text)."""
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


@pytest.fixture(scope="session")
def tool_model_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama after a few seconds of supervised training on one conversation: it calls add(2, 3), reads the
    result and answers. A real model for the real engine, whose first turn is a tool call."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    from preft_rl.trainers.tools import tool_schema, with_tools

    shown = with_tools(TOOL_QUESTION, [tool_schema(add)], template_shows_tools=False)  # the prompt as the trainer shows it
    conversation = [*shown, {"role": "assistant", "content": call("add", a=2, b=3)}, {"role": "tool", "content": "5"},
                    {"role": "assistant", "content": "the answer is 5"}]
    ids = torch.tensor([tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)])
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, loss.item()
    path = tmp_path_factory.mktemp("tool-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
