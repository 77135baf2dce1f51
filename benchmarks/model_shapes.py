"""Real model shapes with random weights, and synthetic data for them: benchmarks whose step time and memory depend
on the architecture, not on the weights, with nothing downloaded.

A shape is the architecture part of a model's `config.json`, typed in. `scaled_shape` narrows it (hidden and MLP
widths and the number of attention and key-value heads divided alike, head size kept), shortens it (fewer layers) and
may shrink its vocabulary, so a CPU can run it; `save_random_model` builds it from the config with random weights and
saves it, with a placeholder tokenizer, as a model directory any trainer can load (4-bit quantization included).
"""

import numpy as np

# From the models' config.json (the -Instruct variants: their `max_position_embeddings` is 32768). Qwen2 gives the
# q/k/v projections a bias and the others none; that is in its modeling code, not in the config.
# What every Qwen2 config.json shares
_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
SHAPES = {
    "Qwen2-7B": {
        **_QWEN2,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "max_window_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
    "Qwen2-1.5B": {
        **_QWEN2,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "max_window_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "Qwen2-0.5B": {
        **_QWEN2,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "max_window_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
}
WIDTHS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def scaled_shape(name: str, width_divisor: int = 1, num_layers: int | None = None, vocab_divisor: int = 1) -> dict:
    """The config of shape `name` with its widths divided by `width_divisor` (hidden size, MLP size, attention and
    key-value heads alike, so the head size and the ratios between them stay), `num_layers` layers (all of them if
    `None`) and its vocabulary divided by `vocab_divisor` (kept by default)."""
    shape = SHAPES[name]
    if width_divisor < 1 or any(shape[key] % width_divisor for key in WIDTHS):
        raise ValueError(
            f"{name}: width_divisor={width_divisor} must be a common divisor of "
            f"{', '.join(f'{key}={shape[key]}' for key in WIDTHS)}."
        )
    num_layers = num_layers or shape["num_hidden_layers"]
    if not 1 <= num_layers <= shape["num_hidden_layers"]:
        raise ValueError(f"{name} has {shape['num_hidden_layers']} layers: num_layers={num_layers} is out of range.")
    if vocab_divisor < 1:
        raise ValueError(f"vocab_divisor must be >= 1, got {vocab_divisor}.")
    scaled = {**shape, **{key: shape[key] // width_divisor for key in WIDTHS}}
    scaled["num_hidden_layers"] = scaled["max_window_layers"] = num_layers
    scaled["vocab_size"] = shape["vocab_size"] // vocab_divisor
    return scaled


def lm_head_share(config: dict) -> float:
    """The fraction of the weights of the linear layers (what a forward multiplies each token by) in the LM head."""
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_size = hidden // heads
    attention = hidden * head_size * (2 * heads + 2 * kv_heads)  # q and o, k and v
    mlp = 3 * hidden * config["intermediate_size"]
    lm_head = config["vocab_size"] * hidden
    return lm_head / (lm_head + config["num_hidden_layers"] * (attention + mlp))


def describe_shape(name: str, config: dict) -> str:
    """What of shape `name` the config `config` keeps and what it scales, and by how much."""
    shape = SHAPES[name]
    changed = [key for key in (*WIDTHS, "num_hidden_layers", "vocab_size") if config[key] != shape[key]]
    kept = [f"head size {shape['hidden_size'] // shape['num_attention_heads']}"]
    kept += [] if "vocab_size" in changed else [f"vocabulary {shape['vocab_size']}"]
    kept += [f"{'tied' if config['tie_word_embeddings'] else 'untied'} embeddings"]
    if not changed:
        return f"{name} ({config['architectures'][0]}) at full size: {', '.join(kept)}"
    scaling = ", ".join(f"{key} {shape[key]} -> {config[key]} (/{shape[key] / config[key]:.3g})" for key in changed)
    return (
        f"{name} ({config['architectures'][0]}) scaled down: {scaling}; kept: {', '.join(kept)}. The LM head holds "
        f"{lm_head_share(config):.0%} of the linear-layer weights ({lm_head_share(shape):.0%} at full size)"
    )


def placeholder_tokenizer():
    """A tokenizer that only names the special tokens: the benchmark's data is already token ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<|endoftext|>": 0}, unk_token="<|endoftext|>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def save_random_model(config: dict, directory: str, device: str = "cpu", dtype: str = "float32") -> int:
    """Build the model of `config` with random weights (seed 0) directly on `device` in `dtype`, save it with a
    placeholder tokenizer into `directory`, and return its number of parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.for_model(**config)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config, dtype=getattr(torch, dtype))
    model.save_pretrained(directory, max_shard_size="2GB")  # a shard at a time in host memory
    placeholder_tokenizer().save_pretrained(directory)
    return model.num_parameters()


def synthetic_examples(num_examples: int, prompt_length: int, completion_length: int, vocab_size: int, seed: int = 0):
    """`num_examples` sequences of random token ids, each `prompt_length` prompt tokens then `completion_length`
    completion tokens (marked by `completion_mask`: the loss is on the completion only)."""
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    length = prompt_length + completion_length
    input_ids = rng.integers(1, vocab_size, size=(num_examples, length)).tolist()
    completion_mask = [[0] * prompt_length + [1] * completion_length] * num_examples
    return Dataset.from_dict({"input_ids": input_ids, "completion_mask": completion_mask})
