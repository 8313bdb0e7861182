"""Checkpoints: safetensors only, written atomically (temp file, fsync, rename), so a crash or a full
disk mid-save never destroys the previous checkpoint.

A model directory holds `config.json` (ModelConfig, with "model_type": "nanoseek") and
`model.safetensors` (our state-dict names; see hf.py for transformers' names).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanoseek.config import ModelConfig
from nanoseek.errors import UserError

MODEL_TYPE = "nanoseek"


class CheckpointError(UserError):
    """A missing, unreadable or mismatched checkpoint; the message is meant for the user as is."""


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path), fsync the file, then rename it over `path` (and fsync the directory). The file gets
    the usual permissions (0666 less the umask; mkstemp's are 0600); temp files a killed writer left are removed."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except (OSError, SafetensorError) as e:  # a full disk, a quota, a read-only file system
        raise CheckpointError(f"could not write {path}: {e}") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _fsync_dir(d: Path) -> None:
    """Make a rename in d durable. Some file systems (FUSE, CIFS, 9p mounts) refuse fsync on a directory: the
    file is in place all the same, so that is not a failed write."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def model_state(model) -> dict[str, torch.Tensor]:
    """The persistent state, without the tied lm_head copy (safetensors refuses shared storage)."""
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def load_model_state(model, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors into the model, failing with one line that names the first mismatched tensor."""
    expected = model_state(model)
    for name, t in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{source}: missing tensor {name}")
        if tuple(tensors[name].shape) != tuple(t.shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                  f"the config expects {tuple(t.shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor {extra[0]} (the config has no such weight)")
    model.load_state_dict(tensors, strict=False)


def save_model(model, out_dir: str | Path) -> None:
    save_tensors(Path(out_dir) / "model.safetensors", model_state(model), metadata={"format": "pt"})
    save_config(model.config, out_dir)


def save_config(cfg: ModelConfig, out_dir: str | Path) -> None:
    atomic_write_text(Path(out_dir) / "config.json", json.dumps({"model_type": MODEL_TYPE, **cfg.to_dict()},
                                                                indent=2) + "\n")


def read_config(path: str | Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return d


def load_model(model_dir: str | Path, device: str | torch.device = "cpu"):
    """Load a nanoseek model directory (config.json + model.safetensors)."""
    from nanoseek.model import NanoSeek

    d = Path(model_dir)
    cfg = read_config(d / "config.json")
    if cfg.pop("model_type", None) != MODEL_TYPE:
        raise CheckpointError(f"{d} is not a nanoseek checkpoint (config.json model_type is not {MODEL_TYPE!r})")
    model = NanoSeek(ModelConfig.from_dict(cfg))
    load_model_state(model, load_tensors(d / "model.safetensors"), str(d / "model.safetensors"))
    return model.to(device).eval()


# --- training state: one file, so that a checkpoint is replaced atomically as a whole ---------------

def save_training_state(path: str | Path, model, optimizer_states: list[dict], info: dict) -> None:
    """model weights + optimizer tensors + RNG state in one safetensors file; everything that is not a
    tensor (step, data position, optimizer hyper-parameters) as JSON in its metadata."""
    tensors = {f"model.{k}": v for k, v in model_state(model).items()}
    groups = []
    for i, s in enumerate(optimizer_states):
        for pid, st in s["state"].items():
            for key, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"optim.{i}.{pid}.{key}"] = v
                else:
                    info.setdefault("optim_scalars", {})[f"{i}.{pid}.{key}"] = v
        groups.append(s["param_groups"])
    tensors["rng.torch"] = torch.get_rng_state()
    save_tensors(path, tensors, metadata={"info": json.dumps({**info, "param_groups": groups})})


def read_training_info(path: str | Path) -> dict:
    """The JSON part of a training checkpoint (step, data position, the run's arguments, ...), tensors unread."""
    from safetensors import safe_open

    if not Path(path).exists():
        raise CheckpointError(f"no checkpoint to resume from at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads(f.metadata()["info"])
    except (OSError, SafetensorError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    kinds = {"step": int, "train_time": (int, float), "tokens": int, "loader": dict, "args": dict}
    if not isinstance(info, dict) or any(k in info and not isinstance(info[k], t) for k, t in kinds.items()):
        raise CheckpointError(f"cannot read checkpoint {path}: its info is not a training checkpoint's")
    return info


def load_training_state(path: str | Path, model) -> tuple[list[dict], dict]:
    """Restore the model in place; return (optimizer state dicts, info)."""
    info = read_training_info(path)
    tensors = load_tensors(path)
    load_model_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, str(path))
    try:
        states = [{"state": {}, "param_groups": g} for g in info.pop("param_groups")]
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, i, pid, key = k.split(".", 3)
                states[int(i)]["state"].setdefault(int(pid), {})[key] = v
        for k, v in info.pop("optim_scalars", {}).items():
            i, pid, key = k.split(".", 2)
            states[int(i)]["state"].setdefault(int(pid), {})[key] = v
        torch.set_rng_state(tensors["rng.torch"])
    except (KeyError, ValueError, IndexError, TypeError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a whole training checkpoint ({type(e).__name__}: {e})") from None
    return states, info
