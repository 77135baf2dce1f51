"""Every recipe parses strictly with the generic script's parser; every accelerate config loads."""

import re
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from tiny import make_tokenizer
from trl.chat_template_utils import has_generation_markers

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "recipes"))

from minor_sft import parse_args  # noqa: E402

RECIPES = sorted((REPO / "recipes").glob("*/*/config_*.yaml"))
ACCELERATE_CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))


def parse(*args):
    # GPU recipes set bf16, which transformers refuses on a machine without a GPU unless use_cpu is set
    return parse_args(list(map(str, args)) + ["--use_cpu", "true"])


def test_there_are_recipes_and_configs():
    assert len(RECIPES) >= 9 and len(ACCELERATE_CONFIGS) >= 5


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_recipe_parses_strictly(recipe):
    script_args, training_args, model_args, _ = parse("--config", recipe)
    assert model_args.model_name_or_path and script_args.dataset_name
    expected_loss = {"sft": "nll"}.get(recipe.parent.name, recipe.parent.name)
    assert training_args.loss_type == expected_loss
    # YAML 1.1 reads `2e-5` as a string: every recipe must give numbers as numbers
    assert isinstance(training_args.learning_rate, float) and isinstance(training_args.beta, float)
    assert 0 < training_args.warmup_steps < 1  # a ratio, as TRL 1.16 reads it
    assert model_args.use_peft
    if training_args.chat_template_path is not None:
        assert has_generation_markers((REPO / training_args.chat_template_path).read_text())


def test_paper_recipes_match_the_paper():
    def load(method):
        return parse("--config", REPO / "recipes" / "Qwen2-7B-Instruct" / method / "config_qlora.yaml")[1]

    for method, loss_type, learning_rate in [("minor_sft", "minor_sft", 2e-5), ("sft_dpo", "sft_dpo", 2e-5)]:
        args = load(method)
        assert (args.loss_type, args.learning_rate, args.beta) == (loss_type, learning_rate, 0.04)
    sft = load("sft")
    assert (sft.loss_type, sft.learning_rate, sft.log_deviation) == ("nll", 1e-5, True)
    for args in map(load, ["minor_sft", "sft_dpo", "sft"]):
        assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 64
        assert (args.warmup_steps, args.lr_scheduler_type, args.num_train_epochs) == (0.1, "linear", 1)


@pytest.mark.parametrize("model", ["SmolLM2-135M-Instruct", "Qwen2-7B-Instruct"])
def test_every_loss_of_the_family_has_a_recipe_with_its_papers_settings(model):
    recipes = {path.parent.name: path for path in RECIPES if path.parts[-3] == model}
    args = {name: parse("--config", recipes[name])[1] for name in ("minor_sft", "asft", "sft_kl", "iw_sft")}
    for name in ("asft", "sft_kl"):
        assert (args[name].kl_coef, args[name].lr_scheduler_type) == (0.05, "cosine")  # ASFT's lambda
        assert args[name].precompute_ref_log_probs in (False, "auto")  # "auto" chooses off for the KL losses
    assert (args["iw_sft"].iw_weight_max, args["iw_sft"].lr_scheduler_type) == (16.0, "cosine")
    if model == "Qwen2-7B-Instruct":
        assert args["asft"].learning_rate == args["sft_kl"].learning_rate == 2e-5
        iw_sft = args["iw_sft"]
        assert (iw_sft.learning_rate, iw_sft.warmup_steps, iw_sft.adam_beta2) == (1e-5, 0.05, 0.95)
    else:  # the LoRA learning rate of the Minor SFT recipe, so the methods compare at one step size
        assert {a.learning_rate for a in args.values()} == {args["minor_sft"].learning_rate}


def test_unknown_or_misspelled_yaml_key_is_an_error(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text((RECIPES[0]).read_text() + "\nlearnig_rate: 1.0e-04\n")
    with pytest.raises(ValueError, match="Unknown arguments from config file.*learnig_rate"):
        parse("--config", recipe)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_a_recipes_header_says_how_to_run_it_from_an_install(recipe):
    """A copied recipe is run with the console command, by its packaged name (no clone needed)."""
    name = recipe.relative_to(REPO / "recipes").with_suffix("").as_posix()
    assert re.search(rf"^#   minorsft-trl train --config {re.escape(name)}( |$)", recipe.read_text(), re.M)


def test_command_line_overrides_the_recipe():
    _, training_args, *_ = parse("--config", RECIPES[0], "--learning_rate", "3e-4", "--beta", "0.1")
    assert (training_args.learning_rate, training_args.beta) == (3e-4, 0.1)


def test_qwen2_training_template_masks_assistant_turns_only():
    tokenizer = make_tokenizer()
    template = (REPO / "recipes" / "chat_templates" / "qwen2_training.jinja").read_text()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    out = tokenizer.apply_chat_template(
        messages, chat_template=template, return_assistant_tokens_mask=True, return_dict=True
    )
    assistant = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(assistant) == "yo<|im_end|>"
    rendered = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi")


# SmolLM2-135M-Instruct's own chat template, as its tokenizer (the embedded model) ships it
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou "
    "are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2="},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3="},
     {"role": "assistant", "content": "6"}],
    [{"role": "user", "content": "only a question"}],
]  # fmt: skip


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one turn", "system and two turns", "a prompt"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_smollm2_training_template_renders_as_smollm2_and_masks_assistant_turns_only(
    conversation, add_generation_prompt
):
    """The SmolLM2 recipes set it, so that `assistant_only_loss: true` works (TRL refuses a template without
    `{% generation %}`) and everything else tokenises as the model's own template does."""
    tokenizer = make_tokenizer()
    template = (REPO / "recipes" / "chat_templates" / "smollm2_training.jinja").read_text()
    render = dict(tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tokenizer.apply_chat_template(conversation, chat_template=template, **render) == (
        tokenizer.apply_chat_template(conversation, chat_template=SMOLLM2_TEMPLATE, **render)
    )
    out = tokenizer.apply_chat_template(
        conversation, chat_template=template, return_assistant_tokens_mask=True, return_dict=True
    )
    assistant = tokenizer.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m])
    assert assistant == "".join(m["content"] + "<|im_end|>" for m in conversation if m["role"] == "assistant")


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads(config):
    cluster = load_config_from_file(str(config))
    assert isinstance(cluster, ClusterConfig)
    expected = {"single_gpu": "NO", "ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
    assert cluster.distributed_type.value == expected[config.stem]
    if config.stem.startswith("zero"):
        assert cluster.deepspeed_config["zero_stage"] == int(config.stem[-1])
