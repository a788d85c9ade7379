"""Model cards and Hub pushes for adapters trained by the recipes.

A pushed repository holds what `PeftModel.from_pretrained(base_model, repo_id)` needs (the adapter's config and
weights), the tokenizer files, the evaluation results and plots, and a model card (`README.md`) that records the base
model, the `align_*` settings, the languages of the task and alignment data and the per-language results.
"""

import os
from collections.abc import Sequence
from typing import Any

import yaml

from .evaluation import PLOT_FILE, RESULTS_FILE, TABLE_FILE, results_table


# Files of an output directory that belong on the Hub: the adapter, the tokenizer, the card, results and plots.
PUSH_PATTERNS = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "README.md",
    RESULTS_FILE,
    TABLE_FILE,
    "*.png",
]
PROBE_PLOTS = ("probe_curve.png", "probe_heatmap.png")

_CITATION = """\
@inproceedings{liu2025middle,
    title     = {{Middle-Layer Representation Alignment for Cross-Lingual Transfer in Fine-Tuned LLMs}},
    author    = {Danni Liu and Jan Niehues},
    year      = 2025,
    booktitle = {Proceedings of the 63rd Annual Meeting of the Association for Computational Linguistics},
}"""


def check_hub_settings(push_to_hub: bool, hub_model_id: str | None) -> None:
    """
    Fail before training when a push is asked for without a repository id.

    Args:
        push_to_hub (`bool`):
            Whether the run pushes at the end.
        hub_model_id (`str` or `None`):
            The target repository, `"user/name"` or `"org/name"`.
    """
    if push_to_hub and not hub_model_id:
        raise ValueError(
            "--push_to_hub needs --hub_model_id: name the repository to push to, e.g. "
            "`--hub_model_id your-name/llama3-massive-midalign` (or drop --push_to_hub)."
        )
    if push_to_hub and hub_model_id.count("/") > 1:
        raise ValueError(f"hub_model_id={hub_model_id!r} is not a repository id; use 'owner/name'.")


def find_probe_plots(output_dir: str) -> list[str]:
    """
    Probe plots of a run, relative to `output_dir`: those at its top level, else those of the latest
    `layer_probe/step-*` folder written by [`LayerProbeCallback`].

    Args:
        output_dir (`str`):
            The run's output directory.

    Returns:
        `list[str]`: relative paths of the plots found (possibly empty).
    """
    found = [name for name in PROBE_PLOTS if os.path.isfile(os.path.join(output_dir, name))]
    if found:
        return found
    probe_root = os.path.join(output_dir, "layer_probe")
    if not os.path.isdir(probe_root):
        return []
    steps = [d for d in os.listdir(probe_root) if d.startswith("step-") and d[5:].isdigit()]
    for step in sorted(steps, key=lambda d: int(d[5:]), reverse=True):
        found = [
            f"layer_probe/{step}/{name}"
            for name in PROBE_PLOTS
            if os.path.isfile(os.path.join(probe_root, step, name))
        ]
        if found:
            return found
    return []


def model_card(
    base_model: str,
    task: str,
    train_languages: Sequence[str],
    alignment_languages: Sequence[str],
    align_settings: dict[str, Any] | None,
    results: dict | None = None,
    datasets: Sequence[str] = (),
    training_settings: dict[str, Any] | None = None,
    plots: Sequence[str] = (),
    repo_id: str | None = None,
) -> str:
    """
    The text of the model card (`README.md`) of an adapter trained by a recipe.

    Args:
        base_model (`str`):
            The model the adapter was trained on (a Hub id, or a local path that is then not put in the metadata).
        task (`str`):
            Recipe name, e.g. `"slot_filling"`.
        train_languages (`Sequence[str]`):
            Languages (or directions) of the task training data.
        alignment_languages (`Sequence[str]`):
            Languages of the alignment pairs (empty for a baseline).
        align_settings (`dict[str, Any]` or `None`):
            The `align_*` settings and the resolved layer of an aligned run; `None` for a plain-SFT baseline.
        results (`dict`, *optional*):
            Evaluation results (see [`~trl_midalign.evaluation.write_results`]).
        datasets (`Sequence[str]`, *optional*):
            Hub ids of the datasets used (local paths are left out of the metadata).
        training_settings (`dict[str, Any]`, *optional*):
            Other settings worth recording (learning rate, LoRA rank, ...).
        plots (`Sequence[str]`, *optional*):
            Plot files (relative paths in the repository) to show: evaluation and probe plots.
        repo_id (`str`, *optional*):
            The repository the card is for, used in the loading snippet.

    Returns:
        `str`: the card, YAML metadata included.
    """
    hub_base = base_model if base_model and not os.path.exists(base_model) else None
    tags = ["trl", "sft", "peft", "lora", "trl-midalign"]
    if align_settings is not None:
        tags.append("cross-lingual-alignment")
    # ISO codes for the metadata: "de-DE" (a locale), "de_pud" (a treebank) and "en-de" (a direction) give "de" (and "en").
    codes = [*train_languages, *alignment_languages, *(results or {}).get("languages", {})]
    languages = sorted(
        {part for code in codes for part in code.split("_")[0].split("-") if part.isalpha() and part.islower()}
    )
    metadata: dict[str, Any] = {"library_name": "peft", "tags": tags}
    if hub_base:
        metadata["base_model"] = hub_base
    hub_datasets = [d for d in datasets if d and not os.path.exists(d)]
    if hub_datasets:
        metadata["datasets"] = hub_datasets
    if languages:
        metadata["language"] = [code for code in languages if len(code) in (2, 3)]
    run = "aligned" if align_settings is not None else "baseline"
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).strip(),
        "---",
        "",
        f"# {repo_id.split('/')[-1] if repo_id else os.path.basename(base_model.rstrip('/'))}: {task} ({run})",
        "",
        f"A LoRA adapter for `{base_model}` trained with the `{task}` recipe of trl-midalign.",
    ]
    if align_settings is not None:
        lines.append(
            "Alongside the task loss, a contrastive loss aligned the representations of parallel sentences at a middle "
            "layer (Liu & Niehues, 2025, [arXiv:2502.14830](https://huggingface.co/papers/2502.14830)), to improve "
            "transfer of the task to languages without task data."
        )
    else:
        lines.append("This is the plain supervised fine-tuning baseline (no alignment loss).")
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_model}")',
        f'model = PeftModel.from_pretrained(base, "{repo_id or "<this repository>"}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id or "<this repository>"}")',
        "```",
        "",
        "## Languages",
        "",
        f"- task training data: {', '.join(train_languages) or 'none'}",
        f"- alignment pairs: {', '.join(alignment_languages) or 'none'}",
        "",
    ]
    if align_settings is not None:
        lines += ["## Alignment settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| `{name}` | `{value!r}` |" for name, value in align_settings.items()]
        lines.append("")
    if training_settings:
        lines += ["## Training settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| `{name}` | `{value!r}` |" for name, value in training_settings.items()]
        lines.append("")
    if results is not None:
        lines += [f"## Evaluation ({results.get('main_metric', '')})", "", results_table(results)]
    for plot in plots:
        title = "Evaluation per language" if os.path.basename(plot) == PLOT_FILE else "Cross-lingual alignment probe"
        lines += [f"### {title}", "", f"![{title}]({plot})", ""]
    lines += ["## Citation", "", "```bibtex", _CITATION, "```", ""]
    return "\n".join(lines)


def push_folder(
    folder: str,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload adapter trained with trl-midalign",
    extra_patterns: Sequence[str] = (),
) -> str:
    """
    Create the repository if needed and upload the adapter, tokenizer, card, results and plots of `folder`.

    Checkpoints, optimizer states and training arguments stay local: only files matching [`PUSH_PATTERNS`] (and
    `extra_patterns`) are uploaded.

    Args:
        folder (`str`):
            The output directory of a run (after `trainer.save_model` and the evaluation).
        repo_id (`str`):
            Target repository, `"owner/name"`.
        private (`bool`, *optional*):
            Create the repository as private.
        token (`str`, *optional*):
            Hub token; defaults to the logged-in one.
        revision (`str`, *optional*):
            Branch to push to; defaults to the main branch.
        commit_message (`str`, *optional*, defaults to `"Upload adapter trained with trl-midalign"`):
            Commit message.
        extra_patterns (`Sequence[str]`, *optional*):
            More glob patterns of files to upload, relative to `folder`.

    Returns:
        `str`: the URL of the commit.
    """
    from huggingface_hub import HfApi

    if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        raise FileNotFoundError(
            f"{folder} has no adapter_config.json: push the output_dir of a LoRA run (use_peft) after it was saved."
        )
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        allow_patterns=[*PUSH_PATTERNS, *extra_patterns],
        ignore_patterns=["checkpoint-*/**"],
        commit_message=commit_message,
        revision=revision,
    )
    return str(getattr(commit, "commit_url", commit))
