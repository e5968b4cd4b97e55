"""The pure ensemble core: member selection, the pending-token ledger,
sampling, stop strings and UTF-8 handling. Imports neither llama_cpp nor
aiohttp nor click (a test keeps it that way)."""

from .ensemble import Event, common_prefix, generate
from .text import TextAssembler
from .types import (
    Cancelled,
    Constraint,
    DoneEvent,
    GenerationStats,
    GrammarSpec,
    Member,
    MemberStats,
    SamplingParams,
    TokenEvent,
    TokenSampler,
)

__all__ = [
    "Cancelled",
    "Constraint",
    "DoneEvent",
    "Event",
    "GenerationStats",
    "GrammarSpec",
    "Member",
    "MemberStats",
    "SamplingParams",
    "TextAssembler",
    "TokenEvent",
    "TokenSampler",
    "common_prefix",
    "generate",
]
