"""``me-local eval --url``: the same figures from a running ``me-local serve``, through its
OpenAI completions ``echo`` and its tokenizer routes (docs/server.md), with the standard
library's HTTP client.

Each continuation is scored as it is in-process (:class:`.run.EngineScorer`): after the
context's tokens (its raw prompt, or for an empty context the member's BOS, or its EOS when
it adds none), with the continuation tokenized on its own:

- each member alone: ``model: ENSEMBLE/MEMBER`` with the prompt as token ids (context, then
  text), summing the entries of the text's tokens;
- the ensemble at token granularity (one vocabulary): the same token ids, ``model: ENSEMBLE``;
- the ensemble at word granularity: the text as the prompt (the daemon scores it after each
  member's BOS or EOS, every entry a unit of the word-level likelihood). A non-empty context
  cannot be given apart from the text there (a prompt is one text, and the text's first word is
  scored differently as a continuation than inside a longer text), so ``--task`` at word
  granularity is refused through ``--url``.

Each member's figure costs a pass of that member and the ensemble's a pass of every member:
twice the in-process work (where one pass per member gives both)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ContextOverflowError, RequestError, UsageError
from .run import Scored

TIMEOUT_S = 3600.0
"""A long text waits for a slot and is scored whole: the daemon's own limits apply first."""


@dataclass
class _Member:
    name: str
    model: str
    """``ENSEMBLE/MEMBER``."""
    empty: list[int] = field(default_factory=list)
    """The context of an empty context: the BOS, or the EOS for a model that adds no BOS."""
    strips_space: bool = False
    """The tokenizer puts a space before a text (SentencePiece's prefix): a continuation's own
    leading space is dropped first, as in-process."""


class RemoteScorer:
    """Scores continuations through a daemon at ``url`` (a :class:`.run.Scorer`)."""

    def __init__(self, url: str, ensemble: str | None, *, api_key: str | None = None,
                 weights: dict[str, float] | None = None, granularity: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        info = self._model(ensemble)
        self.ensemble = str(info["id"])
        ext = info.get("me_local") or {}
        if ext.get("kind") != "ensemble":
            raise UsageError(f"{self.ensemble!r} at {self.url} is not an ensemble; name one with --ensemble")
        self.members = [_Member(str(m["name"]), f"{self.ensemble}/{m['name']}") for m in ext["members"]]
        self.n_ctx = int(ext["n_ctx"])
        names = [m.name for m in self.members]
        base = {str(m["name"]): float(m["weight"]) for m in ext["members"]}
        if weights:
            unknown = [n for n in weights if n not in base]
            if unknown:
                raise RequestError(f"ensemble {self.ensemble!r} has no member {unknown[0]!r}; choose one of: "
                                   f"{', '.join(names)}", param="weights")
            base.update(weights)
        total = sum(base.values())
        if total <= 0:
            raise RequestError("all weights are zero; give at least one member a positive weight", param="weights")
        self.weights = [base[n] / total for n in names]
        self.override = weights
        self.granularity = granularity or ext.get("granularity") or self._granularity_after_load()
        self._extension: dict[str, Any] = {}
        if weights:
            self._extension["weights"] = weights
        if granularity:
            self._extension["granularity"] = granularity
        for m in self.members:
            m.empty = self._tokenize(m.model, "", add_special=True)
            if not m.empty:
                eos = self._get(f"/tokenizer_info?model={urllib.parse.quote(m.model)}").get("eos_token_id")
                if eos is None:
                    raise UsageError(f"member {m.name!r}'s model has neither a BOS nor an EOS token to begin a "
                                     "text with")
                m.empty = [int(eos)]
            probe = self._tokenize(m.model, "a", add_special=False, parse_special=False)
            m.strips_space = self._post("/detokenize", {"model": m.model, "tokens": probe})["content"] != "a"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)

    # -- the Scorer --------------------------------------------------------------
    def __call__(self, context: str, text: str) -> Scored:
        member_logp = []
        ids: list[tuple[list[int], list[int]]] = []
        for m in self.members:
            ctx, toks = self._ids(m, context, text)
            ids.append((ctx, toks))
            member_logp.append(self._echo(m.model, ctx, toks, {}))
        if self.granularity == "token":
            ctx, toks = ids[0]
            ensemble = self._echo(self.ensemble, ctx, toks, self._extension)
        elif context:
            raise UsageError("at word granularity a choice cannot be scored after its context through --url (the "
                             "daemon's echo scores one prompt, where the choice's first word counts differently); "
                             "run eval --task without --url, or at --granularity token")
        else:
            ensemble = self._echo_text(text)
        return Scored(np.array(member_logp), ensemble)

    def count(self, text: str) -> list[int]:
        """Each member's tokens of ``text`` (the windows' budget)."""
        return [len(self._text_ids(m, text)) for m in self.members]

    def context_tokens(self) -> int:
        return max(len(m.empty) for m in self.members)

    # -- requests ----------------------------------------------------------------
    def _ids(self, m: _Member, context: str, text: str) -> tuple[list[int], list[int]]:
        ctx = self._tokenize(m.model, context, add_special=True) if context else []
        return ctx or m.empty, self._text_ids(m, text)

    def _text_ids(self, m: _Member, text: str) -> list[int]:
        if m.strips_space and text.startswith(" "):
            text = text[1:]
        return self._tokenize(m.model, text, add_special=False, parse_special=False) if text else []

    def _echo(self, model: str, ctx: list[int], toks: list[int], extension: dict[str, Any]) -> float:
        if not toks:
            return 0.0
        body: dict[str, Any] = {"model": model, "prompt": ctx + toks, "echo": True, "logprobs": 0, "max_tokens": 0}
        if extension:
            body["ensemble"] = extension
        lps = self._post("/v1/completions", body)["choices"][0]["logprobs"]["token_logprobs"]
        return float(sum(lps[len(ctx):]))

    def _echo_text(self, text: str) -> float:
        body: dict[str, Any] = {"model": self.ensemble, "prompt": text, "echo": True, "logprobs": 0, "max_tokens": 0}
        if self._extension:
            body["ensemble"] = self._extension
        lps = self._post("/v1/completions", body)["choices"][0]["logprobs"]["token_logprobs"]
        return float(sum(x for x in lps if x is not None))

    def _tokenize(self, model: str, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        out = self._post("/tokenize", {"model": model, "content": text, "add_special": add_special,
                                       "parse_special": parse_special})
        return [int(t) for t in out["tokens"]]

    def _model(self, ensemble: str | None) -> dict[str, Any]:
        if ensemble is not None:
            return self._get(f"/v1/models/{urllib.parse.quote(ensemble)}")
        for entry in self._get("/v1/models")["data"]:
            ext = entry.get("me_local") or {}
            if ext.get("kind") == "ensemble" and ext.get("default"):
                return dict(entry)
        raise UsageError(f"the daemon at {self.url} names no default ensemble; give --ensemble")

    def _granularity_after_load(self) -> str:
        """An ensemble not loaded yet says its granularity once it is: load it (a tiny request)."""
        self._tokenize(self.members[0].model, "", add_special=False)
        g = (self._model(self.ensemble).get("me_local") or {}).get("granularity")
        return str(g or "token")

    def _get(self, path: str) -> dict[str, Any]:
        return self._request(urllib.request.Request(self.url + path, headers=self._headers()))

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        return self._request(urllib.request.Request(self.url + path, data=data, method="POST",
                                                    headers={**self._headers(), "Content-Type": "application/json"}))

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _request(self, req: urllib.request.Request) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
                out: dict[str, Any] = json.loads(resp.read())
                return out
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read()).get("error") or {}
            except (ValueError, AttributeError):
                err = {}
            message = err.get("message") if isinstance(err, dict) else err
            message = message or f"HTTP {exc.code} {exc.reason}"
            if exc.code == 404 and req.get_method() == "POST" and "/tokenize" in req.full_url:
                message = "it has no /tokenize route (an older me-local): upgrade the daemon or run without --url"
            if isinstance(err, dict) and err.get("code") == "context_length_exceeded":
                raise ContextOverflowError(str(message)) from None
            if exc.code in (401, 403):
                raise UsageError(f"the daemon at {self.url} refused the request ({message}); give its key with "
                                 "--api-key or ME_LOCAL_API_KEY") from None
            raise RequestError(f"the daemon at {self.url} answered {exc.code}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UsageError(f"cannot reach {self.url} ({reason}); is `me-local serve` running there?") from None
