"""What the recipes in `recipes/` share, so that each of them reads as one straight `main` (load -> trainer -> train ->
save -> evaluate -> push), as TRL's `trl/scripts/sft.py` does: the checks before any model is loaded, loading a saved adapter for `--eval_only`, the evaluation, model-card section and Hub upload of a
run, and the end of a multi-process run.

The task-specific parts (arguments, prompts, formats, metrics, pairs) live in [`trl_midalign.tasks`].
"""

import json
import os
import time
from collections.abc import Sequence
from typing import Any

from ._logging import get_logger
from .tasks import report
from .tasks.report import PLOT_FILE, RESULTS_FILE, TABLE_FILE, is_local_path, public_name


logger = get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Before any model is loaded
def check_hub_settings(push_to_hub: bool, hub_model_id: str | None) -> None:
    """Fail before training when a push is asked for without a repository id (or with one that is not `owner/name`)."""
    if push_to_hub and not hub_model_id:
        raise ValueError(
            "--push_to_hub needs --hub_model_id: name the repository to push to, e.g. "
            "`--hub_model_id your-name/llama3-massive-midalign` (or drop --push_to_hub)."
        )
    if push_to_hub and hub_model_id.count("/") > 1:
        raise ValueError(f"hub_model_id={hub_model_id!r} is not a repository id; use 'owner/name'.")


def keep_hub_token_off_disk(training_args) -> bool:
    """
    Move a `--hub_token` out of the training arguments into this process's environment (`HF_TOKEN`).

    transformers pickles the whole `TrainingArguments` into `training_args.bin` in `output_dir` and in every
    checkpoint, so a token left in `hub_token` would be written to disk in plain text. In `HF_TOKEN` it stays in
    memory, and every Hub call of the run (model and dataset downloads, the final push) still uses it.

    Args:
        training_args:
            The recipe's `AlignmentConfig`; its `hub_token` is set to `None`.

    Returns:
        `bool`: whether a token was moved.
    """
    token = getattr(training_args, "hub_token", None)
    if not token:
        return False
    os.environ["HF_TOKEN"] = token
    training_args.hub_token = None
    logger.info(
        "--hub_token was moved to this process's HF_TOKEN environment variable so that it is not saved in "
        "training_args.bin; `hf auth login` or exporting HF_TOKEN avoids passing it on the command line."
    )
    return True


def deepspeed_zero_stage(accelerator=None) -> int | None:
    """The DeepSpeed ZeRO stage of this launch, or `None` without DeepSpeed."""
    if accelerator is not None and getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        return accelerator.state.deepspeed_plugin.zero_stage
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        return int(stage) if stage else None
    return None


def check_launch(training_args, model_args, script_args) -> None:
    """
    Errors that must come before any model is loaded: a push without a repository id (or of an adapter outside
    `output_dir` with `--eval_only`), a quantized model under DeepSpeed ZeRO-3 (bitsandbytes weights cannot be
    partitioned), and full fine-tuning. Also takes a `--hub_token`
    out of the training arguments before anything can save them (see [`keep_hub_token_off_disk`]).
    """
    keep_hub_token_off_disk(training_args)
    check_hub_settings(training_args.push_to_hub, training_args.hub_model_id)
    if (model_args.load_in_4bit or model_args.load_in_8bit) and deepspeed_zero_stage() == 3:
        raise ValueError(
            "load_in_4bit/load_in_8bit cannot be combined with DeepSpeed ZeRO-3: quantized weights cannot be "
            "partitioned. Use a ZeRO-2 or DDP accelerate config for QLoRA, or drop the quantization."
        )
    adapter_path = os.path.abspath(script_args.adapter_path or training_args.output_dir)
    if (
        script_args.eval_only
        and training_args.push_to_hub
        and adapter_path != os.path.abspath(training_args.output_dir)
    ):
        raise ValueError(
            "--eval_only with --push_to_hub pushes output_dir: keep the adapter there (no --adapter_path)."
        )
    if not script_args.eval_only and not model_args.use_peft:
        raise ValueError(
            "The recipes train LoRA adapters (the paper's setup, and what is evaluated and pushed): pass --use_peft "
            "(the shipped configs do)."
        )


def model_init_kwargs(training_args, model_args) -> dict:
    """The keyword arguments TRL's `sft.py` passes to `from_pretrained`, merged with `training_args.model_init_kwargs`."""
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=getattr(training_args, "trust_remote_code", False),
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        kwargs.update(training_args.model_init_kwargs)
    return kwargs


# ----------------------------------------------------------------------------------------------------------------------
# --eval_only
def load_adapter_for_eval(script_args, training_args, model_args) -> tuple[Any, Any, bool]:
    """
    Load the base model and the adapter at `adapter_path` (default `output_dir`) for `--eval_only`.

    Returns:
        `tuple`: the model, its tokenizer (the adapter's when it was saved with one) and whether the adapter was
        trained with the alignment loss (its model card, written by `AlignmentTrainer.create_model_card`, carries the
        `cross-lingual-alignment` tag).
    """
    from accelerate import PartialState
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = script_args.adapter_path or training_args.output_dir
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise FileNotFoundError(
            f"--eval_only: no adapter at {path} (adapter_config.json missing). Pass --adapter_path to a saved "
            "adapter, or train first."
        )
    kwargs = {k: v for k, v in model_init_kwargs(training_args, model_args).items() if v is not None}
    base = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    model = PeftModel.from_pretrained(base, path).to(PartialState().device)
    has_tokenizer = os.path.isfile(os.path.join(path, "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(path if has_tokenizer else model_args.model_name_or_path)
    card = os.path.join(path, "README.md")
    tags = (ModelCard.load(card).data.tags or []) if os.path.isfile(card) else []
    return model, tokenizer, "cross-lingual-alignment" in tags


# ----------------------------------------------------------------------------------------------------------------------
# The model card's settings and the Hub
def training_settings(training_args, model_args) -> dict[str, Any]:
    """The settings of a run worth recording in its model card besides the `align_*` ones: optimizer and LoRA."""
    scheduler = training_args.lr_scheduler_type
    return {
        "learning_rate": training_args.learning_rate,
        "lr_scheduler_type": str(getattr(scheduler, "value", scheduler)),
        "warmup_steps": training_args.warmup_steps,
        "num_train_epochs": training_args.num_train_epochs,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "lora_r": model_args.lora_r,
        "lora_alpha": model_args.lora_alpha,
        "lora_dropout": model_args.lora_dropout,
        "lora_target_modules": model_args.lora_target_modules,
    }


def model_card_arguments(args: tuple, task: str) -> dict[str, Any]:
    """
    The arguments of `trainer.create_model_card` for a recipe run: the model's name (the Hub repository's, else the
    output folder's), the training dataset when it is a Hub dataset (a local path is never written into the card) and
    the tags `trl-midalign` and the task's name.

    Args:
        args (`tuple`):
            The recipe's `(script_args, training_args, model_args)`.
        task (`str`):
            The task's name, e.g. `"slot_filling"`.
    """
    script_args, training_args, _ = args
    name = training_args.hub_model_id or os.path.abspath(training_args.output_dir)
    dataset = script_args.dataset_name
    return {
        "model_name": name.rstrip("/").split("/")[-1],
        "dataset_name": dataset if dataset and not is_local_path(dataset) else None,
        "tags": ["trl-midalign", task],
    }


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
    The files of `folder` that [`push_run_files`] uploads: those of [`PUSH_FILES`] present at its top level, then
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


def push_run_files(
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
    commit: the recipes' push, instead of `trainer.push_to_hub()`.

    `Trainer.push_to_hub` saves the model again, rewrites the model card (dropping the evaluation section the recipe
    added after training) and uploads the whole output directory but `_*` and `checkpoint-*`: `training_args.bin`,
    probe folders and any file a user keeps there would be published, and `adapter_config.json` would publish the
    local path of a local base model. This function uploads exactly the files of [`PUSH_FILES`] present at the top
    level of `folder`, and `extra_files` (see [`files_to_push`]); nothing else, whatever lies in the folder or its
    subfolders. A local `base_model_name_or_path` in `adapter_config.json` is uploaded as its folder name.

    Args:
        folder (`str`):
            The output directory of a run (after `trainer.save_model`, the evaluation and the model card).
        repo_id (`str`):
            Target repository, `"owner/name"`.
        private (`bool`, *optional*):
            Create the repository as private.
        token (`str`, *optional*):
            Hub token; defaults to the one of `hf auth login` or `$HF_TOKEN` (where [`keep_hub_token_off_disk`] put
            a `--hub_token`).
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
    url = str(getattr(commit, "commit_url", commit))
    logger.info(f"Pushed {folder} to {url}")
    return url


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation, model card and push of a run
def evaluate_run(
    model,
    tokenizer,
    examples: Sequence[dict],
    task,
    args: tuple,
    *,
    aligned: bool,
    alignment_languages: Sequence[str],
    language_groups: dict[str, list[str]],
    trainer=None,
    score=None,
    labels: Sequence[str] | None = None,
) -> dict | None:
    """
    [`~trl_midalign.tasks.report.evaluate_examples`] with a recipe's settings: generation split over the processes
    (in step under DeepSpeed ZeRO-3), scores per language, and the results, predictions and plot in `output_dir`.

    Args:
        model, tokenizer:
            The trained (unwrapped) model, or the adapter loaded for `--eval_only`, and its tokenizer.
        examples (`Sequence[dict]`):
            The task's evaluation examples (`language`, `prompt`, `reference`).
        task (`module`):
            The task module of [`trl_midalign.tasks`] (`NAME`, `MAIN_METRIC`, `score`).
        args (`tuple`):
            The recipe's `(script_args, training_args, model_args)`.
        aligned (`bool`):
            Whether the model was trained with the alignment loss (the results' `run` is then `"aligned"`).
        alignment_languages (`Sequence[str]`):
            Languages of the alignment pairs, recorded in the results.
        language_groups (`dict[str, list[str]]`):
            Groups of evaluated languages averaged in the report (see [`~trl_midalign.tasks.languages.language_groups`]).
        trainer (`Trainer`, *optional*):
            The trainer of the run (`None` with `--eval_only`).
        score (`Callable`, *optional*):
            Replaces `task.score` (e.g. translation's scorer that knows the source sentences).
        labels (`Sequence[str]`, *optional*):
            The label set of a classification task, scored by label likelihood instead of generation.

    Returns:
        `dict | None`: the results on the main process, `None` on the others.
    """
    script_args, training_args, model_args = args
    return report.evaluate_examples(
        model,
        tokenizer,
        examples,
        score or task.score,
        task=task.NAME,
        run="aligned" if aligned else "baseline",
        main_metric=task.MAIN_METRIC,
        output_dir=training_args.output_dir,
        max_new_tokens=script_args.max_new_tokens,
        batch_size=training_args.per_device_eval_batch_size,
        language_groups=language_groups,
        zero3=trainer is not None and deepspeed_zero_stage(trainer.accelerator) == 3,
        compare_with=script_args.compare_with,
        extra={
            "model": public_name(model_args.model_name_or_path),  # eval_results.json is pushed: no local path
            "train_languages": list(script_args.train_languages),
            "alignment_languages": list(alignment_languages),
        },
        labels=labels,
        max_generate=script_args.max_generate_samples,
    )


def publish_run(
    results: dict | None, args: tuple, *, aligned: bool, alignment_languages: Sequence[str], push_to_hub: bool
) -> None:
    """
    On the main process (where `results` is not `None`): add the run's section to the model card that
    `trainer.create_model_card` wrote (see [`~trl_midalign.tasks.report.write_card_section`]) and, with
    `push_to_hub`, upload exactly the run's files with [`push_run_files`].

    Args:
        results (`dict` or `None`):
            The run's evaluation results; `None` on the processes other than the main one.
        args (`tuple`):
            The recipe's `(script_args, training_args, model_args)`.
        aligned (`bool`):
            Whether the model was trained with the alignment loss.
        alignment_languages (`Sequence[str]`):
            Languages of the alignment pairs.
        push_to_hub (`bool`):
            Whether to push (the recipes turn `training_args.push_to_hub` off during training, so that `Trainer` does
            not push at every save).
    """
    if results is None:
        return
    script_args, training_args, model_args = args
    output_dir = training_args.output_dir
    report.write_card_section(
        output_dir,
        results,
        base_model=model_args.model_name_or_path,
        aligned=aligned,
        train_languages=script_args.train_languages,
        alignment_languages=alignment_languages,
        training_settings=training_settings(training_args, model_args),
        repo_id=training_args.hub_model_id,
    )
    if push_to_hub:
        push_run_files(
            output_dir,
            training_args.hub_model_id,
            private=training_args.hub_private_repo,
            revision=training_args.hub_revision,
            extra_files=report.find_probe_plots(output_dir),
        )


# ----------------------------------------------------------------------------------------------------------------------
# The end of a run
# Gloo's worker threads drop the objects of a collective just after it completes, and may need the GIL to do so. A
# process that reaches interpreter shutdown before they have aborts ("terminate called without an active exception",
# exit code -6) although its work is done. `python benchmarks/exit_race.py`: a 2-process Gloo program that ends
# right after all_gather_object and destroy_process_group aborted in 4 of 50 launches; with a barrier and this pause,
# in 0 of 50.
EXIT_PAUSE_SECONDS = 0.5


def end_processes(trainer=None) -> None:
    """
    End a run on every process together: wait for the others, destroy the process groups (through `trainer.end()`,
    which also closes the trackers), then pause briefly so the communication threads finish before Python shuts down.
    """
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:
        state.wait_for_everyone()
    if trainer is not None:
        trainer.end()
    else:
        state.destroy_process_group()
    if state.num_processes > 1:
        time.sleep(EXIT_PAUSE_SECONDS)
