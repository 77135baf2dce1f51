"""The main job: a real Minor SFT run on a BIG-bench multiple-choice task, measured end to end, offline.

    python recipes/bigbench_demo.py --config recipes/SmolLM2-135M-Instruct/minor_sft/config_lora.yaml

1. accuracy of the base model on the held-out test split (each choice scored by its log-likelihood);
2. training with `recipes/minor_sft.py` (same YAML, same command-line overrides);
3. accuracy of the trained model on the same split, the deviation and the drift it reached (and what measuring the
   drift cost);
4. the saved adapter reloaded with PEFT, generating an answer;
5. a summary, also written to `<output_dir>/results.json`, and the training curves PNG.
"""

import json
import os
import time

import torch
from minor_sft import main, parse_args
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import get_quantization_config

from minorsft_trl.data.embedded import resolve_model
from minorsft_trl.data.evaluation import multiple_choice_accuracy
from minorsft_trl.data.sources import load_datasets
from minorsft_trl.drift.card import MEASURES as DRIFT_MEASURES
from minorsft_trl.errors import InputError, run_command


def generate_with_saved_adapter(base_model_path: str, adapter_dir: str, prompt: str) -> str:
    """Reload the adapter the way a user would offline and let it answer one prompt (greedy). The adapter names its
    base model by its Hub id (`HuggingFaceTB/SmolLM2-135M-Instruct` for the embedded model): offline, the base model
    is loaded from where it is, and the adapter onto it."""
    from peft import PeftModel

    base_model = AutoModelForCausalLM.from_pretrained(base_model_path)
    model = PeftModel.from_pretrained(base_model, adapter_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def run(script_args, training_args, model_args, dataset_args=None) -> dict:
    start = time.perf_counter()
    model_path = resolve_model(model_args.model_name_or_path)
    test_split = load_datasets(script_args, dataset_args, evaluate=True).eval
    if "choices" not in test_split.column_names:
        raise InputError(
            f"{script_args.dataset_name} has no `choices` column: use a `bigbench:` multiple-choice task."
        )

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base_model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=model_args.dtype, quantization_config=get_quantization_config(model_args)
    )
    base_accuracy = multiple_choice_accuracy(base_model, tokenizer, test_split, desc="Base model accuracy")
    print(f"Base model accuracy on {len(test_split)} held-out questions: {base_accuracy}", flush=True)
    del base_model

    trainer = main(script_args, training_args, model_args, dataset_args)
    train_seconds = next(log["train_runtime"] for log in trainer.state.log_history if "train_runtime" in log)
    drift_logs = [log for log in trainer.state.log_history if DRIFT_MEASURES.keys() & log.keys()]
    final_drift = {k: v for k, v in drift_logs[-1].items() if k in DRIFT_MEASURES} if drift_logs else {}
    trained_accuracy = multiple_choice_accuracy(trainer.model, tokenizer, test_split, desc="Trained model accuracy")
    train_logs = [log for log in trainer.state.log_history if "deviation" in log]

    example = test_split[0]
    answer = generate_with_saved_adapter(model_path, training_args.output_dir, example["prompt"])
    results = {
        "model": model_args.model_name_or_path,
        "dataset": script_args.dataset_name,
        "loss_type": training_args.loss_type,
        "loss": training_args.describe_loss(),
        "beta": training_args.beta,
        "learning_rate": training_args.learning_rate,
        "train_examples": len(trainer.train_dataset),
        "test_examples": len(test_split),
        "base_accuracy": base_accuracy.value,
        "base_accuracy_stderr": base_accuracy.stderr,
        "trained_accuracy": trained_accuracy.value,
        "trained_accuracy_stderr": trained_accuracy.stderr,
        "final_deviation": train_logs[-1]["deviation"] if train_logs else None,
        "final_drift": final_drift,
        "train_seconds": train_seconds,
        "drift_measure_seconds": round(trainer.drift.seconds, 1),
        "kl_steering_seconds": round(trainer.kl_steering.seconds, 3) if trainer.kl_steering is not None else None,
        "adapter_dir": os.path.abspath(training_args.output_dir),
        "training_curves": os.path.abspath(os.path.join(training_args.output_dir, "training_curves.png")),
        "wall_time_seconds": round(time.perf_counter() - start, 1),
    }
    with open(os.path.join(training_args.output_dir, "results.json"), "w") as file:
        json.dump(results, file, indent=2)

    print(
        "\n".join(
            [
                "",
                f"Base model accuracy:    {base_accuracy}",
                f"Trained model accuracy: {trained_accuracy}",
                f"Final deviation (m_theta): {results['final_deviation']:.4f}",
                *(f"Final {key}: {value:.4f}" for key, value in final_drift.items()),
                f"Drift measures: {trainer.drift.seconds:.1f} s, "
                f"{100 * trainer.drift.seconds / train_seconds:.1f}% of the {train_seconds:.0f} s of training",
                *(
                    [
                        f"Drift budget's controller: {trainer.kl_steering.seconds:.3f} s, "
                        f"{100 * trainer.kl_steering.seconds / train_seconds:.3f}% of training; kl_coef ended at "
                        f"{trainer.kl_steering.coef:.3g}"
                    ]
                    if trainer.kl_steering is not None
                    else []
                ),
                f"Adapter saved to: {results['adapter_dir']}",
                f"Training curves:  {results['training_curves']}",
                f"Reloaded adapter on {example['prompt']!r} -> {answer!r} (expected {example['completion']!r})",
                f"Wall time: {results['wall_time_seconds']:.0f} s",
            ]
        )
    )
    return results


if __name__ == "__main__":
    raise SystemExit(run_command("bigbench_demo", lambda: run(*parse_args())))
