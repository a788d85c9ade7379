"""What the slot-filling answers of `benchmarks/transfer.py` runs look like, per arm: beyond slot F1.

For every run of one or more transfer output directories (their `runs/<arm>-seed<k>/eval_predictions.jsonl`), and for
English and the mean of the other languages:

- `untyped_f1`: span F1 with the slot type ignored (is the right text picked, whatever its class?);
- `verbatim`: the share of predicted slot values that occur in the request as they are (case-insensitive). A slot
  value is always a piece of the request, so a lower share means answers that are paraphrased, translated, mixed
  with another language or degenerate (repeated `emph:emph:...`);
- `none`: the share of answers without any slot.

    python benchmarks/transfer_outputs.py outputs/transfer_slot [more output dirs]

Prints one markdown table row per directory and arm: mean ± std over seeds.
"""

import argparse
import glob
import json
import math
import os
import statistics

from trl_midalign.tasks.metrics import span_f1
from trl_midalign.tasks.slot_filling import PROMPT, parse_slots


ENGLISH = "en-US"
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


def run_statistics(run_dir: str) -> dict[str, dict[str, float]]:
    """{"english": stats, "others": stats averaged over the non-English languages} of one run."""
    with open(os.path.join(run_dir, "eval_predictions.jsonl")) as f:
        records = [json.loads(line) for line in f]
    by_language: dict[str, list[dict]] = {}
    for record in records:
        by_language.setdefault(record["language"], []).append(record)
    stats = {lang: answer_statistics(rows) for lang, rows in by_language.items()}
    others = [s for lang, s in stats.items() if lang != ENGLISH]
    mean = {key: _finite_mean([s[key] for s in others]) for key in others[0]} if others else {}
    return {"english": stats.get(ENGLISH, {}), "others": mean}


def _finite_mean(values: list[float]) -> float:
    """The mean of the finite values (`verbatim` is NaN for a language whose answers hold no slot); NaN if none."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else float("nan")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dirs", nargs="+", help="output directories of benchmarks/transfer.py (slot filling)")
    args = parser.parse_args(argv)
    keys = ("untyped_f1", "verbatim", "none")
    print("| runs | arm | seeds | " + " | ".join(f"{k} en | {k} others" for k in keys) + " |")
    print("|---|---|---|" + "---|---|" * len(keys))
    rows = []
    for output_dir in args.output_dirs:
        for arm in ("baseline", "aligned"):
            runs = sorted(glob.glob(os.path.join(output_dir, "runs", f"{arm}-seed*", "eval_predictions.jsonl")))
            per_run = [run_statistics(os.path.dirname(path)) for path in runs]
            if not per_run:
                continue
            cells = []
            for key in keys:
                for group in ("english", "others"):
                    values = [s[group][key] for s in per_run if math.isfinite(s[group].get(key, math.nan))]
                    std = statistics.stdev(values) if len(values) > 1 else 0.0
                    cells.append(f"{statistics.fmean(values):.2f} ± {std:.2f}" if values else "n/a")
            print(f"| {output_dir} | {arm} | {len(per_run)} | " + " | ".join(cells) + " |")
            rows.append({"output_dir": output_dir, "arm": arm, "runs": per_run})
    return rows


if __name__ == "__main__":
    main()
