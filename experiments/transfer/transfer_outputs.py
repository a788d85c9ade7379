"""What the answers of `experiments/transfer/transfer.py` runs look like, per arm: beyond the task's metric.

For every run of one or more transfer output directories (their `runs/<arm>-seed<k>/eval_predictions.jsonl`):

Slot filling, for English and the mean of the other languages:

- `untyped_f1`: span F1 with the slot type ignored (is the right text picked, whatever its class?);
- `verbatim`: the share of predicted slot values that occur in the request as they are (case-insensitive). A slot
  value is always a piece of the request, so a lower share means answers that are paraphrased, translated, mixed
  with another language or degenerate (repeated `emph:emph:...`);
- `none`: the share of answers without any slot.

Translation, for the mean of the directions into English and out of English that had no task data (the trained
directions, `train_languages` of the run's settings.json, are left out):

- `copied`: the share of answers that repeat the source text (case and spacing ignored) instead of translating it;
- `target_script`: the share of answers whose letters are mostly in the target language's script; only directions
  with a non-Latin side (ja, zh, ko, hi, km, ru) count, where script tells the languages apart (off-target answers,
  e.g. English copied into an English -> Japanese direction, score 0); `reference_script`: the same for the
  references, which shows how far the script test can be trusted (about 1).

    python experiments/transfer/transfer_outputs.py outputs/transfer_slot [more output dirs]

Prints one markdown table row per directory and arm: mean ± std over seeds.

It also holds the statistics of the transfer report (`paired_interval`: the mean of paired per-seed differences with
its 95% t confidence interval) and its plot (`plot_intervals`), which `transfer.py` uses.
"""

import argparse
import glob
import json
import math
import os
import statistics
from collections.abc import Sequence

from trl_midalign.tasks.metrics import span_f1
from trl_midalign.tasks.slot_filling import PROMPT, parse_slots


ENGLISH = "en-US"


def _t_half_width(std: float, n: int, confidence: float) -> float:
    """Half-width of the two-sided `confidence` t interval of the mean of `n` values with sample sd `std`."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)


def paired_interval(differences: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """
    Mean, standard deviation and two-sided `confidence` t interval of paired differences (one per seed: aligned minus
    baseline), with `n` and the two-sided p-value of "mean 0". Fewer than 2 values: the interval and p are NaN.

    Example:

    ```python
    >>> interval = paired_interval([0.02, 0.01, 0.03])
    >>> round(interval["mean"], 3), round(interval["low"], 4), round(interval["high"], 4)
    (0.02, -0.0048, 0.0448)
    ```
    """
    from scipy import stats

    values = [float(v) for v in differences]
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"paired_interval got a value that is not a finite number: {values}.")
    n = len(values)
    nan = float("nan")
    if n == 0:
        return {"n": 0, "mean": nan, "std": nan, "low": nan, "high": nan, "p": nan}
    mean = statistics.fmean(values)
    if n < 2:
        return {"n": 1, "mean": mean, "std": nan, "low": nan, "high": nan, "p": nan}
    std = statistics.stdev(values)
    half = _t_half_width(std, n, confidence)
    p = float(stats.ttest_1samp(values, 0.0).pvalue) if std > 0 else (1.0 if mean == 0 else 0.0)
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half, "p": p}


def paired_power(
    std: float, n: int, effect: float, confidence: float = 0.95, target: float = 0.8, min_seeds: int = 2
) -> dict:
    """
    What `n` paired seeds with a per-seed difference of standard deviation `std` can resolve, for a true mean
    difference `effect` > 0 (with `std` plugged in as if known; estimated from few seeds, it is itself uncertain):

    - `half_width`: the half-width of the two-sided `confidence` t interval at `n` seeds and this sd;
    - `power`: the probability that the interval's lower end is above 0 (a gain is claimed) when the true mean is
      `effect` (non-central t with `n - 1` degrees of freedom);
    - `detectable`: the least true mean difference that `n` seeds claim as a gain with probability `target`;
    - `seeds_for_half_width`: the fewest seeds, at least `min_seeds`, whose half-width is at most `effect`;
    - `seeds_for_power`: the fewest seeds, at least `min_seeds`, with a `power` of at least `target`.

    NaN (and `None` seed counts) for `n < 2` or a `std` without a spread (not finite, or 0 up to rounding: equal
    differences in every seed).
    """
    from scipy import optimize, stats

    if not effect > 0 or not 0 < target < 1:
        raise ValueError(f"paired_power needs an effect above 0 and a target in (0, 1), got {effect} and {target}.")
    nan = float("nan")
    result = {"std": std, "n": n, "effect": effect, "target": target}
    if n < 2 or not math.isfinite(std) or std <= 1e-12 * effect:
        return {**result, "half_width": nan, "power": nan, "detectable": nan, "seeds_for_half_width": None,
                "seeds_for_power": None}  # fmt: skip
    level = 0.5 + confidence / 2

    def power(k: int, true_mean: float = effect) -> float:
        return float(stats.nct.sf(stats.t.ppf(level, k - 1), k - 1, true_mean * math.sqrt(k) / std))

    def fewest(ok) -> int | None:
        for k in range(max(2, min_seeds), 10_001):
            if ok(k):
                return k
        return None

    # The power rises with the true mean, from 1 - level at 0 towards 1: bracket `target` and solve.
    if power(n, 0.0) >= target:
        detectable = 0.0
    else:
        high = std
        while power(n, high) < target:
            high *= 2
        detectable = float(optimize.brentq(lambda m: power(n, m) - target, 0.0, high))
    return {
        **result,
        "half_width": _t_half_width(std, n, confidence),
        "power": power(n),
        "detectable": detectable,
        "seeds_for_half_width": fewest(lambda k: _t_half_width(std, k, confidence) <= effect),
        "seeds_for_power": fewest(lambda k: power(k) >= target),
    }


def plot_intervals(rows: Sequence[tuple[str, dict, str]], path: str, title: str, ylabel: str) -> bool:
    """
    Plot paired differences with their confidence intervals: one point and bar per `(label, paired_interval, group)`
    row, coloured by group, and a line at 0. Returns False (and writes nothing) without matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[transfer] no plot: matplotlib is not installed", flush=True)
        return False
    colours = {}
    figure, axis = plt.subplots(figsize=(max(6, 0.55 * len(rows)), 4))
    for i, (_, interval, group) in enumerate(rows):
        colour = colours.setdefault(group, f"C{len(colours)}")
        mean = interval["mean"]
        if not math.isfinite(mean):
            continue
        low, high = interval["low"], interval["high"]
        error = [[mean - low], [high - mean]] if math.isfinite(low) else None
        axis.errorbar(i, mean, yerr=error, fmt="o", color=colour, capsize=3, label=group)
    handles, labels = axis.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axis.legend(unique.values(), unique.keys(), fontsize=8)
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set_xticks(range(len(rows)))
    axis.set_xticklabels([label for label, _, _ in rows], rotation=45, ha="right")
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


_PREFIX = PROMPT.split("{utterance}")[0]


def request_of(prompt: str) -> str:
    """The request of a slot-filling prompt (the text after the prompt template's fixed part)."""
    if not prompt.startswith(_PREFIX):
        raise ValueError(f"Not a slot-filling prompt of this version: {prompt[:80]!r}")
    return prompt[len(_PREFIX) :].strip()


def answer_statistics(records: list[dict]) -> dict[str, float]:
    """`untyped_f1`, `verbatim` and `none` of one language's prediction records (see the module docstring)."""
    predicted = [parse_slots(r["prediction"]) for r in records]
    gold = [parse_slots(r["reference"]) for r in records]
    untyped = span_f1([[("span", v) for _, v in p] for p in predicted], [[("span", v) for _, v in g] for g in gold])
    values = [(v, request_of(r["prompt"]).lower()) for r, p in zip(records, predicted) for _, v in p]
    return {
        "untyped_f1": untyped["f1"],
        "verbatim": sum(v in request for v, request in values) / len(values) if values else float("nan"),
        "none": sum(not p for p in predicted) / len(records),
    }


# Unicode ranges of the scripts that tell a translation's target language apart from English (and from each other)
SCRIPTS = {
    "ja": ((0x3040, 0x30FF), (0x4E00, 0x9FFF)),  # kana, CJK ideographs
    "zh": ((0x3400, 0x4DBF), (0x4E00, 0x9FFF)),
    "ko": ((0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF)),
    "hi": ((0x0900, 0x097F),),
    "km": ((0x1780, 0x17FF),),
    "ru": ((0x0400, 0x04FF),),
    "en": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F)),  # Latin
}


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def in_script(text: str, language: str) -> bool:
    """Whether at least half of the letters of `text` are in the script of `language` (a key of `SCRIPTS`)."""
    letters = [ord(c) for c in text if c.isalpha()]
    inside = sum(any(lo <= c <= hi for lo, hi in SCRIPTS[language]) for c in letters)
    return bool(letters) and inside >= len(letters) / 2


def translation_statistics(records: list[dict]) -> dict[str, float]:
    """`copied`, `target_script` and `reference_script` of one direction's prediction records (module docstring)."""
    source, target = records[0]["language"].split("-")
    scored = target in SCRIPTS and (target != "en" or source in SCRIPTS)  # a non-Latin side

    def script_share(field: str) -> float:
        return sum(in_script(r[field], target) for r in records) / len(records) if scored else float("nan")

    return {
        "copied": sum(_normalise(r["prediction"]) == _normalise(r["source"]) for r in records) / len(records),
        "target_script": script_share("prediction"),
        # the same for the references: how far the script test itself can be trusted (about 1)
        "reference_script": script_share("reference"),
    }


def _group(task: str, language: str, trained: Sequence[str]) -> str | None:
    if task == "slot_filling":
        return "en" if language == ENGLISH else "others"
    source, target = language.split("-")
    if source in trained or target in trained:  # de-en, en-de: the task data
        return None
    return "into en" if target == "en" else "out of en"


TASKS = {
    "slot_filling": (answer_statistics, ("untyped_f1", "verbatim", "none"), ("en", "others")),
    "translation": (translation_statistics, ("copied", "target_script", "reference_script"), ("into en", "out of en")),
}


def run_statistics(
    run_dir: str, task: str = "slot_filling", trained: Sequence[str] = ()
) -> dict[str, dict[str, float]]:
    """{group: the statistics averaged over the group's languages} of one run (groups: see `TASKS`)."""
    with open(os.path.join(run_dir, "eval_predictions.jsonl")) as f:
        records = [json.loads(line) for line in f]
    by_language: dict[str, list[dict]] = {}
    for record in records:
        by_language.setdefault(record["language"], []).append(record)
    statistics_of, keys, groups = TASKS[task]
    stats = {lang: statistics_of(rows) for lang, rows in by_language.items()}
    result = {}
    for group in groups:
        members = [s for lang, s in stats.items() if _group(task, lang, trained) == group]
        result[group] = {key: _finite_mean([s[key] for s in members]) for key in keys} if members else {}
    return result


def _finite_mean(values: list[float]) -> float:
    """The mean of the finite values (`verbatim` is NaN for a language whose answers hold no slot); NaN if none."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else float("nan")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "output_dirs",
        nargs="+",
        help="output directories of experiments/transfer/transfer.py (slot filling or translation)",
    )
    args = parser.parse_args(argv)
    settings = []
    for output_dir in args.output_dirs:
        with open(os.path.join(output_dir, "settings.json")) as f:
            settings.append(json.load(f))
    tasks = {s["task"] for s in settings}
    if len(tasks) != 1 or not tasks <= set(TASKS):
        raise SystemExit(f"Pass output directories of one task of {sorted(TASKS)}; these are of {sorted(tasks)}.")
    task = tasks.pop()
    _, keys, groups = TASKS[task]
    print("| runs | arm | seeds | " + " | ".join(f"{k} {g}" for k in keys for g in groups) + " |")
    print("|---|---|---|" + "---|" * len(keys) * len(groups))
    rows = []
    for output_dir, setting in zip(args.output_dirs, settings):
        for arm in ("baseline", "aligned"):
            runs = sorted(glob.glob(os.path.join(output_dir, "runs", f"{arm}-seed*", "eval_predictions.jsonl")))
            trained = setting["train_languages"]
            per_run = [run_statistics(os.path.dirname(path), task, trained) for path in runs]
            if not per_run:
                continue
            cells = []
            for key in keys:
                for group in groups:
                    values = [s[group][key] for s in per_run if math.isfinite(s[group].get(key, math.nan))]
                    std = statistics.stdev(values) if len(values) > 1 else 0.0
                    cells.append(f"{statistics.fmean(values):.2f} ± {std:.2f}" if values else "n/a")
            print(f"| {output_dir} | {arm} | {len(per_run)} | " + " | ".join(cells) + " |")
            rows.append({"output_dir": output_dir, "arm": arm, "runs": per_run})
    return rows


if __name__ == "__main__":
    main()
