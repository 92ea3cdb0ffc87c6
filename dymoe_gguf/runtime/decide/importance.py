"""Expert importance: exponential moving averages of gate mass and selection frequency.

Per (layer, expert) the tracker keeps two EMAs over tokens:

- **mass**  the gate weight the expert received (0 when not selected); a row sums to about 1
  for models that renormalise their top-k weights;
- **freq**  whether the expert was selected (1 or 0); a row sums to about k.

``scores = w · mass + (1 − w) · freq / k`` with ``w = cfg.mass_weight``, so both terms are on
the same scale (each row sums to about 1) and scores compare across layers. Mass rewards the
experts the output depends on; frequency rewards the ones that will be read from memory.

A token observed ``h = cfg.half_life_tokens`` tokens ago counts half as much as the current one:
each token multiplies the old value by ``a = 0.5 ** (1 / h)`` and adds ``(1 − a) · x``. A batch
of ``n`` tokens (prompt processing) is folded in as one step of weight ``1 − a ** n`` applied to
the batch mean — exact for a single token, and for a batch whose tokens route alike.

:meth:`ImportanceTracker.update` runs once per layer per decoded token inside the evaluation
callback, so it works in place on preallocated rows and allocates nothing for a single token;
:meth:`ImportanceTracker.update_token` folds a whole token (every layer) in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dymoe_gguf.errors import RuntimeConfigError
from dymoe_gguf.runtime.decide.trace import RoutingTrace, expert_load, gate_mass


@dataclass(frozen=True)
class ImportanceConfig:
    """How fast importance forgets and how it weighs gate mass against frequency."""

    # Tokens after which an observation counts half. Short enough to follow a change of topic
    # within a paragraph, long enough that one token's routing does not move tiers.
    half_life_tokens: float = 32.0
    # Weight of gate mass in the score; the rest goes to selection frequency.
    mass_weight: float = 0.5

    def __post_init__(self) -> None:
        if not self.half_life_tokens > 0:
            raise RuntimeConfigError(f"Expected half_life_tokens > 0, got {self.half_life_tokens}.")
        if not 0.0 <= self.mass_weight <= 1.0:
            raise RuntimeConfigError(f"Expected mass_weight in [0, 1], got {self.mass_weight}.")


class ProfileLike(Protocol):
    """Anything carrying calibration arrays ``freq`` and ``mass`` of shape [L, E]."""

    freq: np.ndarray
    mass: np.ndarray


@dataclass(frozen=True, eq=False)
class ImportanceProfile:
    """Calibration statistics per (layer, expert), the starting point of the tracker."""

    freq: np.ndarray  # (L, E) float64, share of tokens selecting the expert; rows sum to k
    mass: np.ndarray  # (L, E) float64, mean gate weight per token; rows sum to about 1

    def __post_init__(self) -> None:
        freq = np.array(self.freq, dtype=np.float64)
        mass = np.array(self.mass, dtype=np.float64)
        if freq.ndim != 2 or freq.shape != mass.shape:
            raise ValueError(
                f"Expected freq and mass of one shape (layers, experts), got {freq.shape} and {mass.shape}."
            )
        for array in (freq, mass):
            array.setflags(write=False)
        object.__setattr__(self, "freq", freq)
        object.__setattr__(self, "mass", mass)

    @classmethod
    def from_trace(cls, trace: RoutingTrace) -> ImportanceProfile:
        """Profile of a recorded trace: :func:`expert_load` and :func:`gate_mass`."""
        return cls(freq=expert_load(trace), mass=gate_mass(trace))


class ImportanceTracker:
    """EMA of gate mass and selection frequency per (layer, expert); :attr:`scores` ranks them."""

    def __init__(
        self,
        n_layer: int,
        n_expert: int,
        top_k: int,
        cfg: ImportanceConfig | None = None,
    ) -> None:
        if n_layer < 1 or n_expert < 1 or not 1 <= top_k <= n_expert:
            raise ValueError(
                f"Expected n_layer >= 1, n_expert >= 1 and 1 <= top_k <= n_expert, got "
                f"n_layer={n_layer}, n_expert={n_expert}, top_k={top_k}."
            )
        self.n_layer = n_layer
        self.n_expert = n_expert
        self.top_k = top_k
        self.cfg = cfg if cfg is not None else ImportanceConfig()
        # Mass and frequency interleaved, so one in-place pass decays both and one scatter adds
        # both: [..., 0] is mass, [..., 1] frequency.
        self._state = np.zeros((n_layer, n_expert, 2), dtype=np.float64)  # (L, E, 2)
        self._rows = list(self._state)  # (E, 2) views, so update() does no 2-D indexing
        self._decay1 = 0.5 ** (1.0 / self.cfg.half_life_tokens)  # a, one token
        self._gain1 = 1.0 - self._decay1  # 1 − a
        self._slot = np.zeros((top_k, 2), dtype=np.float64)  # (k, 2) one token's contribution
        self._slot[:, 1] = self._gain1
        # update_token scatters into the flat state: index 2·(l·E + e) + {0: mass, 1: freq}.
        self._flat = self._state.reshape(-1)  # (L·E·2,) view
        layer_start = np.arange(n_layer, dtype=np.intp) * (2 * n_expert)  # (L,)
        self._offset = layer_start[:, None, None] + np.arange(2, dtype=np.intp)  # (L, 1, 2)
        self._token_index = np.zeros((n_layer, top_k, 2), dtype=np.intp)  # (L, k, 2)
        self._token_value = np.zeros((n_layer, top_k, 2), dtype=np.float64)  # (L, k, 2)
        self._token_value[..., 1] = self._gain1
        self.tokens_seen = 0  # tokens folded into layer 0 (or into all layers at once)

    def seed(self, profile: ProfileLike) -> None:
        """Start from a calibration profile instead of zeros (replaces the current state)."""
        freq = np.asarray(profile.freq, dtype=np.float64)
        mass = np.asarray(profile.mass, dtype=np.float64)
        shape = self._state.shape[:2]
        if freq.shape != shape or mass.shape != shape:
            raise ValueError(
                f"Expected a profile of shape {shape} (layers, experts), got freq {freq.shape} "
                f"and mass {mass.shape}; was it calibrated on this model?"
            )
        self._state[..., 0] = mass
        self._state[..., 1] = freq

    def reset(self) -> None:
        """Forget everything (zeros)."""
        self._state[...] = 0.0
        self.tokens_seen = 0

    def update(self, layer: int, ids: np.ndarray, weights: np.ndarray) -> None:
        """Fold one layer's routing of ``n`` tokens into the EMAs.

        ``ids`` (n, k) integer and ``weights`` (n, k) float, the router's own selection (ids
        distinct within a token; a skip-redirected duplicate would be counted twice).
        """
        row = self._rows[layer]  # (E, 2)
        n_tok = ids.shape[0]
        if layer == 0:
            self.tokens_seen += n_tok
        if n_tok == 1:  # decode: in place, no temporaries
            row *= self._decay1
            np.multiply(weights[0], self._gain1, out=self._slot[:, 0])
            np.add.at(row, ids[0], self._slot)
            return
        if n_tok == 0:
            return
        decay = 0.5 ** (n_tok / self.cfg.half_life_tokens)
        gain = (1.0 - decay) / n_tok  # weight of each token's contribution to the batch mean
        flat = np.ravel(ids)
        row *= decay
        row[:, 0] += gain * np.bincount(flat, weights=np.ravel(weights), minlength=self.n_expert)
        row[:, 1] += gain * np.bincount(flat, minlength=self.n_expert)

    def update_token(self, ids: np.ndarray, weights: np.ndarray) -> None:
        """Fold one decoded token's routing at every layer at once: ``ids``, ``weights`` (L, k).

        Equivalent to ``update(l, ids[l:l+1], weights[l:l+1])`` for every layer, at a fraction
        of the cost: for a runtime that buffers the routing during the token and updates after.
        """
        self._state *= self._decay1
        index, value = self._token_index, self._token_value
        np.multiply(ids[:, :, None], 2, out=index)
        index += self._offset
        np.multiply(weights, self._gain1, out=value[..., 0])
        np.add.at(self._flat, index.reshape(-1), value.reshape(-1))
        self.tokens_seen += 1

    @property
    def mass(self) -> np.ndarray:
        """EMA of gate mass, float64 [L, E] (a read-only view)."""
        view = self._state[..., 0]
        view.setflags(write=False)
        return view

    @property
    def freq(self) -> np.ndarray:
        """EMA of selection frequency, float64 [L, E] (a read-only view)."""
        view = self._state[..., 1]
        view.setflags(write=False)
        return view

    @property
    def scores(self) -> np.ndarray:
        """Importance ``w · mass + (1 − w) · freq / k``, float64 [L, E], a new array."""
        w = self.cfg.mass_weight
        return w * self._state[..., 0] + ((1.0 - w) / self.top_k) * self._state[..., 1]
