"""Unclear-error probes over the public entry points (issue 14, "a class, not a list"): each bad input below used to
fail deep inside another library (an AttributeError on a dict, a hub error for a local path, Python's int() message)
or, worse, was accepted and did something else (a bare string prompt became one prompt per character). Each now gets
an error that names the bad value and says what to do, before any state changes.
"""

from __future__ import annotations

import pytest

from preft_rl import PreftConfig, PreftGRPOConfig, PreftGRPOTrainer, PreftPPOConfig, get_preft_model
from preft_rl.cli import main
from preft_rl.models import resolve_model

ROWS = [{"prompt": "two plus two", "answer": "4"}] * 4


def grpo_args(tmp_path) -> PreftGRPOConfig:
    return PreftGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_steps=1,
                           max_completion_length=4)


def format_reward(prompts, completions, **_):
    return [0.0] * len(completions)


# ------------------------------------------------------------------------------------------ adapters and models
def test_get_preft_model_names_a_wrong_model_or_config(load_tiny):
    with pytest.raises(TypeError, match=r"must be a loaded Hugging Face causal LM, got str .*AutoModelForCausalLM"):
        get_preft_model("smollm2-135m-instruct", PreftConfig())
    model = load_tiny()
    with pytest.raises(TypeError, match=r"must be a PreftConfig, got dict; use PreftConfig\(\*\*your_dict\)"):
        get_preft_model(model, {"method": "lora", "r": 4})
    assert not any("lora" in name for name, _ in model.named_modules())  # the base model was not touched
    get_preft_model(model, PreftConfig(r=4))  # and still takes a good config


def test_save_pretrained_onto_a_file_says_to_pass_a_directory(load_tiny, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    with pytest.raises(ValueError, match="that path is a file; pass a directory"):
        get_preft_model(load_tiny(), PreftConfig(r=4)).save_pretrained(target)
    assert target.read_text() == "keep me"


def test_a_missing_local_model_path_is_named_not_sent_to_the_hub(tmp_path):
    for path in (str(tmp_path / "no-model"), "./no-such-model", "../x/y/z"):
        with pytest.raises(ValueError, match=r"no such directory; pass a model directory, a hub id"):
            resolve_model(path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"  # a hub id


# ------------------------------------------------------------------------------------------ trainer configs
@pytest.mark.parametrize(
    "config_class, kwargs, message",
    [
        (PreftGRPOConfig, {"learning_rate": -1e-4}, "learning_rate=-0.0001 must be > 0"),
        (PreftGRPOConfig, {"learning_rate": float("nan")}, "learning_rate=nan must be a finite number"),
        (PreftGRPOConfig, {"beta": float("inf")}, "beta=inf must be a finite number"),
        (PreftGRPOConfig, {"weight_decay": -0.1}, "weight_decay=-0.1 must be >= 0"),
        (PreftPPOConfig, {"kl_coef": float("nan")}, "kl_coef=nan must be a finite number"),
        (PreftPPOConfig, {"vf_coef": float("inf")}, "vf_coef=inf must be a finite number"),
    ],
)
def test_trainer_configs_refuse_non_finite_or_negative_rates(config_class, kwargs, message):
    with pytest.raises(ValueError, match=message):
        config_class(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"reward_funcs": [123]}, TypeError, r"reward_funcs\[0\] is 123 \(int\); pass a function"),
        ({"reward_funcs": []}, TypeError, "non-empty list"),
        ({"train_dataset": [{"prompt": 5}] * 4}, ValueError, r"train_dataset row 0: prompt 5 must be non-empty text"),
        ({"train_dataset": [{"prompt": [{"content": "hi"}]}] * 4}, ValueError, "row 0: prompt .* list of chat messages"),
        ({"preft_config": {"r": 4}}, TypeError, r"preft_config must be a PreftConfig, got dict; use PreftConfig"),
        ({"model": "/no/such/model"}, ValueError, "no such directory"),
    ],
)
def test_trainer_arguments_are_checked_before_anything_is_built(tiny_llama_dir, tmp_path, kwargs, error, message):
    arguments = {"model": str(tiny_llama_dir), "reward_funcs": format_reward, "args": grpo_args(tmp_path),
                 "train_dataset": ROWS, **kwargs}
    with pytest.raises(error, match=message):
        PreftGRPOTrainer(**arguments)
    assert not list(tmp_path.iterdir())  # nothing was written


# ------------------------------------------------------------------------------------------ CLI
def test_cli_integer_lists_are_named(capsys):
    assert main(["bench", "rollout", "--adapters", "a,b"]) == 2
    assert "--adapters 'a,b': give comma-separated integers" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ engine
@pytest.fixture(scope="module")
def engine(engines):
    pytest.importorskip("vllm")
    return engines("lora")


def test_generate_refuses_a_bare_string_instead_of_one_prompt_per_character(engine, load_tiny):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=2, temperature=0)
    with pytest.raises(TypeError, match=r"a list of prompts, got a single str; pass \[prompt\]"):
        engine.generate("abc", params, use_tqdm=False)
    with pytest.raises(TypeError, match="a single dict"):
        engine.generate({"role": "user", "content": "hi"}, params, use_tqdm=False)
    model = get_preft_model(load_tiny(), PreftConfig(r=4))
    engine.add_adapter("errors-probe", model)
    try:
        with pytest.raises(TypeError, match=r"adapters='errors-probe' is a single name; pass one name \(or None\) per prompt"):
            engine.generate(["x", "y"], params, adapters="errors-probe", use_tqdm=False)
        for bad, hint in (({"max_tokens": 2}, "use SamplingParams"), ("greedy", "got str")):
            with pytest.raises(TypeError, match=f"sampling_params must be a vllm.SamplingParams.*{hint}"):
                engine.generate(["x"], bad, use_tqdm=False)
        out = engine.generate(["x"], params, adapters=["errors-probe"], use_tqdm=False)  # still serving
        assert len(out[0].outputs[0].token_ids) == 2
    finally:
        engine.remove_adapter("errors-probe")


# ------------------------------------------------------------------------------------------ rewards
def test_reward_batches_are_checked_and_a_bare_string_is_never_read_per_character():
    from preft_rl.rewards import format_reward as fmt
    from preft_rl.rewards import gsm8k_accuracy_reward, gsm8k_last_number_reward

    with pytest.raises(TypeError, match="gsm8k_accuracy_reward: answer must be a list .* got str '42'"):
        gsm8k_accuracy_reward(["q"], ["#### 42"], answer="42")  # used to score 1.0 against the first character only
    with pytest.raises(TypeError, match="completions must be a list with one completion per row, got str"):
        gsm8k_accuracy_reward(["q"], "#### 4", answer=["4"])
    with pytest.raises(TypeError, match="format_reward: completions must be a list"):
        fmt(["q"], None)
    with pytest.raises(ValueError, match="got 2 completions but 1 answers; pass one answer per completion"):
        gsm8k_last_number_reward(["q", "q"], ["4", "5"], answer=["4"])
    # numeric answer columns are read as numbers, not counted as errors
    assert gsm8k_accuracy_reward(["q"] * 3, ["#### 42", "#### 42.0", "#### 41"], answer=[42, 42.0, 42]) == [1.0, 1.0, 0.0]


def test_the_lenient_reward_counts_its_own_errors():
    from preft_rl.rewards import gsm8k_accuracy_reward, gsm8k_last_number_reward

    before_own, before_strict = gsm8k_last_number_reward.errors.count, gsm8k_accuracy_reward.errors.count
    assert gsm8k_last_number_reward(["q"], ["it is 4"], answer=["#### four"]) == [None]
    assert gsm8k_last_number_reward.errors.count == before_own + 1  # logged under its own name in the trainer log
    assert gsm8k_accuracy_reward.errors.count == before_strict


def test_reward_batches_may_be_dataset_columns():
    from datasets import Dataset

    from preft_rl.rewards import gsm8k_accuracy_reward

    rows = Dataset.from_list([{"completion": "#### 4", "answer": "#### 4"}, {"completion": "#### 5", "answer": "#### 6"}])
    assert gsm8k_accuracy_reward(["q", "q"], rows["completion"], answer=rows["answer"]) == [1.0, 0.0]
