"""Model cards and Hub pushes for adapters trained by the recipes.

A pushed repository holds what `PeftModel.from_pretrained(base_model, repo_id)` needs (the adapter's config and
weights), the tokenizer files, the evaluation results and plots, and a model card (`README.md`) that records the base
model, the `align_*` settings, the languages of the task and alignment data and the per-language results.

Nothing local leaves the machine by accident: exactly the files named in [`PUSH_FILES`] (top level of the output
directory) and those a caller names are uploaded, never a pattern that could match files in subfolders, and neither the
card nor the uploaded `adapter_config.json` holds a local filesystem path (a local base model appears by its folder
name).
"""

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import yaml

from .evaluation import PLOT_FILE, RESULTS_FILE, TABLE_FILE, results_table


# Files of an output directory that belong on the Hub, by exact name at its top level: the adapter, the tokenizer,
# the card, the evaluation results and their plot.
PUSH_FILES = (
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
    PLOT_FILE,
)
PROBE_PLOTS = ("probe_curve.png", "probe_heatmap.png")

_CITATION = """\
@inproceedings{liu2025middle,
    title     = {{Middle-Layer Representation Alignment for Cross-Lingual Transfer in Fine-Tuned LLMs}},
    author    = {Danni Liu and Jan Niehues},
    year      = 2025,
    booktitle = {Proceedings of the 63rd Annual Meeting of the Association for Computational Linguistics},
}"""


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_local_path(name_or_path: str) -> bool:
    """
    Whether a model or dataset name is a local filesystem path rather than a Hub id.

    Anything that exists on disk, is absolute, starts with `.` or `~`, or is not of the form `name` / `owner/name` is
    local.

    Args:
        name_or_path (`str`):
            A `model_name_or_path` or `dataset_name`.

    Returns:
        `bool`
    """
    value = os.fspath(name_or_path)
    return (
        os.path.isabs(value)
        or value.startswith((".", "~"))
        or os.path.exists(value)
        or _HUB_ID.fullmatch(value) is None
    )


def public_name(name_or_path: str) -> str:
    """
    The name of a model or dataset as it may appear in anything published: a Hub id unchanged, a local path reduced
    to its last folder name (`/home/me/models/Llama-3-8B/` gives `Llama-3-8B`).

    Args:
        name_or_path (`str`):
            A Hub id or a local path.

    Returns:
        `str`
    """
    value = os.fspath(name_or_path)
    if not is_local_path(value):
        return value
    return os.path.basename(os.path.normpath(os.path.expanduser(value))) or "local-model"


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
            The model the adapter was trained on: a Hub id, or a local path, of which the card shows only the folder
            name (no local path is written into the card).
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
            Hub ids of the datasets used (local paths are left out).
        training_settings (`dict[str, Any]`, *optional*):
            Other settings worth recording (learning rate, LoRA rank, ...).
        plots (`Sequence[str]`, *optional*):
            Plot files (relative paths in the repository) to show: evaluation and probe plots.
        repo_id (`str`, *optional*):
            The repository the card is for, used in the loading snippet.

    Returns:
        `str`: the card, YAML metadata included.
    """
    hub_base = base_model if base_model and not is_local_path(base_model) else None
    base_name = public_name(base_model) if base_model else "the base model"
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
    hub_datasets = [d for d in datasets if d and not is_local_path(d)]
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
        f"# {repo_id.split('/')[-1] if repo_id else base_name}: {task} ({run})",
        "",
        f"A LoRA adapter for `{base_name}`{'' if hub_base else ' (a local copy of the base model)'} trained with the "
        f"`{task}` recipe of trl-midalign.",
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
        f'base = AutoModelForCausalLM.from_pretrained("{hub_base or f"path/to/{base_name}"}")',
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


def _public_adapter_config(path: str) -> bytes | None:
    """`adapter_config.json` with a local `base_model_name_or_path` replaced by its folder name; `None` if unchanged."""
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not is_local_path(base):
        return None
    config["base_model_name_or_path"] = public_name(base)
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def files_to_push(folder: str, extra_files: Sequence[str] = ()) -> list[str]:
    """
    The files of `folder` that [`push_folder`] uploads: those of [`PUSH_FILES`] present at its top level, then
    `extra_files`.

    Args:
        folder (`str`):
            The output directory of a run.
        extra_files (`Sequence[str]`, *optional*):
            More files to upload, as paths relative to `folder` (for example `layer_probe/step-40/probe_curve.png`).

    Returns:
        `list[str]`: relative POSIX paths, without duplicates.

    Raises:
        ValueError: If an extra file is not a file inside `folder` (absolute, `..`, missing, or a link that leads
            outside it).
    """
    root = os.path.realpath(folder)
    names = [name for name in PUSH_FILES if os.path.isfile(os.path.join(folder, name))]
    for name in extra_files:
        relative = os.path.normpath(os.fspath(name)).replace(os.sep, "/")
        full = os.path.realpath(os.path.join(folder, relative))
        if os.path.isabs(os.fspath(name)) or relative.startswith("../") or relative == "..":
            raise ValueError(f"extra file {name!r} must be a path relative to {folder}, inside it.")
        if not os.path.isfile(full) or os.path.commonpath([root, full]) != root:
            raise ValueError(f"extra file {name!r} is not a file inside {folder}; nothing was uploaded.")
        names.append(relative)
    for name in names:  # a link at the top level could point anywhere
        full = os.path.realpath(os.path.join(folder, name))
        if os.path.commonpath([root, full]) != root:
            raise ValueError(f"{os.path.join(folder, name)} leads outside {folder} (a link?); nothing was uploaded.")
    return list(dict.fromkeys(names))


def push_folder(
    folder: str,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload adapter trained with trl-midalign",
    extra_files: Sequence[str] = (),
) -> str:
    """
    Create the repository if needed and upload the adapter, tokenizer, card, results and plot of `folder`, in one
    commit.

    Exactly the files of [`PUSH_FILES`] present at the top level of `folder`, and `extra_files`, are uploaded (see
    [`files_to_push`]); nothing else, whatever lies in the folder or its subfolders (checkpoints, optimizer states,
    `training_args.bin`, your own files). A local `base_model_name_or_path` in `adapter_config.json` is uploaded as
    its folder name, so that no local path is published.

    Args:
        folder (`str`):
            The output directory of a run (after `trainer.save_model` and the evaluation).
        repo_id (`str`):
            Target repository, `"owner/name"`.
        private (`bool`, *optional*):
            Create the repository as private.
        token (`str`, *optional*):
            Hub token; defaults to the one of `hf auth login` or `$HF_TOKEN`.
        revision (`str`, *optional*):
            Branch to push to; defaults to the main branch.
        commit_message (`str`, *optional*, defaults to `"Upload adapter trained with trl-midalign"`):
            Commit message.
        extra_files (`Sequence[str]`, *optional*):
            More files to upload, as exact paths relative to `folder` (no patterns).

    Returns:
        `str`: the URL of the commit.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        raise FileNotFoundError(
            f"{folder} has no adapter_config.json: push the output_dir of a LoRA run (use_peft) after it was saved."
        )
    operations = []
    for name in files_to_push(folder, extra_files):
        path = os.path.join(folder, name)
        content = _public_adapter_config(path) if name == "adapter_config.json" else None
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=content or path))
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.create_commit(
        repo_id=repo_id, operations=operations, commit_message=commit_message, revision=revision
    )
    return str(getattr(commit, "commit_url", commit))
