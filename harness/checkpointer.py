"""The training checkpoint of one run (``checkpoint.pt``): what a rerun resumes from.

It holds the model, optimizer, scheduler and gradient-scaler states, the iteration (with its
epoch and batch in the epoch), every rank's RNG states (python, numpy, torch, CUDA), the metrics
log's open window and the run's fingerprint: the settings that change the trained weights. A
checkpoint with another fingerprint is refused rather than resumed. Rank 0 writes it atomically.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from harness.distributed import DistEnv, all_gather_object
from harness.errors import HarnessError
from harness.files import atomic_write


def rng_state(device: torch.device) -> dict:
    """This process's python, numpy, torch (and CUDA on a GPU) RNG states, as weights-only loading reads them."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": np_state[1].tolist(), "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise HarnessError(f"cannot read the training checkpoint {path} ({type(err).__name__}); delete it to start over") from None


class Checkpointer:
    """Saves and resumes ``model``, ``optimizer``, ``scheduler`` and ``scaler`` at ``path``, for a run
    whose settings are ``fingerprint``. Every rank calls ``resume`` and ``save`` (they gather the RNG
    states); rank 0 reads the file's existence for all and writes it."""

    def __init__(self, path: Path, fingerprint: dict, env: DistEnv, *, model: nn.Module, optimizer, scheduler,
                 scaler):
        self.path, self.fingerprint, self.env = Path(path), fingerprint, env
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler

    def resume(self) -> dict | None:
        """Load the checkpoint into the objects and this rank's RNGs; returns it (``iteration`` and
        ``window`` are the caller's), or None when there is none."""
        seen = all_gather_object(self.path.exists())
        if len(set(seen)) > 1:
            raise HarnessError(f"{self.path} is visible on ranks {[r for r, s in enumerate(seen) if s]} only: "
                               "the output directory must be on a filesystem shared by every node")
        if not seen[0]:
            return None
        state = load_checkpoint(self.path)
        saved, now = state["config"], self.fingerprint
        diff = sorted(k for k in set(now) | set(saved) if now.get(k) != saved.get(k))
        if diff:
            shown = ", ".join(f"{k}: {saved.get(k)} -> {now.get(k)}" for k in diff)
            raise HarnessError(f"{self.path} comes from a run with other settings ({shown}); use another output directory or delete it")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError:
            raise HarnessError(f"{self.path} holds another model's weights; use another output directory or delete it") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][self.env.rank], self.env.device)
        return state

    def save(self, iteration: int, batches_per_epoch: int, window: dict) -> None:
        rng = all_gather_object(rng_state(self.env.device))
        if not self.env.is_main:
            return
        payload = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": iteration,
            "epoch": iteration // batches_per_epoch,
            "batch_in_epoch": iteration % batches_per_epoch,
            "rng": rng,
            "window": window,
            "config": self.fingerprint,
        }
        atomic_write(self.path, lambda f: torch.save(payload, f))
