"""ShareGPT data in the form the tools that publish it write (`conversations` of `from: human | gpt | system`
turns) trains exactly as the same conversations written as `messages`."""

import pytest
from datasets import Dataset
from tiny import COMPLETIONS, PROMPTS, cpu_args, make_model

from minorsft_trl import MinorSFTTrainer
from minorsft_trl.data.sharegpt import sharegpt_to_messages

SYSTEM = "Answer briefly."


def sharegpt(roles=("system", "human", "gpt")) -> Dataset:
    system, user, assistant = roles
    return Dataset.from_dict(
        {
            "conversations": [
                [{"from": system, "value": SYSTEM}, {"from": user, "value": p}, {"from": assistant, "value": c}]
                for p, c in zip(PROMPTS, COMPLETIONS, strict=True)
            ]
        }
    )


def messages() -> Dataset:
    return Dataset.from_dict(
        {
            "messages": [
                [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": p},
                    {"role": "assistant", "content": c},
                ]
                for p, c in zip(PROMPTS, COMPLETIONS, strict=True)
            ]
        }
    )


def trained(tmp_path, tokenizer, dataset, **overrides) -> MinorSFTTrainer:
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=cpu_args(tmp_path, loss_type="nll", max_steps=2, learning_rate=1e-2, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("assistant_only_loss", [False, True])
def test_sharegpt_trains_as_the_same_conversations_written_as_messages(tmp_path, tokenizer, assistant_only_loss):
    runs = {}
    for name, dataset in {"sharegpt": sharegpt(), "messages": messages()}.items():
        trainer = trained(tmp_path / name, tokenizer, dataset, assistant_only_loss=assistant_only_loss)
        runs[name] = (trainer.train_dataset["input_ids"], trainer.train_dataset["labels"], trainer.state.log_history)
    assert runs["sharegpt"][0] == runs["messages"][0]  # the same tokens: `<|im_start|>user`, not `human`
    assert runs["sharegpt"][1] == runs["messages"][1]
    losses = {name: [log["loss"] for log in run[2] if "loss" in log] for name, run in runs.items()}
    assert losses["sharegpt"] == losses["messages"]


def test_the_roles_other_tools_write_map_too():
    converted = sharegpt_to_messages(sharegpt(roles=("system", "user", "assistant")), "train_dataset")
    assert converted["messages"] == messages()["messages"]
    tool = Dataset.from_dict({"conversations": [[{"from": "observation", "value": "42"}]]})
    assert sharegpt_to_messages(tool, "train_dataset")["messages"] == [[{"role": "tool", "content": "42"}]]


def test_a_role_no_chat_template_renders_is_refused_in_one_sentence_before_the_output_folder(tmp_path, tokenizer):
    rows = sharegpt().to_list()
    rows[5]["conversations"][2]["from"] = "function_call"
    with pytest.raises(ValueError, match=r"ShareGPT turns from 'function_call' \(first in row 5\)") as error:
        MinorSFTTrainer(
            make_model(tokenizer),
            args=cpu_args(tmp_path / "out", loss_type="nll"),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    assert "Rename those turns' `from`" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
