"""Checkpoints of a training run: ``checkpoints/step-NNNNNN/`` holds ``model/`` (``save_pretrained``; the LoRA
adapter when LoRA is on) and ``state.pt`` (optimiser, scheduler, RNG and judge state, the config) as tensors
and plain values, loaded with ``torch.load(weights_only=True)``: a checkpoint folder is data, never code.

A checkpoint is written to a temporary folder and swapped in durably (``replace_dir``): a crash never
leaves a half-written checkpoint or none. Under FSDP the shards are gathered and the full model and
optimiser state are saved, like a single process's.
"""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sage_gym.durable import replace_dir, restore_aside
from sage_gym.errors import SageError
from sage_opd.build import Student
from sage_opd.config import TrainConfig
from sage_opd.parallel import DistInfo

CHECKPOINT_PREFIX = "step-"


class OutputExistsError(SageError):
    """``log.out_dir`` already holds a training run and ``--resume`` was not given."""


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values, so that state.pt loads with ``weights_only=True``."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Checkpoints:
    """The ``checkpoints/`` folder of ``out_dir``: the newest one, saving (rank 0 writes) and loading."""

    def __init__(self, out_dir: Path, dist_info: DistInfo, keep: int = 2):
        self.folder, self.dist, self.keep = Path(out_dir) / "checkpoints", dist_info, keep

    def latest(self) -> Path | None:
        if self.folder.is_dir() and self.dist.main:
            restore_aside(self.folder)  # a checkpoint set aside by a save that crashed goes back first
        if self.dist.world > 1:
            dist.barrier()
        found = sorted(self.folder.glob(f"{CHECKPOINT_PREFIX}*[0-9]")) if self.folder.is_dir() else []
        return found[-1] if found else None

    def refuse_existing_run(self, metrics_path: Path) -> None:
        """Never overwrite a run's metrics and checkpoints silently: say how to resume it or go elsewhere."""
        last = self.latest()
        if last is None and not (metrics_path.is_file() and metrics_path.stat().st_size):
            return
        out_dir = self.folder.parent
        where = f"checkpoints up to {last.name}" if last else "metrics.jsonl but no checkpoint"
        raise OutputExistsError(
            f"{out_dir} already holds a training run ({where}). Add --resume to continue it"
            + (f" from {last.name}" if last else " (from step 0: nothing was saved)")
            + f", or write elsewhere with log.out_dir=OTHER_FOLDER (or delete {out_dir}).")

    def save(self, step: int, student: Student, optimizer, scheduler, judge, config: dict[str, Any]) -> Path | None:
        """Write model, optimiser, scheduler, RNG and judge state into a temporary folder, then swap it in
        durably (``replace_dir``: the previous folder of that step goes only once the new one is in place)."""
        model, optimizer_state = student.model, None
        if self.dist.strategy == "fsdp":  # gather the shards (collectives on every rank), save the full copy
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            student.sync_rollout_model()
            model = student.rollout_model
            optimizer_state = get_optimizer_state_dict(student.model, optimizer,
                                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.dist.world > 1:
            dist.barrier()
        if not self.dist.main:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"{CHECKPOINT_PREFIX}{step:06d}"
        tmp = self.folder / f".tmp-{CHECKPOINT_PREFIX}{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp / "model")
        student.tokenizer.save_pretrained(tmp / "model")
        judge_state = [judge.judged_total, judge.judged_sum] if judge is not None else None
        torch.save({"step": step, "optimizer": optimizer_state or optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_state(), "judge": judge_state, "config": config}, tmp / "state.pt")
        replace_dir(tmp, final)
        for old in sorted(self.folder.glob(f"{CHECKPOINT_PREFIX}*[0-9]"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, checkpoint: Path, cfg: TrainConfig, student: Student, optimizer, scheduler, judge) -> int:
        """Restore optimiser, scheduler, RNG and judge state from ``checkpoint`` (the model is loaded by the build
        phase); return its step. Settings that differ from the checkpoint's are named (the run will differ)."""
        try:  # weights_only: a checkpoint folder is data, never code to run
            state = torch.load(checkpoint / "state.pt", weights_only=True)
        except pickle.UnpicklingError as err:
            raise SageError(f"{checkpoint / 'state.pt'} holds pickled objects other than tensors and plain values, "
                            "which sage does not load (unpickling can run code); it was not written by this version "
                            f"of sage: {str(err).splitlines()[0]}") from None
        changed = [k for k, v in flatten(cfg.to_dict()).items()
                   if flatten(state["config"]).get(k) != v and not k.startswith(("log.", "eval."))]
        if changed and self.dist.main:
            print(f"--resume: these settings differ from the checkpoint's, the run will not match an "
                  f"uninterrupted one: {', '.join(changed)}")
        if self.dist.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(student.model, optimizer, optim_state_dict=state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        if judge is not None and state["judge"] is not None:
            judge.judged_total, judge.judged_sum = state["judge"]
        return state["step"]
