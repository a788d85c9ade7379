"""Loading models, GGUF files included, as ordinary trainable transformers models, and checking that a model is one
trl-midalign can train (a decoder-only causal LM with real weights).

A model loaded with `from_pretrained(..., gguf_file=...)` is dequantized into plain floating-point weights, but it
keeps the GGUF quantizer object that did the loading. While it is there, transformers refuses to save the model and
reports it as not trainable, so `SFTTrainer` and peft refuse it too. [`prepare_gguf_model`] drops that leftover;
[`load_causal_lm`] and [`load_tokenizer`] accept a `.gguf` path wherever a directory or Hub id is accepted.
"""

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
    set_seed,
)
from transformers.utils.quantization_config import GgufConfig, QuantizationMethod
from trl.trainer.utils import create_model_from_path, get_config_model_id

from ._logging import get_logger


logger = get_logger(__name__)


def _split_gguf_path(name_or_path: str | os.PathLike, gguf_file: str | None) -> tuple[str, str | None]:
    """Turns `(".../model.gguf", None)` into `(".../", "model.gguf")` and checks that local paths exist."""
    name_or_path = os.fspath(name_or_path)
    if name_or_path.endswith(".gguf"):
        if gguf_file is not None:
            raise ValueError(
                f"`name_or_path` is already a GGUF file ({name_or_path!r}) and `gguf_file={gguf_file!r}` was given "
                "too. Pass either the path of the `.gguf` file alone, or its directory with `gguf_file=` naming it."
            )
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"GGUF file {str(path)!r} does not exist. Check the path, or pass a model directory or Hub id instead."
            )
        return str(path.parent), path.name
    looks_local = name_or_path.startswith(("/", ".", "~")) or os.path.isabs(name_or_path)
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"Model path {name_or_path!r} does not exist. Check the path or pass a Hub model id.")
    if gguf_file is not None and Path(name_or_path).expanduser().is_dir():
        path = Path(name_or_path).expanduser() / gguf_file
        if not path.is_file():
            raise FileNotFoundError(
                f"GGUF file {str(path)!r} does not exist: `gguf_file={gguf_file!r}` is not in {name_or_path!r}."
            )
    return name_or_path, gguf_file


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "Loading a `.gguf` file needs the `gguf` package. Install it with `pip install gguf` "
            '(or `pip install "trl-midalign[demo]"`).'
        )


def _gguf_architecture(path: str) -> str:
    """Reads `general.architecture` from the metadata of a GGUF file."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("general.architecture")
    if field is None:
        return "<missing general.architecture>"
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def _supported_gguf_architectures() -> list[str]:
    """The GGUF architectures this transformers version can load (empty if its internals moved)."""
    names = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf import GGUF_ARCHS

        names.update(GGUF_ARCHS)
    except ImportError:
        pass
    return sorted(names - {"general", "tokenizer"})  # sections of the mapping, not architectures


def _gguf_load_errors(directory: str, gguf_file: str, error: Exception) -> Exception | None:
    """Translates transformers' errors for an unloadable GGUF file into ones that name the cause and the fix."""
    path = os.path.join(directory, gguf_file)
    if isinstance(error, NotImplementedError):
        return ValueError(
            f"The GGUF file {path!r} holds tensors in a quantization type that the installed `gguf` package cannot "
            f"dequantize ({error}), so it cannot become a trainable model. Upgrade `gguf` (`pip install -U gguf`) "
            "or use a GGUF file in another quantization type (Q8_0, Q4_K_M, F16, ...)."
        )
    if isinstance(error, ValueError) and "not supported" in str(error) and "architecture" in str(error):
        architecture = _gguf_architecture(path)
        supported = _supported_gguf_architectures()
        return ValueError(
            f"The GGUF file {path!r} has architecture {architecture!r}, which transformers cannot load from GGUF. "
            f"Supported GGUF architectures: {', '.join(supported) if supported else 'see the transformers docs'}. "
            "Use a checkpoint of a supported architecture, or the model's safetensors checkpoint instead."
        )
    return None


def prepare_gguf_model(model: PreTrainedModel) -> PreTrainedModel:
    """
    Makes a model loaded from a GGUF file an ordinary trainable model.

    `from_pretrained(..., gguf_file=...)` dequantizes the weights but leaves the GGUF quantizer on the model, and
    while it is there `save_pretrained`, peft and `SFTTrainer` refuse the model. This function removes it. It is
    idempotent and returns every other model (ordinary, or quantized by another method such as bitsandbytes)
    unchanged.

    Args:
        model ([`~transformers.PreTrainedModel`]):
            Model to prepare. Modified in place.

    Returns:
        [`~transformers.PreTrainedModel`]: The same model object.

    Raises:
        ValueError: If the model's weights are still packed in GGUF blocks (loaded with
            `GgufConfig(dequantize=False)` and a matmul kernel), which cannot be trained.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from trl_midalign import prepare_gguf_model

    >>> model = AutoModelForCausalLM.from_pretrained("path/to/dir", gguf_file="model.gguf")
    >>> model = prepare_gguf_model(model)  # now trainable and saveable
    ```
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return model
    quantization_config = getattr(quantizer, "quantization_config", None)
    if getattr(quantization_config, "quant_method", None) != QuantizationMethod.GGUF:
        return model
    packed = list(getattr(quantizer, "packed_modules", None) or {})
    if not packed:
        packed = [name for name, param in model.named_parameters() if not param.is_floating_point()]
    if packed:
        raise ValueError(
            f"The model was loaded from GGUF with its weights kept in quantized GGUF blocks ({len(packed)} modules, "
            f"e.g. {packed[0]!r}), which cannot be trained or saved. Load it dequantized instead: "
            "`trl_midalign.load_causal_lm(path_to_gguf)`, or "
            "`from_pretrained(..., gguf_file=..., quantization_config=GgufConfig(dequantize=True))`."
        )
    quantizer.remove_quantization_config(model)
    return model


def load_causal_lm(
    name_or_path: str | os.PathLike,
    gguf_file: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    **kwargs,
) -> PreTrainedModel:
    """
    Loads a causal language model from a directory, a Hub id or a GGUF file, ready to train.

    A GGUF file is dequantized at load time into plain `dtype` weights, and the leftover GGUF quantizer is removed
    with [`prepare_gguf_model`], so the result can be trained (fully or with peft), passed to `SFTTrainer` and saved
    with `save_pretrained`. Loading from GGUF is slow (about a minute for a 270M model on 2 CPU cores); save a
    converted copy with `save_pretrained` and load that afterwards.

    Args:
        name_or_path (`str` or `os.PathLike`):
            Model directory, Hub id, or path of a `.gguf` file (its directory is then the model directory).
        gguf_file (`str`, *optional*):
            Name of a GGUF file inside `name_or_path`. Leave it out when `name_or_path` is the `.gguf` path itself.
        dtype (`torch.dtype` or `str`, *optional*, defaults to `torch.float32`):
            Dtype of the loaded weights (`"auto"` keeps the checkpoint's).
        **kwargs:
            Passed to [`~transformers.AutoModelForCausalLM.from_pretrained`]. For a GGUF file,
            `quantization_config` defaults to `GgufConfig(dequantize=True)`.

    Returns:
        [`~transformers.PreTrainedModel`]: The model, with no GGUF quantizer attached.

    Raises:
        FileNotFoundError: If a local path or the GGUF file does not exist.
        ValueError: If the GGUF file's architecture or quantization type cannot be loaded as a trainable model.

    Example:

    ```python
    >>> from trl_midalign import load_causal_lm
    >>> from trl_midalign.demo import gemma3_270m_gguf

    >>> model = load_causal_lm(gemma3_270m_gguf())
    >>> model.config.num_hidden_layers
    18
    ```
    """
    directory, gguf_file = _split_gguf_path(name_or_path, gguf_file)
    if gguf_file is None:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
    _require_gguf()
    kwargs.setdefault("quantization_config", GgufConfig(dequantize=True))
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype, **kwargs)
    except (ValueError, NotImplementedError) as error:
        translated = _gguf_load_errors(directory, gguf_file, error)
        if translated is None:
            raise
        raise translated from error
    # Name the file, not its directory: that is what `load_causal_lm` (and a peft adapter's base model) needs.
    model.name_or_path = model.config.name_or_path = os.path.join(directory, gguf_file)
    return prepare_gguf_model(model)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _check_tokenizer_files(directory: str) -> None:
    """Refuse a local model folder without any vocabulary file, naming the files looked for and those there."""
    if not os.path.isdir(directory):
        return
    present = sorted(os.listdir(directory))
    if any(name in _TOKENIZER_FILES or name.endswith((".model", ".tiktoken")) for name in present):
        return
    raise FileNotFoundError(
        f"The model folder {directory} holds no tokenizer: none of {list(_TOKENIZER_FILES)} (or a *.model / "
        f"*.tiktoken vocabulary) is there (its files: {present[:12]}{', ...' if len(present) > 12 else ''}). Save the "
        "tokenizer next to the model (`tokenizer.save_pretrained(folder)`), or copy its tokenizer files from the "
        "model it was trained from."
    )


def load_tokenizer(name_or_path: str | os.PathLike, gguf_file: str | None = None, **kwargs) -> PreTrainedTokenizerBase:
    """
    Loads the tokenizer of a model from a directory, a Hub id or a GGUF file.

    Args:
        name_or_path (`str` or `os.PathLike`):
            Model directory, Hub id, or path of a `.gguf` file.
        gguf_file (`str`, *optional*):
            Name of a GGUF file inside `name_or_path`. Leave it out when `name_or_path` is the `.gguf` path itself.
        **kwargs:
            Passed to [`~transformers.AutoTokenizer.from_pretrained`].

    Returns:
        [`~transformers.PreTrainedTokenizerBase`]: The tokenizer.

    Raises:
        FileNotFoundError: If a local path or the GGUF file does not exist, or a local folder has no tokenizer file.
        ValueError: If the GGUF file's architecture is not supported by transformers.
    """
    directory, gguf_file = _split_gguf_path(name_or_path, gguf_file)
    if gguf_file is None:
        _check_tokenizer_files(directory)
        return AutoTokenizer.from_pretrained(directory, **kwargs)
    _require_gguf()
    try:
        return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, **kwargs)
    except ValueError as error:
        translated = _gguf_load_errors(directory, gguf_file, error)
        if translated is None:
            raise
        raise translated from error


def load_model_for_training(
    name_or_path: str, args: TrainingArguments, quantization_config: Any = None, processing_class: Any = None
) -> tuple[PreTrainedModel, Any]:
    """
    Load a model given by name as [`~trl.SFTTrainer`] would, and its processing class when none is given, so that the
    trainer can look at the model (its depth, a layer probe) before [`~trl.SFTTrainer`] sets it up.

    The model is created from `args.model_init_kwargs` (plus `quantization_config`) with TRL's own
    `create_model_from_path`, or with [`load_causal_lm`] for a GGUF file (a `.gguf` path, or `gguf_file` in
    `model_init_kwargs`), whose tokenizer then comes from [`load_tokenizer`]. Any other processing class is loaded
    as TRL loads it, at the revision of the model.

    Args:
        name_or_path (`str`):
            Model directory, Hub id or `.gguf` path.
        args ([`~transformers.TrainingArguments`]):
            The trainer's arguments: `model_init_kwargs`, `seed`, `trust_remote_code` and the distributed setup.
        quantization_config (*optional*):
            The trainer's `quantization_config` argument; not allowed together with one in `model_init_kwargs`.
        processing_class (*optional*):
            The trainer's `processing_class`; returned as it is when given.

    Returns:
        `tuple`: The model and the processing class.
    """
    kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
    set_seed(args.seed)  # as SFTTrainer does before creating a model
    if name_or_path.endswith(".gguf") or "gguf_file" in kwargs:
        if quantization_config is not None:
            logger.warning(
                "quantization_config is ignored for a GGUF file: it is loaded dequantized, as plain weights."
            )
        if processing_class is None:
            processing_class = load_tokenizer(name_or_path, gguf_file=kwargs.get("gguf_file"))
        return load_causal_lm(name_or_path, **kwargs), processing_class
    if quantization_config is not None:
        if "quantization_config" in kwargs:
            raise ValueError(
                "You set `quantization_config` both as a trainer argument and in `args.model_init_kwargs`. Set it in "
                "only one place, preferably as a trainer argument."
            )
        kwargs["quantization_config"] = quantization_config
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None  # distributed training needs device_map=None ("auto" fails)
    kwargs.setdefault("trust_remote_code", getattr(args, "trust_remote_code", False))
    model = create_model_from_path(name_or_path, **kwargs)
    if processing_class is None:
        processing_class = AutoProcessor.from_pretrained(
            get_config_model_id(model.config),
            revision=kwargs.get("revision"),
            trust_remote_code=kwargs["trust_remote_code"],
        )
    return model, processing_class


def check_decoder_only_lm(model: torch.nn.Module, meta_allowed: bool = False) -> None:
    """
    Refuse, naming the class, a model that is not a decoder-only causal LM with real (materialised) weights.

    Args:
        model (`torch.nn.Module`):
            The model, possibly a [`~peft.PeftModel`]. A model that is not a [`~transformers.PreTrainedModel`] passes:
            the block-stack lookup says what it needs.
        meta_allowed (`bool`, *optional*, defaults to `False`):
            Whether parameters on the meta device are expected (FSDP's RAM-efficient loading keeps the model on the
            meta device on every rank but 0 until accelerate shards it).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, PreTrainedModel):
        return
    name = type(base).__name__
    if getattr(base.config, "is_encoder_decoder", False) or not base.can_generate():
        kind = "an encoder-decoder model" if getattr(base.config, "is_encoder_decoder", False) else "not a causal LM"
        raise ValueError(
            f"{name} is {kind}: trl-midalign needs a decoder-only causal language model (such as LlamaForCausalLM, "
            "Qwen2ForCausalLM, Gemma3ForCausalLM), whose hidden states are aligned and which the task loss trains to "
            "generate. Encoders such as BERT or ModernBERT (masked LMs) and models without an LM head are not "
            "supported; load a decoder-only checkpoint with AutoModelForCausalLM."
        )
    meta = [n for n, p in base.named_parameters() if p.is_meta]
    if meta and not meta_allowed:
        raise ValueError(
            f"{name} has {len(meta)} parameter(s) on the meta device (for example {meta[0]!r}): it was created without "
            "real weights (under `torch.device('meta')`, `init_empty_weights` or `device_map='meta'`). trl-midalign "
            "trains a decoder-only causal LM with real, materialised weights: load it with "
            "`AutoModelForCausalLM.from_pretrained(...)`, or materialise it (`model.to_empty(device=...)`, then load "
            "a state dict) before passing it."
        )
