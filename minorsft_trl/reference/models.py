"""The parts `Reference` (`reference.py`) is built from and runs with: frozen copies, the `"ref"` adapter, the
starting base parameters, eval mode without dropout, and the checks that a reference shares the policy's vocabulary.
Which reference a run gets (`kinds.ReferenceKind`):

| situation                                   | reference                                            |
|---------------------------------------------|------------------------------------------------------|
| `ref_model` given (path or model)           | that model, frozen, in eval mode                     |
| PEFT model built from a `peft_config`       | the same model with its adapters disabled            |
| PEFT model passed in (an adapter re-trained) | a frozen copy of that adapter, loaded as `"ref"`     |
| full fine-tuning                            | a frozen copy of the policy as training starts       |
"""

import copy
import dataclasses
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from accelerate.utils import is_peft_model
from torch import nn
from transformers import AutoTokenizer
from trl.trainer.utils import disable_dropout_in_model

from ..errors import InputError

logger = transformers.utils.logging.get_logger(__name__)

REF_ADAPTER = "ref"

# The files a saved tokenizer has one of
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@contextmanager
def quantized_layers_in_train_mode(model: nn.Module) -> Iterator[None]:
    """Keep bitsandbytes 4-bit layers in train mode through a no-grad forward of a model in eval mode.

    On CPUs with AVX512-BF16, `bnb.nn.Linear4bit.forward` in eval mode on an input without grad repacks its weight in
    place into another CPU format: the forward then runs other kernels than training does (other numerics), layers
    narrower than the format's blocks fail, and biased layers break autograd on the next training forward. A 4-bit
    layer has no dropout, so its train mode changes nothing else.
    """
    # A model holds 4-bit layers only once bitsandbytes was imported: no import (nor its start-up cost) otherwise
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    layers = (
        [module for module in model.modules() if isinstance(module, bnb_nn.Linear4bit) and not module.training]
        if bnb_nn
        else []
    )
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False


@contextmanager
def reference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as a frozen reference: no gradient, eval mode (no dropout, no gradient checkpointing).

    Every module's previous train/eval mode comes back on exit, also when the forward raises. The reference pass draws
    no random numbers, so the policy forward that follows is bit-identical to one without a reference pass. Quantized
    4-bit layers stay on their training kernels (see `quantized_layers_in_train_mode`).
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), quantized_layers_in_train_mode(model):
            yield model
    finally:
        for module, training in modes:
            module.training = training


def active_dropouts(model: nn.Module) -> list[str]:
    """The modules of `model` that drop out in training: `nn.Dropout` with `p > 0`, and transformers' attention modules
    with a float `attention_dropout > 0` (a functional dropout, which `nn.Dropout` does not cover)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Dropout) and module.p > 0 or _attention_dropout(module) > 0
    ]


def disable_dropout(model: nn.Module) -> list[str]:
    """Set every dropout of `model` to 0, as TRL's `DPOTrainer` does (`disable_dropout_in_model`), attention dropout
    included. Returns the modules that dropped out before."""
    active = active_dropouts(model)
    disable_dropout_in_model(model)
    for module in model.modules():
        if _attention_dropout(module) > 0:
            module.attention_dropout = 0.0
    return active


def _attention_dropout(module: nn.Module) -> float:
    rate = getattr(module, "attention_dropout", None)
    return rate if isinstance(rate, float) else 0.0


def add_reference_adapter(model: nn.Module) -> None:
    """Give a PEFT model a frozen copy of its active adapter under the name `"ref"`, as TRL's `DPOTrainer` does.

    Used when the model arrives with an adapter of its own (re-training it): the reference is the adapter as it was
    at the start, not the bare base model (with the base parameters the adapter trains at their starting values, see
    `StartingBaseParameters`). The copy keeps the dtype of each trained parameter (QLoRA casts the
    adapter to bfloat16), so at step 0 the reference equals the policy exactly.
    """
    active = model.active_adapter
    config = model.peft_config[active]
    # The base biases an adapter trains (`bias="all"`) belong to no adapter, and PEFT allows one adapter with a bias:
    # the copy has none, and the biases' starting values are put in place for it (`StartingBaseParameters`)
    if getattr(config, "bias", "none") != "none":
        config = dataclasses.replace(config, bias="none")
    model.add_adapter(REF_ADAPTER, config)
    model.set_adapter(active)
    copied = 0
    for name, param in model.named_parameters():
        if belongs_to_adapter(name, active):
            ref_name = ".".join(REF_ADAPTER if part == active else part for part in name.split("."))
            ref_param = model.get_parameter(ref_name)
            ref_param.data = param.data.detach().clone()
            ref_param.requires_grad_(False)
            copied += 1
    if copied == 0:
        raise RuntimeError(
            f"Found no parameter of adapter {active!r} to copy into the reference adapter {REF_ADAPTER!r}: the "
            "reference would be the bare base model. Pass the initial model as `ref_model` explicitly."
        )


class StartingBaseParameters:
    """The base-model parameters a PEFT model trains besides its adapters, as they were at the start.

    PEFT's `bias="all"` / `"lora_only"` (and the same option of other PEFT types) train the base model's own biases:
    disabling the adapters, or switching to the frozen `"ref"` adapter, does not undo their updates, so a reference
    that is the policy itself would train along with it. Their starting values are kept aside (biases: a few
    thousand numbers) and put in place for each reference pass (`in_place`), so the reference stays the model the
    run started from.
    """

    def __init__(self, model: nn.Module | None = None):
        """`model`: a PEFT model that is its own reference, or `None` (nothing to keep)."""
        adapters = list(getattr(model, "peft_config", {}))
        self.parameters = {
            name: param
            for name, param in (model.named_parameters() if model is not None else ())
            if param.requires_grad and not any(belongs_to_adapter(name, adapter) for adapter in adapters)
        }
        self.starting = {name: param.detach().clone() for name, param in self.parameters.items()}

    def __bool__(self) -> bool:
        return bool(self.parameters)

    @contextmanager
    def in_place(self) -> Iterator[None]:
        """Swap the starting values in for the block (no copy: the parameters' storage is exchanged), and the trained
        values back after it, also when the block raises. PEFT's warning that disabled adapters with trained biases
        are not the base model is silenced inside: here they are."""
        trained = {name: param.data for name, param in self.parameters.items()}
        for name, param in self.parameters.items():
            param.data = self.starting[name]
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Careful, disabling adapter layers with bias")
                yield
        finally:
            for name, param in self.parameters.items():
                param.data = trained[name]


def belongs_to_adapter(name: str, adapter: str) -> bool:
    """Whether the parameter `name` belongs to `adapter`. PEFT types place the adapter name differently (LoRA
    `...lora_A.default.weight`, IA3 `...ia3_l.default`, prompt learning `prompt_encoder.default.embedding.weight`):
    match a whole component of the name, not a substring."""
    return adapter in name.split(".")


def reference_adapter_name(model: nn.Module) -> str | None:
    """The adapter a PEFT policy uses as its own reference: the frozen `"ref"` copy if any, else `None` (disabled)."""
    return REF_ADAPTER if is_peft_model(model) and REF_ADAPTER in model.peft_config else None


def freeze(model: nn.Module) -> nn.Module:
    """Turn a separate reference model into a frozen one: eval mode, no parameter requires grad."""
    model.eval()
    model.requires_grad_(False)
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` as it is now (its weights, resized embeddings included), with its class's forward.

    `add_fused_lm_head` binds the original's forward into the patched one, so a plain `deepcopy` would run the
    original's weights on the plain forward path: patch the copy again (`add_fused_lm_head`) to score with it."""
    reference = copy.deepcopy(model)
    vars(reference).pop("forward", None)
    return freeze(reference)


def check_same_vocabulary(policy: nn.Module, reference: nn.Module, explicit: bool) -> None:
    """Raise if the reference scores tokens over a different vocabulary than the policy; `explicit` says whether the
    user chose the reference (`ref_model`) or it was loaded again from the policy's path."""
    policy_vocab = policy.get_output_embeddings().weight.shape[0]
    ref_vocab = reference.get_output_embeddings().weight.shape[0]
    if policy_vocab != ref_vocab:
        fix = (
            "Use a reference with the policy's tokenizer (for instance the model the policy was initialised from, "
            "resized the same way), or leave `ref_model` unset to compare with the policy as training starts."
            if explicit
            else "The policy's embeddings were resized after loading (e.g. by `chat_template_path`): resize the saved "
            "model first and train from that, or set `precompute_ref_log_probs=True`."
        )
        raise InputError(
            f"The reference model has a vocabulary of {ref_vocab} tokens but the policy has {policy_vocab}: their "
            f"log-probabilities cannot be compared. {fix}"
        )


def tokens_mapped_differently(tokenizer, path: str, added_tokens_count: bool) -> list[str]:
    """The tokens that `tokenizer` and the tokenizer saved with the model at `path` map to different ids, sorted;
    with `added_tokens_count=False`, tokens only `tokenizer` has (added for resized embeddings) are not counted.
    Empty when there is nothing to compare (no saved tokenizer: transformers would make an empty one up)."""
    vocab = getattr(tokenizer, "get_vocab", None)
    if vocab is None or Path(path).is_dir() and not any(Path(path, name).is_file() for name in TOKENIZER_FILES):
        return []
    try:
        saved = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return []
    ours, theirs = vocab(), saved.get_vocab()
    compared = ours.keys() | theirs.keys() if added_tokens_count else theirs.keys()
    return sorted(token for token in compared if ours.get(token) != theirs.get(token))


def check_same_tokenizer(tokenizer, ref_path: str) -> None:
    """Raise if the reference at `ref_path` ships a tokenizer that maps tokens to other ids than the policy's: equal
    vocabulary sizes do not make the log-probabilities comparable."""
    differing = tokens_mapped_differently(tokenizer, ref_path, added_tokens_count=True)
    if differing:
        raise InputError(
            f"The reference {ref_path!r} has another tokenizer than the policy: {len(differing)} tokens differ (e.g. "
            f"{differing[:3]}), so its log-probabilities score other tokens. Use a reference trained with the "
            "policy's tokenizer (the model the policy was initialised from)."
        )


def check_model_tokenizer(tokenizer, model_path: str) -> None:
    """Raise if `processing_class` maps the tokens of the tokenizer saved with the model at `model_path` to other ids
    (another tokenizer family of the same vocabulary size); tokens it adds are not a difference."""
    differing = tokens_mapped_differently(tokenizer, model_path, added_tokens_count=False)
    if differing:
        raise InputError(
            f"`processing_class` maps tokens to other ids than the tokenizer saved with the model {model_path!r}: "
            f"{len(differing)} tokens differ (e.g. {differing[:3]}), so the model would read every example as other "
            "tokens. Pass the model's own tokenizer (`AutoTokenizer.from_pretrained(model_path)`)."
        )


def disable_dropout_if_asked(args, policy: nn.Module) -> None:
    """`disable_dropout` (see `MinorSFTConfig`): where training reads the reference, dropout would make the policy's
    log-probs differ from the reference's at the first step; say what was switched off, or warn."""
    if not args.uses_reference:
        return
    if args.disable_dropout:
        switched = disable_dropout(policy)
        if switched:
            logger.info(
                f"disable_dropout=True: set {len(switched)} dropouts of the policy to 0 (e.g. {switched[0]!r}), "
                "so the policy's training forward gives the reference's log-probs at the start."
            )
        return
    active = active_dropouts(policy)
    if active:
        logger.warning(
            f"disable_dropout=False with {len(active)} active dropouts (e.g. {active[0]!r}): the policy's "
            "log-probs come from training forwards with dropout and the reference's without, so the log-ratio, "
            f"the {args.loss_type} weights and `deviation` carry dropout noise from the first step."
        )
