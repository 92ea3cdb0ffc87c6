"""``dymoe-gguf calibrate``: observe the router on calibration text, store an importance profile.

The bundle runs as converted (policy ``observe``: nothing is swapped); for every layer the eval
callback records the selected experts and router probabilities of every token. From them:

* ``freq``  share of tokens selecting each expert (rows sum to k), ``mass`` mean gate weight,
* ``transition`` how predictable layer l+1's choice is from layer l's
  (:func:`dymoe_gguf.runtime.decide.transition_predictability`),

saved as ``calibration.gguf`` in the bundle (seeding the controller's importance). Optionally an
importance matrix for the expert tensors in llama.cpp's GGUF imatrix format (``--imatrix``), which
``dymoe-gguf convert --imatrix`` accepts: per expert, the summed squared activations entering its
gate/up (the FFN-normed hidden state) and down (the SwiGLU output) matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dymoe_gguf.bundle import BundleIndex
from dymoe_gguf.bundle.format import base_expert_name
from dymoe_gguf.convert.imatrix import write_imatrix
from dymoe_gguf.errors import DymoeError
from dymoe_gguf.quality.eval import tokenize_chunks
from dymoe_gguf.quality.profile import Profile, save_profile
from dymoe_gguf.runtime import decide
from dymoe_gguf.runtime.observe import LayerRouting, read_f32, read_f32_array


@dataclass(frozen=True)
class CalibrationResult:
    """What calibrate stored, with the per-layer skew."""

    profile: Profile
    entropy: list[float]  # normalised entropy of expert load per MoE layer (1 = uniform)
    path: Path
    imatrix: Path | None

    def to_dict(self) -> dict:
        return {"path": str(self.path), "imatrix": str(self.imatrix) if self.imatrix else None,
                "tokens": self.profile.tokens, "normalized_entropy": self.entropy,
                "transition": [None if np.isnan(x) else float(x) for x in self.profile.transition],
                "top_expert_share": [float(r.max() / max(r.sum(), 1e-9)) for r in self.profile.freq if r.sum()]}


class _ImatrixAccumulator:
    """Sums of squared expert inputs per (layer, expert), from ffn_norm-N and ffn_moe_swiglu-N."""

    def __init__(self, n_layer: int, n_expert: int) -> None:
        self.x: dict[int, np.ndarray] = {}
        self.ids: dict[int, np.ndarray] = {}
        self.in_sums: dict[int, np.ndarray] = {}
        self.down_sums: dict[int, np.ndarray] = {}
        self.counts: dict[int, np.ndarray] = {}
        self.n_expert = n_expert

    def on_norm(self, layer: int, ptr: int) -> None:
        self.x[layer] = np.array(read_f32(ptr), dtype=np.float64)  # [n, d]

    def on_topk(self, layer: int, ids: np.ndarray) -> None:
        x = self.x.get(layer)
        if x is None or len(x) != len(ids):  # last layer: output rows only unless logits_all
            return
        self.ids[layer] = ids
        E, k = self.n_expert, ids.shape[1]
        if layer not in self.in_sums:
            self.in_sums[layer] = np.zeros((E, x.shape[1]))
            self.counts[layer] = np.zeros(E)
        np.add.at(self.in_sums[layer], ids.reshape(-1), np.repeat(x * x, k, axis=0))
        np.add.at(self.counts[layer], ids.reshape(-1), 1.0)

    def on_swiglu(self, layer: int, ptr: int) -> None:
        ids = self.ids.pop(layer, None)
        if ids is None:
            return
        act = np.array(read_f32_array(ptr), dtype=np.float64).reshape(len(ids), ids.shape[1], -1)  # [n, k, ff]
        if layer not in self.down_sums:
            self.down_sums[layer] = np.zeros((self.n_expert, act.shape[2]))
        np.add.at(self.down_sums[layer], ids.reshape(-1), (act * act).reshape(-1, act.shape[2]))


def calibrate(bundle: Path, text_file: Path, *, ctx: int = 512, max_chunks: int | None = None,
              imatrix_out: Path | None = None, n_threads: int | None = None,
              progress: bool = False) -> CalibrationResult:
    """Run the bundle on ``text_file`` and store its routing profile (and optionally an imatrix).
    ``progress`` shows a tqdm bar over the chunks (on stderr)."""
    from dymoe_gguf.runtime.controller import Controller

    if not text_file.is_file():
        raise DymoeError(f"Calibration text {text_file} does not exist")
    text = text_file.read_text(encoding="utf-8", errors="replace")
    index = BundleIndex(bundle)
    acc = _ImatrixAccumulator(index.n_layer, index.n_expert) if imatrix_out else None
    ctl = Controller.open(bundle, policy="observe", lookahead=0)
    if acc is not None:
        ctl.extra_handlers = {"ffn_norm": acc.on_norm, "ffn_moe_swiglu": acc.on_swiglu}
        ctl.routing_hooks.append(acc.on_topk)
    try:
        llm = ctl.llama(n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, n_threads=n_threads)
        chunks = tokenize_chunks(llm, text, ctx, max_chunks)
        ctl.trace = []
        with tqdm(chunks, unit="chunk", desc="calibrate", disable=not progress) as bar:
            for chunk in bar:
                llm.reset()
                llm.eval(chunk)
        if ctl.observer is not None and ctl.observer.error is not None:
            raise DymoeError(f"eval callback failed: {ctl.observer.error}")
        trace = _to_trace(ctl.trace, len(index.moe_layers), index.n_expert)
    finally:
        ctl.close()
    prof = _profile(index, trace, text_file.name)
    path = save_profile(index, prof)
    if acc is not None and imatrix_out is not None:
        _write(acc, index, imatrix_out, text_file.name, len(chunks), ctx)
    ent = decide.normalized_entropy(prof.freq[list(index.moe_layers)])
    return CalibrationResult(prof, [float(x) for x in ent], path, imatrix_out)


def _to_trace(records: list[LayerRouting], n_moe: int, n_expert: int) -> decide.RoutingTrace:
    by_layer: list[list[np.ndarray]] = [[] for _ in range(n_moe)]
    w_layer: list[list[np.ndarray]] = [[] for _ in range(n_moe)]
    for r in records:
        by_layer[r.moe_index].append(r.ids)
        w_layer[r.moe_index].append(r.weights)
    ids = np.stack([np.concatenate(x) for x in by_layer], axis=1).astype(np.int32)  # [T, L, k]
    ws = np.stack([np.concatenate(x) for x in w_layer], axis=1).astype(np.float32)
    return decide.RoutingTrace(ids, ws, n_expert)


def _profile(index: BundleIndex, trace: decide.RoutingTrace, name: str) -> Profile:
    L, E = index.n_layer, index.n_expert
    freq, mass = np.zeros((L, E)), np.zeros((L, E))
    freq[list(index.moe_layers)] = decide.expert_load(trace)
    mass[list(index.moe_layers)] = decide.gate_mass(trace)
    trans = np.full(L, np.nan)
    pred = decide.transition_predictability(trace) if trace.n_layer > 1 else np.zeros(0)
    for i, layer in enumerate(index.moe_layers[:-1]):
        trans[layer] = pred[i]
    return Profile(freq, mass, trans, trace.n_tokens, name)


def _write(acc: _ImatrixAccumulator, index: BundleIndex, path: Path, dataset: str, chunks: int, ctx: int) -> None:
    sums, counts = {}, {}
    for layer, s in acc.in_sums.items():
        for m in ("gate", "up"):
            sums[base_expert_name(layer, m)] = s
            counts[base_expert_name(layer, m)] = acc.counts[layer]
        if layer in acc.down_sums:
            sums[base_expert_name(layer, "down")] = acc.down_sums[layer]
            counts[base_expert_name(layer, "down")] = acc.counts[layer]
    if not sums:
        raise DymoeError("No expert activations were observed: is the text long enough for one chunk?")
    write_imatrix(path, sums, counts, dataset, chunks, ctx)
