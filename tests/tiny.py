"""Tiny, offline, deterministic stand-ins for a real model, tokenizer and dataset, and the helpers that tests in
several folders share."""

import copy
import io
import json
import tarfile

import torch
from datasets import Dataset
from peft import IA3Config, LoHaConfig, LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from trl.trainer.utils import add_fused_lm_head

from minorsft_trl.data import bigbench
from minorsft_trl.fused_head import labelled_positions_only

ARCHITECTURES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
# Layer widths that bitsandbytes' 4-bit CPU paths accept: multiples of its quantization block (64) and of the packing
# block (32) of the AVX512-BF16 path
QUANTIZABLE_WIDTHS = dict(hidden_size=64, intermediate_size=128)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(reverse: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte) with ChatML special tokens and a chat template; `reverse` numbers
    the bytes the other way round (the same vocabulary size, other ids)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: i for i, char in enumerate(sorted(alphabet, reverse=reverse))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token="<|im_start|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_model(tokenizer, seed: int = 0, architecture: str = "llama", **config_overrides):
    """A randomly initialised 2-layer Llama (no biases) or Qwen2 (q/k/v biases), hidden size 32, on the tokenizer's
    vocabulary."""
    config_class, model_class = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    config_kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return model_class(config_class(**{**config_kwargs, **config_overrides}))


PROMPTS = ["2+2=", "capital of France?", "3*3=", "sky colour?", "10-7=", "opposite of hot?", "5+6=", "say hi"]
COMPLETIONS = [" 4", " Paris", " 9", " blue, mostly", " 3", " cold", " 11", " hi there, friend"]


def prompt_completion_dataset(n: int = 8) -> Dataset:
    """`n` prompt-completion examples with answers of different lengths."""
    return Dataset.from_dict({"prompt": PROMPTS[:n], "completion": COMPLETIONS[:n]})


def conversational_dataset(n: int = 8) -> Dataset:
    """`n` conversations (user, assistant), for assistant-only loss."""
    return Dataset.from_dict(
        {
            "messages": [
                [{"role": "user", "content": p}, {"role": "assistant", "content": c.strip()}]
                for p, c in zip(PROMPTS[:n], COMPLETIONS[:n], strict=True)
            ]
        }
    )


def cpu_args(output_dir, **overrides):
    """A `MinorSFTConfig` for fast, deterministic CPU tests (full precision, no logging backends, no checkpoints)."""
    from minorsft_trl import MinorSFTConfig

    defaults = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        gradient_checkpointing=False,
        per_device_train_batch_size=8,
        max_length=64,
        # The reference on the fly unless a test asks otherwise (the default "auto" precomputes into the user's cache)
        precompute_ref_log_probs=False,
    )
    return MinorSFTConfig(**{**defaults, **overrides})


def write_recipe(directory, model_dir: str, **overrides):
    """A recipe for `recipes/minor_sft.py`: the tiny model and 8 prompt-completion examples saved under `directory`."""
    from pathlib import Path

    import yaml

    directory = Path(directory)
    data_dir = directory / "data"
    if not data_dir.exists():
        prompt_completion_dataset().to_json(data_dir / "train.jsonl")
        prompt_completion_dataset().to_json(data_dir / "test.jsonl")
    recipe = {
        "model_name_or_path": model_dir,
        "use_peft": True,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "v_proj"],
        "dataset_name": str(data_dir),
        "max_length": 64,
        "loss_type": "minor_sft",
        "beta": 0.5,
        "learning_rate": 1.0e-02,
        "max_steps": 1,
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        "precompute_ref_log_probs": False,
        "output_dir": str(directory / "out"),
        **overrides,
    }
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# Adapters of several PEFT types, and a model whose adapter of one of them was trained before
ADAPTERS = {
    "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "loha": LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
}


def pretrained_adapter(tokenizer, name):
    """A PEFT model whose adapter was trained before (weights far from their identity initialisation)."""
    model = get_peft_model(make_model(tokenizer), copy.deepcopy(ADAPTERS[name]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in (p for n, p in model.named_parameters() if p.requires_grad):
            param.add_(0.5 * torch.randn(param.shape, generator=generator))
    return model


# The 4-bit configuration and the fresh, fused-head copies that reference tests in several folders compare with


def four_bit_config():
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def fused_logps(model, batch):
    """Per-token log-probs through TRL's fused LM head on the path the trainer's reference passes take (the answer
    positions only, `minorsft_trl.fused_head`), so that a comparison with them can be exact on any CPU."""
    with torch.no_grad(), labelled_positions_only():
        return model(**batch, use_cache=False, fused_lm_head=True).log_probs


def pristine(model_dir, **init_kwargs):
    """The base model loaded afresh from disk, with TRL's fused LM head."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, **init_kwargs).eval()
    add_fused_lm_head(model)
    return model


def pristine_in_training_kernels(model_dir, **init_kwargs):
    """The base model loaded afresh from disk, run as training runs it (train mode: the 4-bit layers' training
    kernels; the tiny models have no dropout), for a no-grad comparison."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, **init_kwargs).train()
    add_fused_lm_head(model)
    return model


def fake_bigbench(tmp_path, tasks):
    """A tarball laid out like the bigbench source package, holding the given task.json contents."""
    path = tmp_path / "bigbench-fake.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name, content in tasks.items():
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(f"{bigbench.TASKS_PREFIX}{name}/task.json")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


# A multiple-choice BIG-bench task of 10 questions, and one example of another kind
BIGBENCH_TASK = {
    "append_choices_to_input": False,
    "examples": [
        {"input": f"{i} m in cm is ", "target_scores": {f"{i}00 cm.": 1, f"{i} cm.": 0, f"{i}0 mm.": 0}}
        for i in range(10)
    ]
    + [{"input": "no choices", "target": "x"}],
}
