"""The kinds of reference, declared once (as `loss_types` declares the losses): where each comes from, which module
runs it, and for how long it can run. Everything else reads these declarations; nothing branches on a kind's name."""

import enum


class ReferenceKind(enum.Enum):
    """Where a run's reference comes from (chosen by `ReferenceKind.of`).

    Attributes:
        description: what the reference is, as the start-of-run check and the log name it.
        in_policy: the policy's own module runs it (adapters disabled, the `"ref"` adapter, or the policy itself);
            otherwise a separate model does.
        through_training: it can run at every step; otherwise only before the first update (the policy itself).
    """

    ADAPTERS_DISABLED = ("the base model with the adapters disabled", True, True)
    REF_ADAPTER = ("a frozen copy of the adapter being re-trained (the `'ref'` adapter)", True, True)
    FROZEN_COPY = ("a frozen copy of the policy as training starts", False, True)
    GIVEN = ("the model given as `ref_model`", False, True)
    POLICY_AT_START = ("the policy itself as training starts (no copy kept)", True, False)

    def __init__(self, description: str, in_policy: bool, through_training: bool):
        self.description = description
        self.in_policy = in_policy
        self.through_training = through_training

    @classmethod
    def of(cls, *, loaded: bool, given: bool, policy_is_peft: bool, policy_has_own_adapter: bool) -> "ReferenceKind":
        """The kind of a run's reference.

        Args:
            loaded: whether the run reads a reference (its loss, or the drift measures where the reference is free or
                named); where it does not, the reference is what needs no loading, and only names what the run's
                checkpoints and caches belong to.
            given: whether `ref_model` (or `ref_model_name_or_path`) names one.
            policy_is_peft: whether the policy trains adapters.
            policy_has_own_adapter: whether the PEFT policy arrived with an adapter of its own to re-train.
        """
        if loaded and given:
            return cls.GIVEN
        if policy_is_peft:
            return cls.REF_ADAPTER if loaded and policy_has_own_adapter else cls.ADAPTERS_DISABLED
        return cls.FROZEN_COPY if loaded else cls.POLICY_AT_START
