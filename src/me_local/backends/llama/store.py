"""Loading each model file once and sharing it (:class:`ModelStore`), and sharing the
CPU between the slots that decode at the same time."""

from __future__ import annotations

import threading
from pathlib import Path

from .context import ContextSettings, LlamaMember
from .embedding import EmbedSettings, LlamaEmbedder
from .model import LoadedModel, LoadSettings
from .threads import CpuShare


class ModelStore:
    """Loads each (file, load settings) once and shares it between members and slots.

    It also shares the CPU between slots, so that concurrent slots never put more
    spinning llama.cpp threads on the CPU than it has (see docs/architecture.md):
    ``cpu`` (a :class:`CpuShare`) gives each decode ``cores // active generations``
    threads, and the decode gate, a semaphore taken per decode call (so requests on
    different slots still interleave token by token), bounds how many decodes run at
    once to one per core. Why, measured: docs/performance.md ("concurrent slots
    oversubscribing the cores").
    """

    def __init__(self, max_concurrent_decodes: int | None = None, cpu: CpuShare | None = None) -> None:
        self._models: dict[tuple[str, LoadSettings], LoadedModel] = {}
        self._lock = threading.Lock()
        self.cpu = cpu or CpuShare()
        if max_concurrent_decodes is None:
            max_concurrent_decodes = max(1, self.cpu.cores)
        self.gate = threading.BoundedSemaphore(max_concurrent_decodes)

    def acquire(self, path: Path, load: LoadSettings | None = None) -> LoadedModel:
        load = load or LoadSettings.resolve()
        key = (str(path.resolve()), load)
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = self._models[key] = LoadedModel(path, load)
                model.cpu = self.cpu
                model.store_key = key
            model.refs += 1
            return model

    def release(self, model: LoadedModel) -> None:
        with self._lock:
            model.refs -= 1
            if model.refs <= 0:
                if model.store_key is not None:
                    self._models.pop(model.store_key, None)
                model.close()

    def open_member(self, name: str, path: Path, load: LoadSettings, settings: ContextSettings,
                    system: str | None = None, chat_template: str | None = None) -> LlamaMember:
        """A member over this store's load of ``path``, decoding through its gate. The
        member owns its hold on the model: its ``close()`` gives the model back."""
        model = self.acquire(path, load)
        try:
            return LlamaMember(name, model, settings, system=system, gate=self.gate, store=self,
                               chat_template=chat_template)
        except BaseException:
            self.release(model)
            raise

    def open_embedder(self, name: str, path: Path, load: LoadSettings, settings: EmbedSettings) -> LlamaEmbedder:
        """A member's embedding context over this store's load of ``path`` (the weights its
        generation contexts use), decoding through the same gate; its ``close()`` gives the
        model back."""
        model = self.acquire(path, load)
        try:
            return LlamaEmbedder(name, model, settings, gate=self.gate, store=self)
        except BaseException:
            self.release(model)
            raise

    def __len__(self) -> int:
        return len(self._models)
