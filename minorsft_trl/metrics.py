"""The metrics a `MinorSFTTrainer` logs next to TRL's: the reference's (`deviation`, `log_ratio`, the loss's weights
with their extremes, the KL anchor `kl`) and the held-out answers' NLL (`answer_nll`), each a mean over every example
(or token) of the logging window, over all processes."""

import torch
import transformers

from .loss_types import LossInputs
from .losses import deviation

logger = transformers.utils.logging.get_logger(__name__)

# A `minor_weight` below this everywhere in a logging window leaves gradients of a thousandth: learning has stopped
STALLED_WEIGHT = 1e-3


class WindowMetrics:
    """Sums and counts per logging window, added to TRL's metrics (`SFTTrainer._metrics`) when the trainer logs.

    Args:
        trl_metrics: `SFTTrainer._metrics`, `{"train": {key: [values]}, "eval": {...}}`, which `SFTTrainer.log`
            averages and clears.
        accelerator: gathers each micro-batch's sums over the processes.
        args: the run's `MinorSFTConfig` (its loss names the weights).
    """

    def __init__(self, trl_metrics: dict, accelerator, args):
        self.trl_metrics = trl_metrics
        self.accelerator = accelerator
        self.args = args
        self._sums = {"train": {}, "eval": {}}

    def add_reference_terms(
        self, mode: str, terms: LossInputs, topk_anchor: tuple[int, int] | None = None
    ) -> tuple[float, float]:
        """Add this micro-batch's `deviation` and `log_ratio`, the loss's per-example weights (mean, `_min`, `_max`,
        e.g. `minor_weight`) and the mean per-token KL anchor (`kl`), over all processes; with `topk_anchor`
        `(k, s)`, the anchor was the precomputed one from the reference's top `k` tokens and `s` draws from the rest,
        logged as `kl_top_k` and `kl_tail_samples` (both absent for the exact anchor over the vocabulary). Returns
        the anchor's KL summed over the micro-batch's answer tokens on every process, and their count (0 and 0
        without an anchor): what `target_forward_kl` steers on."""
        log_ratio, num_tokens = terms.policy_logps.detach() - terms.ref_logps, terms.num_tokens
        reference_loss = self.args.reference_loss
        weight_name = reference_loss.weight_name if reference_loss is not None else None
        weight = reference_loss.weight(log_ratio, num_tokens, self.args) if weight_name else torch.ones_like(log_ratio)
        kl = terms.token_kl.detach() if terms.token_kl is not None else log_ratio.new_zeros(0)
        local = torch.stack(
            [
                log_ratio.new_tensor(float(log_ratio.numel())),
                deviation(log_ratio, num_tokens).sum(),
                log_ratio.sum(),
                weight.sum(),
                kl.new_tensor(float(kl.numel())),
                kl.sum(),
                weight.min() if weight.numel() else log_ratio.new_tensor(float("inf")),
                weight.max() if weight.numel() else log_ratio.new_tensor(float("-inf")),
            ]
        )
        stats = self.accelerator.gather(local[None]).view(-1, local.numel())
        sums, weight_min, weight_max = stats[:, :6].sum(0), stats[:, 6].min(), stats[:, 7].max()
        # One device-to-host copy per micro-batch
        total, deviation_sum, log_ratio_sum, weight_sum, kl_count, kl_sum, weight_min, weight_max = torch.cat(
            [sums, weight_min[None], weight_max[None]]
        ).tolist()
        self.add_to_mean(mode, "kl", kl_sum, kl_count)
        if topk_anchor is not None:
            for name, value in zip(("kl_top_k", "kl_tail_samples"), topk_anchor, strict=True):
                self.add_to_mean(mode, name, value * kl_count, kl_count)
        if total == 0:
            return kl_sum, kl_count
        self.add_to_mean(mode, "deviation", deviation_sum, total)
        self.add_to_mean(mode, "log_ratio", log_ratio_sum, total)
        if weight_name:
            self.add_to_mean(mode, weight_name, weight_sum, total)
            metrics = self.trl_metrics[mode]
            metrics[f"{weight_name}_min"].append(weight_min)
            metrics[f"{weight_name}_max"].append(weight_max)
        return kl_sum, kl_count

    def add_answer_nll(self, policy_logps: torch.Tensor, num_tokens: torch.Tensor) -> None:
        """Add this evaluation micro-batch's NLL of the answers and their count, over all processes, to `answer_nll`,
        the per-token NLL of the held-out answers: the held-out fit of every loss type on one scale (`eval_loss` is
        each loss's own value)."""
        local = torch.stack([-policy_logps.detach().sum(), num_tokens.sum().to(policy_logps.dtype)]).float()
        nll_sum, count = self.accelerator.gather(local[None]).view(-1, 2).sum(0).tolist()
        self.add_to_mean("eval", "answer_nll", nll_sum, count)

    def add_to_mean(self, mode: str, key: str, total: float, count: float) -> None:
        """Add a micro-batch's sum and count of `key` (over examples or tokens) to the logging window's, so that the
        log holds the mean over every example (token) of the window, not a mean of micro-batch means, which would
        weigh a micro-batch of 3 examples as one of 5 (packing, a last short batch)."""
        if count:
            sums = self._sums[mode].setdefault(key, [0.0, 0.0])
            sums[0] += total
            sums[1] += count

    def close_window(self, mode: str) -> None:
        """Before `SFTTrainer.log` averages each metric over the window: the means of the window's sums, the extremes
        of the weights as their min and max, and a warning where the brake has stopped learning."""
        metrics = self.trl_metrics[mode]
        for key, (total, count) in self._sums[mode].items():
            metrics[key] = [total / count]
        self._sums[mode].clear()
        reference_loss = self.args.reference_loss
        weight_name = reference_loss.weight_name if reference_loss is not None else None
        if not weight_name:
            return
        for key, reduce in ((f"{weight_name}_min", min), (f"{weight_name}_max", max)):
            if metrics.get(key):
                metrics[key] = [reduce(metrics[key])]
        largest = metrics.get(f"{weight_name}_max")
        if mode == "train" and largest and reference_loss.brakes and largest[0] < STALLED_WEIGHT:
            log_ratio = sum(metrics["log_ratio"]) / len(metrics["log_ratio"])
            logger.warning(
                f"Every {self.args.loss_type} weight (`{weight_name}`) of the last logging window is below "
                f"{STALLED_WEIGHT:g} (largest {largest[0]:.3g}, mean log-ratio {log_ratio:.3g}): the brake has "
                f"stopped learning. beta={self.args.beta:g} is too large for these log-ratios; lower it (the paper's "
                "best is 0.04)."
            )
