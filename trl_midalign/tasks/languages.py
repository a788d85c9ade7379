"""Language codes shared by the tasks: names for prompts, ISO codes of tags, checks and the report's language groups."""

import difflib
from collections.abc import Sequence


# ISO 639-1 codes (and a few ISO 639-3 codes of languages without one) with English names, for prompts and checks.
LANGUAGE_NAMES = {
    "af": "Afrikaans", "am": "Amharic", "ar": "Arabic", "as": "Assamese", "az": "Azerbaijani", "be": "Belarusian",
    "bg": "Bulgarian", "bn": "Bengali", "bo": "Tibetan", "br": "Breton", "bs": "Bosnian", "ca": "Catalan",
    "ceb": "Cebuano", "cs": "Czech", "cy": "Welsh", "da": "Danish", "de": "German", "dz": "Dzongkha", "el": "Greek",
    "en": "English", "eo": "Esperanto", "es": "Spanish", "et": "Estonian", "eu": "Basque", "fa": "Persian",
    "fi": "Finnish", "fil": "Filipino", "fo": "Faroese", "fr": "French", "fy": "Western Frisian", "ga": "Irish",
    "gd": "Scottish Gaelic", "gl": "Galician", "gu": "Gujarati", "ha": "Hausa", "he": "Hebrew", "hi": "Hindi",
    "hr": "Croatian", "ht": "Haitian Creole", "hu": "Hungarian", "hy": "Armenian", "id": "Indonesian", "ig": "Igbo",
    "is": "Icelandic", "it": "Italian", "ja": "Japanese", "jv": "Javanese", "ka": "Georgian", "kk": "Kazakh",
    "km": "Khmer", "kn": "Kannada", "ko": "Korean", "ku": "Kurdish", "ky": "Kyrgyz", "la": "Latin",
    "lb": "Luxembourgish", "lo": "Lao", "lt": "Lithuanian", "lv": "Latvian", "mg": "Malagasy", "mi": "Maori",
    "mk": "Macedonian", "ml": "Malayalam", "mn": "Mongolian", "mr": "Marathi", "ms": "Malay", "mt": "Maltese",
    "my": "Burmese", "nb": "Norwegian Bokmal", "ne": "Nepali", "nl": "Dutch", "nn": "Norwegian Nynorsk",
    "no": "Norwegian", "ny": "Chichewa", "oc": "Occitan", "om": "Oromo", "or": "Odia", "pa": "Punjabi", "pl": "Polish",
    "ps": "Pashto", "pt": "Portuguese", "qu": "Quechua", "ro": "Romanian", "ru": "Russian", "rw": "Kinyarwanda",
    "sa": "Sanskrit", "sd": "Sindhi", "si": "Sinhala", "sk": "Slovak", "sl": "Slovenian", "sm": "Samoan",
    "sn": "Shona", "so": "Somali", "sq": "Albanian", "sr": "Serbian", "st": "Sesotho", "su": "Sundanese",
    "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "te": "Telugu", "tg": "Tajik", "th": "Thai", "ti": "Tigrinya",
    "tk": "Turkmen", "tl": "Tagalog", "tr": "Turkish", "tt": "Tatar", "ug": "Uyghur", "uk": "Ukrainian", "ur": "Urdu",
    "uz": "Uzbek", "vi": "Vietnamese", "wo": "Wolof", "xh": "Xhosa", "yi": "Yiddish", "yo": "Yoruba", "yue": "Cantonese",
    "zh": "Chinese", "zu": "Zulu",
}  # fmt: skip


def iso_code(language: str) -> str:
    """The ISO 639 part of a language tag: `"de-DE"` -> `"de"`, `"de_pud"` -> `"de"`, `"zh"` -> `"zh"`."""
    return language.split("_")[0].split("-")[0].lower()


def check_languages(requested: Sequence[str], known: Sequence[str], option: str, what: str = "language code") -> None:
    """
    Fail naming the first unknown code among `requested`, with close known codes and the fix.

    Args:
        requested (`Sequence[str]`):
            Codes given by the user.
        known (`Sequence[str]`):
            Codes the task knows.
        option (`str`):
            The argument that held them (e.g. `"--train_languages"`).
        what (`str`, *optional*, defaults to `"language code"`):
            What a code is, for the message.
    """
    for code in requested:
        if code not in known:
            close = difflib.get_close_matches(code, list(known), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"{option}: unknown {what} {code!r}.{hint} Known: {', '.join(sorted(known))}.")


def language_groups(
    eval_languages: Sequence[str], train_languages: Sequence[str], alignment_languages: Sequence[str]
) -> dict[str, list[str]]:
    """
    Split evaluated languages into those with task data (`task`), those with alignment pairs only (`aligned`) and the
    rest (`transfer`), the groups averaged in the report.
    """
    train, aligned = set(train_languages), set(alignment_languages)
    return {
        "task": [lang for lang in eval_languages if lang in train],
        "aligned": [lang for lang in eval_languages if lang not in train and lang in aligned],
        "transfer": [lang for lang in eval_languages if lang not in train and lang not in aligned],
    }
