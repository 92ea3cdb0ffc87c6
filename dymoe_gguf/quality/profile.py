"""The calibration profile stored in a bundle (``calibration.gguf``).

Tensors (float32, numpy shapes): ``freq [n_layer, n_expert]`` share of tokens selecting each expert
(rows of MoE layers sum to k), ``mass [n_layer, n_expert]`` mean gate weight per token,
``transition [n_layer]`` how predictable layer l+1's choice is from layer l's (recall of the
co-occurrence predictor; NaN for the last layer). Keys under ``dymoe.`` tie it to its bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from dymoe_gguf.bundle import BundleIndex
from dymoe_gguf.bundle.format import CALIBRATION_FILE, FORMAT_VERSION, Key
from dymoe_gguf.errors import BundleError
from dymoe_gguf.util import atomic_file


@dataclass(frozen=True)
class Profile:
    """Routing statistics of a bundle on calibration text."""

    freq: np.ndarray
    mass: np.ndarray
    transition: np.ndarray
    tokens: int
    text: str  # what it was computed on (file name)


def save_profile(index: BundleIndex, prof: Profile) -> Path:
    """Write ``calibration.gguf`` into the bundle atomically."""
    path = index.root / CALIBRATION_FILE
    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(tmp, index.arch)
        w.add_uint32(Key.FORMAT_VERSION, FORMAT_VERSION)
        w.add_string(Key.ROLE, "calibration")
        w.add_string(Key.BUNDLE_ID, index.bundle_id)
        w.add_uint32("dymoe.calibration.tokens", prof.tokens)
        w.add_string("dymoe.calibration.text", prof.text)
        w.add_tensor("freq", prof.freq.astype(np.float32))
        w.add_tensor("mass", prof.mass.astype(np.float32))
        w.add_tensor("transition", prof.transition.astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def load_profile(index: BundleIndex) -> Profile | None:
    """The bundle's profile, or None; a profile from another conversion is an error."""
    path = index.root / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        r = gguf.GGUFReader(path, "r")
    except Exception as exc:
        raise BundleError(f"Corrupt {CALIBRATION_FILE}: {exc}; delete it and re-run `dymoe-gguf calibrate`") from None
    bid = r.get_field(Key.BUNDLE_ID)
    if bid is None or bid.contents() != index.bundle_id:
        raise BundleError(f"{CALIBRATION_FILE} belongs to another conversion: re-run `dymoe-gguf calibrate`")
    t = {x.name: np.array(x.data, dtype=np.float64) for x in r.tensors}
    tokens = r.get_field("dymoe.calibration.tokens")
    text = r.get_field("dymoe.calibration.text")
    return Profile(t["freq"], t["mass"], t["transition"], int(tokens.contents()) if tokens else 0,
                  str(text.contents()) if text else "")
