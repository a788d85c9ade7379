"""Combining separately trained LoRA adapters ([`merge_adapters`]) and choosing their weights on a dev set
([`search_merge_weights`])."""

from .merge import COMBINATIONS, merge_adapters
from .search import format_search_table, search_merge_weights


__all__ = ["COMBINATIONS", "format_search_table", "merge_adapters", "search_merge_weights"]
