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
from dymoe_gguf.util import atomic_file, read_error


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
    """The bundle's profile, or None; a profile from another conversion, or one that does not fit the
    bundle (shapes, values), is a :class:`BundleError` naming what is wrong."""
    path = index.root / CALIBRATION_FILE
    if not path.exists():
        return None
    redo = "delete it and re-run `dymoe-gguf calibrate`"
    if not path.is_file():
        raise BundleError(f"{CALIBRATION_FILE} in {index.root} is not a file; {redo}")
    try:
        with open(path, "rb"):
            pass
        r = gguf.GGUFReader(path, "r")
    except OSError as exc:
        raise BundleError(read_error(path, exc)) from None
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BundleError(f"Corrupt or truncated {CALIBRATION_FILE}: {msg}; {redo}") from None
    role = r.get_field(Key.ROLE)
    if role is None or role.contents() != "calibration":
        raise BundleError(f"{CALIBRATION_FILE} is not a calibration profile (no {Key.ROLE} = calibration); {redo}")
    bid = r.get_field(Key.BUNDLE_ID)
    if bid is None or bid.contents() != index.bundle_id:
        raise BundleError(f"{CALIBRATION_FILE} belongs to another conversion: re-run `dymoe-gguf calibrate`")
    t = {x.name: x for x in r.tensors}
    want = {"freq": (index.n_layer, index.n_expert), "mass": (index.n_layer, index.n_expert),
            "transition": (index.n_layer,)}
    arrays = {}
    for name, shape in want.items():
        x = t.get(name)
        if x is None:
            raise BundleError(f"Corrupt {CALIBRATION_FILE}: tensor {name} is missing; {redo}")
        if x.tensor_type != gguf.GGMLQuantizationType.F32:
            raise BundleError(f"Corrupt {CALIBRATION_FILE}: {name} is {x.tensor_type.name}, expected F32; {redo}")
        a = np.array(x.data, dtype=np.float64).reshape(-1)
        if a.size != int(np.prod(shape)):
            raise BundleError(f"Corrupt {CALIBRATION_FILE}: {name} has {a.size} values, expected shape "
                              f"{list(shape)} for this bundle; {redo}")
        arrays[name] = a.reshape(shape)
    for name in ("freq", "mass"):
        if not np.isfinite(arrays[name]).all() or (arrays[name] < 0).any():
            raise BundleError(f"Corrupt {CALIBRATION_FILE}: {name} holds negative or non-finite values; {redo}")
    if np.isinf(arrays["transition"]).any():  # NaN marks layers without a successor
        raise BundleError(f"Corrupt {CALIBRATION_FILE}: transition holds infinite values; {redo}")
    tokens = r.get_field("dymoe.calibration.tokens")
    text = r.get_field("dymoe.calibration.text")
    return Profile(arrays["freq"], arrays["mass"], arrays["transition"], int(tokens.contents()) if tokens else 0,
                   str(text.contents()) if text else "")
