"""Task transfer with and without middle-layer alignment: the paper's protocol on the LibreOffice help, Gemma 3 270M.

For one task (slot filling, translation or structured generation), this driver

1. builds the task data from the inline markup of the LibreOffice help (`experiments/transfer/libreoffice_tasks.py`):
   task training data in English (translation: the directions de-en and en-de), alignment pairs (non-English,
   English) of `--alignment_languages` from the alignment pages, evaluation rows of `--eval_languages` (plus English)
   from the eval pages; pages are split once with a fixed seed, so no evaluated paragraph was trained on;
2. probes the base model's retrieval accuracy at every layer on held-out eval-page pairs (`probe_layers`);
3. runs BOTH arms through the unchanged recipe script (`recipes/<task>.py`) as subprocesses, for every seed: the
   baseline (`--alignment false`, plain `trl.SFTTrainer`) and the aligned run (`AlignmentTrainer`, alternate
   schedule by default; `--align_weight`, `--align_schedule joint`, `--align_stop_gradient target` for variants) with
   otherwise identical settings. The alternate schedule spends every second micro-batch on alignment,
   so the aligned arm gets `--aligned_steps_factor` (default 2; 1 with `joint`) times the baseline's optimizer steps:
   both arms see the same number of task micro-batches (the paper doubles the epochs, 10 vs 5, for the same reason);
4. probes each trained adapter again (the whole layer curve, to see whether layers other than the aligned one move);
5. writes `transfer.json`, `transfer.md` and `transfer.png` into `--output_dir`.

Every finished run is appended as one JSON line to `<output_dir>/runs.jsonl`; a second call skips the runs already
there, so an interrupted run resumes (or `--seeds` grows; any other setting must stay as it was, else the call is
refused), and `--report_only` rebuilds the report from that file alone.

    python experiments/transfer/transfer.py --task slot_filling --output_dir outputs/transfer_slot --quick
    python experiments/transfer/transfer.py --task slot_filling --output_dir outputs/transfer_slot --seeds 3
    python experiments/transfer/transfer.py --task slot_filling --output_dir outputs/transfer_slot --report_only

A variant of the aligned arm can reuse the baselines of an earlier run (`--baseline_from`; refused unless the task
data, the probe pairs and every setting the baseline depends on are the same):

    python experiments/transfer/transfer.py --task slot_filling --output_dir outputs/transfer_slot_w01 --seeds 3 \
        --align_weight 0.1 --baseline_from outputs/transfer_slot

The adapters of an earlier run can be scored again on more evaluation rows without training (`--evaluate_from`; the
data and training settings come from its settings.json, the eval pages are the same). With `--max_new_tokens 1` only
the teacher-forced reference loss is meaningful, which is cheap enough for hundreds of rows per language:

    python experiments/transfer/transfer.py --task slot_filling --output_dir outputs/transfer_slot_256 \
        --evaluate_from outputs/transfer_slot --max_eval 256 --max_new_tokens 1
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = os.path.join(ROOT, "recipes")
TASKS = ("slot_filling", "translation", "structured_generation")
CACHED = ["de", "fr", "hi", "ja", "km", "ko", "pt", "ru"]
DOWNLOADED = ["es", "it", "zh-cn", "nl"]
LOW_RESOURCE = ["hi", "km"]
MAX_NEW_TOKENS = {"slot_filling": 48, "translation": 96, "structured_generation": 64}
RUNS_FILE, JSON_FILE, MD_FILE, PLOT_FILE = "runs.jsonl", "transfer.json", "transfer.md", "transfer.png"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--output_dir", required=True, help="data, runs, runs.jsonl and the report")
    parser.add_argument("--quick", action="store_true", help="a few steps, 1 seed, few examples: < 10 min on 2 cores")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3; --quick: 1)")
    parser.add_argument("--report_only", action="store_true", help="rebuild the report from runs.jsonl")
    parser.add_argument("--model", default=None, help="model path (default: Gemma 3 270M, trl_midalign.demo)")
    parser.add_argument("--train_languages", nargs="+", default=None, help="task data (default en; translation de)")
    parser.add_argument("--alignment_languages", nargs="+", default=["ja", "hi", "ru"])
    parser.add_argument(
        "--eval_languages", nargs="+", default=CACHED + DOWNLOADED, help="evaluated besides English; help codes"
    )
    parser.add_argument("--max_steps", type=int, default=None, help="baseline optimizer steps (default 150; quick 4)")
    parser.add_argument(
        "--aligned_steps_factor",
        type=float,
        default=None,
        help="aligned steps / baseline steps (default 2 with the alternate schedule, 1 with joint)",
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--align_layer", default="12", help="layer of the alignment loss (Gemma 3 270M has 18)")
    parser.add_argument("--align_weight", type=float, default=1.0, help="weight of the alignment loss (aligned arm)")
    parser.add_argument(
        "--align_schedule", default="alternate", choices=["alternate", "joint"], help="schedule of the aligned arm"
    )
    parser.add_argument(
        "--align_stop_gradient",
        default="none",
        choices=["none", "target"],
        help="'target' detaches the English side of the pairs (aligned arm)",
    )
    parser.add_argument(
        "--max_chars", type=int, default=None, help="longest English paragraph (default 120; quick 70)"
    )
    parser.add_argument("--max_length", type=int, default=96, help="tokens per task row")
    parser.add_argument("--max_eval", type=int, default=None, help="eval rows per language (default 50; quick 3)")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="default per task (quick 24)")
    parser.add_argument("--max_alignment_pairs", type=int, default=None, help="per language (default 512; quick 64)")
    parser.add_argument(
        "--probe_pairs", type=int, default=None, help="probe pairs per language (default 64; quick 16)"
    )
    parser.add_argument("--min_paragraphs", type=int, default=None, help="fewest usable paragraphs per split")
    parser.add_argument(
        "--directions", default=None, choices=["into_english", "out_of_english", "both"], help="translation only"
    )
    parser.add_argument("--data_seed", type=int, default=0, help="seed of the page split")
    parser.add_argument(
        "--align_batch_size",
        type=int,
        default=None,
        help="pairs per alignment step of the aligned arm (default: the task batch)",
    )
    parser.add_argument(
        "--baseline_from",
        default=None,
        help="reuse the baseline runs of this earlier output_dir (same task data and baseline settings; checked) and "
        "run only the aligned arm: for variants of the aligned arm",
    )
    parser.add_argument(
        "--evaluate_from",
        default=None,
        help="train nothing: evaluate the adapters of this earlier output_dir (both arms, its seeds) on this run's "
        "evaluation rows, e.g. more of them with --max_eval 256 --max_new_tokens 1 (reference loss only); the data "
        "and training settings are taken from its settings.json; with --baseline_from (an earlier --evaluate_from "
        "output_dir with the same rows) only the aligned arm is evaluated",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at a time (each recipe gets cores / jobs threads); 2 on 2 cores"
    )
    args = parser.parse_args(argv)
    if args.evaluate_from:
        take_training_settings(args, parser)
    quick = args.quick
    defaults = {
        "seeds": 1 if quick else 3,
        "max_steps": 4 if quick else 150,
        "max_chars": 70 if quick else 120,
        "max_eval": 3 if quick else 50,
        "max_new_tokens": 24 if quick else MAX_NEW_TOKENS[args.task],
        "max_alignment_pairs": 64 if quick else 512,
        "probe_pairs": 16 if quick else 64,
        "min_paragraphs": 3 if quick else 20,
        "directions": "into_english" if quick else "both",
        "aligned_steps_factor": 2.0 if args.align_schedule == "alternate" else 1.0,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.train_languages is None:
        args.train_languages = ["de"] if args.task == "translation" else ["en"]
    for name in (
        "seeds", "max_steps", "batch_size", "max_chars", "max_length", "max_eval", "max_new_tokens",
        "max_alignment_pairs", "probe_pairs", "min_paragraphs", "jobs",
    ):  # fmt: skip
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.align_batch_size is not None and args.align_batch_size < 2:
        parser.error(
            f"--align_batch_size must be at least 2, got {args.align_batch_size}: each pair of an alignment step is "
            "contrasted with the other pairs of that step."
        )
    for name in ("learning_rate", "aligned_steps_factor"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}.")
    if not args.align_weight >= 0:
        parser.error(f"--align_weight must be 0 or more, got {args.align_weight}.")
    if not str(args.align_layer).isdigit():
        parser.error(f"--align_layer must be a layer number (0 = the embeddings), got {args.align_layer!r}.")
    return args


# What `--evaluate_from` takes from the earlier run's settings.json: everything that decides its data and its training
# (the evaluation caps `max_eval` and `max_new_tokens` only when not given).
TRAINING_SETTINGS = (
    "train_languages", "alignment_languages", "quick", "seeds", "max_steps", "aligned_steps_factor", "batch_size",
    "learning_rate", "align_layer", "align_weight", "align_schedule", "align_stop_gradient", "align_batch_size",
    "max_chars", "max_length", "max_alignment_pairs", "probe_pairs", "directions", "data_seed",
)  # fmt: skip


def read_settings(source_dir: str, flag: str) -> dict:
    path = os.path.join(source_dir, "settings.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"{flag} {source_dir}: no settings.json there; pass an --output_dir of an earlier run of this driver."
        )
    with open(path) as f:
        return json.load(f)


def take_training_settings(args, parser: argparse.ArgumentParser) -> None:
    """Set the data and training settings of `args` to those of the `--evaluate_from` run.

    Refuses another task, and a flag given on the command line with a value other than the earlier run's: the adapters
    being evaluated were trained with that run's settings. A setting an older driver did not record keeps this call's
    value (printed), so pass it as that run had it.
    """
    source = read_settings(args.evaluate_from, "--evaluate_from")
    if source["task"] != args.task:
        raise ValueError(
            f"--evaluate_from {args.evaluate_from}: its runs are of task {source['task']!r}, not {args.task!r}."
        )
    for key in TRAINING_SETTINGS:
        given = getattr(args, key)
        if key not in source:  # an older driver that did not record it: the value of this call stands
            print(f"[transfer] {args.evaluate_from}/settings.json does not record {key}; taking {key}={given!r}")
            continue
        if given != parser.get_default(key) and given != source[key]:
            raise ValueError(
                f"--evaluate_from {args.evaluate_from}: its adapters were trained with {key}={source[key]!r}, this "
                f"call passes {key}={given!r}; drop the flag (the earlier run's value is used)."
            )
        setattr(args, key, source[key])
    for key in ("max_eval", "max_new_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, source[key])


# ----------------------------------------------------------------------------------------------------------------------
# Data
def available_languages(languages: list[str]) -> tuple[list[str], dict[str, str]]:
    """The languages whose help markup extracts (downloading missing packages), and why the others failed."""
    from trl_midalign.demo.libreoffice import help_markup

    kept, failed = [], {}
    for language in languages:
        try:
            help_markup(language)
            kept.append(language)
        except (RuntimeError, ValueError) as error:
            failed[language] = str(error).splitlines()[0]
            print(f"[transfer] {language}: no help package ({failed[language]}); continuing without it", flush=True)
    return kept, failed


def build_data(args) -> dict:
    from libreoffice_tasks import libreoffice_task_paragraphs, write_task_data

    wanted = list(dict.fromkeys([*args.alignment_languages, *args.eval_languages]))
    wanted = [lang for lang in wanted if lang not in ("en", "en-us")]
    kept, failed = available_languages(wanted)
    train = [lang for lang in args.train_languages if lang in ("en", "en-us") or lang in kept]
    paragraphs = libreoffice_task_paragraphs(
        eval_languages=["en", *[lang for lang in kept if lang in args.eval_languages]],
        alignment_languages=[lang for lang in args.alignment_languages if lang in kept],
        train_languages=train,
        seed=args.data_seed,
        max_chars=args.max_chars,
        max_train=max(64, args.max_steps * args.batch_size * 2),
        max_alignment=args.max_alignment_pairs,
        max_eval=max(args.max_eval, args.probe_pairs),
        min_paragraphs=args.min_paragraphs,
        no_span_fraction=1.0 if args.task == "translation" else 0.25,
        drop_short_languages=True,
    )
    data = write_task_data(args.task, paragraphs, os.path.join(args.output_dir, "data"), args.directions)
    info = {**data.__dict__, "failed_languages": failed}
    with open(os.path.join(args.output_dir, "data", "data.json"), "w") as f:
        json.dump(info, f, indent=2, ensure_ascii=False)
    print("[transfer] usable paragraphs per language and split (train / alignment / eval pages):", flush=True)
    for language, counts in data.counts.items():
        print(f"[transfer]   {language:6s} {counts}", flush=True)
    return info


# ----------------------------------------------------------------------------------------------------------------------
# Runs
def read_runs(output_dir: str) -> list[dict]:
    path = os.path.join(output_dir, RUNS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_key(record: dict) -> tuple:
    """What identifies a line of runs.jsonl: `(kind, arm, seed)`."""
    return record["kind"], record["arm"], record.get("seed")


def recorded_runs(output_dir: str) -> set[tuple]:
    """The `run_key` of every run and probe already in `output_dir`'s runs.jsonl (what a resumed call skips)."""
    return {run_key(r) for r in read_runs(output_dir)}


# Settings a resumed call may change: more seeds add runs, and baselines already copied from --baseline_from stay valid.
RESUMABLE_SETTINGS = ("seeds", "baseline_from")


def check_resume(output_dir: str, settings: dict) -> None:
    """Refuse to add runs to `output_dir` with settings other than those of the runs already recorded there.

    A second call skips the recorded runs and trains the missing ones; with another learning rate (or data, layer,
    evaluation cap, ...) the report would silently mix runs of two experiments. Only `RESUMABLE_SETTINGS` may differ.
    """
    path = os.path.join(output_dir, "settings.json")
    if not read_runs(output_dir) or not os.path.isfile(path):
        return
    with open(path) as f:
        recorded = json.load(f)
    for key, value in settings.items():
        if key in RESUMABLE_SETTINGS or key not in recorded:  # not recorded by an older driver: cannot be compared
            continue
        if recorded[key] != value:
            raise ValueError(
                f"--output_dir {output_dir} holds runs made with {key}={recorded[key]!r}, this call asks for "
                f"{key}={value!r}. Pass the same value to resume those runs, or another --output_dir for a new "
                "experiment (--baseline_from reuses its baselines)."
            )


def append_run(output_dir: str, record: dict) -> None:
    with open(os.path.join(output_dir, RUNS_FILE), "a") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def probe(model_path: str, adapter: str | None, pairs_path: str, pairs_per_language: int, layer: int) -> dict:
    """Retrieval accuracy at every layer (mean pooling, as the loss) on the held-out pairs, per language."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_midalign.local_files import load_rows
    from trl_midalign.probing import probe_layers

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    pairs = load_rows(pairs_path)
    result = probe_layers(
        model, tokenizer, pairs, max_pairs_per_language=pairs_per_language, max_length=64, show_progress=False
    )
    return {
        "layers": result.layers,
        "retrieval": {lang: values for lang, values in result.retrieval_accuracy.items()},
        "num_pairs": result.num_pairs,
        "align_layer": layer,
    }


def recipe_command(args, data: dict, arm: str, seed: int, run_dir: str) -> list[str]:
    steps = args.max_steps if arm == "baseline" else max(1, round(args.max_steps * args.aligned_steps_factor))
    command = [
        sys.executable, os.path.join(RECIPES, f"{args.task}.py"), "--model_name_or_path", args.model,
        "--dataset_name", data["dataset"], "--output_dir", run_dir, "--use_cpu", "--bf16", "false",
        "--seed", str(seed), "--max_steps", str(steps), "--per_device_train_batch_size", str(args.batch_size),
        "--per_device_eval_batch_size", "16", "--learning_rate", str(args.learning_rate),
        "--lr_scheduler_type", "constant", "--gradient_checkpointing", "false", "--max_length", str(args.max_length), "--logging_steps", "1",
        "--save_strategy", "steps", "--save_steps", str(steps), "--save_only_model", "true", "--report_to", "none",
        "--max_eval_samples", str(args.max_eval), "--max_new_tokens", str(args.max_new_tokens),
        "--train_languages", ",".join(data["train_languages"]), "--eval_languages", ",".join(data["eval_languages"]),
    ]  # fmt: skip
    if arm == "aligned":
        command += [
            "--alignment", "true", "--alignment_dataset_name", data["pairs"],
            "--alignment_languages", ",".join(data["alignment_languages"]), "--align_layer", str(args.align_layer),
            "--max_alignment_pairs", str(args.max_alignment_pairs), "--align_max_length", "64",
            "--align_weight", str(args.align_weight), "--align_schedule", args.align_schedule,
        ]  # fmt: skip
        if args.align_stop_gradient != "none":
            command += ["--align_stop_gradient", args.align_stop_gradient]
        if args.align_batch_size:
            command += ["--align_batch_size", str(args.align_batch_size)]
    else:
        command += ["--alignment", "false"]
    return command


def run_recipe(args, data: dict, arm: str, seed: int, adapter: str | None = None) -> dict:
    """Train (or, given `adapter`, only evaluate) one run through the recipe; its record for runs.jsonl."""
    run_dir = os.path.join(args.output_dir, "runs", f"{arm}-seed{seed}")
    command = recipe_command(args, data, arm, seed, run_dir)
    if adapter is not None:
        command += ["--eval_only", "--adapter_path", adapter]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    start = time.perf_counter()
    print(f"[transfer] {arm} seed {seed}: {' '.join(command)}", flush=True)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "recipe.log"), "w") as f:
        f.write(done.stdout + "\n" + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"The {arm} run (seed {seed}) failed:\n{done.stderr[-4000:]}")
    with open(os.path.join(run_dir, "eval_results.json")) as f:
        results = json.load(f)
    metric = results["main_metric"]
    trained = adapter or run_dir
    checkpoints = sorted(
        (d for d in os.listdir(trained) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1])
    )
    with open(os.path.join(trained, checkpoints[-1], "trainer_state.json")) as f:
        state = json.load(f)
    log = state["log_history"]
    return {
        "kind": "task",
        "arm": arm,
        "seed": seed,
        "metric": metric,
        "scores": {lang: scores[metric] for lang, scores in results["languages"].items()},
        "reference_loss": {lang: scores.get("reference_loss") for lang, scores in results["languages"].items()},
        "num_examples": {lang: scores["num_examples"] for lang, scores in results["languages"].items()},
        "global_step": state["global_step"],
        # The task loss of each logged step (the aligned arm's alignment-only steps log `align_loss` alone)
        "losses": [
            entry.get("task_loss", entry["loss"])
            for entry in log
            if "loss" in entry and ("task_loss" in entry or "align_loss" not in entry)
        ],
        "alignment_losses": [entry[k] for entry in log for k in entry if k.startswith("align") and "loss" in k],
        "wall_s": round(wall, 1),
        "run_dir": os.path.relpath(run_dir, args.output_dir),
        **({"evaluated_from": os.path.abspath(adapter)} if adapter else {}),
    }


def adapters_of(source_dir: str) -> dict[tuple[str, int], str]:
    """The adapter folder of every task run recorded in `source_dir` (`--evaluate_from`), by `(arm, seed)`."""
    adapters = {}
    for record in read_runs(source_dir):
        if record["kind"] == "task":
            path = record.get("evaluated_from") or os.path.join(source_dir, record["run_dir"])
            if not os.path.isfile(os.path.join(path, "adapter_config.json")):
                raise ValueError(
                    f"--evaluate_from {source_dir}: the {record['arm']} run of seed {record['seed']} has no adapter "
                    f"in {path}; finish or rerun that run first."
                )
            adapters[record["arm"], record["seed"]] = path
    if not adapters:
        raise ValueError(f"--evaluate_from {source_dir}: its runs.jsonl records no finished run to evaluate.")
    return adapters


# Settings the baseline arm depends on; `--baseline_from` refuses an earlier run that differs in any of them.
BASELINE_SETTINGS = (
    "task", "model_name", "train_languages", "max_steps", "batch_size", "learning_rate", "max_chars", "max_length",
    "max_eval", "max_new_tokens", "probe_pairs", "directions", "data_seed",
)  # fmt: skip


def reuse_baseline(source_dir: str, output_dir: str, settings: dict, data: dict) -> None:
    """Copy the baseline records (and the base model's probe) of `source_dir` into `output_dir`'s runs.jsonl.

    Refuses, naming the setting or file, unless the earlier run trained its baseline on the same task data with the
    same settings and evaluated and probed the same rows.
    """
    source = read_settings(source_dir, "--baseline_from")
    for key in BASELINE_SETTINGS:
        if source.get(key) != settings.get(key):
            raise ValueError(
                f"--baseline_from {source_dir}: its baseline ran with {key}={source.get(key)!r}, this run asks for "
                f"{key}={settings.get(key)!r}; pass the same value or drop --baseline_from."
            )
    for path in (data["dataset"], data["probe_pairs"]):
        theirs = os.path.join(source_dir, os.path.relpath(path, output_dir))
        with open(path, "rb") as f:
            ours = f.read()
        same = False
        if os.path.isfile(theirs):
            with open(theirs, "rb") as f:
                same = f.read() == ours
        if not same:
            raise ValueError(
                f"--baseline_from {source_dir}: {theirs} differs from (or lacks) this run's {path}; the baseline "
                "would be scored on other rows. Rebuild it with the same languages and data settings."
            )
    done = recorded_runs(output_dir)
    for record in read_runs(source_dir):
        if record["arm"] in ("base", "baseline") and run_key(record) not in done:
            if "run_dir" in record:
                record["run_dir"] = os.path.relpath(os.path.join(source_dir, record["run_dir"]), output_dir)
            append_run(output_dir, {**record, "reused_from": os.path.abspath(source_dir)})


# ----------------------------------------------------------------------------------------------------------------------
# Report
def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return None
    return statistics.correlation(xs, ys)


def help_language(code: str, languages: dict[str, str]) -> str:
    """The help language of a recipe code (a direction counts as its non-English side)."""
    inverse = {v: k for k, v in languages.items()}
    if code in inverse:
        return inverse[code]
    parts = [p for p in code.split("-") if p != "en"]
    return inverse.get(parts[0], parts[0]) if parts else "en"


def build_report(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "data", "data.json")) as f:
        data = json.load(f)
    with open(os.path.join(output_dir, "settings.json")) as f:
        settings = json.load(f)
    runs = read_runs(output_dir)
    tasks = [r for r in runs if r["kind"] == "task"]
    probes = [r for r in runs if r["kind"] == "probe"]
    seeds = sorted({r["seed"] for r in tasks})
    eval_languages = data["eval_languages"]

    def per_seed(key: str) -> dict[str, dict[str, list]]:
        """{arm: {language: [the runs' `key` value per seed]}} (None where a run or value is missing)."""
        arms = {}
        for arm in ("baseline", "aligned"):
            by_seed = {r["seed"]: r.get(key) or {} for r in tasks if r["arm"] == arm}
            arms[arm] = {lang: [by_seed.get(s, {}).get(lang) for s in seeds] for lang in eval_languages}
        return arms

    def paired(arms: dict) -> dict[str, list[float]]:
        return {
            lang: [
                a - b for a, b in zip(arms["aligned"][lang], arms["baseline"][lang]) if a is not None and b is not None
            ]
            for lang in eval_languages
        }

    arms, losses = per_seed("scores"), per_seed("reference_loss")
    languages = data["languages"]
    layer = int(settings["align_layer"])
    base = next((p for p in probes if p["arm"] == "base"), None)
    retrieval = {}
    if base is not None:
        retrieval["base"] = base["retrieval"]
        for arm in ("baseline", "aligned"):
            curves = [p["retrieval"] for p in probes if p["arm"] == arm]
            if curves:
                retrieval[arm] = {
                    lang: [statistics.fmean(c[lang][i] for c in curves) for i in range(len(base["layers"]))]
                    for lang in curves[0]
                }
    gains = paired(arms)
    correlation = None
    if base is not None:
        index = base["layers"].index(layer) if layer in base["layers"] else None
        by_help: dict[str, list[float]] = {}
        for lang in eval_languages:
            if gains[lang]:
                by_help.setdefault(help_language(lang, languages), []).append(statistics.fmean(gains[lang]))
        xs, ys = [], []
        for help_code, values in by_help.items():
            if index is not None and help_code in base["retrieval"]:
                xs.append(base["retrieval"][help_code][index])
                ys.append(statistics.fmean(values))
        correlation = {"pearson_r": _pearson(xs, ys), "num_languages": len(xs), "layer": layer}
    alignment_help = settings["alignment_languages"]
    train_help = settings["train_languages"]
    groups = {
        "alignment languages": [x for x in eval_languages if help_language(x, languages) in alignment_help],
        "unseen": [
            x for x in eval_languages if help_language(x, languages) not in [*alignment_help, *train_help, "en"]
        ],
        "low-resource (hi, km)": [x for x in eval_languages if help_language(x, languages) in LOW_RESOURCE],
    }
    transfer = {
        "task": settings["task"],
        "model": settings["model_name"],
        "metric": tasks[0]["metric"] if tasks else None,
        "train_languages": data["train_languages"],
        "alignment_languages": data["alignment_languages"],
        "eval_languages": eval_languages,
        "seeds": seeds,
        "baseline": arms["baseline"],
        "aligned": arms["aligned"],
        "paired_difference": gains,
        # The teacher-forced loss per reference token (lower is better), same layout
        "reference_loss": {**losses, "paired_difference": paired(losses)},
        "groups": groups,
        "retrieval_accuracy": {"layers": base["layers"] if base else None, "align_layer": layer, **retrieval},
        "base_retrieval_vs_gain": correlation,
        "steps": {r["arm"]: r["global_step"] for r in tasks},
        "settings": settings,
        "data_counts": data["counts"],
        "failed_languages": data.get("failed_languages", {}),
    }
    with open(os.path.join(output_dir, JSON_FILE), "w") as f:
        json.dump(transfer, f, indent=2, ensure_ascii=False)
    write_markdown(output_dir, transfer, tasks)
    write_plot(output_dir, transfer)
    return transfer


def _fmt(mean: float, std: float) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def _score_tables(values: dict, languages: list[str], groups: dict[str, list[str]]) -> list[str]:
    """Markdown lines: per language mean ± std of `values["baseline"]`, `["aligned"]`, `["paired_difference"]`, then
    the unweighted means over each group of languages."""
    lines = ["| language | baseline | aligned | aligned - baseline |", "|---|---|---|---|"]
    for lang in languages:
        cells = [_fmt(*_mean_std(values[key][lang])) for key in ("baseline", "aligned", "paired_difference")]
        lines.append(f"| {lang} | {' | '.join(cells)} |")
    lines += ["", "| group | languages | baseline | aligned | aligned - baseline |", "|---|---|---|---|---|"]
    for group, members in groups.items():
        row = []
        for key in ("baseline", "aligned", "paired_difference"):
            per_language = [
                statistics.fmean(v) for lang in members if (v := [x for x in values[key][lang] if x is not None])
            ]
            row.append(f"{statistics.fmean(per_language):.3f}" if per_language else "n/a")
        lines.append(f"| {group} | {', '.join(members) or '-'} | {' | '.join(row)} |")
    return lines


def write_markdown(output_dir: str, transfer: dict, tasks: list[dict]) -> None:
    metric = transfer["metric"]
    lines = [
        f"# Task transfer: {transfer['task']} ({transfer['model']})",
        "",
        f"Metric: `{metric}`, seeds {transfer['seeds']}; task data {transfer['train_languages']}, alignment pairs "
        f"{transfer['alignment_languages']}. Optimizer steps: "
        + ", ".join(f"{arm} {steps}" for arm, steps in transfer["steps"].items())
        + " (the alternate schedule spends every second micro-batch on alignment).",
        "",
        *_score_tables(transfer, transfer["eval_languages"], transfer["groups"]),
    ]
    if any(
        v is not None for arm in ("baseline", "aligned") for vs in transfer["reference_loss"][arm].values() for v in vs
    ):
        lines += [
            "",
            "Teacher-forced loss per reference token (nats, lower is better) on the same evaluation rows:",
            "",
            *_score_tables(transfer["reference_loss"], transfer["eval_languages"], transfer["groups"]),
        ]
    retrieval = transfer["retrieval_accuracy"]
    if retrieval.get("base"):
        index = retrieval["layers"].index(retrieval["align_layer"])
        lines += [
            "",
            f"Retrieval accuracy at layer {retrieval['align_layer']} (held-out eval-page pairs; the whole curve is in "
            "transfer.json):",
            "",
            "| language | base | after baseline | after aligned |",
            "|---|---|---|---|",
        ]
        for lang, curve in retrieval["base"].items():
            after = [retrieval.get(arm, {}).get(lang) for arm in ("baseline", "aligned")]
            cells = [f"{c[index]:.3f}" if c else "n/a" for c in after]
            lines.append(f"| {lang} | {curve[index]:.3f} | {' | '.join(cells)} |")
        corr = transfer["base_retrieval_vs_gain"]
        r = corr["pearson_r"]
        lines += [
            "",
            f"Pearson r between base retrieval and task gain over {corr['num_languages']} languages: "
            + ("n/a (fewer than 3 languages or no spread)" if r is None else f"{r:.3f}"),
        ]
    lines += ["", "Runs:", ""]
    for run in tasks:
        losses = run["losses"]
        lines.append(
            f"- {run['arm']} seed {run['seed']}: {run['global_step']} steps, task loss {losses[0]:.3f} -> "
            f"{losses[-1]:.3f}, {run['wall_s']:.0f} s"
            if losses
            else f"- {run['arm']} seed {run['seed']}: no loss logged"
        )
    with open(os.path.join(output_dir, MD_FILE), "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(output_dir: str, transfer: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[transfer] no plot: matplotlib is not installed", flush=True)
        return
    languages = transfer["eval_languages"]
    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(languages)), 4))
    width = 0.4
    for offset, arm in ((-width / 2, "baseline"), (width / 2, "aligned")):
        stats = [_mean_std(transfer[arm][lang]) for lang in languages]
        axis.bar(
            [i + offset for i in range(len(languages))],
            [0 if math.isnan(m) else m for m, _ in stats],
            width,
            yerr=[0 if math.isnan(s) else s for _, s in stats],
            label=arm,
        )
    axis.set_xticks(range(len(languages)))
    axis.set_xticklabels(languages, rotation=45, ha="right")
    axis.set_ylabel(transfer["metric"] or "score")
    axis.set_title(f"{transfer['task']}: per language, mean ± std over seeds {transfer['seeds']}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, PLOT_FILE), dpi=120)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.report_only:
        transfer = build_report(args.output_dir)
        print(f"[transfer] report rebuilt in {args.output_dir}", flush=True)
        return transfer
    start = time.perf_counter()
    if args.model is None:
        from trl_midalign.demo import gemma3_270m

        args.model = gemma3_270m()
    model_name = "gemma-3-270m" if "gemma-3-270m" in args.model else os.path.basename(args.model.rstrip("/"))
    if args.evaluate_from and model_name != read_settings(args.evaluate_from, "--evaluate_from")["model_name"]:
        raise ValueError(
            f"--evaluate_from {args.evaluate_from}: its adapters belong to another model than {args.model}."
        )
    settings = {
        "task": args.task,
        "model_name": model_name,
        "train_languages": args.train_languages,
        **{k: getattr(args, k) for k in (
            "quick", "seeds", "max_steps", "aligned_steps_factor", "batch_size", "learning_rate", "align_layer",
            "align_weight", "align_schedule", "align_stop_gradient", "align_batch_size", "max_chars", "max_length",
            "max_eval", "max_new_tokens", "max_alignment_pairs", "probe_pairs", "directions", "data_seed",
            "baseline_from", "evaluate_from",
        )},
    }  # fmt: skip
    check_resume(args.output_dir, settings)  # before build_data rewrites the data files of the recorded runs
    data = build_data(args)
    settings["alignment_languages"] = [lang for lang in args.alignment_languages if lang in data["languages"]]
    check_resume(args.output_dir, settings)  # the alignment languages are known (installed) only now
    with open(os.path.join(args.output_dir, "settings.json"), "w") as f:
        json.dump(settings, f, indent=2)
    if args.baseline_from:
        reuse_baseline(args.baseline_from, args.output_dir, settings, data)
    adapters = adapters_of(args.evaluate_from) if args.evaluate_from else None
    done = recorded_runs(args.output_dir)
    layer = int(args.align_layer)
    if ("probe", "base", None) not in done:
        result = probe(args.model, None, data["probe_pairs"], args.probe_pairs, layer)
        append_run(args.output_dir, {"kind": "probe", "arm": "base", "seed": None, **result})
    lock = threading.Lock()

    def run_and_probe(arm: str, seed: int) -> None:
        adapter = adapters[arm, seed] if adapters else None
        if ("task", arm, seed) not in done:
            record = run_recipe(args, data, arm, seed, adapter)
            with lock:
                append_run(args.output_dir, record)
            print(f"[transfer] {arm} seed {seed}: {record['scores']} ({record['wall_s']:.0f} s)", flush=True)
        if ("probe", arm, seed) not in done:
            adapter = adapter or os.path.join(args.output_dir, "runs", f"{arm}-seed{seed}")
            result = probe(args.model, adapter, data["probe_pairs"], args.probe_pairs, layer)
            with lock:
                append_run(args.output_dir, {"kind": "probe", "arm": arm, "seed": seed, **result})

    if args.jobs > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))  # the probes run in this process
    runs = [(arm, seed) for seed in range(args.seeds) for arm in ("baseline", "aligned")]
    if adapters:
        runs = [run for run in runs if run in adapters]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(run_and_probe, arm, seed) for arm, seed in runs]:
            future.result()  # re-raises a failed run
    transfer = build_report(args.output_dir)
    print(f"[transfer] done in {time.perf_counter() - start:.0f} s; report in {args.output_dir}", flush=True)
    return transfer


if __name__ == "__main__":
    main()
