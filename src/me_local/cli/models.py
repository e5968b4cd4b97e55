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
        differ = next((name for name, info in infos[1:] if info.fingerprint != infos[0][1].fingerprint), None)
        if differ is not None:
            mismatch = f"members {infos[0][0]!r} and {differ!r} do not share a vocabulary"
            if ens.granularity == "token" or ens.mode == "ce":
                what = "granularity token" if ens.granularity == "token" else "mode ce"
                problems.append(f"{mismatch}; {what} needs one shared vocabulary: use mode me at granularity word")
                lines.append(f"  ERROR: {problems[-1]}")
            else:
                lines.append(f"  granularity word: {mismatch}, so `me` mixes words (ce is not available)")
        elif len(infos) == len(ens.members) > 1:
            granularity = ens.granularity or "token"
            why = "models.yaml" if ens.granularity else "the members share a vocabulary"
            lines.append(f"  granularity {granularity}: {why}")
        if problems:
            ok = False
        else:
            lines.append("  ok")
    return "\n".join(lines), ok
