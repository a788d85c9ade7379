"""Every model card trl-midalign writes, through `huggingface_hub`'s `ModelCard` and `ModelCardData`.

A card is written whole ([`write_card`], for a merged adapter) or, on top of the card that TRL's `create_model_card`
writes, extended by named sections ([`update_card`]: the alignment settings of a run, its evaluation, a merge's weight
search). A section is marked in the card's text, so that writing it again replaces it; metadata goes into the card's
YAML header.
"""

import os
from typing import Any

from huggingface_hub import ModelCard, ModelCardData


PAPER = (
    'Liu & Niehues, "Middle-Layer Representation Alignment for Cross-Lingual Transfer in Fine-Tuned LLMs", ACL 2025 '
    "(https://huggingface.co/papers/2502.14830)"
)
CARD_FILE = "README.md"
_MARKER_PREFIX = "<!-- trl-midalign: "


def section_marker(name: str) -> str:
    """The line that marks the section `name` in a card's text."""
    return f"{_MARKER_PREFIX}{name} -->"


def write_card(folder: str, data: ModelCardData, text: str) -> str:
    """Write a new model card with the metadata `data` and the markdown `text` into `folder`; return its path."""
    path = os.path.join(folder, CARD_FILE)
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text.strip()}\n").save(path)
    return path


def update_card(folder: str, name: str, section: str, metadata: dict[str, Any] | None = None) -> str:
    """
    Put the markdown `section` called `name` into the model card of `folder`, replacing an earlier section of that
    name, and set the `metadata` fields of its header. Without a card, the section is a new card (a PEFT adapter's).

    Args:
        folder (`str`):
            The folder holding (or to hold) `README.md`.
        name (`str`):
            The section's name, as in its marker (for example `"alignment"`).
        section (`str`):
            The section's markdown, with its own heading.
        metadata (`dict[str, Any]`, *optional*):
            Fields of the card's YAML header (for example `{"language": ["de", "en"]}`).

    Returns:
        `str`: the path of the card.
    """
    path = os.path.join(folder, CARD_FILE)
    card = ModelCard.load(path) if os.path.isfile(path) else ModelCard("---\nlibrary_name: peft\n---\n")
    marker = section_marker(name)
    text = card.text
    if marker in text:
        before, _, rest = text.partition(marker)
        following = rest.find(_MARKER_PREFIX)  # the next section of ours, if any
        text = before.rstrip() + ("\n\n" + rest[following:] if following >= 0 else "")
    card.text = f"{text.rstrip()}\n\n{marker}\n{section.strip()}\n"
    for field, value in (metadata or {}).items():
        setattr(card.data, field, value)
    card.save(path)
    return path


def alignment_section(settings: dict[str, Any], layer: int, num_layers: int) -> tuple[str, dict[str, Any]]:
    """
    The model card section of a run of [`AlignmentTrainer`] and its metadata: the aligned layer, the paper and the
    `align_*` settings (a table, and the `trl_midalign` field of the header).
    """
    rows = "\n".join(f"| `{name}` | `{value!r}` |" for name, value in settings.items())
    section = (
        "## Cross-lingual alignment\n\n"
        "Trained with trl-midalign's `AlignmentTrainer`: a contrastive loss aligns the representations of parallel "
        f"sentences at layer {layer} of {num_layers} ({PAPER}).\n\n"
        f"| setting | value |\n|---|---|\n{rows}\n"
    )
    plain = (str, int, float, bool, type(None))
    metadata = {name: value if isinstance(value, plain) else repr(value) for name, value in settings.items()}
    return section, {"trl_midalign": {"aligned_layer": layer, **metadata}}
