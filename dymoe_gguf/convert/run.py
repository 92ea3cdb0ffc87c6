"""``dymoe-gguf convert``: source -> plan -> quantize (ggml, parallel) -> bundle (atomic).

Work is cut into jobs of one tensor or one expert; each job reads its float32 data and quantizes it
into every type that needs it (base tier and each sidecar tier, each type once). Jobs run on a
thread pool (ggml's quantizers release the GIL) with a bounded number in flight, and their results
are written in plan order to all output streams at once.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
import psutil
from gguf import GGMLQuantizationType as QT

from dymoe_gguf import __version__
from dymoe_gguf._native import ggml
from dymoe_gguf.bundle.format import BASE_FILE, EXPERT_ALIGNMENT, FORMAT_VERSION, Key, Tier
from dymoe_gguf.convert.imatrix import check_imatrix, load_imatrix
from dymoe_gguf.convert.output import OutputLock, atomic_dir, check_output, check_space, clean_stale
from dymoe_gguf.convert.plan import ConvertPlan, FilePlan, make_plan, parse_overrides
from dymoe_gguf.convert.writer import GGUFStream, file_bytes, prepare
from dymoe_gguf.converters import Source, SourceTensor, open_source
from dymoe_gguf.errors import SourceError
from dymoe_gguf.util import read_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion produced and what it cost."""

    out: Path
    plan: ConvertPlan
    seconds: float
    quantize_seconds: float  # summed time inside ggml's quantizers (all threads)
    peak_rss: int
    bytes_written: int

    def to_dict(self) -> dict:
        return {"out": str(self.out), "seconds": round(self.seconds, 3),
                "quantize_seconds": round(self.quantize_seconds, 3), "peak_rss": self.peak_rss,
                "bytes_written": self.bytes_written, "plan": self.plan.to_dict()}


def _metadata(source: Source, plan: ConvertPlan, f: FilePlan, bundle_id: str, imatrix_sha: str):
    def write(w: gguf.GGUFWriter) -> None:
        # dymoe keys first: a bundle is recognised (before --force replaces it) without reading the vocabulary
        w.add_uint32(Key.FORMAT_VERSION, FORMAT_VERSION)
        w.add_string(Key.ROLE, f.role)
        w.add_string(Key.BUNDLE_ID, bundle_id)
        w.add_string(Key.BASE_TIER, plan.base_tier.name)
        w.add_array(Key.TIERS, [t.name for t in plan.tiers])
        w.add_array(Key.TIER_FILES, [p.name for p in plan.files[1:]])
        if f.role == "tier":
            w.add_string(Key.TIER, f.tier.name)
        w.add_uint32(Key.EXPERT_ALIGNMENT, EXPERT_ALIGNMENT)
        w.add_uint32(Key.N_LAYER, source.hparams.n_layer)
        w.add_uint32(Key.N_EXPERT, source.hparams.n_expert)
        w.add_array(Key.MOE_LAYERS, source.moe_layers)
        w.add_string(Key.SOURCE_KIND, source.kind)
        w.add_string(Key.SOURCE_ID, source.ident)
        w.add_string(Key.SOURCE_FINGERPRINT, source.fingerprint)
        w.add_string(Key.CONVERTER_VERSION, __version__)
        w.add_string(Key.IMATRIX, imatrix_sha)
        if f.role == "base":
            source.write_metadata(w)
            w.add_file_type(_file_type(plan.base_tier))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        else:
            w.add_type("dymoe-experts")
    return write


def _file_type(tier: Tier) -> int:
    names = {Tier.F32: "ALL_F32", Tier.F16: "MOSTLY_F16", Tier.BF16: "MOSTLY_BF16", Tier.Q8_0: "MOSTLY_Q8_0",
             Tier.Q2_K: "MOSTLY_Q2_K", Tier.Q3_K: "MOSTLY_Q3_K_M", Tier.Q4_K: "MOSTLY_Q4_K_M",
             Tier.Q5_K: "MOSTLY_Q5_K_M", Tier.Q6_K: "MOSTLY_Q6_K"}
    return int(gguf.LlamaFileType[names[tier]])


class _Quantizer:
    """Runs one job: read float32 data once, quantize into each needed type once."""

    def __init__(self, imatrix: dict[str, np.ndarray]) -> None:
        self.imatrix = imatrix
        self.seconds = 0.0
        self.peak = 0  # RSS sampled while a job's float32 data and its outputs are all alive
        self._proc = psutil.Process()

    def run(self, t: SourceTensor, expert: int | None, types: tuple[QT, ...],
            reuse: QT | None) -> dict[QT, np.ndarray]:
        try:
            return self._run(t, expert, types, reuse)
        except OSError as exc:
            raise SourceError(f"{read_error(t.name, exc)} (reading the source)") from None

    def _run(self, t: SourceTensor, expert: int | None, types: tuple[QT, ...],
             reuse: QT | None) -> dict[QT, np.ndarray]:
        if t.raw is not None and (t.load is None or types == (t.raw[0],)):
            return {t.raw[0]: np.asarray(t.raw[1]()).view(np.uint8).reshape(-1)}
        out = {}
        if reuse is not None and expert is not None and t.raw_expert is not None:
            out[reuse] = np.ascontiguousarray(t.raw_expert[1](expert)).view(np.uint8).reshape(-1)
        need = [q for q in types if q not in out]
        if not need:
            return out
        x = t.load_expert(expert) if expert is not None else t.load()  # type: ignore[misc]
        x2 = x.reshape(-1, x.shape[-1])
        imp = self.imatrix.get(t.name)
        row_imp = None
        if imp is not None:
            row_imp = imp[expert if expert is not None and imp.shape[0] > 1 else 0]
        for q in need:
            t0 = time.perf_counter()
            out[q] = ggml.quantize(x2, q, row_imp if q not in (QT.F32, QT.F16, QT.BF16) else None)
            self.seconds += time.perf_counter() - t0
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return out


Job = tuple[SourceTensor, "int | None", tuple[QT, ...], "QT | None"]


def _jobs(plan: ConvertPlan) -> Iterator[Job]:
    """(source tensor, expert or None, types needed, type copied from the source) in file order."""
    side_types = {(f.tier, t.source.name): t.qtype for f in plan.files[1:] for t in f.tensors}
    reused = {t.source.name for f in plan.files for t in f.tensors if t.reuse}
    for bt in plan.base.tensors:
        if not bt.source.is_expert:
            yield bt.source, None, (bt.qtype,), None
            continue
        extra = [side_types[(tier, bt.name)] for tier in plan.tiers]
        types = tuple(dict.fromkeys([bt.qtype, *extra]))
        reuse = bt.source.raw_expert[0] if bt.name in reused and bt.source.raw_expert is not None else None
        for e in range(bt.shape[0]):
            yield bt.source, e, types, reuse


def convert(src: str | Path, out: Path, *, base_tier: Tier, tiers: tuple[Tier, ...],
            imatrix: Path | None = None, tensor_types: tuple[str, ...] = (), threads: int | None = None,
            force: bool = False, dry_run: bool = False, progress: bool = False, revision: str | None = None,
            requantize: bool = False) -> ConvertResult:
    """Convert ``src`` into a bundle at ``out`` (see :mod:`dymoe_gguf.bundle.format`).

    Every check runs before any heavy work: the output location, the source, the plan (types,
    overrides), the importance matrix and the disk space (exact file sizes). ``dry_run`` stops there.
    """
    t_start = time.perf_counter()
    out = Path(out)
    overrides = parse_overrides(tensor_types)
    local = Path(src).expanduser()
    check_output(out, force, [local] if local.exists() else [])
    source = open_source(src, revision=revision)
    check_output(out, force, [*source.files, *([source.root] if source.root else [])])
    plan = make_plan(source, base_tier, tiers, overrides, reuse_source=not requantize)
    imat, imat_sha = load_imatrix(imatrix) if imatrix else ({}, "")
    check_imatrix(imat, imatrix or Path("--imatrix"), plan)
    bundle_id = uuid.uuid4().hex
    writers = [prepare(source.spec.gguf_arch, f, EXPERT_ALIGNMENT, _metadata(source, plan, f, bundle_id, imat_sha))
               for f in plan.files]
    plan = replace(plan, file_sizes=tuple(file_bytes(w) for w in writers))
    check_space(out, plan.total_bytes)
    if dry_run:  # the plan (warnings included) is the output
        return ConvertResult(out, plan, time.perf_counter() - t_start, 0.0, psutil.Process().memory_info().rss, 0)
    for w in plan.warnings:
        log.warning(w)
    for line in clean_stale(out.resolve().parent):
        log.warning(line)
    lock = OutputLock(out)
    try:
        quant, peak = _write(out, force, plan, writers, imat, threads, progress)
    finally:
        lock.release()
    written = sum(plan.file_sizes or ())
    log.info("converted %s -> %s in %.1fs", src, out, time.perf_counter() - t_start)
    return ConvertResult(out, plan, time.perf_counter() - t_start, quant.seconds, peak, written)


def _write(out: Path, force: bool, plan: ConvertPlan, writers: list[gguf.GGUFWriter], imat: dict[str, np.ndarray],
           threads: int | None, progress: bool) -> tuple[_Quantizer, int]:
    quant = _Quantizer(imat)
    threads = max(1, threads or os.cpu_count() or 1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(f.data_bytes for f in plan.files), unit="B", unit_scale=True,
                   unit_divisor=1024, desc="convert")
    with atomic_dir(out, force) as tmp:
        streams: list[GGUFStream] = []
        try:
            for f, w in zip(plan.files, writers):
                streams.append(GGUFStream(tmp / f.name, w, f))
            peak = _pump(plan, streams, quant, threads, bar)
            for s in streams:
                s.close()
            sizes = tuple((tmp / f.name).stat().st_size for f in plan.files)
            if sizes != plan.file_sizes:
                raise AssertionError(f"planned file sizes {plan.file_sizes}, wrote {sizes}")
        except BaseException:  # atomic_dir removes the partial directory (and words an OSError as one line)
            for s in streams:
                s.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
    return quant, peak


def _pump(plan: ConvertPlan, streams: list[GGUFStream], quant: _Quantizer, threads: int, bar) -> int:
    """Run the jobs on a pool and write results in order; returns the peak RSS seen (sampled by the
    quantizer threads while their float32 input is alive, and after every write)."""
    proc = psutil.Process()
    peak = proc.memory_info().rss
    side_streams = {f.tier: s for f, s in zip(plan.files[1:], streams[1:])}
    side_type = {(f.tier, t.source.name): t.qtype for f in plan.files[1:] for t in f.tensors}
    base_type = {t.name: t.qtype for t in plan.base.tensors}
    pending: deque[tuple[SourceTensor, int | None, Future]] = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="quantize") as pool:
        def drain_one() -> None:
            nonlocal peak
            t, e, fut = pending.popleft()
            res = fut.result()
            streams[0].write(res[base_type[t.name]] if base_type[t.name] in res else next(iter(res.values())))
            n = res[base_type[t.name]].nbytes if base_type[t.name] in res else 0
            if e is not None:
                for tier, s in side_streams.items():
                    data = res[side_type[(tier, t.name)]]
                    s.write(data)
                    n += data.nbytes
            if bar is not None:
                bar.update(n)
            peak = max(peak, proc.memory_info().rss)

        for t, e, types, reuse in _jobs(plan):
            pending.append((t, e, pool.submit(quant.run, t, e, types, reuse)))
            if len(pending) >= 2 * threads:
                drain_one()
        while pending:
            drain_one()
    return max(peak, quant.peak)


__all__ = ["BASE_FILE", "ConvertResult", "convert"]
