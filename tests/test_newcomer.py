"""What a new user trips on that is not a plain bad input: a run that would silently do something other than what was
asked (caps of another dataset, NaN weights, a LoRA target that matches nothing, a resumed run with other settings)."""

from tiny import prompt_completion_dataset, write_recipe

from minorsft_trl.data import MinorSFTScriptArguments, load_datasets
from minorsft_trl.scripts.minor_sft import parse_args


def test_a_recipes_example_caps_do_not_cut_the_data_the_command_line_names(
    tmp_path, tiny_model_dir, warnings_of_minorsft
):
    """The packaged SmolLM2 recipe caps its BIG-bench demo at 400 questions: `--dataset_name data/big.jsonl` on the
    command line must train on all of the user's data, and say why the cap was dropped."""
    recipe = write_recipe(tmp_path, tiny_model_dir, max_train_examples=2, max_eval_examples=1)
    own = tmp_path / "own.jsonl"
    prompt_completion_dataset().to_json(own)

    script_args, *_ = parse_args(["--config", str(recipe), "--dataset_name", str(own)])
    assert (script_args.max_train_examples, script_args.max_eval_examples) == (None, None)
    assert any("max_train_examples=2 limits its own data" in message for message in warnings_of_minorsft)
    script_args, *_ = parse_args(["--config", str(recipe), f"--dataset_name={own}", "--max_train_examples", "3"])
    assert (script_args.max_train_examples, script_args.max_eval_examples) == (3, None)
    script_args, *_ = parse_args(["--config", str(recipe)])  # the recipe's own data: its caps apply
    assert (script_args.max_train_examples, script_args.max_eval_examples) == (2, 1)


def test_a_cap_that_leaves_examples_out_says_so(tmp_path, warnings_of_minorsft):
    own = tmp_path / "own.jsonl"
    prompt_completion_dataset().to_json(own)
    train, _ = load_datasets(MinorSFTScriptArguments(dataset_name=str(own), max_train_examples=3), evaluate=False)
    assert len(train) == 3
    assert "max_train_examples=3: using the first 3 of the 8 training examples." in warnings_of_minorsft
