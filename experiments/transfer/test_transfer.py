"""The LibreOffice task data (spans from the help markup, filters, page split, the recipes' loaders on the written
files) and the transfer study's driver (`experiments/transfer/transfer.py --quick`, end to end, marked slow/downloads)."""

import io
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile

import libreoffice_tasks as lt
import pytest
from safetensors.torch import load_file
from testing_utils import load_script

from trl_midalign.demo.libreoffice import _HelpPageParser, help_markup
from trl_midalign.tasks import loading, slot_filling, structured_generation, translation


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def parse(html: str) -> list[tuple[str, str, list[tuple[int, int, str]]]]:
    parser = _HelpPageParser()
    parser.feed(html)
    parser.close()
    return parser.marked


def spans_of(text: str, spans) -> list[tuple[str, str]]:
    return [(text[start:end], name) for start, end, name in spans]


def test_spans_are_exact_with_classes_and_switch_variants():
    html = (
        '<p id="par_id1" class="paragraph">Choose <span class="menuitem">Format -\n  Cells</span>, then '
        '<span class="avis">click <span class="emph">OK</span></span>.</p>'
        '<p id="par_id2">Press <span class="switchinline"><span hidden="true" class="MAC">'
        '<span class="keycode">Command + *</span></span><span hidden="true" id="default">'
        '<span class="keycode">Ctrl + *</span></span></span> or type <span class="literal"> =SUM(A1) </span></p>'
        '<p id="par_id3">No markup <span class="productname">LibreOffice</span> here.</p>'
    )
    marked = parse(html)
    assert [m[0] for m in marked] == ["par_id1", "par_id2", "par_id3"]
    _, text, spans = marked[0]
    assert text == "Choose Format - Cells, then click OK."
    assert spans_of(text, spans) == [("Format - Cells", "menuitem"), ("OK", "emph")]
    _, text, spans = marked[1]
    assert text == "Press Ctrl + * or type =SUM(A1)"  # the MAC variant is skipped, the default one kept
    assert spans_of(text, spans) == [("Ctrl + *", "keycode"), ("=SUM(A1)", "literal")]
    assert marked[2][2] == []  # productname is not a recorded class


def test_nested_recorded_span_belongs_to_the_outer_one():
    _, text, spans = parse(
        '<p id="par_x">See <span class="menuitem">Tools - <span class="emph">Options</span></span></p>'
    )[0]
    assert spans_of(text, spans) == [("Tools - Options", "menuitem")]


def test_annotate_and_bio_tokens():
    assert lt.annotate("Choose Format - Cells.", [[7, 21, "menuitem"]]) == "Choose [menuitem : Format - Cells]."
    assert slot_filling.slots_of(lt.annotate("A b c", [[2, 3, "emph"], [4, 5, "literal"]])) == [
        ("emph", "b"),
        ("literal", "c"),
    ]
    tokens, tags = lt.bio_tokens("Choose Format - Cells.", [[7, 21, "menuitem"]], "de")
    assert tokens == ["Choose", "Format", "-", "Cells", "."]
    assert tags == ["O", "B-LOC", "I-LOC", "I-LOC", "O"]
    # No spaces (ja): tokens join back into the exact paragraph, and the entity is exact
    text = "メニュー書式 - セルを選択します。"
    tokens, tags = lt.bio_tokens(text, [[4, 11, "menuitem"]], "ja")
    assert "".join(tokens) == text
    assert structured_generation.entities_from_bio(tokens, tags, joiner="") == [("location", "書式 - セル")]
    # A class without a Universal NER tag (keycode) is O
    assert lt.bio_tokens("Press Ctrl + C", [[6, 14, "keycode"]], "en")[1] == ["O", "O", "O", "O"]


def _html_page(paragraphs: list[tuple[str, str]]) -> bytes:
    body = "".join(f'<p id="{pid}" class="paragraph">{html}</p>' for pid, html in paragraphs)
    return f"<html><body>{body}</body></html>".encode()


def _deb(path, help_dir: str, pages: dict[str, list[tuple[str, str]]]) -> None:
    """A minimal Debian package (an `ar` archive with data.tar.xz) holding help pages."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as archive:
        for page, paragraphs in pages.items():
            content = _html_page(paragraphs)
            info = tarfile.TarInfo(f"./usr/share/libreoffice/help/{help_dir}/{page}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    payload = data.getvalue()
    with open(path, "wb") as f:
        f.write(b"!<arch>\n")
        for name, content in ((b"debian-binary", b"2.0\n"), (b"data.tar.xz", payload)):
            header = name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
            f.write(
                header + str(len(content)).encode().ljust(10) + b"`\n" + content + (b"\n" if len(content) % 2 else b"")
            )


# English paragraphs and their German / Japanese translations; ids are shared. Each page holds 4 paragraphs.
WORDS = ["table", "chart", "sheet", "frame", "page", "cell", "field", "macro", "index", "style", "shape", "slide"]
GERMAN = ["Tabelle", "Diagramm", "Blatt", "Rahmen", "Seite", "Zelle", "Feld", "Makro", "Verzeichnis", "Vorlage"]
GERMAN += ["Form", "Folie"]
JAPANESE = [
    "表",
    "グラフ",
    "シート",
    "フレーム",
    "ページ",
    "セル",
    "フィールド",
    "マクロ",
    "索引",
    "スタイル",
    "図形",
    "スライド",
]


APPLICATIONS = ["swriter", "scalc", "simpress", "shared", "sdraw"]


def _help_pages(language: str) -> dict[str, list[tuple[str, str]]]:
    pages = {}
    for p in range(30):
        paragraphs = []
        for i in range(4):
            n = p * 4 + i
            word = WORDS[n % len(WORDS)]
            if language == "en":
                html = f'Choose <span class="menuitem">Insert - {word.title()} {n}</span> to add the {word} here.'
            elif language == "de":
                if n % 10 == 3:  # markup lost in translation: dropped by the mismatch filter
                    html = f"Wählen Sie Einfügen - {GERMAN[n % 12]} {n}, um hier etwas hinzuzufügen."
                elif n % 10 == 7:  # untranslated: dropped by the pair filter
                    html = f'Choose <span class="menuitem">Insert - {word.title()} {n}</span> to add the {word} here.'
                else:
                    html = (
                        f'Wählen Sie <span class="menuitem">Einfügen - {GERMAN[n % 12]} {n}</span>, um ihn zu setzen.'
                    )
            else:
                html = f'<span class="menuitem">挿入 → {JAPANESE[n % 12]} {n}</span> を選択すると追加されます。'
            paragraphs.append((f"par_id{n}", html))
        pages[f"text/{APPLICATIONS[p % len(APPLICATIONS)]}/01/page{p:02d}.html"] = paragraphs
    return pages


@pytest.fixture
def help_cache(tmp_path, monkeypatch):
    """A cache with fake English, German and Japanese help packages (no download)."""
    debs = tmp_path / "cache" / "libreoffice_help" / "debs"
    debs.mkdir(parents=True)
    for package, help_dir, language in (("en-us", "en-US", "en"), ("de", "de", "de"), ("ja", "ja", "ja")):
        _deb(debs / f"libreoffice-help-{package}_1.0_all.deb", help_dir, _help_pages(language))
    monkeypatch.setenv("TRL_MIDALIGN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_markup_extraction_is_cached_separately(help_cache):
    markup = help_markup("de")
    record = markup["text/swriter/01/page00.html#par_id0"]
    assert spans_of(record["text"], record["spans"]) == [("Einfügen - Tabelle 0", "menuitem")]
    assert (help_cache / "libreoffice_help" / "markup-v1" / "de.jsonl").is_file()
    assert not (help_cache / "libreoffice_help" / "v1").exists()  # the plain-text cache is another one


def test_filters_and_page_split(help_cache):
    data = lt.libreoffice_task_paragraphs(["en", "de", "ja"], ["ja"], seed=3, min_paragraphs=1, max_chars=200)
    # German: the paragraphs whose markup was lost (n % 10 == 3) or that were copied (n % 10 == 7) are dropped
    kept = [int(p["id"].rpartition("par_id")[2]) for split in (data.eval,) for p in split["de"]]
    assert kept and all(n % 10 not in (3, 7) for n in kept)
    assert data.counts["de"]["train"] + data.counts["de"]["alignment"] + data.counts["de"]["eval"] == 96
    assert data.counts["ja"]["train"] + data.counts["ja"]["alignment"] + data.counts["ja"]["eval"] == 120
    # Disjoint pages: no page of the evaluation is in training or alignment, in any language
    train_pages = {lt.page_of(p["id"]) for rows in data.train.values() for p in rows}
    alignment_pages = {lt.page_of(p["id"]) for rows in data.alignment.values() for p in rows}
    eval_pages = {lt.page_of(p["id"]) for rows in data.eval.values() for p in rows}
    assert train_pages and alignment_pages and eval_pages
    assert (
        not (train_pages & eval_pages) and not (alignment_pages & eval_pages) and not (train_pages & alignment_pages)
    )
    # The split does not depend on the languages asked for
    other = lt.libreoffice_task_paragraphs(["en"], seed=3, min_paragraphs=1, max_chars=200)
    assert [p["id"] for p in other.train["en"]] == [p["id"] for p in data.train["en"]]
    assert list(data.train) == ["en"] and list(data.alignment) == ["ja"]


def test_written_files_load_in_each_recipe(help_cache, tmp_path):
    data = lt.libreoffice_task_paragraphs(["en", "de", "ja"], ["ja"], min_paragraphs=1, max_chars=200)
    out = tmp_path / "data"

    # Slot filling: MASSIVE rows, partitions train/test, pairs with a locale column
    written = lt.write_task_data("slot_filling", data, out)
    assert written.eval_languages == ["en-US", "de-DE", "ja-JP"] and written.alignment_languages == ["ja-JP"]
    train = loading.load_language_rows(written.dataset, None, "train", ["en-US"], "locale")
    test = loading.load_language_rows(written.dataset, None, "test", None, "locale")
    assert len(train) == len(data.train["en"]) and set(test["locale"]) == {"en-US", "de-DE", "ja-JP"}
    rows = slot_filling.train_dataset(train, "locale", conversational=False)
    assert any("menuitem: Insert - " in r["completion"] for r in rows)
    examples = slot_filling.examples(test, "locale", conversational=False)
    assert all(e["reference"].startswith("menuitem: ") for e in examples)
    ids = {}
    for row in test:
        ids.setdefault(row["id"], set()).add(row["locale"])
    assert any(len(locales) > 1 for locales in ids.values())  # ids are shared across languages

    class Args:
        alignment_dataset_name, alignment_dataset_config, alignment_dataset_split = written.pairs, None, "train"
        alignment_pivot_language, language_column, max_alignment_pairs = "en-US", "locale", None

    pairs = loading.load_pair_dataset(Args, ["ja-JP"], seed=0)
    assert len(pairs) == len(data.alignment["ja"]) and set(pairs["language"]) == {"ja-JP"}

    # Structured generation: tokens + BIO tags; the JSON answer holds the exact span
    written = lt.write_task_data("structured_generation", data, out)
    test = loading.load_language_rows(written.dataset, None, "test", None, "language")
    examples = structured_generation.examples(test, "language", conversational=False)
    by_language = {e["language"]: e for e in examples}
    assert set(by_language) == {"en", "de", "ja"}
    located = json.loads(by_language["ja"]["reference"])["location"]
    assert located and located[0].startswith("挿入 → ")
    assert structured_generation.english_languages(
        loading.load_split(written.dataset, None, "train"), "language", "en"
    ) == ["en"]

    # Translation: one direction per language, the train language's pairs as task rows
    data = lt.libreoffice_task_paragraphs(["de", "ja"], ["ja"], ["de"], min_paragraphs=1, max_chars=200)
    written = lt.write_task_data("translation", data, out, translation_directions="both")
    assert written.train_languages == ["de-en", "en-de"]
    assert written.eval_languages == ["de-en", "ja-en", "en-de", "en-ja"]
    rows = translation.direction_rows(written.dataset, None, "test", "ja-en", "en")
    assert len(rows) == len(data.eval["ja"]) and rows[0]["target"].startswith("Choose Insert - ")
    train = translation.direction_rows(written.dataset, None, "train", "en-de", "en")
    assert train[0]["source"].startswith("Choose ") and train[0]["target"].startswith("Wählen Sie ")


def test_classification_by_application_with_page_disjoint_dev_and_test(help_cache, tmp_path):
    """The label is the page's application (Draw merged with Impress, shared pages dropped), the same in every
    language; train, dev, alignment and test pages are disjoint; the written files load as the recipe reads them."""
    assert lt.application_of("text/sdraw/01/x.html#p") == lt.application_of("text/simpress/01/y.html#p")
    assert lt.application_of("text/shared/01/x.html#p") is None and lt.application_of("other/x.html#p") is None
    data = lt.libreoffice_task_paragraphs(["en", "de", "ja"], ["ja"], seed=1, min_paragraphs=1, max_chars=200,
                                          dev_fraction=0.3, by_application=True, no_span_fraction=1.0)  # fmt: skip
    labels = {"Writer", "Calc", "Impress and Draw"}
    every = [p for split in (data.train, data.dev, data.alignment, data.eval) for rows in split.values() for p in rows]
    assert {p["label"] for p in every} == labels and all("/shared/" not in p["id"] for p in every)
    assert all(p["label"] == lt.application_of(p["id"]) for p in every)
    pages = {
        name: {lt.page_of(p["id"]) for rows in split.values() for p in rows}
        for name, split in (
            ("train", data.train),
            ("dev", data.dev),
            ("alignment", data.alignment),
            ("eval", data.eval),
        )
    }
    assert all(pages.values()) and list(data.dev) == ["en"]
    for a in pages:
        for b in pages:
            assert a == b or not pages[a] & pages[b], (a, b)
    # dev pages come out of the train pages only: the other splits are those of dev_fraction=0
    plain = lt.libreoffice_task_paragraphs(["en"], seed=1, min_paragraphs=1, max_chars=200, by_application=True,
                                           no_span_fraction=1.0)  # fmt: skip
    assert {p["id"] for p in plain.eval["en"]} == {p["id"] for p in data.eval["en"]}
    assert {p["id"] for p in plain.train["en"]} == {p["id"] for p in data.train["en"] + data.dev["en"]}
    # A cap keeps the labels even
    capped = lt.libreoffice_task_paragraphs(["en"], seed=1, min_paragraphs=1, max_chars=200, by_application=True,
                                            no_span_fraction=1.0, max_train=9)  # fmt: skip
    assert sorted(p["label"] for p in capped.train["en"]) == sorted([*labels] * 3)
    written = lt.write_task_data("classification", data, tmp_path / "data")
    assert written.eval_languages == ["en", "de", "ja"] and written.alignment_languages == ["ja"]
    for split, languages, n in (("train", ["en"], len(data.train["en"])), ("dev", ["en"], len(data.dev["en"])),
                                ("test", None, sum(map(len, data.eval.values())))):  # fmt: skip
        rows = loading.load_language_rows(written.dataset, None, split, languages, "language")
        assert len(rows) == n and set(rows.column_names) >= {"id", "text", "label", "language"}
    test = loading.load_language_rows(written.dataset, None, "test", None, "language")
    by_id = {}
    for row in test:
        by_id.setdefault(row["id"], set()).add(row["label"])
    assert all(len(found) == 1 for found in by_id.values())  # the same label in every language
    assert written.rows["ja"]["test"] == len(data.eval["ja"]) and written.rows["en"]["dev"] == len(data.dev["en"])


def test_bad_input_messages(help_cache, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown LibreOffice help language 'xx'.*Available languages: ca, "):
        lt.libreoffice_task_paragraphs(["xx"])
    with pytest.raises(ValueError, match=r"'de' has only \d+ usable paragraphs in the eval pages.*--min_paragraphs"):
        lt.libreoffice_task_paragraphs(["de"], min_paragraphs=40)
    # Dropped with a warning instead, when asked for; never an empty evaluation set
    counts = lt.libreoffice_task_paragraphs(["de", "ja"], min_paragraphs=1).counts
    assert counts["de"]["eval"] < counts["ja"]["eval"]  # the German filters drop 2 paragraphs in 10
    least = counts["ja"]["eval"]
    data = lt.libreoffice_task_paragraphs(["de", "ja"], min_paragraphs=least, drop_short_languages=True)
    assert list(data.eval) == ["ja"] and len(data.eval["ja"]) == least
    with pytest.raises(ValueError, match="help language 'eu' has none. Help languages with a MASSIVE locale: ca, "):
        lt.task_language_code("eu", "slot_filling")
    assert (
        lt.task_language_code("zh-cn", "slot_filling") == "zh-CN"
        and lt.task_language_code("zh-cn", "translation") == "zh"
    )
    # A language whose evaluation paragraphs have no gold span of the task
    data = lt.libreoffice_task_paragraphs(["ja"], min_paragraphs=1)
    for row in data.eval["ja"]:
        row["spans"] = []
    with pytest.raises(ValueError, match=r"Language 'ja' has no gold span .* drop it"):
        lt.write_task_data("slot_filling", data, tmp_path)
    with pytest.raises(ValueError, match="non-English"):
        lt.write_task_data("translation", lt.libreoffice_task_paragraphs(["ja"], min_paragraphs=1), tmp_path)


def test_paragraph_without_gold_spans_is_refused_with_the_language(help_cache, monkeypatch):
    # Japanese translations that lost all markup: the span tasks refuse the language, naming it
    original = lt.help_markup

    def without_spans(language, cache_dir=None):
        records = original(language, cache_dir)
        if language == "ja":
            return {k: {"text": v["text"].replace("→", "->"), "spans": []} for k, v in records.items()}
        return records

    monkeypatch.setattr(lt, "help_markup", without_spans)
    with pytest.raises(ValueError, match=r"Language 'ja' has no gold spans in the eval pages"):
        lt.libreoffice_task_paragraphs(["ja"], min_paragraphs=1)


@pytest.mark.slow
@pytest.mark.downloads
def test_transfer_quick_end_to_end(tmp_path):
    """`--quick` (a tiny Gemma 3, 2 seeds) end to end on the classification task: data, arm files, both arms with the
    dev-loss checkpoint, probes, the report with its gate, intervals and flags; then --report_only, a resumed call
    with another regime setting (refused), and a run cut short that the next call continues from its checkpoint. About
    6 minutes on 2 cores."""
    output_dir = tmp_path / "transfer"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    base = [sys.executable, os.path.join(HERE, "transfer.py"), "--task", "classification"]
    command = [*base, "--output_dir", str(output_dir), "--quick"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(output_dir / "transfer.json") as f:
        transfer = json.load(f)
    assert transfer["task"] == "classification" and transfer["metric"] == "accuracy"
    assert transfer["seeds"] == [0, 1] and len(transfer["eval_languages"]) >= 10
    for lang in transfer["eval_languages"]:
        entry = transfer["scores"]["languages"][lang]
        assert entry["paired_seeds"] == [0, 1] and entry["interval"]["n"] == 2
        assert all(isinstance(s, float) and math.isfinite(s) for s in entry["baseline"] + entry["aligned"])
    # The flags: 2 seeds (< 5), 4 test rows per language (< 256)
    assert transfer["flags"]["too_few_seeds"] and set(transfer["flags"]["short_languages"]) == set(
        transfer["eval_languages"]
    )
    markdown = (output_dir / "transfer.md").read_text()
    assert ("No claim: the task was not learned" in markdown) == (not transfer["gate"]["passed"])
    assert "fewer than the 256 asked" in markdown and (output_dir / "transfer.png").is_file()
    runs = [json.loads(line) for line in (output_dir / "runs.jsonl").read_text().splitlines()]
    tasks = {(r["arm"], r["seed"]): r for r in runs if r["kind"] == "task"}
    plan = transfer["plan"]
    for seed in (0, 1):
        baseline, aligned = tasks["baseline", seed], tasks["aligned", seed]
        assert (
            baseline["global_step"] == plan["baseline_steps"] and aligned["global_step"] == 2 * plan["baseline_steps"]
        )
        assert aligned["alignment_losses"] and all(math.isfinite(x) for x in baseline["losses"])
        # Both arms evaluated the dev loss at the same task steps, and kept the best checkpoint
        assert [s for s, _ in baseline["dev_losses"]] == [s for s, _ in aligned["dev_losses"]]
        assert len(baseline["dev_losses"]) == plan["baseline_steps"] // plan["eval_steps"]
        for run in (baseline, aligned):
            best = min(loss for _, loss in run["dev_losses"])
            assert run["best_dev_loss"] == pytest.approx(best)
            weights = load_file(output_dir / run["run_dir"] / "adapter_model.safetensors")
            assert any("lora_B" in name and tensor.abs().max() > 0 for name, tensor in weights.items())
    # --report_only rebuilds the same report from runs.jsonl
    os.remove(output_dir / "transfer.json")
    done = subprocess.run([*base, "--output_dir", str(output_dir), "--report_only"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with open(output_dir / "transfer.json") as f:
        assert json.load(f)["scores"] == transfer["scores"]
    # A resumed call with another regime setting is refused, naming it, before anything is rewritten
    before = (output_dir / "runs.jsonl").read_text()
    command = [*base, "--output_dir", str(output_dir), "--quick", "--gradient_accumulation_steps", "2"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "gradient_accumulation_steps=4, this call asks for" in done.stderr
    assert (output_dir / "runs.jsonl").read_text() == before
    # An aligned run cut short after its first save (the process killed): the next call continues it from that
    # checkpoint, with its optimizer state, and ends where the uninterrupted run ended
    full = tasks["aligned", 1]
    run_dir = output_dir / full["run_dir"]
    first = plan["aligned_eval_steps"]
    for name in os.listdir(run_dir):
        if name.startswith("checkpoint-") and name != f"checkpoint-{first}":
            shutil.rmtree(run_dir / name)
    os.remove(run_dir / "eval_results.json")
    kept = [r for r in runs if (r["arm"], r["seed"]) != ("aligned", 1)]
    (output_dir / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    command = [*base, "--output_dir", str(output_dir), "--quick"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resuming from {run_dir / f'checkpoint-{first}'}" in done.stdout
    resumed = {(r["kind"], r["arm"], r["seed"]): r for r in map(json.loads, open(output_dir / "runs.jsonl"))}
    resumed = resumed["task", "aligned", 1]
    assert resumed["resumed_from_step"] == first and resumed["global_step"] == full["global_step"]
    assert [s for s, _ in resumed["dev_losses"]] == [s for s, _ in full["dev_losses"]]
    assert [x for _, x in resumed["dev_losses"]] == pytest.approx([x for _, x in full["dev_losses"]], rel=1e-4)
    assert resumed["scores"] == full["scores"]


def _benchmark(name: str):
    """The script `experiments/transfer/<name>.py` as a module."""
    return load_script(os.path.join(HERE, f"{name}.py"))


def test_capped_split_keeps_the_share_of_paragraphs_with_spans():
    """The cap takes a random sample of the kept paragraphs, not the first ones of the shuffle (which held all the
    kept paragraphs without spans: 66% of a capped split answered None instead of at most 25%)."""
    rows = [{"id": f"page{i}.html#par{i}", "spans": [[0, 1, "emph"]] if i % 5 == 0 else []} for i in range(1000)]
    for seed in range(5):
        capped = lt._cap(rows, 100, 0.25, seed, "en:train")
        without = sum(1 for row in capped if not row["spans"])
        assert len(capped) == 100 and 10 <= without <= 40, (seed, without)
        assert len({row["id"] for row in capped}) == 100
    assert all(row["spans"] for row in lt._cap(rows, 100, 0.0, 0, "en:train"))


def test_paired_interval_equals_scipy_paired_t_test():
    """The paired difference's 95% t interval and p-value against scipy's paired t-test on the two arms."""
    from scipy import stats

    outputs = _benchmark("transfer_outputs")
    rng = random.Random(0)
    for n in (2, 3, 5, 8):
        baseline = [rng.uniform(0.2, 0.6) for _ in range(n)]
        aligned = [b + rng.gauss(0.015, 0.02) for b in baseline]
        interval = outputs.paired_interval([a - b for a, b in zip(aligned, baseline)])
        test = stats.ttest_rel(aligned, baseline)
        low, high = test.confidence_interval(0.95)
        assert interval["n"] == n and interval["mean"] == pytest.approx(
            statistics.fmean(aligned) - statistics.fmean(baseline)
        )
        assert (interval["low"], interval["high"]) == (pytest.approx(low), pytest.approx(high))
        assert interval["p"] == pytest.approx(test.pvalue)
    one = outputs.paired_interval([0.1])
    assert one["mean"] == 0.1 and math.isnan(one["low"]) and math.isnan(one["p"])
    with pytest.raises(ValueError, match="not a finite number"):
        outputs.paired_interval([0.1, float("nan")])


def test_paired_power_matches_a_simulation_of_the_paired_t_interval():
    """paired_power against a plain simulation of what the report does with n seeds: draw n paired differences,
    take their 95% t interval, count how often its lower end is above 0; and its seed counts against the half-width
    of paired_interval on samples of exactly that sd."""
    import numpy as np
    from scipy import stats

    outputs = _benchmark("transfer_outputs")
    rng = np.random.default_rng(0)
    std, effect = 0.032, 0.015
    for n in (3, 5, 10):
        power = outputs.paired_power(std, n, effect)
        for true_mean, expected in ((effect, power["power"]), (power["detectable"], 0.8)):
            draws = rng.normal(true_mean, std, size=(40_000, n))
            low = draws.mean(1) - stats.t.ppf(0.975, n - 1) * draws.std(1, ddof=1) / np.sqrt(n)
            assert float((low > 0).mean()) == pytest.approx(expected, abs=0.01), (n, true_mean)
        assert 0.0 < power["power"] < 0.8 and power["detectable"] > effect

    def half_width(k: int) -> float:  # of a sample with sample sd exactly `std`
        z = np.linspace(-1.0, 1.0, k)
        interval = outputs.paired_interval(list(0.01 + std * z / z.std(ddof=1)))
        assert interval["std"] == pytest.approx(std)
        return (interval["high"] - interval["low"]) / 2

    power = outputs.paired_power(std, 5, effect)
    assert power["half_width"] == pytest.approx(half_width(5))
    k = power["seeds_for_half_width"]
    assert half_width(k) <= effect < half_width(k - 1)
    k = power["seeds_for_power"]
    assert outputs.paired_power(std, k, effect)["power"] >= 0.8 > outputs.paired_power(std, k - 1, effect)["power"]
    assert outputs.paired_power(std, 5, 0.2)["power"] > 0.99  # an effect far above the noise
    assert outputs.paired_power(std, 5, 0.2, min_seeds=5)["seeds_for_power"] == 5  # never fewer than asked
    assert (
        outputs.paired_power(std, 2, effect, target=0.99)["detectable"] > 0
    )  # the bracket grows until it holds the target
    # No spread (equal differences in every seed, 0 up to rounding) and one seed: nothing to estimate
    for nothing in (outputs.paired_power(std, 1, effect), outputs.paired_power(1e-17, 5, effect)):
        assert math.isnan(nothing["power"]) and nothing["seeds_for_power"] is None
    with pytest.raises(ValueError, match="effect above 0"):
        outputs.paired_power(std, 5, 0.0)


def _write_report_inputs(
    tmp_path, runs: list[dict], seeds: int = 3, max_eval: int = 4, min_eval_rows: int = 4, **more_settings
):
    (tmp_path / "data").mkdir(exist_ok=True)
    languages = {"en": "en", "ja": "ja", "fr": "fr", "de": "de"}
    data = {"eval_languages": ["en", "ja", "fr", "de"], "train_languages": ["en"], "alignment_languages": ["ja"],
            "languages": languages, "counts": {}, "plan": {"baseline_steps": 10}}  # fmt: skip
    (tmp_path / "data" / "data.json").write_text(json.dumps(data))
    settings = {"task": "classification", "model_name": "m", "align_layer": "2", "alignment_languages": ["ja"],
                "train_languages": ["en"], "seeds": seeds, "max_eval": max_eval, "min_eval_rows": min_eval_rows,
                "plateau_tolerance": 0.02, "plateau_window": 0.2, **more_settings}  # fmt: skip
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))


def _task_run(arm, seed, scores, dev_losses=((2, 1.0), (4, 0.8), (6, 0.7), (8, 0.695), (10, 0.69)), rows=4):
    languages = ["en", "ja", "fr", "de"]
    return {"kind": "task", "arm": arm, "seed": seed, "metric": "accuracy", "global_step": 10, "losses": [1.0],
            "scores": dict(zip(languages, scores)), "reference_loss": {lang: 2.0 - s for lang, s in zip(languages, scores)},
            "trivial": dict.fromkeys(languages, 0.25), "num_examples": dict.fromkeys(languages, rows),
            "dev_losses": [list(x) for x in dev_losses], "best_step": 10, "wall_s": 1.0}  # fmt: skip


def test_report_pairs_the_arms_by_seed_with_intervals_and_the_primary_metric(tmp_path):
    """build_report on hand-written runs: per-language paired differences and intervals, the pre-registered primary
    metric (the unseen languages fr, de; not the alignment language ja, not English) paired by seed."""
    driver, outputs = _benchmark("transfer"), _benchmark("transfer_outputs")
    scores = {("baseline", 0): [0.5, 0.3, 0.4, 0.3], ("aligned", 0): [0.6, 0.4, 0.45, 0.35],
              ("baseline", 1): [0.6, 0.2, 0.3, 0.3], ("aligned", 1): [0.6, 0.3, 0.35, 0.3],
              ("baseline", 2): [0.55, 0.3, 0.3, 0.4], ("aligned", 2): [0.5, 0.2, 0.36, 0.39]}  # fmt: skip
    _write_report_inputs(tmp_path, [_task_run(arm, seed, v) for (arm, seed), v in scores.items()])
    transfer = driver.build_report(str(tmp_path))
    assert transfer["gate"]["passed"], transfer["gate"]
    assert transfer["groups"]["unseen (primary)"] == ["fr", "de"]
    assert transfer["groups"]["alignment languages"] == ["ja"] and transfer["groups"]["task languages"] == ["en"]
    for i, lang in enumerate(["en", "ja", "fr", "de"]):
        expected = [scores["aligned", s][i] - scores["baseline", s][i] for s in range(3)]
        entry = transfer["scores"]["languages"][lang]
        assert entry["differences"] == pytest.approx(expected)
        assert entry["interval"] == pytest.approx(outputs.paired_interval(expected), nan_ok=True)
        assert transfer["reference_loss"]["languages"][lang]["differences"] == pytest.approx([-x for x in expected])
    primary = [
        statistics.fmean(scores["aligned", s][i] for i in (2, 3))
        - statistics.fmean(scores["baseline", s][i] for i in (2, 3))
        for s in range(3)
    ]
    assert transfer["primary"]["differences"] == pytest.approx(primary)
    assert transfer["primary"]["interval"]["mean"] == pytest.approx(statistics.fmean(primary))
    markdown = (tmp_path / "transfer.md").read_text()
    assert markdown.startswith("# Task transfer") and "Primary metric (mean over the 2 unseen languages" in markdown
    assert "only 3 paired seeds (pre-registered: at least 5)" in markdown  # flagged next to the number
    # What these seeds can resolve, at the sd of their paired primary differences
    assert transfer["power"] == pytest.approx(
        outputs.paired_power(statistics.stdev(primary), 3, driver.PAPER_EFFECT), nan_ok=True
    )
    half = transfer["power"]["half_width"]
    assert (
        f"half-width at this sd is {half:.3f}" in markdown
        and f"these seeds, {statistics.stdev(primary):.3f}, taken" in markdown
    )
    assert (tmp_path / "transfer.png").is_file()
    assert "`accuracy` per language and group:" in markdown  # every row generated (or none: classification)
    # With --max_generate the metric's rows are fewer than the reference loss's: said above the metric's table
    runs = [{**_task_run(arm, seed, v), "num_generated": dict.fromkeys(["en", "ja", "fr", "de"], 2)}
            for (arm, seed), v in scores.items()]  # fmt: skip
    _write_report_inputs(tmp_path, runs)
    driver.build_report(str(tmp_path))
    assert (
        "`accuracy` per language and group (from at most 2 generated answers per language; the reference loss uses "
        "all rows):" in (tmp_path / "transfer.md").read_text()
    )
    # chrF is on a 0-100 scale: the paper's effect is 1.5 there
    runs = [{**_task_run(arm, seed, v), "metric": "chrf"} for (arm, seed), v in scores.items()]
    _write_report_inputs(tmp_path, runs)
    assert driver.build_report(str(tmp_path))["power"]["effect"] == pytest.approx(100 * driver.PAPER_EFFECT)


def test_translation_primary_is_the_reference_loss_with_its_power_for_a_1_percent_reduction(tmp_path):
    """Translation's pre-registered primary is the teacher-forced reference loss of the unseen languages (chrF, from
    the first --max_generate rows, is reported beside it); a gain is a lower loss."""
    driver, outputs = _benchmark("transfer"), _benchmark("transfer_outputs")
    scores = {("baseline", 0): [0.5, 0.3, 0.4, 0.3], ("aligned", 0): [0.6, 0.4, 0.45, 0.35],
              ("baseline", 1): [0.6, 0.2, 0.3, 0.3], ("aligned", 1): [0.6, 0.3, 0.38, 0.3],
              ("baseline", 2): [0.55, 0.3, 0.3, 0.4], ("aligned", 2): [0.5, 0.2, 0.36, 0.39]}  # fmt: skip
    runs = [{**_task_run(arm, seed, v), "metric": "chrf"} for (arm, seed), v in scores.items()]
    _write_report_inputs(tmp_path, runs)
    settings = json.loads((tmp_path / "settings.json").read_text())
    (tmp_path / "settings.json").write_text(json.dumps({**settings, "task": "translation"}))
    transfer = driver.build_report(str(tmp_path))
    # reference loss = 2 - score in _task_run: the loss differences are minus the score differences
    loss = {key: [2.0 - x for x in v] for key, v in scores.items()}
    primary = [
        statistics.fmean(loss["aligned", s][i] for i in (2, 3))
        - statistics.fmean(loss["baseline", s][i] for i in (2, 3))
        for s in range(3)
    ]
    assert transfer["primary"]["measure"] == "reference_loss"
    assert transfer["primary"]["differences"] == pytest.approx(primary) and max(primary) < 0  # lower: a gain
    baseline = statistics.fmean(statistics.fmean(loss["baseline", s][i] for i in (2, 3)) for s in range(3))
    expected = outputs.paired_power(statistics.stdev(primary), 3, 0.01 * baseline, min_seeds=driver.MIN_SEEDS)
    assert transfer["power"] == pytest.approx(expected, nan_ok=True)
    markdown = (tmp_path / "transfer.md").read_text()
    assert "Primary metric (teacher-forced loss per reference token, nats, lower is better" in markdown
    assert f"a true reduction of {0.01 * baseline:.3g} nats (1% of the baseline's loss" in markdown
    # classification keeps its metric as the primary
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    assert driver.build_report(str(tmp_path))["primary"]["measure"] == "scores"


def test_english_gate_refuses_a_claim_when_the_task_was_not_learned(tmp_path):
    driver = _benchmark("transfer")
    falling = ((2, 1.0), (4, 0.9), (6, 0.8), (8, 0.7), (10, 0.6))  # still 14% down over the last fifth
    flat = ((2, 1.0), (4, 0.8), (6, 0.7), (8, 0.70), (10, 0.69))  # 1.4% down: plateaued
    runs = [_task_run("baseline", 0, [0.5] * 4, flat), _task_run("baseline", 1, [0.5] * 4, falling)]
    gate = driver.english_gate(runs, ["en"])
    assert not gate["passed"] and [e["plateaued"] for e in gate["per_seed"]] == [True, False]
    assert gate["per_seed"][1]["fall"] == pytest.approx((0.7 - 0.6) / 0.7)
    assert "baseline seed 1: dev loss still fell by 14.3%" in gate["reasons"][0]
    # At the majority baseline in English: not learned, even when the dev loss is flat
    gate = driver.english_gate([_task_run("baseline", 0, [0.25] * 4, flat)], ["en"])
    assert not gate["passed"] and "is not above the best constant answer's (0.250)" in gate["reasons"][0]
    assert driver.english_gate([_task_run("baseline", 0, [0.3] * 4, flat)], ["en"])["passed"]
    # No dev evaluation before the last fifth: cannot be checked, so no claim
    gate = driver.english_gate([_task_run("baseline", 0, [0.5] * 4, ((10, 0.6),))], ["en"])
    assert not gate["passed"] and "cannot be checked" in gate["reasons"][0]
    # The report leads with it
    runs = [_task_run(arm, seed, [0.5] * 4, falling) for seed in range(2) for arm in ("baseline", "aligned")]
    _write_report_inputs(tmp_path, runs, seeds=2)
    driver.build_report(str(tmp_path))
    assert (
        "**No claim: the task was not learned.** baseline seed 0: dev loss still fell"
        in (tmp_path / "transfer.md").read_text()
    )


def test_report_names_a_missing_seed_and_a_short_language_next_to_the_number(tmp_path):
    driver = _benchmark("transfer")
    runs = [_task_run(arm, seed, [0.5, 0.3, 0.4, 0.3]) for seed in range(3) for arm in ("baseline", "aligned")]
    runs = [r for r in runs if (r["arm"], r["seed"]) != ("aligned", 2)]  # seed 2's aligned run is missing
    runs[0]["num_examples"]["de"] = 3  # de has fewer test rows than asked in one run
    del runs[2]["scores"]["fr"]  # and fr has no score in seed 1's baseline
    runs[4]["scores"]["ja"] = 0.9  # seed 2's baseline, whose aligned run is missing, scores ja higher
    _write_report_inputs(tmp_path, runs, seeds=3, max_eval=4, min_eval_rows=4)
    transfer = driver.build_report(str(tmp_path))
    assert transfer["flags"]["missing_runs"] == ["seed 2: no aligned run"]
    assert transfer["flags"]["short_languages"]["de"] == "3 test rows (fewer than the 4 asked)"
    assert transfer["scores"]["languages"]["fr"]["paired_seeds"] == [0]
    # The primary mean never averages a seed with a language missing: seeds 1 (fr) and 2 (aligned) are left out
    assert transfer["primary"]["seeds"] == [0] and transfer["primary"]["incomplete_seeds"] == [1, 2]
    markdown = (tmp_path / "transfer.md").read_text()
    headline = markdown.splitlines()[2]
    assert "missing: seed 2: no aligned run" in headline and "seeds [1, 2] left out of the mean" in headline
    assert "de (3 test rows (fewer than the 4 asked))" in headline
    assert "| 3 test rows (fewer than the 4 asked) |" in markdown  # in the table, next to the number
    # A row's arm means are over its paired seeds only (seed 2's ja baseline, 0.9, is not averaged in), the others named
    assert "| ja | 0.300 ± 0.000 | 0.300 ± 0.000 | " in markdown and "| ok | [2] |" in markdown
    assert "| fr | 0.400 ± 0.000 | 0.400 ± 0.000 | " in markdown and "| ok | [1, 2] |" in markdown


def test_report_says_when_the_kept_checkpoint_had_not_yet_learned_the_alignment(tmp_path):
    """The layer-9 arm's kept checkpoints (best English dev loss, step 128 of 256) had an alignment loss of 3.40 with
    chance at ln 32 = 3.47: the report names such seeds, next to each aligned run's loss at its kept checkpoint."""
    driver = _benchmark("transfer")
    chance = math.log(4)  # 4 pairs per alignment step
    flat = [0.99 * chance] * 10  # one loss per optimizer step, never below 95% of chance
    falling = [chance - 0.15 * step for step in range(10)]
    runs = [_task_run(arm, seed, [0.5, 0.3, 0.4, 0.3]) for seed in range(2) for arm in ("baseline", "aligned")]
    for run, losses in zip((r for r in runs if r["arm"] == "aligned"), (flat, falling)):
        run.update(alignment_losses=losses, best_step=6)
    _write_report_inputs(tmp_path, runs, seeds=2, align_batch_size=4)
    transfer = driver.build_report(str(tmp_path))
    kept = transfer["flags"]["alignment_at_kept"]
    assert [k["seed"] for k in kept] == [0, 1] and all(k["step"] == 6 for k in kept)
    assert kept[0]["at_kept"] == pytest.approx(0.99 * chance) and kept[0]["at_chance"]
    assert kept[1]["at_kept"] == pytest.approx(statistics.fmean(falling[:6])) and not kept[1]["at_chance"]
    assert kept[1]["first"] == pytest.approx(statistics.fmean(falling[:8]))
    assert kept[1]["last"] == pytest.approx(statistics.fmean(falling[2:]))
    assert transfer["flags"]["unaligned_seeds"] == [0]
    markdown = (tmp_path / "transfer.md").read_text()
    assert "aligned seeds [0]: alignment loss still at chance at the kept checkpoint" in markdown.splitlines()[2]
    assert f"is {chance:.3f}): seed 0 {0.99 * chance:.3f} -> {0.99 * chance:.3f} at step 6" in markdown
    assert "**The alignment had not learned at the kept checkpoint in aligned seeds [0]**" in markdown
    # A log without one alignment loss per step cannot be placed at the kept step: left out, not guessed
    runs[1]["alignment_losses"] = flat[:5]
    _write_report_inputs(tmp_path, runs, seeds=2, align_batch_size=4)
    transfer = driver.build_report(str(tmp_path))
    flags = transfer["flags"]
    assert [k["seed"] for k in flags["alignment_at_kept"]] == [1] and not flags["unaligned_seeds"]
    assert "had not learned" not in (tmp_path / "transfer.md").read_text()


def test_run_order_starts_the_aligned_arms_of_a_block_of_seeds_together():
    run_order = _benchmark("transfer").run_order
    pending = [("baseline", 1), ("aligned", 1), ("baseline", 2), ("aligned", 2), ("baseline", 3), ("aligned", 3)]
    assert run_order(pending, 2) == [
        ("aligned", 1), ("aligned", 2), ("baseline", 1), ("baseline", 2), ("aligned", 3), ("baseline", 3)
    ]  # fmt: skip
    assert run_order(pending, 1) == [
        ("aligned", 1), ("baseline", 1), ("aligned", 2), ("baseline", 2), ("aligned", 3), ("baseline", 3)
    ]  # fmt: skip
    # a seed whose baseline is recorded already: its aligned arm pairs with the next seed's
    assert run_order([("aligned", 1), ("baseline", 2), ("aligned", 2)], 2) == [
        ("aligned", 1), ("aligned", 2), ("baseline", 2)
    ]  # fmt: skip


def _checkpoint(run_dir, step: int, files) -> str:
    path = os.path.join(run_dir, f"checkpoint-{step}")
    os.makedirs(path)
    for name in files:
        open(os.path.join(path, name), "w").close()
    return path


def test_a_run_cut_short_resumes_from_its_newest_complete_checkpoint_of_the_same_call(tmp_path, capsys):
    driver = _benchmark("transfer")
    run_dir = str(tmp_path / "runs" / "aligned-seed1")
    command = ["/usr/bin/python", "recipe.py", "--seed", "1"]
    assert driver.start_or_resume(run_dir, command, "aligned") is None  # a fresh run records its call
    with open(os.path.join(run_dir, "command.json")) as f:
        assert json.load(f) == command[1:]
    full = [*driver.RESUME_FILES, "alignment_state.json"]
    complete = _checkpoint(run_dir, 32, full)
    _checkpoint(run_dir, 64, [name for name in full if name != "alignment_state.json"])  # cut while being saved
    _checkpoint(run_dir, 96, [name for name in full if name != "optimizer.pt"])  # saved with --save_only_model
    # The same call (another interpreter) resumes from checkpoint-32; the baseline arm needs no alignment state
    assert driver.start_or_resume(run_dir, ["/venv/bin/python", *command[1:]], "aligned") == complete
    assert driver.start_or_resume(run_dir, command, "baseline") == os.path.join(run_dir, "checkpoint-64")
    # Another call (another seed) starts again, and the earlier run is moved aside, not deleted
    other = ["/usr/bin/python", "recipe.py", "--seed", "2"]
    assert driver.start_or_resume(run_dir, other, "aligned") is None
    assert os.path.isdir(os.path.join(f"{run_dir}.interrupted-1", "checkpoint-32"))
    assert os.listdir(run_dir) == ["command.json"] and "moved to" in capsys.readouterr().out
    # A folder without a recorded call (an earlier driver's, or a run that saved nothing to resume) is moved aside too
    _checkpoint(run_dir, 32, [name for name in full if name != "optimizer.pt"])
    assert driver.start_or_resume(run_dir, other, "aligned") is None
    assert os.path.isdir(os.path.join(f"{run_dir}.interrupted-2", "checkpoint-32"))


def test_training_plan_cuts_rows_to_whole_steps_and_evaluations():
    driver = _benchmark("transfer")
    args = driver.parse_args(
        [
            "--task",
            "classification",
            "--output_dir",
            "o",
            "--train_rows",
            "1000",
            "--epochs",
            "2",
            "--batch_size",
            "16",
        ]
    )
    plan = driver.training_plan(args, available_rows=5000)
    # 16 rows x 4 micro-batches = 64 rows per step: 15 steps per epoch, 30 in 2 epochs, a dev evaluation every 3
    assert plan == {"rows": 960, "rows_per_example": 1, "baseline_steps": 30, "aligned_steps": 60, "eval_steps": 3,
                    "aligned_eval_steps": 6, "warmup_steps": 1, "aligned_warmup_steps": 2,
                    "pairs_per_task_row": 2}  # fmt: skip
    # The defaults: 1024 rows, 8 x 4 = 32 rows per step, 4 epochs: 128 steps, 32 pairs per alignment micro-batch
    args = driver.parse_args(["--task", "classification", "--output_dir", "o"])
    assert driver.training_plan(args, 5000) == {**plan, "rows": 1024, "baseline_steps": 128, "aligned_steps": 256,
                                                "eval_steps": 16, "aligned_eval_steps": 32, "warmup_steps": 4,
                                                "aligned_warmup_steps": 8, "pairs_per_task_row": 4}  # fmt: skip
    args = driver.parse_args(["--task", "classification", "--output_dir", "o", "--train_rows", "1000",
                              "--epochs", "2", "--eval_steps", "4", "--batch_size", "16"])  # fmt: skip
    plan = driver.training_plan(args, available_rows=5000)
    assert plan["baseline_steps"] == 28 and plan["rows"] == 14 * 64  # cut so that evaluation 7 is the last step
    args = driver.parse_args(
        ["--task", "translation", "--output_dir", "o", "--train_rows", "100", "--epochs", "2", "--batch_size", "16"]
    )
    plan = driver.training_plan(args, available_rows=5000, rows_per_example=2)  # de-en and en-de per file row
    assert plan["rows"] == 96 and plan["baseline_steps"] == 2 * 96 * 2 // 64
    with pytest.raises(ValueError, match="less than one optimizer step of 64 rows"):
        driver.training_plan(args, available_rows=40)


def test_arm_files_pair_the_arms_on_the_data(tmp_path):
    """The aligned arm's file holds every micro-batch of the baseline's twice in a row: under the alternate schedule
    (task micro-batch, then alignment micro-batch) its task micro-batches are the baseline's, in the same order; the
    order is the seed's, the same for both arms, and another seed's differs."""
    driver = _benchmark("transfer")
    folder = tmp_path / "data" / "classification"
    folder.mkdir(parents=True)
    rows = [{"id": f"p{i}", "text": f"t{i}", "label": "Calc", "language": "en"} for i in range(150)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "dev.jsonl").write_text(json.dumps(rows[0]) + "\n")
    args = driver.parse_args(["--task", "classification", "--output_dir", str(tmp_path), "--train_rows", "150"])
    data = {"dataset": str(folder), "plan": driver.training_plan(args, len(rows))}
    read = {}
    for seed in (0, 1):
        for arm in ("baseline", "aligned"):
            path = driver.write_arm_data(args, data, seed, arm)
            read[arm, seed] = [json.loads(x)["id"] for x in open(os.path.join(path, "train.jsonl"))]
    size = args.batch_size
    baseline, aligned = read["baseline", 0], read["aligned", 0]
    assert len(baseline) == data["plan"]["rows"] == 128 and len(aligned) == 2 * len(baseline)
    batches = [aligned[i : i + size] for i in range(0, len(aligned), size)]
    assert [x for b in batches[0::2] for x in b] == baseline  # task micro-batches: the baseline's, in order
    assert batches[1::2] == batches[0::2]  # each followed by the same rows (only their pairs are used)
    assert read["baseline", 1] != baseline and sorted(read["baseline", 1]) != sorted(baseline[:0])
    assert len(set(baseline)) == 128


def test_regime_and_aligned_arm_variants_reach_the_recipe_command():
    driver = _benchmark("transfer")
    data = {"dataset": "d", "pairs": "p.jsonl", "train_languages": ["en"], "eval_languages": ["en", "ja"],
            "alignment_languages": ["ja"], "max_alignment_pairs": 100,
            "plan": {"eval_steps": 3, "aligned_eval_steps": 6, "warmup_steps": 1, "aligned_warmup_steps": 2}}  # fmt: skip

    def flag(command, name):
        return command[command.index(name) + 1]

    args = driver.parse_args(["--task", "classification", "--output_dir", "o", "--model", "m"])
    baseline = driver.recipe_command(args, data, "baseline", 0, "run", "arm-dir")
    aligned = driver.recipe_command(args, data, "aligned", 0, "run", "arm-dir")
    for command in (baseline, aligned):  # the paper's regime in both arms
        assert flag(command, "--gradient_accumulation_steps") == "4" and flag(command, "--learning_rate") == "0.0005"
        assert flag(command, "--lr_scheduler_type") == "inverse_sqrt" and flag(command, "--warmup_steps") == (
            "2" if command is aligned else "1"
        )
        assert flag(command, "--weight_decay") == "0.0" and flag(command, "--lora_r") == "8"
        assert flag(command, "--lora_alpha") == "16" and flag(command, "--lora_dropout") == "0.1"
        assert flag(command, "--train_sampling_strategy") == "sequential" and flag(command, "--use_cpu") == "true"
        assert (
            flag(command, "--load_best_model_at_end") == "true"
            and flag(command, "--metric_for_best_model") == "eval_loss"
        )
        assert flag(command, "--dataset_dev_split") == "dev" and flag(command, "--dataset_name") == "arm-dir"
        assert flag(command, "--eval_dataset_name") == "d" and flag(command, "--bf16") == "false"
    assert flag(baseline, "--eval_steps") == flag(baseline, "--save_steps") == "3"
    assert flag(aligned, "--eval_steps") == flag(aligned, "--save_steps") == "6"  # the same task progress
    assert flag(aligned, "--align_batch_size") == "32" and flag(aligned, "--align_layer") == "12"
    assert not any(f.startswith("--align_") for f in baseline)
    assert "--max_generate_samples" not in baseline  # every test row is generated unless --max_generate says so
    args = driver.parse_args(["--task", "translation", "--output_dir", "o", "--model", "m", "--max_generate", "64"])
    for arm in ("baseline", "aligned"):
        assert flag(driver.recipe_command(args, data, arm, 0, "run"), "--max_generate_samples") == "64"
    args = driver.parse_args(["--task", "classification", "--output_dir", "o", "--model", "m", "--device", "cuda",
                              "--bf16", "--align_weight", "0.1", "--align_schedule", "joint", "--align_stop_gradient",
                              "target", "--align_layer", "9", "--gradient_accumulation_steps", "1",
                              "--best_checkpoint", "last"])  # fmt: skip
    aligned = driver.recipe_command(args, data, "aligned", 0, "run")
    assert "--use_cpu" not in aligned and flag(aligned, "--bf16") == "true" and "--eval_strategy" not in aligned
    assert flag(aligned, "--align_weight") == "0.1" and flag(aligned, "--align_schedule") == "joint"
    assert flag(aligned, "--align_stop_gradient") == "target" and flag(aligned, "--align_layer") == "9"
    assert flag(aligned, "--gradient_accumulation_steps") == "1"
    assert driver.training_plan(args, 5000)["aligned_steps"] == driver.training_plan(args, 5000)["baseline_steps"]


def test_answer_statistics_of_slot_filling_outputs():
    """experiments/transfer/transfer_outputs.py on hand-written predictions: untyped F1, verbatim share and None share."""
    outputs = _benchmark("transfer_outputs")
    prompt = slot_filling.PROMPT.format
    records = [  # right span, wrong type / a value not in the request / None for a gold span / right None
        {"prompt": prompt(utterance="Choose Format - Cells"), "reference": "emph: Format - Cells",
         "prediction": "menuitem: Format - Cells"},
        {"prompt": prompt(utterance="Wählen Sie Format - Zellen"), "reference": "menuitem: Format - Zellen",
         "prediction": "menuitem: Format - Cells; emph: Zellen"},
        {"prompt": prompt(utterance="Click OK"), "reference": "emph: OK", "prediction": "None"},
        {"prompt": prompt(utterance="Nothing here"), "reference": "None", "prediction": "None"},
    ]  # fmt: skip
    stats = outputs.answer_statistics(records)
    # untyped: predicted {format - cells, format - cells, zellen}, gold {format - cells, format - zellen, ok}: 1 hit
    assert stats["untyped_f1"] == pytest.approx(2 * (1 / 3) * (1 / 3) / (2 / 3))
    assert stats["verbatim"] == pytest.approx(2 / 3)  # "Format - Cells" is not in the German request
    assert stats["none"] == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="Not a slot-filling prompt"):
        outputs.request_of("Translate this")


def test_answer_statistics_when_a_language_answers_only_none(tmp_path):
    """A language whose answers hold no slot has no verbatim share: the others' mean and the table leave it out (a run
    of the joint weight-10 variant crashed the table with a NaN)."""
    outputs = _benchmark("transfer_outputs")
    prompt = slot_filling.PROMPT.format
    rows = {"en-US": ("Click OK", "emph: OK", "emph: OK"), "de-DE": ("Klicken Sie OK", "emph: OK", "emph: Abbrechen"),
            "km-KH": ("ចុច OK", "emph: OK", "None")}  # fmt: skip
    for seed, languages in enumerate((rows, {k: v for k, v in rows.items() if k != "de-DE"})):
        run = tmp_path / "runs" / f"aligned-seed{seed}"
        run.mkdir(parents=True)
        records = [{"language": lang, "prompt": prompt(utterance=u), "reference": r, "prediction": p}
                   for lang, (u, r, p) in languages.items()]  # fmt: skip
        (run / "eval_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "settings.json").write_text(json.dumps({"task": "slot_filling", "train_languages": ["en"]}))
    stats = outputs.run_statistics(str(tmp_path / "runs" / "aligned-seed0"))
    assert stats["others"]["verbatim"] == 0.0  # de-DE's "Abbrechen" is not in its request; km-KH has no value
    assert stats["others"]["none"] == pytest.approx(1 / 2)
    assert math.isnan(outputs.run_statistics(str(tmp_path / "runs" / "aligned-seed1"))["others"]["verbatim"])
    (table,) = outputs.main([str(tmp_path)])  # seed 1 has no verbatim share in the other languages: one value left
    assert [run["others"]["none"] for run in table["runs"]] == [pytest.approx(0.5), 1.0]


def test_translation_outputs_copied_and_target_script(tmp_path):
    """experiments/transfer/transfer_outputs.py on hand-written translations: copies of the source, answers in the target
    script, the trained directions left out."""
    outputs = _benchmark("transfer_outputs")
    assert outputs.in_script("選択したセルに Calc", "ja") and not outputs.in_script("Editing Curves", "ja")
    assert outputs.in_script("Изменить", "ru") and outputs.in_script("Insert Chart", "en")
    assert not outputs.in_script("", "en") and not outputs.in_script("123 !", "ko")
    rows = [("en-ja", "Editing Curves", "曲線を編集する", "editing  curves"),  # copied, off target
            ("en-ja", "Insert Chart", "グラフの挿入", "グラフを挿入"),  # in the target script
            ("en-fr", "Insert Chart", "Insérer un diagramme", "Insert chart"),  # copied; Latin: no script share
            ("ja-en", "グラフの挿入", "Insert Chart", "Insert a chart"),
            ("ja-en", "グラフの挿入", "Insert Chart", "グラフの挿入"),  # copied, not English
            ("de-en", "Diagramm einfügen", "Insert Chart", "Diagramm einfügen"),  # trained direction: left out
            ("en-de", "Insert Chart", "Diagramm einfügen", "Insert Chart")]  # fmt: skip
    run = tmp_path / "runs" / "baseline-seed0"
    run.mkdir(parents=True)
    records = [{"language": d, "source": src, "reference": ref, "prediction": pred} for d, src, ref, pred in rows]
    (run / "eval_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "settings.json").write_text(json.dumps({"task": "translation", "train_languages": ["de"]}))
    stats = outputs.run_statistics(str(run), "translation", ["de"])
    assert stats["out of en"]["copied"] == pytest.approx((1 / 2 + 1) / 2)  # en-ja, en-fr
    assert stats["out of en"]["target_script"] == pytest.approx(1 / 2)  # en-ja only
    assert stats["into en"] == {"copied": pytest.approx(1 / 2), "target_script": pytest.approx(1 / 2),
                                "reference_script": 1.0}  # fmt: skip
    assert stats["out of en"]["reference_script"] == 1.0
    (table,) = outputs.main([str(tmp_path)])
    assert table["arm"] == "baseline" and table["runs"] == [stats]
    (tmp_path / "settings.json").write_text(json.dumps({"task": "structured_generation", "train_languages": ["en"]}))
    with pytest.raises(SystemExit, match="structured_generation"):
        outputs.main([str(tmp_path)])


def test_baseline_from_copies_the_baseline_runs_only_when_data_and_settings_match(tmp_path):
    driver = _benchmark("transfer")
    settings = {key: 1 for key in driver.BASELINE_SETTINGS}
    for name, extra in (("old", {"align_layer": "12"}), ("new", {"align_layer": "9"})):
        (tmp_path / name / "data").mkdir(parents=True)
        (tmp_path / name / "settings.json").write_text(json.dumps({**settings, **extra}))
        for file in ("rows.jsonl", "probe.jsonl"):
            (tmp_path / name / "data" / file).write_text('{"a": 1}\n')
    old, new = tmp_path / "old", tmp_path / "new"
    records = [{"kind": "probe", "arm": "base", "seed": None, "retrieval": {}},
               {"kind": "task", "arm": "baseline", "seed": 0, "run_dir": "runs/baseline-seed0", "scores": {"x": 0.5}},
               {"kind": "probe", "arm": "baseline", "seed": 0, "retrieval": {}},
               {"kind": "task", "arm": "aligned", "seed": 0, "run_dir": "runs/aligned-seed0", "scores": {"x": 0.1}}]  # fmt: skip
    (old / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = {"dataset": str(new / "data" / "rows.jsonl"), "probe_pairs": str(new / "data" / "probe.jsonl")}
    for _ in range(2):  # a second call (a resumed run) adds nothing
        driver.reuse_baseline(str(old), str(new), {**settings, "align_layer": "9"}, data)
    copied = driver.read_runs(str(new))
    assert [(r["kind"], r["arm"]) for r in copied] == [("probe", "base"), ("task", "baseline"), ("probe", "baseline")]
    assert copied[1]["scores"] == {"x": 0.5} and all(r["reused_from"] == str(old) for r in copied)
    assert os.path.normpath(new / copied[1]["run_dir"]) == str(old / "runs" / "baseline-seed0")
    with pytest.raises(ValueError, match="learning_rate=1.*learning_rate=2"):
        driver.reuse_baseline(str(old), str(new), {**settings, "learning_rate": 2}, data)
    (old / "data" / "probe.jsonl").write_text('{"a": 2}\n')
    with pytest.raises(ValueError, match="probe.jsonl differs"):
        driver.reuse_baseline(str(old), str(new), settings, data)
    with pytest.raises(ValueError, match="no settings.json there"):
        driver.reuse_baseline(str(tmp_path / "missing"), str(new), settings, data)


def test_baseline_from_compares_every_split_of_a_dataset_folder_but_not_the_alignment_pairs(tmp_path):
    """Classification and translation keep their rows as a folder of splits (train, dev, test, pairs, probe pairs)."""
    driver = _benchmark("transfer")
    settings = {key: 1 for key in driver.BASELINE_SETTINGS}
    for name in ("old", "new"):
        folder = tmp_path / name / "data" / "classification"
        folder.mkdir(parents=True)
        (tmp_path / name / "settings.json").write_text(json.dumps(settings))
        for file in ("train.jsonl", "dev.jsonl", "test.jsonl", "pairs.jsonl", "probe_pairs.jsonl"):
            (folder / file).write_text('{"a": 1}\n')
    old, new = tmp_path / "old", tmp_path / "new"
    (old / "runs.jsonl").write_text(json.dumps({"kind": "task", "arm": "baseline", "seed": 0, "scores": {}}) + "\n")
    folder = new / "data" / "classification"
    data = {
        "dataset": str(folder),
        "pairs": str(folder / "pairs.jsonl"),
        "probe_pairs": str(folder / "probe_pairs.jsonl"),
    }
    (old / "data" / "classification" / "pairs.jsonl").write_text('{"other": "pairs"}\n')  # not the baseline's concern
    driver.reuse_baseline(str(old), str(new), settings, data)
    assert [r["arm"] for r in driver.read_runs(str(new))] == ["baseline"]
    for file in ("train.jsonl", "dev.jsonl", "test.jsonl", "probe_pairs.jsonl"):
        (old / "data" / "classification" / file).write_text('{"a": 2}\n')
        with pytest.raises(ValueError, match=f"classification/{file} differs"):
            driver.reuse_baseline(str(old), str(new), settings, data)
        (old / "data" / "classification" / file).write_text('{"a": 1}\n')
    (old / "data" / "classification" / "dev.jsonl").unlink()
    with pytest.raises(ValueError, match="dev.jsonl differs from \\(or lacks\\)"):
        driver.reuse_baseline(str(old), str(new), settings, data)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seeds", "0"], "--seeds must be at least 1, got 0"),
        (["--max_eval", "0"], "--max_eval must be at least 1, got 0"),
        (["--quick", "--probe_pairs", "-3"], "--probe_pairs must be at least 1, got -3"),
        (["--jobs", "0"], "--jobs must be at least 1, got 0"),
        (["--align_batch_size", "1"], "--align_batch_size must be at least 2, got 1"),
        (["--learning_rate", "0"], "--learning_rate must be positive, got 0.0"),
        (["--learning_rate", "nan"], "--learning_rate must be positive, got nan"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1, got 0"),
        (["--train_rows", "0"], "--train_rows must be at least 1, got 0"),
        (["--eval_steps", "0"], "--eval_steps must be at least 1, got 0"),
        (["--max_generate", "0"], "--max_generate must be at least 1, got 0"),
        (["--warmup_ratio", "1.5"], "--warmup_ratio must be below 1"),
        (["--weight_decay", "-1"], "--weight_decay must be 0 or more, got -1.0"),
        (["--batch_size", "16", "--align_batch_size", "24"], "--align_batch_size 24 must be a multiple of"),
        (["--dev_fraction", "0"], "--best_checkpoint dev_loss needs dev rows"),
        (["--align_weight", "-0.5"], "--align_weight must be 0 or more, got -0.5"),
        (["--align_layer", "auto"], "--align_layer must be a layer number .* got 'auto'"),
    ],
)
def test_bad_numbers_are_refused_when_parsing(flags, message, capsys):
    driver = _benchmark("transfer")
    with pytest.raises(SystemExit):
        driver.parse_args(["--task", "slot_filling", "--output_dir", "unused", *flags])
    assert re.search(message, capsys.readouterr().err)
    args = driver.parse_args(["--task", "slot_filling", "--output_dir", "unused", "--align_weight", "0"])
    assert args.align_weight == 0 and args.seeds == 5 and args.align_batch_size == 32


def test_resuming_with_other_settings_is_refused_before_the_data_is_rebuilt(tmp_path):
    driver = _benchmark("transfer")
    out = tmp_path / "run"
    (out / "data" / "slot_filling").mkdir(parents=True)
    common = ["--task", "slot_filling", "--output_dir", str(out), "--model", str(tmp_path / "gemma-3-270m")]
    args = driver.parse_args([*common, "--learning_rate", "1e-3"])
    recorded = {"task": "slot_filling", "model_name": "gemma-3-270m", "train_languages": args.train_languages,
                "alignment_languages": ["ja", "ru"],
                **{key: getattr(args, key) for key in driver.TRAINING_SETTINGS if key not in ("train_languages",
                   "alignment_languages")},
                **{key: getattr(args, key) for key in ("max_eval", "min_eval_rows", "max_new_tokens",
                   "plateau_tolerance", "plateau_window", "eval_languages")},
                "baseline_from": None, "evaluate_from": None}  # fmt: skip
    (out / "settings.json").write_text(json.dumps(recorded))
    (out / "data" / "slot_filling" / "massive.jsonl").write_text('{"a": 1}\n')
    # Nothing recorded yet: any settings may be used (the directory is simply reused)
    driver.check_resume(str(out), {**recorded, "learning_rate": 3e-4})
    (out / "runs.jsonl").write_text(json.dumps({"kind": "task", "arm": "baseline", "seed": 0}) + "\n")
    with pytest.raises(ValueError, match=r"holds runs made with learning_rate=0\.001, this call asks for "
                       r"learning_rate=0\.0003"):  # fmt: skip
        driver.main([*common, "--learning_rate", "3e-4"])
    # the regime's settings are in the fingerprint too
    for flags, message in ((["--gradient_accumulation_steps", "1"], "gradient_accumulation_steps=4, this call asks "
                            "for gradient_accumulation_steps=1"), (["--lr_scheduler_type", "constant"],
                            "lr_scheduler_type='inverse_sqrt'"), (["--best_checkpoint", "last"], "best_checkpoint"),
                           (["--device", "cuda", "--bf16"], "device='cpu'"), (["--align_layer", "9"], "align_layer")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            driver.main([*common, "--learning_rate", "1e-3", *flags])
    # refused before anything in the directory was rewritten
    assert json.loads((out / "settings.json").read_text()) == recorded
    assert (out / "data" / "slot_filling" / "massive.jsonl").read_text() == '{"a": 1}\n'
    with pytest.raises(ValueError, match="alignment_languages=\\['ja', 'ru'\\], this call asks for"):
        driver.check_resume(str(out), {**recorded, "alignment_languages": ["ja"]})
    # More seeds, or dropping --baseline_from once its baselines are copied, resumes
    driver.check_resume(str(out), {**recorded, "seeds": 5, "baseline_from": "elsewhere"})
    # A key an older driver did not record cannot be compared and is let through
    driver.check_resume(str(out), {**recorded, "a_new_setting": 1})


def test_evaluate_from_takes_the_training_settings_of_the_earlier_run(tmp_path):
    driver = _benchmark("transfer")
    old = tmp_path / "old"
    old.mkdir()
    defaults = driver.parse_args(["--task", "slot_filling", "--output_dir", "unused"])
    trained = {"task": "slot_filling", "model_name": "gemma-3-270m", "train_languages": ["en"],
               "alignment_languages": ["ja", "ru"],
               **{key: getattr(defaults, key) for key in driver.TRAINING_SETTINGS},
               "train_rows": 512, "batch_size": 4, "learning_rate": 0.001, "align_weight": 10.0,
               "align_schedule": "joint", "align_batch_size": 16, "max_alignment_pairs": 512, "max_eval": 32,
               "max_new_tokens": 24}  # fmt: skip
    trained["train_languages"], trained["alignment_languages"] = ["en"], ["ja", "ru"]
    (old / "settings.json").write_text(json.dumps(trained))
    base = ["--task", "slot_filling", "--output_dir", str(tmp_path / "new"), "--evaluate_from", str(old)]
    args = driver.parse_args([*base, "--max_eval", "256", "--max_new_tokens", "1"])
    for key in driver.TRAINING_SETTINGS:
        assert getattr(args, key) == trained[key], key
    assert (args.max_eval, args.max_new_tokens) == (256, 1)
    args = driver.parse_args([*base, "--batch_size", "4"])  # the earlier run's value may be repeated
    assert (args.max_eval, args.max_new_tokens, args.batch_size) == (32, 24, 4)
    with pytest.raises(ValueError, match="train_rows=512, this call passes train_rows=64"):
        driver.parse_args([*base, "--train_rows", "64"])
    with pytest.raises(ValueError, match="task 'slot_filling', not 'translation'"):
        driver.parse_args(["--task", "translation", *base[2:]])
    with pytest.raises(ValueError, match="no settings.json there"):
        driver.parse_args([*base[:-1], str(tmp_path / "missing")])
    # A setting an older driver did not record keeps the value of this call
    del trained["align_batch_size"]
    (old / "settings.json").write_text(json.dumps(trained))
    assert driver.parse_args([*base, "--align_batch_size", "8"]).align_batch_size == 8


def test_evaluate_from_finds_every_adapter_or_names_the_missing_one(tmp_path):
    driver = _benchmark("transfer")
    old, earlier = tmp_path / "old", tmp_path / "earlier"
    for folder in (old / "runs" / "aligned-seed0", earlier / "runs" / "baseline-seed0"):
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
    records = [{"kind": "probe", "arm": "base", "seed": None},
               {"kind": "task", "arm": "baseline", "seed": 0, "run_dir": "../earlier/runs/baseline-seed0",
                "reused_from": str(earlier)},
               {"kind": "task", "arm": "aligned", "seed": 0, "run_dir": "runs/aligned-seed0"}]  # fmt: skip
    (old / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    adapters = driver.adapters_of(str(old))
    assert {key: os.path.normpath(path) for key, path in adapters.items()} == {
        ("baseline", 0): str(earlier / "runs" / "baseline-seed0"),
        ("aligned", 0): str(old / "runs" / "aligned-seed0"),
    }
    # An evaluation of an evaluation points at the adapters of the run that trained them
    evaluated = [{"kind": "task", "arm": "aligned", "seed": 0, "run_dir": "runs/aligned-seed0",
                  "evaluated_from": str(old / "runs" / "aligned-seed0")}]  # fmt: skip
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "runs.jsonl").write_text(json.dumps(evaluated[0]) + "\n")
    assert driver.adapters_of(str(tmp_path / "again")) == {("aligned", 0): str(old / "runs" / "aligned-seed0")}
    os.remove(old / "runs" / "aligned-seed0" / "adapter_config.json")
    with pytest.raises(ValueError, match="aligned run of seed 0 has no adapter"):
        driver.adapters_of(str(old))
    (old / "runs.jsonl").write_text(json.dumps(records[0]) + "\n")
    with pytest.raises(ValueError, match="records no finished run"):
        driver.adapters_of(str(old))
