"""Combining separately trained LoRA adapters, for example a task adapter with an alignment adapter.

Liu & Niehues (2025, https://huggingface.co/papers/2502.14830) show that an alignment module trained on its own can
be merged into an existing task module and still improve cross-lingual transfer. [`merge_adapters`] does this with
PEFT's `add_weighted_adapter` ([`search_merge_weights`], in `search.py`, picks the alignment adapter's weight).

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

What PEFT does not check is checked here, before any model is loaded: damaged or incomplete adapter files, adapters
of different base models, adapter state that is not a low-rank delta (`add_weighted_adapter` would drop it without a
word), and an `output_dir` that would overwrite an input.
"""

import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCardData
from peft import PeftConfig, PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .._logging import get_logger
from ..model_card import PAPER, write_card


logger = get_logger(__name__)

Combination = Literal["cat", "svd", "linear"]
"""How `add_weighted_adapter` combines the adapters, see the module docstring."""
COMBINATIONS: tuple[str, ...] = get_args(Combination)
_MERGED_NAME = "default"  # saved at the root of output_dir, and what PeftModel.from_pretrained loads by default
_INPUT_PREFIX = "merge_input_"
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# Settings that train state besides the low-rank delta `s * B @ A`, which add_weighted_adapter drops without a word
# (PEFT itself refuses `target_parameters`). Any other such state shows up as extra tensors in the weights file.
_STATE_BESIDES_THE_DELTA = {
    "use_dora": "DoRA's magnitude vectors",
    "lora_bias": "a trained bias of lora_B",
    "modules_to_save": "full copies of modules",
}
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
    others = []
    for key in keys:
        match = _LORA_KEY.match(key)
        if match:
            parts.setdefault(match["module"], set()).add(match["part"][-1])
        else:
            others.append(key)
    if parts and others:
        raise ValueError(
            f"Adapter {name!r}: the weights file {file} holds {len(others)} tensor(s) besides the LoRA factors (e.g. "
            f"{others[0]}): trained state that is not a low-rank delta (DoRA magnitudes, biases, saved modules, new "
            "token embeddings, ...), which a weighted sum of deltas would drop. Merge that adapter into the base "
            "model first (merge_and_unload) or train it without such settings."
        )
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
        for setting, state in _STATE_BESIDES_THE_DELTA.items():
            if getattr(config, setting, None):
                raise ValueError(
                    f"Adapter {name!r} uses {setting}={getattr(config, setting)!r}: it trains {state}, which is not a "
                    "low-rank weight delta and cannot be combined as a weighted sum. Merge that adapter into the base "
                    "model first (merge_and_unload) or train it without this setting."
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


def add_combined_adapter(
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
    text = f"""# Merged {kind}

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

Middle-layer representation alignment for cross-lingual transfer: {PAPER}.
"""
    data = ModelCardData(
        base_model=base_name,
        library_name="transformers" if merge_into_base else "peft",
        tags=["trl-midalign", "lora", "merge"],
    )
    return write_card(output_dir, data, text)


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PreparedMerge:
    """Validated inputs of a merge, from [`prepare_merge`]."""

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


def prepare_merge(
    base_model,
    adapters: Mapping[str, str],
    weights,
    combination: str,
    svd_rank: int | None,
    output_dir: str | None,
    overwrite: bool,
    extra_inputs: Sequence[tuple[str, str | None]] = (),
) -> PreparedMerge:
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
    return PreparedMerge(paths, configs, weight_map, given_name or recorded, sources, in_files, origin)


def load_for_merge(
    base_model: PreTrainedModel | str | None, prepared: PreparedMerge, combination: str, svd_rank: int | None
) -> tuple[PeftModel, dict[str, str]]:
    """
    Load the base model and every adapter of a validated merge into one PeftModel, check that the weights files
    match the configs and that the combination fits every module, and make the union of the adapters' coverage
    exact. Returns the model and `{adapter name: its internal adapter name}`.
    """
    model = _load_base_model(base_model if base_model is not None else prepared.base_name, prepared.base_origin)
    peft_model, inputs = _load_adapters(model, prepared.paths)
    _check_weights_complete(peft_model, inputs, prepared.in_files)
    _check_loaded(peft_model, inputs, combination, svd_rank)
    _prepare_configs(peft_model, list(inputs.values()))
    return peft_model, inputs


def merge_adapters(
    base_model: PreTrainedModel | str | None,
    adapters: Mapping[str, str],
    weights: Mapping[str, float] | Sequence[float] | None = None,
    combination: Combination = "cat",
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
    prepared = prepare_merge(base_model, adapters, weights, combination, svd_rank, output_dir, overwrite)
    peft_model, inputs = load_for_merge(base_model, prepared, combination, svd_rank)
    deviation = add_combined_adapter(peft_model, inputs, prepared.weights, combination, svd_rank, _MERGED_NAME)
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
