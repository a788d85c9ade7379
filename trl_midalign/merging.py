"""Combining separately trained LoRA adapters, for example a task adapter with an alignment adapter.

Liu & Niehues (2025, https://huggingface.co/papers/2502.14830) show that an alignment module trained on its own can
be merged into an existing task module and still improve cross-lingual transfer. [`merge_adapters`] does this with
PEFT's `add_weighted_adapter`; [`search_merge_weights`] picks the alignment adapter's weight on a dev set.

Three combinations are offered. With `w_i` the weights and `ΔW_i = s_i B_i A_i` the weight delta of adapter `i`
(`s_i` its scaling) on a module:

- `"cat"`: stacks the scaled `A_i` and the `B_i`; the merged delta is `Σ w_i ΔW_i` exactly and its rank is the sum
  of the input ranks. The default.
- `"svd"`: the truncated SVD of `Σ w_i ΔW_i` at rank `svd_rank`; exact when `svd_rank` is at least the rank of the
  sum, otherwise the best approximation of that rank (Eckart–Young). Costs one SVD per module.
- `"linear"`: `A = Σ sign(w_i) sqrt(|w_i s_i|) A_i`, `B = Σ sqrt(|w_i s_i|) B_i`, i.e. averaging in the space of
  the low-rank factors. Its delta contains cross terms `B_i A_j` and is not the weighted sum of the deltas; it is only
  meaningful for adapters trained from one shared initialisation (same `A` to start with), and needs equal ranks.

PEFT's `add_weighted_adapter` gives the merged adapter the `target_modules` and `layers_to_transform` of the *first*
input adapter (or the union of the target module names over all layers). When the adapters cover different modules,
which is the rule for an alignment adapter (it only touches the blocks below the aligned layer), that loses deltas or
fails. [`merge_adapters`] therefore gives the merged adapter the exact list of modules that any input adapter covers.
"""

import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import PeftConfig, PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging


logger = logging.get_logger(__name__)

COMBINATIONS = ("cat", "svd", "linear")
_MERGED_NAME = "default"  # saved at the root of output_dir, and what PeftModel.from_pretrained loads by default
_INPUT_PREFIX = "merge_input_"
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# LoRA settings whose effect is not a low-rank delta `s * B @ A` on a module's weight: these cannot be combined
# as a weighted sum of deltas (or PEFT refuses them in add_weighted_adapter).
_UNMERGEABLE_SETTINGS = (
    "use_dora",
    "lora_bias",
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
    "alora_invocation_tokens",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
    "use_qalora",
    "megatron_config",
)
# Mean |cosine| between the lora_A matrices of two adapters above which they count as sharing their initialisation
# (training moves A little; independently initialised A matrices have cosine close to 0).
_SHARED_INIT_THRESHOLD = 0.5
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")  # "gpt2" or "org/name"


# ---------------------------------------------------------------------------------------------------------------------
# Validation (runs before any model is loaded)
# ---------------------------------------------------------------------------------------------------------------------


def _check_names_and_weights(
    adapters: Mapping[str, str], weights: Mapping[str, float] | Sequence[float] | None
) -> dict[str, float]:
    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError(
            "adapters must be a non-empty dict {name: adapter directory}, for example "
            "{'task': 'out/task-lora', 'alignment': 'out/align-lora'} (CLI: --adapters task=PATH alignment=PATH)."
        )
    for name, path in adapters.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(
                f"Adapter name {name!r} is not valid: use letters, digits, '_' or '-' (it names the part in the "
                "model card)."
            )
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"adapters[{name!r}] must be the path of an adapter directory, got {path!r}.")
    names = list(adapters)
    if weights is None:
        values = dict.fromkeys(names, 1.0)
    elif isinstance(weights, Mapping):
        missing = [name for name in names if name not in weights]
        unknown = [name for name in weights if name not in adapters]
        if missing or unknown:
            raise ValueError(
                f"weights do not match the adapters: adapters are {names}, weights are given for {list(weights)} "
                f"(missing: {missing}, unknown: {unknown}). Give one weight per adapter name."
            )
        values = {name: weights[name] for name in names}
    elif isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ValueError(
            f"weights must be a dict {{name: weight}}, a list with one weight per adapter, or None, got {weights!r}."
        )
    else:
        if len(weights) != len(names):
            raise ValueError(
                f"weights has {len(weights)} value(s) but there are {len(names)} adapters {names}: give one weight per "
                "adapter, in the order of the adapters (CLI: --weights in the order of --adapters)."
            )
        values = dict(zip(names, weights))
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"The weight of adapter {name!r} must be a finite number, got {value!r}.")
    return {name: float(value) for name, value in values.items()}


def _check_combination(combination: str, svd_rank: int | None) -> None:
    if combination not in COMBINATIONS:
        raise ValueError(
            f"combination={combination!r} is not supported: use one of {list(COMBINATIONS)} ('cat' is the exact "
            "weighted sum of the adapters' deltas)."
        )
    if svd_rank is not None:
        if combination != "svd":
            raise ValueError(
                f"svd_rank={svd_rank} only applies to combination='svd' (got combination={combination!r}); drop "
                "svd_rank or use combination='svd'."
            )
        if isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1:
            raise ValueError(f"svd_rank must be a positive int, got {svd_rank!r}.")


def _resolve_adapter_dir(name: str, path: str | os.PathLike) -> str:
    """Local directory holding the adapter (downloaded first when `path` is a Hub repo id); checks its files."""
    path = os.fspath(path)
    if not os.path.exists(path):
        if not _REPO_ID.match(path):
            raise FileNotFoundError(
                f"Adapter {name!r}: {path!r} does not exist. Pass the directory written by save_pretrained (it holds "
                "adapter_config.json and adapter_model.safetensors) or a Hub repo id."
            )
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(path, allow_patterns=["adapter_config.json", "adapter_model.*", "tokenizer*"])
        except Exception as error:
            raise FileNotFoundError(
                f"Adapter {name!r}: {path!r} does not exist as a local directory and could not be fetched as a Hub "
                f"repo id ({type(error).__name__}: {error}). Check the path or repo id, or download it first."
            ) from error
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"Adapter {name!r}: {path!r} is a file; pass the adapter directory that contains adapter_config.json."
        )
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise FileNotFoundError(
            f"Adapter {name!r}: {path!r} has no adapter_config.json, so it is not a PEFT adapter directory. Pass the "
            "directory written by PeftModel.save_pretrained / trainer.save_model."
        )
    if not any(os.path.isfile(os.path.join(path, weight_file)) for weight_file in _WEIGHT_FILES):
        raise FileNotFoundError(
            f"Adapter {name!r}: {path!r} has adapter_config.json but no weights ({' or '.join(_WEIGHT_FILES)}). The "
            "save was incomplete; save the adapter again."
        )
    return path


_RESAVE = (
    "The file is corrupt or incomplete (an interrupted save, a partial copy or download, a full disk?): save the "
    "adapter again (PeftModel.save_pretrained / trainer.save_model) or retrain it."
)
# Keys of a LoRA adapter_config.json without which PEFT would silently fall back to its defaults (rank 8, alpha 8,
# its own guess of the target modules) and merge a delta other than the one that was trained.
_REQUIRED_LORA_KEYS = ("r", "lora_alpha", "target_modules")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_(?:embedding_)?[AB])(?:\.weight)?$")


def _read_adapter_config(name: str, path: str) -> PeftConfig:
    """Reads `adapter_config.json` with errors that name the adapter and the file."""
    file = os.path.join(path, "adapter_config.json")
    try:
        with open(file, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"Adapter {name!r}: {file} is not valid JSON ({error}). {_RESAVE}") from error
    if not isinstance(raw, dict):
        raise ValueError(
            f"Adapter {name!r}: {file} holds a JSON {type(raw).__name__}, not the object of settings PEFT writes. "
            f"{_RESAVE}"
        )
    required = ("peft_type", *(_REQUIRED_LORA_KEYS if raw.get("peft_type") == "LORA" else ()))
    missing = [key for key in required if raw.get(key) is None]
    if missing:
        raise ValueError(
            f"Adapter {name!r}: {file} lacks {', '.join(missing)} (absent or null); PEFT would fill in its defaults "
            f"and merge a delta other than the trained one. {_RESAVE}"
        )
    if raw["peft_type"] == "LORA":
        rank, alpha = raw["r"], raw["lora_alpha"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"Adapter {name!r}: {file} has r={rank!r}, not a positive int. {_RESAVE}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ValueError(f"Adapter {name!r}: {file} has lora_alpha={alpha!r}, not a number. {_RESAVE}")
    try:
        return PeftConfig.from_pretrained(path)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise ValueError(
            f"Adapter {name!r}: PEFT cannot read {file} ({type(error).__name__}: {error}). {_RESAVE}"
        ) from error


def _weights_file(path: str) -> str:
    return next(os.path.join(path, file) for file in _WEIGHT_FILES if os.path.isfile(os.path.join(path, file)))


def _lora_modules_in_file(name: str, path: str) -> set[str]:
    """
    Names of the modules (as in `model.named_modules()`) whose lora_A and lora_B the adapter's weights file holds.

    Reads only the safetensors header (a `.bin` file is loaded); a truncated or empty file fails here, naming it.
    """
    file = _weights_file(path)
    try:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as handle:
                keys = list(handle.keys())
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            if not isinstance(state, Mapping):
                raise TypeError(f"it holds a {type(state).__name__}, not a dict of tensors")
            keys = list(state)
    except Exception as error:  # SafetensorError, EOFError, UnpicklingError, zip errors ...: the file is damaged
        raise ValueError(
            f"Adapter {name!r}: the weights file {file} ({os.path.getsize(file)} bytes) cannot be read "
            f"({type(error).__name__}: {error}). {_RESAVE}"
        ) from error
    parts: dict[str, set[str]] = {}
    for key in keys:
        match = _LORA_KEY.match(key)
        if match:
            parts.setdefault(match["module"], set()).add(match["part"][-1])
    if not parts:
        raise ValueError(
            f"Adapter {name!r}: the weights file {file} holds no LoRA weights (keys: {keys[:5]}). {_RESAVE}"
        )
    half = sorted(module for module, found in parts.items() if found != {"A", "B"})
    if half:
        raise ValueError(
            f"Adapter {name!r}: the weights file {file} holds only one of lora_A / lora_B for {len(half)} module(s) "
            f"(e.g. {half[0]}). {_RESAVE}"
        )
    return set(parts)


def _same_model_name(first: str, second: str) -> bool:
    first, second = first.rstrip("/\\"), second.rstrip("/\\")
    if first == second:
        return True
    if os.path.exists(first) and os.path.exists(second):
        return os.path.samefile(first, second)
    # A local copy of a Hub model ("/models/google/gemma-3-270m" and "google/gemma-3-270m") counts as the same model.
    tail = lambda name: "/".join(re.split(r"[/\\]", name)[-2:])  # noqa: E731
    return tail(first) == tail(second)


def _check_configs(configs: dict[str, PeftConfig], combination: str, base_name: str | None) -> str | None:
    """Checks that the adapters can be combined; returns the base model name they record (if any)."""
    for name, config in configs.items():
        peft_type = getattr(config.peft_type, "value", config.peft_type)
        if peft_type != "LORA":
            raise ValueError(f"Adapter {name!r} is a {peft_type} adapter; merge_adapters combines LoRA adapters only.")
        for setting in _UNMERGEABLE_SETTINGS:
            if getattr(config, setting, None):
                raise ValueError(
                    f"Adapter {name!r} uses {setting}={getattr(config, setting)!r}, which is not a low-rank weight "
                    "delta and cannot be combined as a weighted sum. Merge that adapter into the base model first "
                    "(merge_and_unload) or train it without this setting."
                )
        if getattr(config, "bias", "none") != "none":
            raise ValueError(
                f"Adapter {name!r} trains biases (bias={config.bias!r}); those are not low-rank deltas and cannot be "
                "combined. Train it with bias='none'."
            )

    recorded = {
        name: config.base_model_name_or_path for name, config in configs.items() if config.base_model_name_or_path
    }
    reference_name, reference = next(iter(recorded.items()), (None, None))
    for name, other in recorded.items():
        if not _same_model_name(reference, other):
            raise ValueError(
                f"The adapters were trained on different base models: {reference_name!r} on {reference!r} and "
                f"{name!r} on {other!r} (base_model_name_or_path in adapter_config.json). Deltas are only meaningful "
                "on the model they were trained on; merge adapters of one base model."
            )
    if base_name and reference and not _same_model_name(base_name, reference):
        warnings.warn(
            f"The base model {base_name!r} is not the one the adapters record ({reference!r}). The merge goes on, but "
            "the adapters only work on the model they were trained on: pass that model unless this is a copy of it.",
            stacklevel=3,
        )

    if combination == "linear" and len(configs) > 1:
        ranks = {name: _max_rank(config) for name, config in configs.items()}
        if len(set(ranks.values())) > 1:
            raise ValueError(
                f"combination='linear' needs adapters of one rank, got ranks {ranks}. Use combination='cat' (exact, "
                "rank = sum of ranks) or 'svd' (any target rank)."
            )
        patterns = {name: dict(config.rank_pattern or {}) for name, config in configs.items()}
        if len({tuple(sorted(p.items())) for p in patterns.values()}) > 1:
            raise ValueError(
                f"combination='linear' needs the same rank on every module, but the adapters' rank_pattern differ: "
                f"{patterns}. Use combination='cat' or 'svd'."
            )
    return reference


def _max_rank(config: PeftConfig) -> int:
    return max([config.r, *(config.rank_pattern or {}).values()])


def _ancestors(path: str) -> list[str]:
    """The real path of `path` (symbolic links resolved) followed by each of its parent directories."""
    chain = [os.path.realpath(path)]
    while os.path.dirname(chain[-1]) != chain[-1]:
        chain.append(os.path.dirname(chain[-1]))
    return chain


def _same_path(first: str, second: str) -> bool:
    if first == second:
        return True
    try:  # also catches one directory reached under two names (bind mounts, case-insensitive file systems)
        return os.path.samefile(first, second)
    except OSError:
        return False


def _overlap(output_dir: str, source: str) -> str | None:
    """How `output_dir` overlaps `source` ("is", "is inside" or "contains"), or `None`."""
    target, origin = _ancestors(output_dir), _ancestors(source)
    if _same_path(target[0], origin[0]):
        return "is"
    if any(_same_path(parent, origin[0]) for parent in target[1:]):
        return "is inside"
    if any(_same_path(parent, target[0]) for parent in origin[1:]):
        return "contains"
    return None


def _check_output_dir(output_dir: str | None, overwrite: bool, inputs: list[tuple[str, str]]) -> None:
    """
    Refuses an `output_dir` that is, is inside or contains any input of the merge (`inputs`: `(what, path)` pairs),
    whatever name or link reaches it: the save would delete or replace files the merge reads.
    """
    if output_dir is None:
        return
    output_dir = os.fspath(output_dir)
    if not output_dir:
        raise ValueError("output_dir is an empty string; pass the directory to save the merge in (CLI: --output_dir).")
    overlaps = []
    for label, source in inputs:
        relation = _overlap(output_dir, source)
        if relation is not None:
            real = os.path.realpath(source)
            overlaps.append((label, source, relation, real))
    if overlaps:
        described = "; and ".join(
            f"it {relation} the {label}, {source!r}" + (f" (real path {real!r})" if real != source else "")
            for label, source, relation, real in overlaps
        )
        suggestion = overlaps[0][3].rstrip(os.sep) + "-merged"
        if any(_overlap(suggestion, other) for _, other in inputs):
            suggestion = None
        raise ValueError(
            f"output_dir={output_dir!r} overlaps an input: {described}. Saving there would delete or replace files "
            "the merge reads, and the inputs are never modified. Choose an output directory (CLI: --output_dir) "
            "outside every input" + (f", for example {suggestion!r}." if suggestion else ".")
        )
    if os.path.isfile(output_dir):
        raise ValueError(f"output_dir={output_dir!r} is a file; pass a directory path.")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        if not overwrite:
            raise ValueError(
                f"output_dir={output_dir!r} already exists and is not empty. Choose another directory, or pass "
                "overwrite=True (CLI: --overwrite) to replace its contents."
            )
        if os.path.islink(output_dir):
            raise ValueError(
                f"output_dir={output_dir!r} is a symbolic link to {os.path.realpath(output_dir)!r}, which is not "
                "empty; overwrite=True does not replace the contents behind a link. Pass the directory itself, or "
                "an empty one."
            )


def _load_lora_weights(path: str) -> dict[str, torch.Tensor]:
    safetensors_file = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(safetensors_file):
        from safetensors.torch import load_file

        return load_file(safetensors_file)
    return torch.load(os.path.join(path, "adapter_model.bin"), map_location="cpu", weights_only=True)


def _shared_init_similarity(paths: dict[str, str]) -> float | None:
    """Mean |cosine| between the lora_A matrices the adapters have in common; None when they share no module."""
    states = [_load_lora_weights(path) for path in paths.values()]
    keys = [key for key in states[0] if ".lora_A." in key or "lora_embedding_A" in key]
    similarities = []
    for i in range(len(states)):
        for j in range(i + 1, len(states)):
            for key in keys:
                if key in states[j] and states[i][key].shape == states[j][key].shape:
                    a, b = states[i][key].float().flatten(), states[j][key].float().flatten()
                    similarities.append(F.cosine_similarity(a, b, dim=0).abs().item())
    return sum(similarities) / len(similarities) if similarities else None


# ---------------------------------------------------------------------------------------------------------------------
# Loading and combining
# ---------------------------------------------------------------------------------------------------------------------


def _load_base_model(base_model: PreTrainedModel | str, origin: str = "base_model") -> PreTrainedModel:
    if isinstance(base_model, (str, os.PathLike)):
        try:
            return AutoModelForCausalLM.from_pretrained(os.fspath(base_model), dtype="auto")
        except OSError as error:
            where = "" if os.path.exists(base_model) else " does not exist as a local directory and"
            raise OSError(
                f"The base model {os.fspath(base_model)!r} ({origin}){where} could not be loaded: {error} Pass a "
                "local model directory, or a Hub id that can be downloaded or is in the Hugging Face cache (CLI: "
                "--base_model_name_or_path)."
            ) from error
    if isinstance(base_model, PeftModel):
        raise ValueError(
            "base_model is already a PeftModel. Pass the plain base model (or its path); merge_adapters loads the "
            "adapters itself. To merge adapters already loaded in a PeftModel use its add_weighted_adapter."
        )
    if not isinstance(base_model, torch.nn.Module):
        raise ValueError(f"base_model must be a transformers model or a path, got {type(base_model).__name__}.")
    return base_model


def _load_adapters(base_model: PreTrainedModel, paths: dict[str, str]) -> tuple[PeftModel, dict[str, str]]:
    """Loads every adapter into one PeftModel under an internal name; returns the model and {name: internal name}."""
    internal = {name: f"{_INPUT_PREFIX}{index}" for index, name in enumerate(paths)}
    model = None
    for name, path in paths.items():
        try:
            if model is None:
                model = PeftModel.from_pretrained(base_model, path, adapter_name=internal[name])
            else:
                model.load_adapter(path, adapter_name=internal[name])
        except (RuntimeError, ValueError, KeyError) as error:
            raise ValueError(
                f"Adapter {name!r} ({path}) does not fit the base model: {type(error).__name__}: {error} Its "
                "adapter_config.json and weights must come from one save on this base model: check that it was "
                "trained on this model, or save it again."
            ) from error
    model.eval()
    return model, internal


def _check_weights_complete(model: PeftModel, inputs: dict[str, str], in_files: dict[str, set[str]]) -> None:
    """Every module an adapter was injected into has its weights in the adapter's file, and nothing else is there."""
    for name, adapter in inputs.items():
        covered = set(_covered_modules(model, adapter))
        missing, unused = sorted(covered - in_files[name]), sorted(in_files[name] - covered)
        if missing:
            raise ValueError(
                f"Adapter {name!r}: its weights file lacks the LoRA weights of {len(missing)} of the {len(covered)} "
                f"module(s) its adapter_config.json targets (e.g. {missing[0]}); they would merge as untrained "
                f"initial values. {_RESAVE}"
            )
        if unused:
            raise ValueError(
                f"Adapter {name!r}: its weights file holds LoRA weights for {len(unused)} module(s) that its "
                f"adapter_config.json does not target (e.g. {unused[0]}); they would be dropped from the merge. "
                f"The config and the weights do not belong together. {_RESAVE}"
            )


def _lora_layers(model: PeftModel):
    for module_name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            yield module_name, module


def _has_adapter(module: LoraLayer, adapter: str) -> bool:
    return adapter in module.lora_A or adapter in module.lora_embedding_A


def _adapter_rank(module: LoraLayer, adapter: str) -> int:
    return module.r[adapter]


def _covered_modules(model: PeftModel, adapter: str) -> list[str]:
    return [name for name, module in _lora_layers(model) if _has_adapter(module, adapter)]


def _prepare_configs(model: PeftModel, inputs: list[str]) -> None:
    """
    Makes `add_weighted_adapter` cover exactly the modules that some input covers (in memory only).

    PEFT copies the first input's config for the merged adapter and takes the union of the `target_modules`, which
    ignores differing `layers_to_transform` (a module of a layer covered by no input makes PEFT fail, and a layer
    covered by the second input only is dropped). When the inputs' coverage differs, each input's in-memory config
    is set to the list of module names it was injected into: their union is then exact. When it is the same, all
    take the first input's targeting, so that the merged config stays as readable as the inputs'. The merged
    adapter's scaling must be 1 (PEFT sets lora_alpha = r), so rsLoRA is switched off for it.
    """
    coverage = {adapter: _covered_modules(model, adapter) for adapter in inputs}
    configs = [model.peft_config[adapter] for adapter in inputs]
    identical = all(coverage[adapter] == coverage[inputs[0]] for adapter in inputs)
    for adapter, config in zip(inputs, configs):
        if identical:  # keep the first input's (readable) targeting for all, so that the union is that targeting
            config.target_modules = configs[0].target_modules
            config.layers_to_transform = configs[0].layers_to_transform
            config.layers_pattern = configs[0].layers_pattern
            config.exclude_modules = configs[0].exclude_modules
        else:
            config.target_modules = set(coverage[adapter])
            config.layers_to_transform = None
            config.layers_pattern = None
            config.exclude_modules = None
    configs[0].use_rslora = False


def _check_loaded(model: PeftModel, inputs: dict[str, str], combination: str, svd_rank: int | None) -> None:
    """Checks that need the adapters in place: every adapter covers a module, per-module ranks and sizes fit."""
    for name, adapter in inputs.items():
        if not _covered_modules(model, adapter):
            raise ValueError(f"Adapter {name!r} adds LoRA weights to no module of the base model; nothing to merge.")
    for module_name, module in _lora_layers(model):
        present = {
            name: _adapter_rank(module, adapter) for name, adapter in inputs.items() if _has_adapter(module, adapter)
        }
        if combination == "linear" and len(set(present.values())) > 1:
            raise ValueError(
                f"combination='linear' needs equal ranks on each module, but {module_name} has ranks {present}. Use "
                "combination='cat' or 'svd'."
            )
        if combination == "svd" and svd_rank is not None and present:
            weight = module.get_base_layer().weight
            smallest = min(weight.shape[0], math.prod(weight.shape[1:]))
            if svd_rank > smallest:
                raise ValueError(
                    f"svd_rank={svd_rank} exceeds the rank a delta of {module_name} can have ({smallest}, its "
                    f"smallest dimension). Pass svd_rank <= {smallest}."
                )


@torch.no_grad()
def _deviation(model: PeftModel, inputs: dict[str, str], weights: dict[str, float], merged: str) -> dict[str, float]:
    """Relative Frobenius distance between the merged delta and the exact weighted sum Σ w_i ΔW_i, per module."""
    errors = []
    for _, module in _lora_layers(model):
        if not _has_adapter(module, merged):
            continue
        exact = sum(
            weights[name] * module.get_delta_weight(adapter).float()
            for name, adapter in inputs.items()
            if _has_adapter(module, adapter)
        )
        got = module.get_delta_weight(merged).float()
        errors.append((torch.linalg.norm(got - exact) / torch.linalg.norm(exact).clamp_min(1e-12)).item())
    return {
        "max_relative_error": max(errors),
        "mean_relative_error": sum(errors) / len(errors),
        "num_modules": len(errors),
    }


def _combine(
    model: PeftModel,
    inputs: dict[str, str],
    weights: dict[str, float],
    combination: str,
    svd_rank: int | None,
    merged: str,
    measure: bool = True,
) -> dict[str, float] | None:
    """Adds adapter `merged` to `model` from the loaded `inputs` ({name: internal name}); returns its deviation."""
    model.add_weighted_adapter(
        adapters=list(inputs.values()),
        weights=[weights[name] for name in inputs],
        adapter_name=merged,
        combination_type=combination,
        svd_rank=svd_rank,
        svd_full_matrices=False,  # the reduced SVD gives the same truncation without the (in, in) matrix
    )
    if merged not in model.peft_config:
        raise RuntimeError(f"PEFT did not create the merged adapter {merged!r}.")
    return _deviation(model, inputs, weights, merged) if measure else None


def _merged_rank(model: PeftModel, merged: str) -> int:
    return max(_adapter_rank(module, merged) for _, module in _lora_layers(model) if _has_adapter(module, merged))


# ---------------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------------


def _save_tokenizer(sources: list[str], output_dir: str) -> str | None:
    for source in sources:
        if os.path.isfile(os.path.join(source, "tokenizer_config.json")):
            AutoTokenizer.from_pretrained(source).save_pretrained(output_dir)
            return source
    return None


def _describe_layers(config: PeftConfig) -> str:
    layers = config.layers_to_transform
    if layers is None:
        return "all"
    layers = [layers] if isinstance(layers, int) else sorted(layers)
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1:
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers))


def _describe_targets(config: PeftConfig) -> str:
    targets = config.target_modules
    return targets if isinstance(targets, str) else ", ".join(sorted(targets))


def _write_model_card(
    output_dir: str,
    *,
    base_name: str | None,
    configs: dict[str, PeftConfig],
    paths: dict[str, str],
    weights: dict[str, float],
    combination: str,
    svd_rank: int | None,
    merged_rank: int,
    deviation: dict[str, float],
    merge_into_base: bool,
) -> str:
    base = base_name or "unknown"
    rows = "\n".join(
        f"| {name} | `{paths[name]}` | {weights[name]:g} | {_max_rank(configs[name])} | {configs[name].lora_alpha} | "
        f"{_describe_targets(configs[name])} | {_describe_layers(configs[name])} |"
        for name in configs
    )
    explanation = {
        "cat": "the scaled low-rank factors are stacked, so every module's delta is exactly the weighted sum of the "
        "parts' deltas",
        "svd": f"every module's weighted sum of deltas is truncated to rank {merged_rank} by SVD",
        "linear": "the parts' low-rank factors are averaged with the square roots of the weights; the delta is not the "
        "weighted sum of the parts' deltas (meaningful only for parts trained from one initialisation)",
    }[combination]
    kind = "full model (the merged adapter is folded into the base weights)" if merge_into_base else "LoRA adapter"
    if merge_into_base:
        usage = (
            "```python\nfrom transformers import AutoModelForCausalLM\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{output_dir}")\n```'
        )
    else:
        usage = (
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(base, "{output_dir}")\n```'
        )
    card = f"""---
base_model: {base}
library_name: {"transformers" if merge_into_base else "peft"}
tags:
- trl-midalign
- lora
- merge
---

# Merged {kind}

Made by `trl_midalign.merge_adapters` from {len(configs)} LoRA adapter(s) of `{base}`.

| part | source | weight | rank | alpha | target modules | layers |
|---|---|---|---|---|---|---|
{rows}

- Combination: `{combination}`{f" (svd_rank={svd_rank})" if svd_rank else ""}: {explanation}.
- Rank of the merged adapter: {merged_rank} (scaling 1).
- Distance of the merged deltas from the exact weighted sum of the parts' deltas (relative Frobenius norm over
  {deviation["num_modules"]} modules): max {deviation["max_relative_error"]:.3g}, mean {deviation["mean_relative_error"]:.3g}.

## Use

{usage}

## Method

Middle-layer representation alignment for cross-lingual transfer: Liu & Niehues, "Middle-Layer Representation
Alignment for Cross-Lingual Transfer in Fine-Tuned LLMs", ACL 2025 (https://huggingface.co/papers/2502.14830).
"""
    path = os.path.join(output_dir, "README.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(card)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """Validated inputs of a merge."""

    paths: dict[str, str]
    configs: dict[str, PeftConfig]
    weights: dict[str, float]
    base_name: str | None
    sources: list[str] = field(default_factory=list)
    in_files: dict[str, set[str]] = field(default_factory=dict)  # per adapter: the modules its weights file holds
    base_origin: str = "base_model"  # where the base model's name came from, for load errors


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name


def _protected_inputs(
    base_model, base_path: str | None, adapters: Mapping[str, str], paths: dict[str, str], configs, extra_inputs
) -> list[tuple[str, str]]:
    """Every file or directory a merge reads, as `(what, path)`: none may be, be inside or contain `output_dir`."""
    inputs = [(f"directory of adapter {name!r}", path) for name, path in paths.items()]
    if base_path and os.path.exists(base_path):
        inputs.append(("base model directory (base_model, CLI: --base_model_name_or_path)", base_path))
    source = getattr(getattr(base_model, "config", None), "_name_or_path", None)
    if base_path is None and isinstance(source, str) and source and os.path.exists(source):
        inputs.append(("directory the given base model was loaded from", source))
    from_hub = any(not os.path.exists(os.fspath(path)) for path in adapters.values())
    for name, config in configs.items():
        recorded = config.base_model_name_or_path
        if recorded and os.path.exists(recorded):
            inputs.append(
                (
                    f"base model directory that adapter {name!r} records (base_model_name_or_path in its "
                    "adapter_config.json)",
                    recorded,
                )
            )
        elif recorded and base_model is None:
            from_hub = True
    if base_path and not os.path.exists(base_path):
        from_hub = True
    inputs += [(label, os.fspath(path)) for label, path in extra_inputs if path]
    if from_hub:
        from huggingface_hub import constants

        inputs.append(("Hugging Face cache, which holds the inputs downloaded from the Hub", constants.HF_HUB_CACHE))
    return inputs


def _prepare(
    base_model,
    adapters: Mapping[str, str],
    weights,
    combination: str,
    svd_rank: int | None,
    output_dir: str | None,
    overwrite: bool,
    extra_inputs: Sequence[tuple[str, str | None]] = (),
) -> _Prepared:
    """
    Validates a merge before any model is loaded. `extra_inputs` (`(what, path)` pairs, e.g. the CLI's `--dev_file`)
    are protected from `output_dir` like the adapters and base model.
    """
    weight_map = _check_names_and_weights(adapters, weights)
    _check_combination(combination, svd_rank)
    paths = {name: _resolve_adapter_dir(name, path) for name, path in adapters.items()}
    base_path = os.fspath(base_model) if isinstance(base_model, (str, os.PathLike)) else None
    if base_path is not None and not base_path:
        raise ValueError("base_model is an empty string; pass a model, a model directory or a Hub id.")
    if base_path is not None and not os.path.exists(base_path) and not _is_hub_id(base_path):
        raise FileNotFoundError(
            f"The base model {base_path!r} (base_model, CLI: --base_model_name_or_path) does not exist, and it is not "
            "a Hub id either. Pass the directory of the model the adapters were trained on, or its Hub id."
        )
    configs = {name: _read_adapter_config(name, path) for name, path in paths.items()}
    given_name = base_path
    if given_name is None and base_model is not None:
        given_name = getattr(getattr(base_model, "config", None), "_name_or_path", None) or None
    recorded = _check_configs(configs, combination, given_name)
    in_files = {name: _lora_modules_in_file(name, path) for name, path in paths.items()}
    if base_model is None and recorded is None:
        raise ValueError(
            "base_model is None and the adapters record no base_model_name_or_path; pass the base model (CLI: "
            "--base_model_name_or_path)."
        )
    origin = "base_model, CLI: --base_model_name_or_path"
    if base_model is None:
        owner = next(name for name, config in configs.items() if config.base_model_name_or_path)
        origin = f"recorded as base_model_name_or_path in the adapter_config.json of adapter {owner!r}"
        if not os.path.exists(recorded) and not _is_hub_id(recorded):
            raise FileNotFoundError(
                f"Adapter {owner!r} records base_model_name_or_path={recorded!r} in "
                f"{os.path.join(paths[owner], 'adapter_config.json')}, which does not exist on this machine (trained "
                "elsewhere, or the model was moved). Pass the base model the adapters were trained on: "
                "base_model=PATH (CLI: --base_model_name_or_path PATH)."
            )
    protected = _protected_inputs(base_model, base_path, adapters, paths, configs, extra_inputs)
    _check_output_dir(output_dir, overwrite, protected)
    if combination == "linear" and len(paths) > 1:
        similarity = _shared_init_similarity(paths)
        if similarity is not None and similarity < _SHARED_INIT_THRESHOLD:
            warnings.warn(
                f"combination='linear' is not meaningful for these adapters: their lora_A matrices have mean |cosine| "
                f"{similarity:.2f} (below {_SHARED_INIT_THRESHOLD}), so they were not trained from a shared "
                "initialisation, and averaging their factors mixes unrelated subspaces (the merged delta contains "
                "cross terms B_i A_j). Use combination='cat' for the exact weighted sum of the deltas, or 'svd'.",
                stacklevel=3,
            )
    sources = [base_path] if base_path and os.path.isdir(base_path) else []
    if base_path is None and recorded and os.path.isdir(recorded):
        sources.append(recorded)
    sources += list(paths.values())
    return _Prepared(paths, configs, weight_map, given_name or recorded, sources, in_files, origin)


def merge_adapters(
    base_model: PreTrainedModel | str | None,
    adapters: Mapping[str, str],
    weights: Mapping[str, float] | Sequence[float] | None = None,
    combination: str = "cat",
    svd_rank: int | None = None,
    output_dir: str | None = None,
    merge_into_base: bool = False,
    overwrite: bool = False,
) -> PeftModel | PreTrainedModel:
    r"""
    Combine LoRA adapters of one base model into a single adapter (or into the base weights).

    With `w_i` the weights and `ΔW_i` the weight delta of adapter `i` on a module, `combination="cat"` gives exactly
    `Σ w_i ΔW_i` on every module any adapter covers; `"svd"` its best rank-`svd_rank` approximation; `"linear"`
    averages the low-rank factors (see the module docstring; a warning says when the adapters do not share their
    initialisation, which makes it meaningless). Adapters may cover different modules and layers, for example a task
    adapter on every block and an alignment adapter on the blocks below the aligned layer (`layers_to_transform`): the
    merged adapter covers the union, each module with the deltas of the adapters that cover it.

    All inputs are validated before any model is loaded: missing files, damaged adapter files (a truncated or empty
    weights file, an `adapter_config.json` that is not valid JSON or lacks `r`, `lora_alpha` or `target_modules`),
    adapters of different base models, settings that are not low-rank deltas (DoRA, `modules_to_save`, trained
    biases, ...), unequal ranks for `"linear"`, weights that do not match the adapter names, an existing `output_dir`.
    The inputs are only read: an `output_dir` that is, is inside or contains any of them (each adapter directory, the
    base model given or recorded in an adapter's `base_model_name_or_path`, the Hugging Face cache when a part comes
    from the Hub), reached under any name or symbolic link, is refused. After loading, each adapter's weights file
    must hold exactly the modules its config targets.

    Args:
        base_model ([`~transformers.PreTrainedModel`], `str` or `None`):
            The base model the adapters were trained on, or its path / Hub id (loaded with
            `AutoModelForCausalLM.from_pretrained(..., dtype="auto")`); `None` loads the `base_model_name_or_path`
            the adapters record. A model instance is modified in place: LoRA layers are injected into it and, with
            `merge_into_base=True`, its weights change. Pass a path or a copy to keep it intact.
        adapters (`dict[str, str]`):
            `{name: adapter directory or Hub repo id}`, for example `{"task": ..., "alignment": ...}`. The names
            appear in the model card and key `weights`.
        weights (`dict[str, float]`, `list[float]` or `None`, *optional*, defaults to `None`):
            One weight per adapter (a dict by name, or a list in the order of `adapters`); negative weights subtract.
            `None` gives every adapter weight 1.0.
        combination (`str`, *optional*, defaults to `"cat"`):
            `"cat"` (exact, rank = sum of the ranks), `"svd"` (rank `svd_rank`) or `"linear"` (same rank required).
        svd_rank (`int` or `None`, *optional*, defaults to `None`):
            Rank of the merged adapter for `combination="svd"`; `None` uses the largest input rank (PEFT's default).
            The merge is exact when it is at least the sum of the input ranks.
        output_dir (`str` or `None`, *optional*, defaults to `None`):
            Where to save the result with a `README.md` model card naming the parts, weights, combination and base
            model. The tokenizer of the base model (or of the first adapter directory holding one) is saved with it.
            It must not be, be inside or contain any input. `None` saves nothing.
        merge_into_base (`bool`, *optional*, defaults to `False`):
            Fold the merged adapter into the base weights and return (and save) a plain transformers model.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace the contents of an existing, non-empty `output_dir`; otherwise such a directory is an error.

    Returns:
        [`~peft.PeftModel`] with the merged adapter as its only (active) adapter, named `"default"`, or the
        [`~transformers.PreTrainedModel`] with merged weights when `merge_into_base=True`. The model is in eval mode.

    Example:

    ```python
    >>> from trl_midalign import merge_adapters
    >>> model = merge_adapters(
    ...     "google/gemma-3-270m",
    ...     {"task": "out/task-lora", "alignment": "out/align-lora"},
    ...     weights={"task": 1.0, "alignment": 0.5},
    ...     output_dir="out/merged-lora",
    ... )
    ```
    """
    prepared = _prepare(base_model, adapters, weights, combination, svd_rank, output_dir, overwrite)
    model = _load_base_model(base_model if base_model is not None else prepared.base_name, prepared.base_origin)
    peft_model, inputs = _load_adapters(model, prepared.paths)
    _check_weights_complete(peft_model, inputs, prepared.in_files)
    _check_loaded(peft_model, inputs, combination, svd_rank)
    _prepare_configs(peft_model, list(inputs.values()))
    deviation = _combine(peft_model, inputs, prepared.weights, combination, svd_rank, _MERGED_NAME)
    merged_rank = _merged_rank(peft_model, _MERGED_NAME)
    logger.info(
        f"Merged {list(inputs)} with weights {prepared.weights} ({combination}, rank {merged_rank}); relative "
        f"distance from the exact weighted sum of deltas: max {deviation['max_relative_error']:.3g}."
    )
    peft_model.set_adapter(_MERGED_NAME)
    for adapter in inputs.values():
        peft_model.delete_adapter(adapter)
    peft_model.eval()
    result = peft_model.merge_and_unload() if merge_into_base else peft_model

    if output_dir is not None:
        if os.path.isdir(output_dir) and os.listdir(output_dir):  # overwrite=True was checked in _prepare
            shutil.rmtree(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        result.save_pretrained(output_dir)
        _save_tokenizer(prepared.sources, output_dir)
        _write_model_card(
            output_dir,
            base_name=prepared.base_name,
            configs=prepared.configs,
            paths={name: os.fspath(path) for name, path in adapters.items()},
            weights=prepared.weights,
            combination=combination,
            svd_rank=svd_rank,
            merged_rank=merged_rank,
            deviation=deviation,
            merge_into_base=merge_into_base,
        )
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Weight search
# ---------------------------------------------------------------------------------------------------------------------


def _token_ids(encoded) -> list[int]:
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def _task_examples(rows, tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Tokenizes task rows as TRL's SFT does: `(input_ids, loss_mask)`, the mask selecting the scored tokens."""
    eos = tokenizer.eos_token or ""
    examples = []
    for index, row in enumerate(rows):
        if "prompt" in row and "completion" in row:
            prompt, completion = row["prompt"], row["completion"]
            if isinstance(prompt, str) and isinstance(completion, str):
                prompt_ids = _token_ids(tokenizer(prompt))
                if eos and not completion.endswith(eos):
                    completion = completion + eos
                ids = _token_ids(tokenizer(prompt + completion))
            else:  # conversational: lists of {"role", "content"} messages
                prompt_ids = _token_ids(
                    tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
                )
                ids = _token_ids(tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=True))
            start = 0
            while start < min(len(prompt_ids), len(ids)) and prompt_ids[start] == ids[start]:
                start += 1
            mask = [0] * start + [1] * (len(ids) - start)
        elif "text" in row and isinstance(row["text"], str):
            text = row["text"] if not eos or row["text"].endswith(eos) else row["text"] + eos
            ids = _token_ids(tokenizer(text))
            mask = [1] * len(ids)
        elif "messages" in row:
            ids = _token_ids(tokenizer.apply_chat_template(row["messages"], tokenize=True))
            mask = [1] * len(ids)
        else:
            raise ValueError(
                f"Task row {index} has keys {sorted(row)}; a task row needs 'prompt' and 'completion', 'text' or "
                "'messages' (the formats TRL's SFTTrainer accepts)."
            )
        ids, mask = ids[:max_length], mask[:max_length]
        if sum(mask[1:]) > 0:  # the first token is never predicted
            examples.append((ids, mask))
    if not examples:
        raise ValueError(
            f"No task row has a token to score within max_length={max_length}; check the dev file or raise max_length."
        )
    return examples


@torch.no_grad()
def _task_loss(
    model: torch.nn.Module, examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int
) -> float:
    """Mean negative log-likelihood per scored token (completion tokens), over all examples."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        loss_mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, (ids, mask) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            loss_mask[row, : len(ids)] = torch.tensor(mask, dtype=torch.bool)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (batch, seq - 1, vocab)
        token_log_probs = log_probs.gather(-1, input_ids[:, 1:, None].to(device)).squeeze(-1)  # (batch, seq - 1)
        scored = loss_mask[:, 1:].to(device)
        total -= token_log_probs[scored].sum().item()
        count += int(scored.sum())
    return total / count


def _infer_align_layer(config: PeftConfig, align_layer, num_layers: int) -> int:
    from .layers import resolve_layer

    if align_layer is not None:
        return resolve_layer(align_layer, num_layers)
    layers = config.layers_to_transform
    if layers is not None:  # an alignment adapter changes the blocks below the aligned layer, 0 .. L - 1
        layers = [layers] if isinstance(layers, int) else list(layers)
        return min(max(layers) + 1, num_layers)
    return resolve_layer("middle", num_layers)


def _format_table(table: list[dict], search_adapter: str, layer: int) -> str:
    lines = [
        f"| {search_adapter} weight | task loss | change vs 0 | retrieval acc @ layer {layer} | selected |",
        "|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['weight']:g} | {row['task_loss']:.4f} | {100 * row['task_loss_change']:+.2f}% | "
            f"{row['retrieval_accuracy']:.4f} | {'*' if row['selected'] else ''} |"
        )
    return "\n".join(lines)


def search_merge_weights(
    base_model: PreTrainedModel | str | None,
    adapters: Mapping[str, str],
    task_rows,
    pairs,
    tokenizer=None,
    search_adapter: str = "alignment",
    grid: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    weights: Mapping[str, float] | Sequence[float] | None = None,
    combination: str = "cat",
    svd_rank: int | None = None,
    align_layer: int | float | str | None = None,
    max_task_loss_increase: float = 0.05,
    batch_size: int = 8,
    max_length: int = 512,
    source_column: str = "parallel_source",
    target_column: str = "parallel_target",
    language_column: str = "language",
) -> tuple[float, list[dict[str, float]]]:
    r"""
    Choose the weight of one adapter (usually the alignment adapter) in a merge, on a dev set, and print the table.

    For every weight `w` of `grid` (0 is always added: it is the reference, the other adapters alone), the adapters
    are merged as in [`merge_adapters`] with `search_adapter` at weight `w` and two scores are measured:

    - task loss: the mean negative log-likelihood per completion token of `task_rows` (every token for `text` /
      `messages` rows), tokenized as TRL's `SFTTrainer` does (EOS appended to plain-text completions);
    - retrieval accuracy at the aligned layer: [`probe_layers`]'s `retrieval_accuracy["mean"]` at `align_layer`
      (mean over languages of the two retrieval directions).

    Selection rule: among the weights whose task loss is at most `(1 + max_task_loss_increase)` times the task loss
    at weight 0, take the one with the highest retrieval accuracy; ties go to the smaller `|w|`. Weight 0 always
    qualifies, so a search never returns a merge that hurts the task more than allowed.

    The model and adapters are loaded once; each weight adds and removes one merged adapter.

    Args:
        base_model ([`~transformers.PreTrainedModel`], `str` or `None`):
            As in [`merge_adapters`] (an instance gets LoRA layers injected).
        adapters (`dict[str, str]`):
            `{name: adapter directory}`, including `search_adapter`.
        task_rows (`datasets.Dataset` or `list[dict]`):
            Dev rows of the task: `prompt` + `completion` (plain or conversational), `text` or `messages`.
        pairs (`datasets.Dataset` or `list[dict]`):
            Parallel pairs for [`probe_layers`] (`source_column`, `target_column`, optional `language_column`).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`] or `None`, *optional*, defaults to `None`):
            The base model's tokenizer; `None` loads it from the base model directory or an adapter directory.
        search_adapter (`str`, *optional*, defaults to `"alignment"`):
            Name (key of `adapters`) of the adapter whose weight is searched.
        grid (`Sequence[float]`, *optional*, defaults to `(0.0, 0.25, 0.5, 0.75, 1.0)`):
            Weights to try for `search_adapter`.
        weights (`dict[str, float]`, `list[float]` or `None`, *optional*, defaults to `None`):
            Fixed weights of the other adapters, as in [`merge_adapters`] (the entry of `search_adapter` is
            ignored); `None` gives them 1.0.
        combination (`str`, *optional*, defaults to `"cat"`):
            `"cat"`, `"svd"` or `"linear"`, see [`merge_adapters`].
        svd_rank (`int` or `None`, *optional*, defaults to `None`):
            Rank for `combination="svd"`.
        align_layer (`int`, `float`, `str` or `None`, *optional*, defaults to `None`):
            Layer to score (see [`resolve_layer`]); `None` takes the layer above the highest block the search
            adapter changes (`max(layers_to_transform) + 1`, the aligned layer of an alignment-only adapter), or the
            middle layer when it covers every block.
        max_task_loss_increase (`float`, *optional*, defaults to `0.05`):
            Largest relative rise of the task loss over weight 0 that a selected weight may cause (0.05 = 5%).
        batch_size (`int`, *optional*, defaults to `8`):
            Rows per forward pass.
        max_length (`int`, *optional*, defaults to `512`):
            Maximum tokens per task row and per sentence of a pair (longer ones are truncated).
        source_column (`str`, *optional*, defaults to `"parallel_source"`):
            Column of `pairs` with the non-English sentence.
        target_column (`str`, *optional*, defaults to `"parallel_target"`):
            Column of `pairs` with its (English) translation.
        language_column (`str`, *optional*, defaults to `"language"`):
            Column of `pairs` with the language; optional.

    Returns:
        `tuple[float, list[dict]]`: The selected weight, and one row per weight (sorted by weight) with keys
        `weight`, `task_loss`, `task_loss_change` (relative to weight 0), `retrieval_accuracy`, `layer` (the scored
        layer) and `selected`.
    """
    from .probing import probe_layers

    if search_adapter not in adapters:
        raise ValueError(
            f"search_adapter={search_adapter!r} is not one of the adapters {list(adapters)}; pass the name of the "
            "adapter whose weight to search (CLI: --search_adapter)."
        )
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or not grid:
        raise ValueError(f"grid must be a non-empty list of weights, got {grid!r}.")
    for value in grid:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"grid holds {value!r}; every weight must be a finite number.")
    grid = sorted({0.0, *(float(value) for value in grid)})
    if not (isinstance(max_task_loss_increase, (int, float)) and max_task_loss_increase >= 0):
        raise ValueError(
            f"max_task_loss_increase must be >= 0 (a fraction: 0.05 allows a 5% rise), got {max_task_loss_increase!r}."
        )
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}.")
    if isinstance(weights, Mapping):
        weights = {**weights, search_adapter: weights.get(search_adapter, 1.0)}
    prepared = _prepare(base_model, adapters, weights, combination, svd_rank, None, False)
    if tokenizer is None:
        source = next((s for s in prepared.sources if os.path.isfile(os.path.join(s, "tokenizer_config.json"))), None)
        if source is None:
            raise ValueError(
                "No tokenizer given and none found in the base model or adapter directories; pass tokenizer=."
            )
        tokenizer = AutoTokenizer.from_pretrained(source)
    examples = _task_examples(task_rows, tokenizer, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    model = _load_base_model(base_model if base_model is not None else prepared.base_name, prepared.base_origin)
    peft_model, inputs = _load_adapters(model, prepared.paths)
    _check_weights_complete(peft_model, inputs, prepared.in_files)
    _check_loaded(peft_model, inputs, combination, svd_rank)
    _prepare_configs(peft_model, list(inputs.values()))
    from .layers import num_decoder_layers

    layer = _infer_align_layer(prepared.configs[search_adapter], align_layer, num_decoder_layers(peft_model))

    table = []
    for index, value in enumerate(grid):
        name = f"search_{index}"
        weights_now = {**prepared.weights, search_adapter: value}
        _combine(peft_model, inputs, weights_now, combination, svd_rank, name, measure=False)
        peft_model.set_adapter(name)
        peft_model.eval()
        loss = _task_loss(peft_model, examples, pad_id, batch_size)
        probe = probe_layers(
            peft_model,
            tokenizer,
            pairs,
            batch_size=batch_size,
            max_length=max_length,
            source_column=source_column,
            target_column=target_column,
            language_column=language_column,
            show_progress=False,
        )
        accuracy = probe.retrieval_accuracy["mean"][layer]
        table.append({"weight": value, "task_loss": loss, "retrieval_accuracy": accuracy, "layer": layer})
        peft_model.set_adapter(next(iter(inputs.values())))  # deleting the active adapter makes PEFT warn
        peft_model.delete_adapter(name)

    reference = next(row["task_loss"] for row in table if row["weight"] == 0.0)
    for row in table:
        row["task_loss_change"] = row["task_loss"] / reference - 1.0
    eligible = [row for row in table if row["task_loss"] <= reference * (1.0 + max_task_loss_increase)]
    best = max(eligible, key=lambda row: (row["retrieval_accuracy"], -abs(row["weight"])))
    for row in table:
        row["selected"] = row is best
    print(
        f"Weight search for {search_adapter!r} ({combination}); rule: highest retrieval accuracy at layer {layer} "
        f"with task loss at most {100 * max_task_loss_increase:g}% above weight 0.\n"
        + _format_table(table, search_adapter, layer)
    )
    return best["weight"], table


# ---------------------------------------------------------------------------------------------------------------------
# Command line: `trl-midalign merge`
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class MergeArguments:
    r"""
    Arguments of `trl-midalign merge`.

    Parameters:
        > Merge

        base_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            Base model directory or Hub id; `None` uses the one the adapters record.
        adapters (`list[str]`):
            Required. Adapters as `name=path`, for example `task=out/task-lora alignment=out/align-lora`.
        weights (`list[float]` or `None`, *optional*, defaults to `None`):
            One weight per adapter, in the order of `adapters`; `None` gives every adapter 1.0.
        combination (`str`, *optional*, defaults to `"cat"`):
            `"cat"`, `"svd"` or `"linear"`, see [`merge_adapters`].
        svd_rank (`int` or `None`, *optional*, defaults to `None`):
            Rank of the merged adapter for `combination="svd"`.
        output_dir (`str` or `None`, *optional*, defaults to `None`):
            Where to save the merged adapter (or model) and its model card. Required unless `search` only prints.
            It must not be, be inside or contain any input (adapters, base model, dev files).
        merge_into_base (`bool`, *optional*, defaults to `False`):
            Save a full model with the merged adapter folded into the base weights.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace the contents of an existing, non-empty `output_dir`.

        > Weight search

        search (`bool`, *optional*, defaults to `False`):
            Choose the weight of `search_adapter` with [`search_merge_weights`] before merging.
        search_adapter (`str`, *optional*, defaults to `"alignment"`):
            Adapter whose weight is searched.
        search_weights (`list[float]`, *optional*, defaults to `[0.0, 0.25, 0.5, 0.75, 1.0]`):
            Weights to try (0 is always added as the reference).
        dev_file (`str` or `None`, *optional*, defaults to `None`):
            Dev task rows (json/jsonl/csv/parquet). Required with `search`.
        pairs_file (`str` or `None`, *optional*, defaults to `None`):
            Parallel pairs for the retrieval score; `None` reads them from `dev_file`.
        align_layer (`str` or `None`, *optional*, defaults to `None`):
            Layer to score; `None` infers it from the searched adapter's `layers_to_transform`.
        max_task_loss_increase (`float`, *optional*, defaults to `0.05`):
            Largest allowed relative rise of the dev task loss over weight 0.
        batch_size (`int`, *optional*, defaults to `8`):
            Rows per forward pass during the search.
        max_length (`int`, *optional*, defaults to `512`):
            Maximum tokens per dev row or sentence.
        source_column (`str`, *optional*, defaults to `"parallel_source"`):
            Pair column with the non-English sentence.
        target_column (`str`, *optional*, defaults to `"parallel_target"`):
            Pair column with its translation.
        language_column (`str`, *optional*, defaults to `"language"`):
            Pair column with the language (optional in the data).
    """

    base_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Base model directory or Hub id. Defaults to the base_model_name_or_path the adapters record."
        },
    )
    adapters: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Required. Adapters to combine as name=path, for example: task=out/task-lora "
            "alignment=out/align-lora."
        },
    )
    weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "One weight per adapter, in the order of --adapters (negative subtracts). Default: 1.0 each."
        },
    )
    combination: str = field(
        default="cat",
        metadata={
            "help": "How to combine: 'cat' (exact weighted sum of the deltas, rank = sum of ranks), 'svd' (truncated to "
            "--svd_rank) or 'linear' (averages the LoRA factors; only for adapters with a shared initialisation).",
            "choices": list(COMBINATIONS),
        },
    )
    svd_rank: int | None = field(
        default=None,
        metadata={"help": "Rank of the merged adapter for --combination svd. Default: the largest input rank."},
    )
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Required (unless --search only prints the weight table). Directory for the merged adapter (or "
            "model) and its README.md model card; it must not be, be inside or contain any input."
        },
    )
    merge_into_base: bool = field(
        default=False,
        metadata={"help": "Fold the merged adapter into the base weights and save a full model."},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace the contents of an existing, non-empty --output_dir."},
    )
    search: bool = field(
        default=False,
        metadata={
            "help": "Before merging, try every weight of --search_weights for --search_adapter on the dev set and keep "
            "the one with the highest retrieval accuracy at the aligned layer whose dev task loss is at most "
            "--max_task_loss_increase above weight 0. Prints the table."
        },
    )
    search_adapter: str = field(
        default="alignment",
        metadata={"help": "Name (in --adapters) of the adapter whose weight --search chooses."},
    )
    search_weights: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        metadata={"help": "Weights tried by --search (0 is always added as the reference)."},
    )
    dev_file: str | None = field(
        default=None,
        metadata={
            "help": "Required with --search. Dev task rows (json, jsonl, csv or parquet): prompt+completion, text or "
            "messages."
        },
    )
    pairs_file: str | None = field(
        default=None,
        metadata={"help": "Parallel pairs for the retrieval score of --search. Default: read them from --dev_file."},
    )
    align_layer: str | None = field(
        default=None,
        metadata={
            "help": "Layer scored by --search ('middle', an int, a negative int or a fraction). Default: one above the "
            "highest block the searched adapter changes (its layers_to_transform), else the middle layer."
        },
    )
    max_task_loss_increase: float = field(
        default=0.05,
        metadata={
            "help": "Largest relative rise of the dev task loss over weight 0 that --search accepts (0.05 = 5%%)."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Rows per forward pass during --search."})
    max_length: int = field(default=512, metadata={"help": "Maximum tokens per dev row or sentence during --search."})
    source_column: str = field(
        default="parallel_source", metadata={"help": "Pair column with the non-English sentence."}
    )
    target_column: str = field(default="parallel_target", metadata={"help": "Pair column with its translation."})
    language_column: str = field(
        default="language", metadata={"help": "Pair column with the language of the pair (optional in the data)."}
    )

    def missing_options(self) -> list[str]:
        """The required options that are not set (the CLI reports them as a usage error)."""
        missing = []
        if not self.adapters:
            missing.append("--adapters NAME=PATH [NAME=PATH ...]")
        if self.output_dir is None and not self.search:
            missing.append("--output_dir DIR (or --search with --dev_file to only print the weight table)")
        if self.search and self.dev_file is None:
            missing.append("--dev_file FILE (with --search)")
        return missing


MERGE_USAGE = (
    "trl-midalign merge --adapters NAME=PATH [NAME=PATH ...] --output_dir DIR [options]\n"
    "       trl-midalign merge --adapters NAME=PATH [NAME=PATH ...] --search --dev_file FILE [--output_dir DIR] "
    "[options]"
)


def _parse_named_paths(items: Sequence[str]) -> dict[str, str]:
    if not items:
        raise ValueError(
            "--adapters is required: give the adapters as name=path, for example task=PATH alignment=PATH."
        )
    adapters = {}
    for item in items:
        name, separator, path = item.partition("=")
        if not separator or not name or not path:
            raise ValueError(
                f"--adapters entry {item!r} is not name=path; write it as, for example, task=out/task-lora."
            )
        if name in adapters:
            raise ValueError(f"--adapters names {name!r} twice; give each adapter its own name.")
        adapters[name] = path
    return adapters


def _read_rows(path: str, option: str):
    from datasets import load_dataset

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{option} {path!r} does not exist.")
    builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
    builder = builders.get(os.path.splitext(path)[1].lower())
    if builder is None:
        raise ValueError(f"{option} {path!r}: use a .json, .jsonl, .csv or .parquet file.")
    return load_dataset(builder, data_files=path, split="train")


def run_merge(args: MergeArguments) -> None:
    """Runs `trl-midalign merge`: optional weight search, then [`merge_adapters`]; see [`MergeArguments`]."""
    adapters = _parse_named_paths(args.adapters)
    if args.output_dir is None and not args.search:
        raise ValueError(
            "--output_dir is required to save the merge (or pass --search to only print the weight table)."
        )
    if args.search and args.dev_file is None:
        raise ValueError("--search needs --dev_file (dev task rows, and the pairs unless --pairs_file is given).")
    weights = list(args.weights) if args.weights is not None else None
    if args.output_dir is not None:  # every input, the dev files too, is checked before the (slow) search
        _prepare(
            args.base_model_name_or_path,
            adapters,
            weights,
            args.combination,
            args.svd_rank,
            args.output_dir,
            args.overwrite,
            extra_inputs=[("--dev_file", args.dev_file), ("--pairs_file", args.pairs_file)] if args.search else [],
        )
    section = None
    if args.search:
        task_rows = _read_rows(args.dev_file, "--dev_file")
        pairs = _read_rows(args.pairs_file, "--pairs_file") if args.pairs_file else task_rows
        best, table = search_merge_weights(
            args.base_model_name_or_path,
            adapters,
            task_rows,
            pairs,
            search_adapter=args.search_adapter,
            grid=args.search_weights,
            weights=weights,
            combination=args.combination,
            svd_rank=args.svd_rank,
            align_layer=args.align_layer,
            max_task_loss_increase=args.max_task_loss_increase,
            batch_size=args.batch_size,
            max_length=args.max_length,
            source_column=args.source_column,
            target_column=args.target_column,
            language_column=args.language_column,
        )
        weights = dict(zip(adapters, weights)) if weights is not None else dict.fromkeys(adapters, 1.0)
        weights[args.search_adapter] = best
        section = (
            f"## Weight search\n\nThe weight of `{args.search_adapter}` was chosen on `{args.dev_file}`: the highest "
            f"retrieval accuracy at layer {table[0]['layer']} among the weights whose dev task loss is at most "
            f"{100 * args.max_task_loss_increase:g}% above weight 0.\n\n"
            + _format_table(table, args.search_adapter, table[0]["layer"])
        )
        if args.output_dir is None:
            return
    merge_adapters(
        args.base_model_name_or_path,
        adapters,
        weights=weights,
        combination=args.combination,
        svd_rank=args.svd_rank,
        output_dir=args.output_dir,
        merge_into_base=args.merge_into_base,
        overwrite=args.overwrite,
    )
    if section is not None:
        with open(os.path.join(args.output_dir, "README.md"), "a", encoding="utf-8") as handle:
            handle.write("\n" + section + "\n")
    print(f"Saved the merged {'model' if args.merge_into_base else 'adapter'} to {args.output_dir}")
