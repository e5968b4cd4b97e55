"""The engine: the one object both ``me-local chat`` (in-process) and
``me-local serve`` drive.

It loads ensembles (sharing weights through the backend's ModelStore),
plans each ensemble's granularity from its members' vocabularies (shared: token by
token; different: word by word), keeps ``parallel`` slots per ensemble
(each with its own context per member, created on first use), serves waiting
requests in arrival order, gives each the free slot with the longest cached
prefix, and runs the pure core's generation loop.

    engine.py    Engine, Request, Run, collect, sampling_params
    embedding.py EmbedRequest, EmbedResult (Engine.embed: vectors of texts, in embedding contexts of
                 their own), embedding_members
    limits.py    LineLimits: llama-server's n_indent and t_max_predict_ms over a generation's text
    scoring.py   ScoreRequest (Engine.score: a text's likelihood under the ensemble), plan_score
    ensemble.py  LoadedEnsemble (slots and the line of waiting requests), Slot, Ticket,
                 plan_vocabulary, VocabularyPlan
    messages.py  ROLES, normalize_messages, fit_messages (truncation to a context)
    factory.py   the default member factory (llama.cpp), which prepares the runtime first

It talks to members only through the backend seam (:mod:`me_local.backends.types`).
"""

from ..backends.types import MemberContext, MemberFactory
from ..errors import QueueFullError
from ..fim import FimChunk, FimInput, FimPrompt
from .embedding import EmbedRequest, EmbedResult, embedding_members
from .engine import Engine, Plan, Request, Run, SamplingOverrides, collect, sampling_params
from .ensemble import CANCEL_POLL_S, LoadedEnsemble, Slot, Ticket, VocabularyPlan, plan_vocabulary
from .factory import LlamaMemberFactory, llama_member_factory
from .limits import LineLimits
from .messages import ROLES, Messages, fit_messages, normalize_messages
from .scoring import ScorePlan, ScoreRequest, plan_score

__all__ = [
    "CANCEL_POLL_S",
    "ROLES",
    "EmbedRequest",
    "EmbedResult",
    "Engine",
    "FimChunk",
    "FimInput",
    "FimPrompt",
    "LineLimits",
    "LlamaMemberFactory",
    "LoadedEnsemble",
    "MemberContext",
    "MemberFactory",
    "Messages",
    "Plan",
    "QueueFullError",
    "Request",
    "Run",
    "SamplingOverrides",
    "ScorePlan",
    "ScoreRequest",
    "Slot",
    "Ticket",
    "VocabularyPlan",
    "collect",
    "embedding_members",
    "fit_messages",
    "llama_member_factory",
    "normalize_messages",
    "plan_score",
    "plan_vocabulary",
    "sampling_params",
]
