"""Random-number state of one rank: seeding, and capture/restore as plain JSON.

DeepSpeed does not save RNG states, so dsgpt writes each rank's beside the checkpoint. They are
JSON, not pickles: loading a run dir from somewhere else must never run code from it.
"""

from __future__ import annotations

import base64
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(seed: int, rank: int, step: int) -> int:
    """A seed for rank `rank` continuing at `step` when no saved state fits (another layout)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def _bytes(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture() -> dict:
    """This process's Python, numpy, torch (and CUDA) RNG states as a JSON-ready dict."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": _bytes(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = _bytes(torch.cuda.get_rng_state())
    return state


def restore(state: dict) -> None:
    """Inverse of capture(); raises KeyError/ValueError/TypeError on a malformed state."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["internal"]), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state({"bit_generator": nps["bit_generator"],
                         "state": {"key": np.asarray(nps["key"], dtype=np.uint32), "pos": int(nps["pos"])},
                         "has_gauss": int(nps["has_gauss"]), "gauss": float(nps["gauss"])})
    torch.set_rng_state(_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_tensor(state["cuda"]))
