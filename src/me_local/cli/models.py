"""`me-local models`: what each ensemble is made of, checked without loading weights."""

from __future__ import annotations

from ..config import Config
from ..errors import MeLocalError


def _size(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def describe(config: Config) -> tuple[str, bool]:
    from ..backends.llama import LoadedModel, LoadSettings, inspect_model

    lines = [f"config: {config.path}"]
    ok = True
    cache: dict[str, LoadedModel] = {}
    for ens in config.ensembles.values():
        weights = ens.normalized_weights()
        lines.append(f"\n{ens.name}  (mode {ens.mode}, n_ctx {ens.n_ctx}, parallel {ens.parallel})")
        first_by_load: dict[tuple[str, LoadSettings], str] = {}
        infos = []
        problems = []
        for mc, w in zip(ens.members, weights):
            try:
                path = mc.resolve_path()
                key = str(path.resolve())
                if key not in cache:
                    cache[key] = inspect_model(path)
                info = cache[key]
                load = LoadSettings.resolve(mc.repack, mmap=mc.mmap, n_gpu_layers=mc.n_gpu_layers)
                shared = first_by_load.get((key, load))
                first_by_load.setdefault((key, load), mc.name)
                note = f"  shares weights with {shared}" if shared else ""
                lines.append(
                    f"  {mc.name:<14} weight {w:.2f}  {path.name}  {_size(info.size_bytes)}  "
                    f"vocab {info.n_vocab}  mmap {'on' if load.mmap else 'off'}  "
                    f"repack {'on' if load.repack else 'off'} ({load.repack_reason}){note}"
                )
                lines.append(f"  {'':<14} chat template: {info.template(mc.chat_template).source}")
                infos.append((mc.name, info))
            except MeLocalError as exc:
                lines.append(f"  {mc.name:<14} weight {w:.2f}  ERROR: {exc}")
                problems.append(str(exc))
        for name, info in infos[1:]:
            if info.fingerprint != infos[0][1].fingerprint:
                problems.append(
                    f"members {infos[0][0]!r} and {name!r} do not share a vocabulary; "
                    "ensemble only models with the same tokenizer"
                )
                lines.append(f"  ERROR: {problems[-1]}")
        if problems:
            ok = False
        else:
            lines.append("  ok")
    return "\n".join(lines), ok
