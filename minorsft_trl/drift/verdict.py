"""What a method comparison says, in plain words: sentences computed from the intervals of its report, none written
by hand.

A difference is beyond noise when its 95% interval leaves out 0, within noise when it holds 0; with one seed a measure
has no interval over seeds (a task's accuracy still has one, over its held-out questions). The sentences read the
summary of `minorsft_trl.drift.report.summarise`: the paired differences against SFT, each method at its best learning
rate, the drift at matched gain, the step-size control and the Pareto front. Gain is the task accuracy, or the
held-out answer NLL (lower is better); drift is the forward KL the comparison measured with one estimator.
"""

import math
from dataclasses import dataclass

from minorsft_trl.drift.grid import LABELS, STEP_CONTROL, Grid
from minorsft_trl.drift.stats import Interval, paired_difference, seeds_to_exclude_zero

# What a difference says: better or worse beyond noise, within noise, no interval (one seed), or nothing to compare
BETTER, WORSE, WITHIN_NOISE, NO_INTERVAL, NOT_COMPARED = "better", "worse", "within noise", "no interval", "n/a"
# measure: (its name in a sentence, the unit of a difference, the unit of a value)
WORDS = {
    "accuracy": ("accuracy", " points", "%"),
    "answer_nll": ("held-out answer NLL", " nats/token", " nats/token"),
    "forward_kl": ("forward KL", " nats/token", " nats/token"),
    "forward_kl_sampled": ("forward KL (sampled-token estimate)", " nats/token", " nats/token"),
    "nll_change": ("NLL change on held-out text", " nats/token", " nats/token"),
}
# Beyond this many seeds, more seeds are not how a difference gets settled
MOST_SEEDS = 30
# How many of the comparisons more seeds would settle are named
SETTLE_SHOWN = 3


@dataclass(frozen=True)
class Reading:
    """What every sentence needs to know of the comparison besides the numbers."""

    gain: str  # "accuracy" or "answer_nll"
    kl: str | None  # the forward KL measure differences are taken on; None when the runs used two estimators
    drifts: tuple[str, ...]  # the drift measures a comparison sentence reports: the forward KL, the NLL change
    grid: Grid
    base_accuracy: float | None  # in %

    @property
    def higher_is_better(self) -> bool:
        return self.gain == "accuracy"

    @property
    def one_seed(self) -> bool:
        return len(self.grid.seeds) == 1


@dataclass(frozen=True)
class Option:
    """A method at the learning rate it is judged at (its best, or the grid's one), with its difference from SFT."""

    method: str
    learning_rate: float
    interior: bool | None  # whether the best rate has a rate of the method on either side; None with one rate
    values: dict  # the configuration's intervals, by measure
    against_sft: dict | None  # this minus SFT (at SFT's best, or at the same rate), by measure

    @property
    def name(self) -> str:
        """`SFT + KL at lr 0.001`."""
        return f"{LABELS[self.method]} at lr {self.learning_rate:.3g}"


# ------------------------------------------------------------------ words for numbers


def has_interval(interval: dict) -> bool:
    """Whether an interval's dict (`Interval.to_dict()`, NaN or None bounds for one value) has bounds."""
    return interval["n"] >= 2 and _finite(interval.get("low")) and _finite(interval.get("high"))


def verdict(difference: dict | None, higher_is_better: bool) -> str:
    """What a difference `this - other` says: BETTER or WORSE for `this` beyond noise, WITHIN_NOISE, NO_INTERVAL (one
    seed) or NOT_COMPARED (no value)."""
    if not difference or not difference.get("n") or not _finite(difference.get("mean")):
        return NOT_COMPARED
    if not has_interval(difference):
        return NO_INTERVAL
    if difference["low"] > 0 or difference["high"] < 0:
        return BETTER if (difference["mean"] > 0) == higher_is_better else WORSE
    return WITHIN_NOISE


def decimals(scale: float, significant: int) -> int:
    """The decimals that show `scale` to `significant` digits."""
    if not _finite(scale) or scale == 0:
        return 2
    return min(6, max(0, significant - 1 - math.floor(math.log10(abs(scale)))))


def signed(value: float, places: int) -> str:
    """`+0.017`, `-4.9`; `+0.0` for what rounds to 0 (never `-0.0`)."""
    return f"{0.0 if round(value, places) == 0 else value:+.{places}f}"


def value_text(value: float, measure: str) -> str:
    """A measure's value: `58.3%`, `3.09 nats/token`."""
    places = 1 if measure == "accuracy" else decimals(value, 3)
    return f"{value:.{places}f}{WORDS[measure][2]}"


def difference_text(difference: dict, measure: str, over_questions: bool = False) -> str:
    """A difference with its interval, `+1.5 points (95% interval -3.9 to +6.9)`; one seed's value alone where it
    has none."""
    places = places_of(difference, measure)
    text = short_difference(difference, measure)
    if has_interval(difference):
        over = " over the held-out questions" if over_questions else ""
        text += f" (95% interval{over} {signed(difference['low'], places)} to {signed(difference['high'], places)})"
    return text


def short_difference(difference: dict, measure: str) -> str:
    """A difference's mean alone, `+1.3 points`."""
    return signed(difference["mean"], places_of(difference, measure)) + WORDS[measure][1]


def places_of(difference: dict, measure: str) -> int:
    """Points to one decimal; else two digits of the interval's half-width, or three of the mean where the interval
    has no width (the same difference on every seed, float noise aside) or there is none."""
    if measure == "accuracy":
        return 1
    half, mean = half_width(difference), difference["mean"]
    return decimals(half, 2) if half > 1e-9 * abs(mean) else decimals(mean, 3)


def half_width(interval: dict) -> float:
    """Half the width of an interval; 0 without one."""
    return (interval["high"] - interval["low"]) / 2 if has_interval(interval) else 0.0


def verdict_text(said: str, is_drift: bool) -> str:
    """What a verdict reads as, after a difference of the gain or of a drift."""
    if said == BETTER:
        return "less drift, beyond noise" if is_drift else "better, beyond noise"
    if said == WORSE:
        return "more drift, beyond noise" if is_drift else "worse, beyond noise"
    return "within noise" if said == WITHIN_NOISE else "one seed: no interval"


def compared(differences: dict, reading: Reading) -> str:
    """`accuracy +1.5 points (95% interval ...), within noise; forward KL ...`: the gain and the drifts of a
    difference, each with what it says."""
    parts = []
    for measure in (reading.gain, *reading.drifts):
        is_drift = measure != reading.gain
        said = verdict(differences.get(measure), higher_is_better=reading.higher_is_better and not is_drift)
        if said == NOT_COMPARED:
            continue
        text = difference_text(differences[measure], measure, over_questions=reading.one_seed)
        verdict_words = verdict_text(said, is_drift)
        parts.append(
            f"{WORDS[measure][0]} {text}" + (f" ({verdict_words})" if said == NO_INTERVAL else f", {verdict_words}")
        )
    return "; ".join(parts)


# ------------------------------------------------------------------ the sentences


def noise_lines(summary: dict, reading: Reading) -> list[str]:
    """Each method against SFT at the same learning rate, and at its best against SFT at SFT's best where the two
    best rates differ: which differences are beyond noise and which within."""
    lines = [
        f"{LABELS[row['method']]} against SFT at lr {row['learning_rate']:.3g}: {compared(row, reading)}."
        for row in summary["paired"]
    ]
    sft_best = next((row for row in summary["best"] if row["method"] == "sft"), None)
    for row in summary["best"]:
        if "against_sft" in row and row["learning_rate"] != sft_best["learning_rate"]:
            lines.append(
                f"{LABELS[row['method']]} at its best learning rate ({row['learning_rate']:.3g}) against SFT at its "
                f"best ({sft_best['learning_rate']:.3g}): {compared(row['against_sft'], reading)}."
            )
    return lines


def control_lines(summary: dict, reading: Reading) -> list[str]:
    """Minor SFT against plain SFT at its mean step, and what that says of its re-weighting."""
    lines = []
    for row in summary["control"]:
        said = {verdict(row.get(reading.gain), reading.higher_is_better)}
        if reading.kl:
            said.add(verdict(row.get(reading.kl), higher_is_better=False))
        if NO_INTERVAL in said or said == {NOT_COMPARED}:
            meaning = ""
        elif WORSE in said and BETTER not in said:
            meaning = " The smaller step alone does better than Minor SFT's re-weighting."
        elif BETTER in said and WORSE not in said:
            meaning = " Minor SFT's re-weighting does better than the smaller step alone."
        elif said == {WITHIN_NOISE}:
            meaning = " Its re-weighting does no better than the smaller step alone, within noise."
        else:
            meaning = " Neither is better on both."
        lines.append(
            f"Minor SFT against plain SFT at its mean step (lr {row['trained_lr']:.3g}, Minor SFT's "
            f"{row['learning_rate']:.3g} times its mean weight): {compared(row, reading)}.{meaning}"
        )
    return lines


def matched_line(summary: dict, reading: Reading) -> str | None:
    """Which method reaches a gain every method reached with the least drift, and whether that is beyond noise
    (paired by seed against the next least); without a matched gain, the Pareto front."""
    rows = summary["matched"]
    if rows and rows[0].get("target") is None:
        return (
            "The methods' gains over their learning rates do not overlap: there is no gain they all reached to "
            "compare their drift at."
        )
    rows = [row for row in rows if reading.kl and row[reading.kl]["n"]]
    if len(rows) < 2:
        return pareto_line(summary, reading)
    kl, gain = reading.kl, reading.gain
    least, *others = sorted(rows, key=lambda row: row[kl]["mean"])
    reached = ""
    if least["seeds_reaching"] < least["seeds"]:
        reached = f" (on {least['seeds_reaching']} of its {least['seeds']} seeds)"
    against_others = " and ".join(f"{value_text(row[kl]['mean'], kl)} ({LABELS[row['method']]})" for row in others)
    text = (
        f"Most gain for its drift: at matched {WORDS[gain][0]} {value_text(least['target'], gain)} (interpolated "
        f"between learning rates), {LABELS[least['method']]} drifts least, {WORDS[kl][0]} "
        f"{value_text(least[kl]['mean'], kl)}{reached} against {against_others}"
    )
    runner_up = others[0]
    difference = paired_difference(least["by_seed"][kl], runner_up["by_seed"][kl]).to_dict()
    said = verdict(difference, higher_is_better=False)
    versus = f"its difference from {LABELS[runner_up['method']]}'s, {difference_text(difference, kl)},"
    if said == BETTER:
        return f"{text}; {versus} is beyond noise."
    if said == WITHIN_NOISE:
        return f"{text}; but {versus} is within noise: no method gets more gain for its drift beyond noise here."
    if said == NO_INTERVAL:
        seeds = "with one seed" if reading.one_seed else "on the one seed both reach it at"
        return f"{text}; {seeds}, no interval says whether that is more than noise."
    return f"{text}."


def pareto_line(summary: dict, reading: Reading) -> str | None:
    """The configurations nothing beats on both gain and forward KL (on the means)."""
    if not reading.kl or not summary["pareto_front"]:
        return None
    front = ", ".join(f"{LABELS[method]} at lr {lr:.3g}" for method, lr in summary["pareto_front"])
    one_rate = (
        "; with one learning rate there is no drift at matched gain" if len(reading.grid.learning_rates) == 1 else ""
    )
    return (
        f"Nothing here beats {front} on both {WORDS[reading.gain][0]} and {WORDS[reading.kl][0]} (the Pareto front, "
        f"on the means{one_rate})."
    )


def options_of(summary: dict) -> list[Option]:
    """Each method (the control aside) at its best learning rate against SFT at its best, or with one learning rate,
    at it against SFT at it."""
    if summary["best"]:
        return [
            Option(row["method"], row["learning_rate"], row["interior"], row, row.get("against_sft"))
            for row in summary["best"]
        ]
    paired = {row["method"]: row for row in summary["paired"]}
    return [
        Option(row["method"], row["learning_rate"], None, row, paired.get(row["method"]))
        for row in summary["configurations"]
        if row["method"] != STEP_CONTROL
    ]


def pick_line(summary: dict, reading: Reading) -> str | None:
    """Which method to pick on this data, and why, from the differences against SFT: one that beats SFT beyond noise
    on gain or drift and loses on neither; else SFT, the simplest, when nothing beats it; else the trade-off, or
    with one seed, no pick."""
    options = options_of(summary)
    if not options:
        return None
    if len(options) == 1:
        return single_method_line(options[0], reading)
    sft = next((option for option in options if option.method == "sft"), None)
    if sft is None:
        return no_sft_line(options, reading)
    judged = [(option, *judge(option, reading)) for option in options if option is not sft and option.against_sft]
    winners = [
        (option, gain, drift)
        for option, gain, drift in judged
        if (gain == BETTER and drift in (BETTER, WITHIN_NOISE, NOT_COMPARED))
        or (gain == WITHIN_NOISE and drift == BETTER)
    ]
    if winners:
        sign = 1 if reading.higher_is_better else -1
        option, gain, drift = max(
            winners, key=lambda w: (w[1] == BETTER, w[2] == BETTER, sign * w[0].values[reading.gain]["mean"])
        )
        return winner_line(option, sft, gain, drift, reading) + notes(option, summary, reading)
    if any(NO_INTERVAL in (gain, drift) for _, gain, drift in judged):
        return unsettled_line(options, reading)
    trades = [(o, g, d) for o, g, d in judged if {g, d} == {BETTER, WORSE}]
    if trades:
        return trade_line(trades, sft, reading)
    drift = f" or {WORDS[reading.kl][0]}" if reading.kl else ""
    return (
        f"Pick SFT at lr {sft.learning_rate:.3g} on this data: no method beats it beyond noise on "
        f"{WORDS[reading.gain][0]}{drift}, and its loss is the simplest (it needs no reference model)."
        + notes(sft, summary, reading)
    )


def judge(option: Option, reading: Reading) -> tuple[str, str]:
    """What the option's difference from SFT says of its gain and of its forward KL."""
    gain = verdict(option.against_sft.get(reading.gain), reading.higher_is_better)
    drift = verdict(option.against_sft.get(reading.kl), higher_is_better=False) if reading.kl else NOT_COMPARED
    return gain, drift


def winner_line(option: Option, sft: Option, gain: str, drift: str, reading: Reading) -> str:
    """The pick of a method that beats SFT beyond noise on gain or drift, and loses on neither."""
    gain_name = WORDS[reading.gain][0]
    if gain == BETTER:
        reason = f"its {gain_name} is better than SFT's beyond noise, {against(option, sft, reading.gain, reading)}"
        if drift == BETTER:
            reason += f"; and its {WORDS[reading.kl][0]} less, {against(option, sft, reading.kl, reading)}"
        elif drift == WITHIN_NOISE:
            kl_difference = difference_text(option.against_sft[reading.kl], reading.kl)
            reason += f"; for no more {WORDS[reading.kl][0]} beyond noise, {kl_difference}"
        else:
            reason += "; its forward KL is not compared with SFT's, taken by another estimator (see the note above)"
    else:
        gain_difference = option.against_sft[reading.gain]
        if half_width(gain_difference) == 0 and gain_difference["mean"] == 0:
            same_gain = f"its {gain_name} the same as SFT's on every seed"
        else:
            same_gain = (
                f"its {gain_name} is not told apart from SFT's, "
                f"{difference_text(gain_difference, reading.gain, reading.one_seed)}, within noise"
            )
        reason = (
            f"it moves the model less than SFT beyond noise, {WORDS[reading.kl][0]} "
            f"{against(option, sft, reading.kl, reading)}; {same_gain}"
        )
    return f"Pick {option.name} on this data: {reason}."


def against(option: Option, sft: Option, measure: str, reading: Reading) -> str:
    """`58.3% against 56.8% for SFT at lr 0.0001, +1.5 points (95% interval +1.5 to +1.5)`."""
    return (
        f"{value_text(option.values[measure]['mean'], measure)} against "
        f"{value_text(sft.values[measure]['mean'], measure)} for {sft.name}, "
        f"{difference_text(option.against_sft[measure], measure, reading.one_seed)}"
    )


def trade_line(trades: list[tuple[Option, str, str]], sft: Option, reading: Reading) -> str:
    """No method beats SFT on both: what each gives and what it costs, and what to pick by (the trade with the
    most gain, the one with the least drift, or SFT)."""
    gain_name, sign = WORDS[reading.gain][0], 1 if reading.higher_is_better else -1
    parts = []
    for option, gain, _ in trades:
        gain_difference = difference_text(option.against_sft[reading.gain], reading.gain, reading.one_seed)
        kl_difference = difference_text(option.against_sft[reading.kl], reading.kl)
        if gain == BETTER:
            parts.append(f"{option.name} gains more, {gain_difference}, but drifts more, {kl_difference}")
        else:
            parts.append(f"{option.name} drifts less, {kl_difference}, but gains less, {gain_difference}")
    gaining = [option for option, gain, _ in trades if gain == BETTER]
    calmer = [option for option, gain, _ in trades if gain == WORSE]
    most_gain = max(gaining, key=lambda o: sign * o.values[reading.gain]["mean"]) if gaining else sft
    least_drift = min(calmer, key=lambda o: o.values[reading.kl]["mean"]) if calmer else sft
    return (
        f"No method beats SFT on both {gain_name} and drift: {'; '.join(parts)}. Pick by what matters more on your "
        f"data: the {gain_name} ({most_gain.name}) or staying close to the reference ({least_drift.name})."
    )


def unsettled_line(options: list[Option], reading: Reading) -> str:
    """With one seed no pick: which option had the most gain and which the least drift on it."""
    sign = 1 if reading.higher_is_better else -1
    best = max(options, key=lambda o: sign * o.values[reading.gain]["mean"])
    text = (
        f"No pick is settled with one seed: on seed {reading.grid.seeds[0]}, {best.name} reached the best "
        f"{WORDS[reading.gain][0]} ({value_text(best.values[reading.gain]['mean'], reading.gain)})"
    )
    if reading.kl:
        calmest = min(options, key=lambda o: o.values[reading.kl]["mean"])
        least = value_text(calmest.values[reading.kl]["mean"], reading.kl)
        text += f" and {calmest.name} the least {WORDS[reading.kl][0]} ({least})"
    return text + "."


def single_method_line(option: Option, reading: Reading) -> str:
    """One method: nothing to pick between, its best learning rate where there are several."""
    text = f"One method ({LABELS[option.method]}): nothing to pick between."
    if len(reading.grid.learning_rates) > 1:
        text += (
            f" Its best learning rate here is {option.learning_rate:.3g} ({WORDS[reading.gain][0]} "
            f"{value_text(option.values[reading.gain]['mean'], reading.gain)})."
        )
    return text + " Add --methods sft minor_sft sft_kl to compare."


def no_sft_line(options: list[Option], reading: Reading) -> str:
    """Without SFT there is nothing paired: the option with the most gain, and whether its interval and the next
    one's overlap."""
    sign = 1 if reading.higher_is_better else -1
    first, second = sorted(options, key=lambda o: -sign * o.values[reading.gain]["mean"])[:2]
    mine, theirs = first.values[reading.gain], second.values[reading.gain]
    text = (
        f"Without SFT among the methods nothing is paired: {first.name} reached the best {WORDS[reading.gain][0]} "
        f"({value_text(mine['mean'], reading.gain)}, against {value_text(theirs['mean'], reading.gain)} for "
        f"{second.name})"
    )
    if not (has_interval(mine) and has_interval(theirs)):
        return text + "; with one seed, no interval says whether that is more than noise."
    if mine["low"] <= theirs["high"] and theirs["low"] <= mine["high"]:
        return text + "; their 95% intervals overlap, so the order may be noise."
    return text + "; their 95% intervals do not overlap."


def notes(option: Option, summary: dict, reading: Reading) -> str:
    """What else the pick should know: a best rate at the grid's edge, an accuracy not above the base model's, a
    step-size control that does as well as Minor SFT."""
    text = ""
    if option.interior is False:
        smallest = option.learning_rate == min(reading.grid.learning_rates)
        text += (
            f" Its best learning rate is the {'smallest' if smallest else 'largest'} of the grid: a "
            f"{'smaller' if smallest else 'larger'} one may do better."
        )
    text += base_model_note(option, reading)
    control = next((row for row in summary["control"] if row["learning_rate"] == option.learning_rate), None)
    if option.method == "minor_sft" and control and reading.kl:
        said = {verdict(control.get(reading.gain), reading.higher_is_better), verdict(control.get(reading.kl), False)}
        if said <= {WITHIN_NOISE, WORSE}:
            text += (
                f" Plain SFT at lr {control['trained_lr']:.3g}, its mean step, does as well (the step-size control)."
            )
    return text


def base_model_note(option: Option, reading: Reading) -> str:
    """Where the picked accuracy is not above the base model's, beyond noise: said."""
    accuracy = option.values.get("accuracy")
    if reading.base_accuracy is None or not accuracy or not accuracy["n"]:
        return ""
    base = reading.base_accuracy
    low, high = (accuracy["low"], accuracy["high"]) if has_interval(accuracy) else (accuracy["mean"],) * 2
    if high < base:
        return f" Its accuracy is below the base model's {base:.1f}%."
    if low <= base:
        return f" Its accuracy is not above the base model's {base:.1f}% beyond noise."
    return ""


def more_seeds_line(summary: dict, reading: Reading) -> str | None:
    """What more seeds would settle: with one seed, every difference; else each difference the pick rests on that
    is within noise, with an estimate of the seeds that would settle it at the spread these seeds show."""
    if reading.one_seed:
        drift = " for the drift (the accuracy's are over the held-out questions)" if reading.gain == "accuracy" else ""
        return (
            f"With one seed there are no intervals over seeds{drift}: run --seeds 0 1 2 (or more) to settle whether "
            "the differences above are more than noise."
        )
    estimates = [
        (
            seeds_to_exclude_zero(Interval(**difference), MOST_SEEDS),
            f"{what} ({short_difference(difference, measure)})",
        )
        for what, measure, difference in within_noise(summary, reading)
    ]
    settled = sorted((seeds, what) for seeds, what in estimates if seeds is not None)
    unsettled = [what for seeds, what in estimates if seeds is None]
    sentences = []
    if settled:
        shown = "; ".join(f"about {seeds} would settle {what}" for seeds, what in settled[:SETTLE_SHOWN])
        sentences.append(
            f"More seeds, estimated from the spread of these {len(reading.grid.seeds)} (were it and the mean "
            f"difference to hold): {shown}."
        )
    if unsettled:
        sentences.append(
            f"More than {MOST_SEEDS} seeds would be needed for {' and '.join(unsettled)}: too small against the "
            "spread for seeds to settle."
        )
    return " ".join(sentences) or None


def within_noise(summary: dict, reading: Reading) -> list[tuple[str, str, dict]]:
    """The differences the pick rests on (each method against SFT, Minor SFT against its step-size control) that
    are within noise, and not the same on every seed: (what it compares, the measure, the difference)."""
    comparisons = [(f"{o.name} against SFT", o.against_sft) for o in options_of(summary) if o.against_sft]
    comparisons += [("Minor SFT against its step-size control", row) for row in summary["control"]]
    pending = []
    for what, differences in comparisons:
        for measure in (reading.gain, reading.kl) if reading.kl else (reading.gain,):
            difference = differences.get(measure)
            # Within noise either way (the direction of better does not matter); a zero-width one has nothing to settle
            if verdict(difference, higher_is_better=True) == WITHIN_NOISE and half_width(difference) > 0:
                pending.append((f"{what} on {WORDS[measure][0]}", measure, difference))
    return pending


def plain_words(summary: dict, grid: Grid, base_accuracy: float | None = None) -> list[str]:
    """The sentences, in order: which differences are within noise, what the step-size control says, which method
    gets the most gain for its drift, which to pick and why, and what more seeds would settle. `base_accuracy` is a
    share (0.52)."""
    kl = summary.get("pareto_kl")
    drifts = tuple(m for m in (kl, "nll_change") if m and m in summary["measures"])
    base = None if base_accuracy is None else 100 * base_accuracy
    reading = Reading(summary["gain"], kl, drifts, grid, base)
    sentences = [*noise_lines(summary, reading), *control_lines(summary, reading), matched_line(summary, reading)]
    sentences += [pick_line(summary, reading), more_seeds_line(summary, reading)]
    return [sentence for sentence in sentences if sentence]


def section(summary: dict, grid: Grid, base_accuracy: float | None = None) -> list[str]:
    """`## What this says`, the plain words as markdown lines: the end of `results.md`."""
    return [
        "## What this says",
        "",
        "Read from the 95% intervals above: a difference is beyond noise when its interval leaves out 0, within noise "
        "when it holds 0.",
        "",
        *(f"- {sentence}" for sentence in plain_words(summary, grid, base_accuracy)),
    ]


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)
