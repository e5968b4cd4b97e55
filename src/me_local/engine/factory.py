"""The engine's default member factory: members backed by llama.cpp."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import EnsembleConfig, MemberConfig
from ..errors import SettingError
from ..runtime import prepare

if TYPE_CHECKING:
    from ..backends.llama import LlamaEmbedder, LlamaMember, ModelStore


class LlamaMemberFactory:
    """Members backed by llama.cpp, sharing loaded weights through one ModelStore (``store``).

    Making one prepares the process for llama.cpp (:func:`me_local.runtime.prepare`) and
    then imports the llama backend, so that a library user who builds an
    :class:`~me_local.engine.Engine` gets the same set-up as ``me-local``. Each member
    it returns owns its hold on its model: closing the member releases it."""

    def __init__(self, store: ModelStore | None = None) -> None:
        prepare()
        from ..backends.llama import ModelStore

        self.store = ModelStore() if store is None else store

    def __call__(self, member: MemberConfig, ensemble: EnsembleConfig, /) -> LlamaMember:
        from ..backends.llama import ContextSettings, LoadSettings

        load = LoadSettings.resolve(member.repack, mmap=member.mmap, n_gpu_layers=member.n_gpu_layers)
        settings = ContextSettings(n_ctx=ensemble.n_ctx, n_batch=ensemble.n_batch, n_threads=member.n_threads,
                                   kv_cache_type=ensemble.kv_cache_type)
        try:
            return self.store.open_member(member.name, member.resolve_path(), load, settings, system=member.system,
                                          chat_template=member.chat_template)
        except SettingError as exc:  # an ensemble's setting that does not suit this model: say where it is set
            raise SettingError(exc.reason, setting=exc.setting, file=ensemble.file,
                               key=f"ensembles.{ensemble.name}.{exc.setting}") from None

    def embedder(self, member: MemberConfig, ensemble: EnsembleConfig, /) -> LlamaEmbedder:
        """The member's embedding context: its own llama context over the same loaded weights."""
        from ..backends.llama import EmbedSettings, LoadSettings

        load = LoadSettings.resolve(member.repack, mmap=member.mmap, n_gpu_layers=member.n_gpu_layers)
        settings = EmbedSettings(n_ctx=ensemble.n_ctx, n_batch=ensemble.n_batch, n_threads=member.n_threads)
        return self.store.open_embedder(member.name, member.resolve_path(), load, settings)


def llama_member_factory(store: ModelStore | None = None) -> LlamaMemberFactory:
    """Members backed by llama.cpp, sharing loaded weights through one ModelStore."""
    return LlamaMemberFactory(store)
