"""Wall time of the recipes' evaluation on CPU: generation, the teacher-forced reference loss, and label scoring.

Rows are LibreOffice help paragraphs labelled by the application their page belongs to (the classification task);
the prompts are those of `trl_midalign.tasks.classification`. Three parts are timed on the same rows:

- `generate`: greedy generation of `--max_new_tokens` tokens (`report.generate_completions`);
- `reference`: the teacher-forced loss of each row's label (`report.reference_losses`);
- `labels`: the summed completion NLL of every label for every row, the classification task's scoring. Before this
  existed, the way to get it with the library was `reference_losses` over every (row, label) pair (`--labels_as_rows`).

    python benchmarks/evaluation.py --model tiny --rows 64
    python benchmarks/evaluation.py --model gemma --rows 64 --parts generate reference labels

Timings exclude loading; each part runs once after a warm-up on 4 rows.
"""

import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_midalign.tasks import report


APPS = ("swriter", "scalc", "simpress", "sdraw", "sbasic", "smath", "schart", "sdatabase", "shared")
PROMPT = "Which LibreOffice application is this help text about? Answer with one of: {labels}.\nText: {text}"


def rows(count: int, max_chars: int) -> list[tuple[str, str]]:
    """`count` English help paragraphs of at least 40 characters, cut at `max_chars`, with their application."""
    from trl_midalign.demo.libreoffice import help_paragraphs

    found = []
    for key, text in help_paragraphs("en").items():
        app = key.split("/")[1] if key.startswith("text/") else None
        if app in APPS and len(text) >= 40:
            found.append((text[:max_chars], app))
    step = max(1, len(found) // count)
    return found[::step][:count]


def tiny_model():
    """A tiny Llama (4 layers, hidden 64) on the offline tokenizer of the tests."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from testing_utils import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    return build_model("llama", len(tokenizer), seed=0).eval(), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "gemma"], default="tiny")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max_chars", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--parts", nargs="+", default=["generate", "reference", "labels"])
    parser.add_argument("--labels_as_rows", action="store_true", help="label scoring through reference_losses")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.model == "tiny":
        model, tokenizer = tiny_model()
    else:
        from trl_midalign.demo import gemma3_270m

        path = gemma3_270m()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    data = rows(args.rows, args.max_chars)
    prompts = [PROMPT.format(labels=", ".join(APPS), text=text) + "\n" for text, _ in data]
    labels = [label for _, label in data]

    def run(part: str, prompts: list[str], labels: list[str]):
        kwargs = {"batch_size": args.batch_size, "disable_progress": True}
        if part == "generate":
            return report.generate_completions(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, **kwargs)
        if part == "reference":
            return report.reference_losses(model, tokenizer, prompts, labels, **kwargs)
        if args.labels_as_rows:
            pairs = [(p, label) for p in prompts for label in APPS]
            return report.reference_losses(model, tokenizer, [p for p, _ in pairs], [x for _, x in pairs], **kwargs)
        return report.label_log_likelihoods(model, tokenizer, prompts, APPS, **kwargs)

    tokens = sum(len(report.tokenize_prompt(tokenizer, p)) for p in prompts)
    print(
        f"model={args.model} rows={len(prompts)} prompt tokens={tokens} batch_size={args.batch_size} "
        f"max_new_tokens={args.max_new_tokens} threads={args.threads} torch={torch.__version__}"
    )
    for part in args.parts:
        run(part, prompts[:4], labels[:4])  # warm-up
        load = os.getloadavg()[0]
        start, cpu = time.perf_counter(), time.process_time()
        run(part, prompts, labels)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        name = "labels (as rows)" if part == "labels" and args.labels_as_rows else part
        print(f"{name}: {wall:.2f} s wall, {cpu:.2f} s CPU, load {load:.2f} -> {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
