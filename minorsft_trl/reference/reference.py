"""`Reference`: the reference of a run as one object, which the loss, the precompute, the start-of-run check and the
drift measures all use: where it comes from (`ReferenceKind`), loading and preparing it for the engine, running it,
its identity, and releasing it."""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from accelerate.utils import is_peft_model
from transformers.integrations import is_deepspeed_zero3_enabled
from trl.models.utils import prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import add_fused_lm_head, create_model_from_path, get_config_model_id, use_adapter

from ..engines import destroy_if_engine, parameter_bytes
from ..errors import InputError
from ..examples import ExampleIndex
from ..fused_head import labelled_positions_only
from .check import ReferenceCheck, deviation_tolerance
from .identity import peft_reference_name
from .kinds import ReferenceKind
from .models import (
    StartingBaseParameters,
    add_reference_adapter,
    check_same_tokenizer,
    check_same_vocabulary,
    freeze,
    frozen_copy,
    reference_adapter_name,
    reference_mode,
)
from .precompute import REF_LOGPS
from .topk_anchor import ReferenceTopK, topk_kl
from .topk_cache import topk_from_batch
from .vocabulary_kl import answer_hidden_states, captured_hidden_states, reference_head, token_kl

logger = transformers.utils.logging.get_logger(__name__)

# What to do when a dataset reaches the reference after `precompute_ref_log_probs=True` released it
RELEASED_REFERENCE_FIX = (
    "Pass every dataset you evaluate to the trainer's `eval_dataset` (a dict for several), or leave "
    "precompute_ref_log_probs at 'auto', which keeps the reference to score datasets passed to `evaluate` later."
)


@dataclass(frozen=True)
class ReferenceSide:
    """The reference's side of the loss on a batch of `N` examples with `T` answer tokens (`Reference.loss_side`).

    Attributes:
        logps: `(N,)` summed answer log-probs.
        precomputed: whether `logps` come from the precompute pass.
        hidden: `(T, hidden)` the reference's hidden states at the answer positions, with `head` its LM head
            `(weight, bias)`: the exact KL anchor over the vocabulary, on the fly (else `None`).
        topk: the reference's precomputed top-k and draws from its rest at the answer tokens (else `None`).
    """

    logps: torch.Tensor
    precomputed: bool
    hidden: torch.Tensor | None = None
    head: tuple | None = None
    topk: ReferenceTopK | None = None

    @property
    def reads_distribution(self) -> bool:
        return self.hidden is not None or self.topk is not None

    def kl_anchor(
        self,
        policy_hidden: torch.Tensor,
        policy_head: tuple[torch.Tensor, torch.Tensor | None],
        answer_ids: torch.Tensor | None,
        answer_logps: torch.Tensor,
    ) -> torch.Tensor:
        """`(T,)` the KL anchor per answer token, differentiable through the policy: from the precomputed top-k and
        draws (`topk_anchor.topk_kl`, which reads the answer tokens `answer_ids` and the policy's `(T,)`
        `answer_logps`), else the exact one over the vocabulary (`vocabulary_kl.token_kl`).

        Args:
            policy_hidden: `(T, hidden)` the policy's hidden states at the answer positions, with gradient.
            policy_head: the policy's LM head `(weight, bias)` (`vocabulary_kl.lm_head_weights`).
        """
        if self.topk is not None:
            return topk_kl(policy_hidden, policy_head, answer_ids, answer_logps, self.topk)
        return token_kl(policy_hidden, policy_head, self.hidden, self.head)


def fused_token_logps(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """`(batch, seq_len - 1)` per-token log-probs from the fused LM head, without the policy-only forward options."""
    inputs = {k: v for k, v in inputs.items() if k not in ("output_router_logits", "use_cache")}
    return model(**inputs, use_cache=False, fused_lm_head=True).log_probs


class Reference:
    """The reference of a run.

    Attributes:
        kind: where it comes from.
        model: the separate reference model (prepared for the engine once `prepare` ran), or `None` where the policy
            runs it or once it is released.
        check: what the start-of-run check expects of it (`None` where nothing is loaded, and once checked).
        released: whether `release` let go of the separate model (`precompute_ref_log_probs=True`).
        releases_after_precompute: whether the precompute releases the separate model (only an explicit True does).
    """

    def __init__(
        self,
        kind: ReferenceKind,
        accelerator,
        policy: Callable[[], torch.nn.Module],
        model: torch.nn.Module | None = None,
        check: ReferenceCheck | None = None,
        starting_base_parameters: StartingBaseParameters | None = None,
        releases_after_precompute: bool = False,
    ):
        self.kind = kind
        self.model = model
        self.check = check
        self.released = False
        self.releases_after_precompute = releases_after_precompute
        self._accelerator = accelerator
        self._policy = policy
        self._starting_base_parameters = starting_base_parameters or StartingBaseParameters()

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        ref_model: "str | torch.nn.Module | None",
        *,
        args,
        policy: Callable[[], torch.nn.Module],
        accelerator,
        processing_class,
        quantization_config,
        measures_drift: bool,
        policy_has_own_adapter: bool,
        sharded: bool,
        releases_after_precompute: bool,
    ) -> "Reference":
        """The reference of a run, loaded where the loss reads one, or where the drift measures do and it is free (a
        PEFT policy's base) or named; full fine-tuning with plain SFT keeps no copy (see `ReferenceKind.of`). A
        separate model is not yet prepared for the engine (`prepare`).

        Args:
            ref_model: the reference the trainer was given, else `args.ref_model_name_or_path`, else `None`.
            policy: the policy without its DDP / FSDP wrapper, as it is now.
            measures_drift: whether the run measures its drift (`DriftMeasures.wanted`).
            sharded: whether FSDP or ZeRO-3 shards the policy's parameters.
            releases_after_precompute: whether the precompute releases a separate model (an explicit
                `precompute_ref_log_probs=True`).
        """
        ref_model = ref_model if ref_model is not None else args.ref_model_name_or_path
        model = policy()
        needed = args.uses_reference or (measures_drift and (ref_model is not None or is_peft_model(model)))
        kind = ReferenceKind.of(
            loaded=needed,
            given=ref_model is not None,
            policy_is_peft=is_peft_model(model),
            policy_has_own_adapter=policy_has_own_adapter,
        )
        if not needed:
            return cls(kind, accelerator, policy, releases_after_precompute=releases_after_precompute)
        if kind.in_policy:
            adapter_config = model.peft_config[model.active_adapter]
            starting = _starting_base_parameters(model, sharded)
            if kind is ReferenceKind.REF_ADAPTER:
                add_reference_adapter(model)
                check = ReferenceCheck(
                    f"a frozen copy of the {adapter_config.peft_type.value} adapter {model.active_adapter!r} being "
                    "re-trained",
                    starts_at_reference=True,
                    hint="Pass the reference you mean as `ref_model`.",
                )
            else:
                # Prompt learning adds virtual tokens, and an adapter initialised as a non-identity on purpose changes
                # the outputs: there the policy legitimately starts away from its base model
                identity_init = all(
                    getattr(adapter_config, field, True) is not False
                    for field in ("init_lora_weights", "init_weights", "init_ia3_weights")
                )
                check = ReferenceCheck(
                    f"the base model with the {adapter_config.peft_type.value} adapters disabled",
                    starts_at_reference=identity_init and not adapter_config.is_prompt_learning,
                    hint="The base weights seen with the adapters disabled are not those the policy starts from (an "
                    "initialisation such as PiSSA, OLoRA or LoftQ rewrites them): pass the original model as "
                    "`ref_model`.",
                )
            return cls(kind, accelerator, policy, None, check, starting, releases_after_precompute)
        if kind is ReferenceKind.GIVEN:
            name = ref_model if isinstance(ref_model, str) else get_config_model_id(ref_model.config) or "a model"
            check = ReferenceCheck(f"the model given as `ref_model` ({name})", starts_at_reference=False, hint="")
        else:
            logger.warning(
                "Full fine-tuning with a reference: a second, frozen copy of the policy is the reference, which "
                "doubles the model memory. Train with a `peft_config` (LoRA/QLoRA) to use the policy with its "
                "adapters disabled instead, or set `precompute_ref_log_probs=True` to free it after one"
                " pass over the data."
            )
            check = ReferenceCheck(
                "a frozen copy of the policy as training starts",
                starts_at_reference=True,
                hint="Pass the reference you mean as `ref_model`.",
            )
            ref_model = _policy_copy(model, args.loss_type)
        if isinstance(ref_model, str):
            check_same_tokenizer(processing_class, ref_model)
            init_kwargs = dict(args.model_init_kwargs or {})
            if quantization_config is not None:
                init_kwargs["quantization_config"] = quantization_config
            if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
                init_kwargs["device_map"] = None
            init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            init_kwargs.setdefault("dtype", model.dtype)
            ref_model = create_model_from_path(ref_model, **init_kwargs)
        check_same_vocabulary(model, ref_model, explicit=kind is ReferenceKind.GIVEN)
        freeze(ref_model)
        add_fused_lm_head(ref_model.get_base_model() if is_peft_model(ref_model) else ref_model)
        return cls(kind, accelerator, policy, ref_model, check, releases_after_precompute=releases_after_precompute)

    def prepare(self, deepspeed: bool, fsdp: bool) -> None:
        """Place (and under FSDP / ZeRO, shard) a separate reference, as TRL's `DPOTrainer` does."""
        if self.model is None:
            return
        if deepspeed:
            self.model = prepare_deepspeed(self.model, self._accelerator)
        elif fsdp:
            self.model = prepare_fsdp(self.model, self._accelerator)
        else:
            self.model = self._accelerator.prepare_model(self.model, evaluation_mode=True)
        held, whole = parameter_bytes(self._accelerator.unwrap_model(self.model))
        logger.info(
            f"The separate reference holds {held / 2**20:.1f} MiB of weights in this process, of "
            f"{whole / 2**20:.1f} MiB whole."
        )

    # ------------------------------------------------------------------ what it is

    @property
    def is_live(self) -> bool:
        """Whether a reference model is there to run at every step: a separate one not released, or the PEFT policy
        with its adapters disabled (or its `"ref"` adapter)."""
        return self.model is not None or (self.kind.in_policy and self.kind.through_training)

    @property
    def stays_for_run(self) -> bool:
        """Whether it can still run once training has started (the precompute releases none of it)."""
        return self.is_live and not (self.model is not None and self.releases_after_precompute)

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The separate reference model without its wrapper, if any: the weights the reference adds to the policy's."""
        return [self._accelerator.unwrap_model(self.model)] if self.model is not None else []

    def weights(self) -> tuple[torch.nn.Module, Callable[[str], str | None], Any]:
        """The module whose weights the reference pass runs, how to name its state-dict entries (`None`: leave out),
        and the configuration of the adapter it runs. For a PEFT policy without a separate reference: its base model
        (plus its frozen `"ref"` adapter, if any), named as in the plain model, so equal weights are equal. Where no
        reference is loaded for a full fine-tuning policy: the policy as it starts, which is what a checkpoint of the
        run continues from."""
        if self.model is not None:
            reference = self._accelerator.unwrap_model(self.model)
            # An explicit PEFT reference runs its active adapter, whose settings (`lora_alpha`) scale its output
            adapter_config = reference.peft_config[reference.active_adapter] if is_peft_model(reference) else None
            return reference, lambda name: name, adapter_config
        model = self._policy()
        if not is_peft_model(model):
            return model, lambda name: name, None
        ref_adapter = reference_adapter_name(model)
        other_adapters = [name for name in model.peft_config if name != ref_adapter]
        adapter_config = model.peft_config[ref_adapter] if ref_adapter else None
        return model, lambda name: peft_reference_name(name, other_adapters), adapter_config

    # ------------------------------------------------------------------ running it

    @contextmanager
    def running(self) -> Iterator[torch.nn.Module]:
        """The reference as a model to call (no gradient, eval mode): the separate reference; or the PEFT policy with
        its adapters disabled (or its `"ref"` adapter) and the base parameters it trains at their starting values
        (`StartingBaseParameters`); or, before training only, the full fine-tuning policy itself."""
        if self.model is not None:
            model, context = self._accelerator.unwrap_model(self.model), nullcontext()
        else:
            model = self._policy()
            context = use_adapter(model, reference_adapter_name(model)) if is_peft_model(model) else nullcontext()
        with self._starting_base_parameters.in_place(), reference_mode(model), context:
            yield model

    def token_logps(self, inputs: dict[str, Any], hidden_states: bool = False):
        """`(batch, seq_len - 1)` per-token log-probs of the reference on the batch (zero where the label is -100).
        With `hidden_states=True`, also its `(batch, seq_len, hidden)` last hidden states and its LM head's weight and
        bias (read inside the reference's context: disabling the adapters may swap the head)."""
        if self.released:
            raise InputError(
                "The reference model was released after its log-probs were precomputed for the datasets given at "
                f"init (precompute_ref_log_probs=True), and this batch has none. {RELEASED_REFERENCE_FIX}"
            )
        with self.running() as model, labelled_positions_only():
            if not hidden_states:
                return fused_token_logps(model, inputs)
            with captured_hidden_states(model) as captured:
                token_logps = fused_token_logps(model, inputs)
            return token_logps, captured[-1], reference_head(model)

    def logps(self, inputs: dict[str, Any], index: ExampleIndex) -> torch.Tensor:
        """`(num_examples,)` summed answer log-probs of the reference, by a reference forward on the batch."""
        # Prompt-learning PEFT prepends virtual tokens to the policy's outputs only: align from the right
        return index.sum(self.token_logps(inputs)[:, -index.answer_mask.size(1) :])

    def distribution(self, inputs: dict[str, Any], index: ExampleIndex):
        """What the KL anchor needs, from one reference forward: the reference's `(num_examples,)` summed answer
        log-probs, `(num_answer_tokens, hidden)` hidden states at the answer positions, and LM head weights."""
        token_logps, hidden_states, head = self.token_logps(inputs, hidden_states=True)
        ref_logps = index.sum(token_logps[:, -index.answer_mask.size(1) :])
        return ref_logps, answer_hidden_states(hidden_states, index.answer_mask), head

    def loss_side(self, inputs: dict[str, Any], index: ExampleIndex, distribution: bool) -> "ReferenceSide":
        """The reference's side of the loss on a batch: the summed answer log-probs precomputed (popped from
        `inputs`) or by a reference forward; with `distribution`, what the KL anchor reads: the precomputed top-k the
        batch carries, else the answer hidden states and LM head of the same forward."""
        ref_logps = inputs.pop(REF_LOGPS, None)
        topk = topk_from_batch(inputs)
        precomputed = ref_logps is not None
        if ref_logps is not None and ref_logps.numel() != index.num_examples:
            raise RuntimeError(
                f"The batch carries {ref_logps.numel()} precomputed reference log-probs for {index.num_examples} "
                "examples: the data changed after the precompute. Recreate the trainer to recompute them."
            )
        if topk is not None and topk.ids.size(0) != index.answer_mask.sum().item():
            raise RuntimeError(
                f"The batch carries the reference's top-k for {topk.ids.size(0)} answer tokens, and has "
                f"{index.answer_mask.sum().item()}: the data changed after the precompute. Recreate the trainer to "
                "recompute them."
            )
        if distribution and topk is None:
            # Reference first: its activations are freed before the policy's graph is built
            ref_logps, hidden, head = self.distribution(inputs, index)
            return ReferenceSide(ref_logps, precomputed, hidden=hidden, head=head)
        if ref_logps is None:
            ref_logps = self.logps(inputs, index)
        return ReferenceSide(ref_logps, precomputed, topk=topk)

    def check_at_start(
        self,
        policy: torch.nn.Module,
        inputs: dict[str, Any],
        index: ExampleIndex,
        ref_logps: torch.Tensor,
        *,
        precomputed: bool,
        half: bool,
    ) -> None:
        """Before the first update, compare the policy in reference mode with the reference on this batch (all
        processes), and stop if a reference that must equal the policy's starting point does not (`ReferenceCheck`).

        Args:
            policy: the policy, wrapped or not.
            ref_logps: `(num_examples,)` the reference's summed answer log-probs on this batch.
            precomputed: whether `ref_logps` come from the precompute pass (other batches: layout noise).
            half: whether either side computes in half precision (`precision.half_precision`).
        """
        start = time.perf_counter()
        per_token = self.start_log_ratios(policy, inputs, index, ref_logps)
        local = torch.stack(
            [
                per_token.abs().max() if per_token.numel() else per_token.new_tensor(0.0),
                per_token.sum(),
                per_token.new_tensor(float(per_token.numel())),
            ]
        )
        stats = self._accelerator.gather(local[None]).view(-1, 3)
        max_abs, total, count = stats[:, 0].max().item(), stats[:, 1].sum().item(), stats[:, 2].sum().item()
        tolerance = deviation_tolerance(half, same_batch=not precomputed)
        self.check.verify(max_abs, total / max(count, 1), tolerance)
        logger.info(f"The reference check took {time.perf_counter() - start:.3f} s.")

    def start_log_ratios(
        self, policy: torch.nn.Module, inputs: dict[str, Any], index: ExampleIndex, ref_logps: torch.Tensor
    ) -> torch.Tensor:
        """`(num_examples,)` log-ratios per answer token of the policy in reference mode (no dropout) against the
        reference's `ref_logps` on this batch."""
        policy = self._accelerator.unwrap_model(policy)
        with reference_mode(policy):
            policy_logps = index.sum(fused_token_logps(policy, inputs)[:, -index.answer_mask.size(1) :])
        return (policy_logps - ref_logps) / index.num_tokens

    def check_can_score(self, eval_dataset) -> None:
        """Stop before evaluating datasets whose reference log-probs were not precomputed, where the reference model
        that would score them was released (`precompute_ref_log_probs=True`). A name selects a dataset given at
        init."""
        if not self.released or eval_dataset is None or isinstance(eval_dataset, str):
            return
        datasets = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
        missing = [name for name, dataset in datasets.items() if REF_LOGPS not in (dataset.column_names or [])]
        if missing:
            raise InputError(
                f"evaluate(eval_dataset=...): the reference log-probs of {', '.join(map(repr, missing))} were not "
                "precomputed, and precompute_ref_log_probs=True released the reference model that would score them. "
                f"{RELEASED_REFERENCE_FIX}"
            )

    # ------------------------------------------------------------------ letting go

    def release(self) -> None:
        """Let go of a separate reference model (and its engine); what the run keeps of it is its identity and the
        precomputed values. Running it afterwards stops with the fix (`RELEASED_REFERENCE_FIX`)."""
        if self.model is None:
            return
        destroy_if_engine(self.model)
        # `Accelerator.prepare_model` keeps every model it prepared: let go of it there too, or it stays in memory
        self._accelerator._models = [model for model in self._accelerator._models if model is not self.model]
        self.model = None
        self.released = True

    def destroy_engine(self) -> None:
        """Let go of a separate reference's DeepSpeed engine (see `MinorSFTTrainer.end`)."""
        destroy_if_engine(self.model)


def _starting_base_parameters(policy: torch.nn.Module, sharded: bool) -> StartingBaseParameters:
    """The starting values of the base parameters a PEFT policy trains besides its adapters (`bias="all"`), which
    its own reference must not see move. Refused where they are sharded (FSDP, ZeRO-3): kept whole here, they could
    not be put in place of a shard."""
    starting = StartingBaseParameters(policy)
    if not starting:
        return starting
    names = list(starting.parameters)
    if sharded:
        raise InputError(
            f"The PEFT adapter trains {len(names)} parameters of the base model besides its own (e.g. "
            f"{names[0]!r}: `bias='all'` or `'lora_only'`), which the base model seen with the adapters disabled "
            "(the reference) must keep at their starting values; under FSDP or ZeRO-3 they are sharded and "
            "cannot be swapped. Set `bias='none'`, or pass the starting model as `ref_model`."
        )
    logger.info(
        f"The PEFT adapter trains {len(names)} parameters of the base model besides its own (e.g. {names[0]!r}): "
        "their starting values are kept aside and put in place for every reference pass, so the reference stays "
        "the model the run started from."
    )
    return starting


def _policy_copy(policy: torch.nn.Module, loss_type: str) -> "torch.nn.Module | str":
    """The frozen copy of a full fine-tuning policy, or under ZeRO-3 the path to load it again from."""
    if not is_deepspeed_zero3_enabled():
        return frozen_copy(policy)
    # ZeRO-3 partitions the weights at load time: a copy would hold empty shards, so load them again
    path = get_config_model_id(policy.config)
    if not path:
        raise InputError(
            f"loss_type={loss_type!r} under DeepSpeed ZeRO-3 loads the reference from the policy's path, but this "
            "model has none (`config._name_or_path` is empty). Pass `ref_model` (a path or a model), or set "
            "`precompute_ref_log_probs=True`."
        )
    return path
