"""Parallel paragraphs of the LibreOffice help in 32 languages, aligned with the English help by their stable paragraph
ids, from Debian's `libreoffice-help-*` packages (MPL-2.0).

This is the only module of trl-midalign that runs a program (`apt-get download`, and `apt-get update` when the package
lists are missing), and only when a package is not cached yet; nothing runs at import.
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

from .._logging import get_logger
from .cache import cache_root, lock, temporary_sibling


logger = get_logger(__name__)

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
# The same for the extraction with inline spans (`help_markup`), cached separately.
_MARKUP_EXTRACTION_VERSION = 1


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


# Inline span classes recorded by the markup extraction (the gold labels of the LibreOffice tasks). Other spans
# (`avis`, `switchinline`, `productname`, ...) are containers or untranslated names: their text is kept, unlabelled.
SPAN_CLASSES = ("emph", "menuitem", "literal", "keycode", "widget")


class _HelpPageParser(HTMLParser):
    """Collects the text of the `par_*`/`hd_*` paragraphs and headings of one LibreOffice help page.

    Platform- and module-specific variants (`<span hidden class="MAC">`, `class="WRITER"`, ...) are skipped; the
    classless default variant of each switch is kept, which is what a reader on Windows/Linux sees. Besides the text
    (`paragraphs`), `marked` holds each paragraph's inline spans of the `SPAN_CLASSES` as `(start, end, class)` offsets
    into that same text; a span inside another recorded span belongs to the outer one.
    """

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[tuple[str, str]] = []
        self.marked: list[tuple[str, str, list[tuple[int, int, str]]]] = []
        self._stack: list[tuple[str, bool, str | None]] = []  # (tag, skipped, recorded span class)
        # (id, tag, [(text, span number or None)], stack depth, span classes)
        self._current: tuple[str, str, list[tuple[str, int | None]], int, list[str]] | None = None
        self._span: int | None = None  # number of the recorded span being read, within the current paragraph

    def _skipping(self) -> bool:
        return any(skipped for _, skipped, _ in self._stack)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "br" and self._current is not None:
            self._current[2].append((" ", self._span))
        if tag in _VOID_TAGS:
            return
        skipped = "hidden" in attributes and bool(attributes.get("class"))
        recorded = None
        if tag == "span" and self._current is not None and self._span is None and not self._skipping():
            if attributes.get("class") in SPAN_CLASSES:
                recorded = attributes["class"]
                self._current[4].append(recorded)
                self._span = len(self._current[4]) - 1
        self._stack.append((tag, skipped, recorded))
        element_id = attributes.get("id") or ""
        if self._current is None and tag in _PARAGRAPH_TAGS and _PARAGRAPH_ID.match(element_id):
            if attributes.get("class") not in _CODE_CLASSES:
                self._current = (element_id, tag, [], len(self._stack), [])

    def handle_endtag(self, tag):
        if tag in _VOID_TAGS or not any(open_tag == tag for open_tag, _, _ in self._stack):
            return
        while self._stack:
            open_tag, _, recorded = self._stack.pop()
            if recorded is not None:
                self._span = None
            if self._current is not None and len(self._stack) < self._current[3]:
                element_id, _, parts, _, classes = self._current
                text, spans = _normalize_with_spans(parts, classes)
                self.paragraphs.append((element_id, text))
                self.marked.append((element_id, text, spans))
                self._current, self._span = None, None
            if open_tag == tag:
                break

    def handle_data(self, data):
        if self._current is not None and not self._skipping():
            self._current[2].append((data, self._span))


def _normalize_with_spans(
    parts: list[tuple[str, int | None]], classes: list[str]
) -> tuple[str, list[tuple[int, int, str]]]:
    """The paragraph text with whitespace collapsed (`" ".join(text.split())`) and the recorded spans as offsets into
    it, stripped of surrounding whitespace; empty spans are dropped."""
    characters = [(character, span) for text, span in parts for character in text]
    text, owners = [], []
    for character, span in characters:
        if character.isspace():
            if text and text[-1] != " ":
                text.append(" ")
                owners.append(span)
        else:
            text.append(character)
            owners.append(span)
    if text and text[-1] == " ":
        text.pop()
        owners.pop()
    spans = []
    for number, name in enumerate(classes):
        positions = [i for i, owner in enumerate(owners) if owner == number and text[i] != " "]
        if positions:
            spans.append((positions[0], positions[-1] + 1, name))
    return "".join(text), spans


def _iter_help_paragraphs(deb_path: Path, help_dir: str, markup: bool = False) -> Iterator[dict]:
    """Yields `{"id": "<page path>#<paragraph id>", "text": ...}` for every paragraph of one help language, with
    `"spans": [[start, end, class], ...]` (offsets into `text`) when `markup` is true."""
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
            for element_id, text, spans in parser.marked:
                if element_id not in seen and text:
                    seen.add(element_id)
                    record = {"id": f"{page}#{element_id}", "text": text}
                    if markup:
                        record["spans"] = [list(span) for span in spans]
                    yield record


def _extracted_help(package: str, help_dir: str, root: Path, markup: bool = False) -> Path:
    """The cached JSONL of one help language's paragraphs (with their spans when `markup`), extracted from the `.deb`
    once (downloaded with `apt-get download` when missing) and written atomically under the package's lock."""
    directory = root / "libreoffice_help"
    version = f"markup-v{_MARKUP_EXTRACTION_VERSION}" if markup else f"v{_EXTRACTION_VERSION}"
    jsonl = directory / version / f"{help_dir}.jsonl"
    if not jsonl.is_file():
        with lock(root, f"libreoffice_help_{package}"):  # one lock per .deb (ca and ca-valencia share one)
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
                what = "paragraphs and spans" if markup else "paragraphs"
                logger.info(f"Extracting the {help_dir} help {what} from {deb_path.name} ...")
                jsonl.parent.mkdir(parents=True, exist_ok=True)
                temporary = temporary_sibling(jsonl)
                count = 0
                with open(temporary, "w", encoding="utf-8") as file:
                    for record in _iter_help_paragraphs(deb_path, help_dir, markup=markup):
                        file.write(json.dumps(record, ensure_ascii=False) + "\n")
                        count += 1
                os.replace(temporary, jsonl)
                logger.info(f"Extracted {count} {help_dir} paragraphs ({time.perf_counter() - start:.0f} s).")
    return jsonl


def _help_paragraphs(package: str, help_dir: str, root: Path) -> dict[str, str]:
    """Paragraph id -> text for one help language, from the cached JSONL (extracted from the `.deb` once)."""
    paragraphs = {}
    with open(_extracted_help(package, help_dir, root), encoding="utf-8") as file:
        for line in file:
            record = json.loads(line)
            paragraphs[record["id"]] = record["text"]
    return paragraphs


def help_paragraphs(language: str, cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """
    Paragraph id -> plain text for one help language (`"en"` for the English original), extracted from the Debian
    package once and cached: every paragraph of the help, translated or not, unfiltered (for length statistics and
    benchmarks; `libreoffice_parallel_pairs` gives filtered pairs).

    Raises:
        ValueError: If the language has no help package (the message lists the available ones).
    """
    if str(language).strip().lower() in ("en", "en-us"):
        package, help_dir = _ENGLISH
    else:
        package, help_dir, _ = LIBREOFFICE_LANGUAGES[_normalize_language(language)]
    return _help_paragraphs(package, help_dir, cache_root(cache_dir))


def help_markup(language: str, cache_dir: str | os.PathLike | None = None) -> dict[str, dict]:
    """
    Paragraph id (`"<page path>#<paragraph id>"`) -> `{"text": ..., "spans": [[start, end, class], ...]}` for one help
    language (`"en"` for the English original), the spans being the inline markup of the `SPAN_CLASSES` as character
    offsets into the text. Extracted from the Debian package once and cached (a separate cache from the plain text).

    Raises:
        ValueError: If the language has no help package (the message lists the available ones).
    """
    if str(language).strip().lower() in ("en", "en-us"):
        package, help_dir = _ENGLISH
    else:
        package, help_dir, _ = LIBREOFFICE_LANGUAGES[_normalize_language(language)]
    paragraphs = {}
    with open(_extracted_help(package, help_dir, cache_root(cache_dir), markup=True), encoding="utf-8") as file:
        for line in file:
            record = json.loads(line)
            paragraphs[record["id"]] = {"text": record["text"], "spans": record["spans"]}
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
    >>> from trl_midalign.demo import libreoffice_parallel_pairs

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
