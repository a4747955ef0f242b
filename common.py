"""common.py: what the stages share, and nothing else, read top to bottom: 1. the model (Llama,
Qwen2, Qwen3) and HF checkpoints in and out; 2. attention; 3. packing with shared prefixes; 4. the
generation engine; 5. chat and GRM formats (SPEC 1.1); 6. torchrun / FSDP2; 7. files, metrics,
checkpoints; 8. the OpenAI-compatible client. Stages talk to each other only through files."""
import contextlib
import functools
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
import warnings
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from tqdm import tqdm

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")  # DCP in one process is fine

# =============================================================================================
# 1. Model
# =============================================================================================
# Parameter names are Hugging Face's ("model.layers.3.self_attn.q_proj.weight"): loading is a state-dict copy.

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
            raise ValueError(f"unsupported model_type {model_type!r}: this repository implements Llama, Qwen2, Qwen3")
        rope = cfg.get("rope_parameters") or {}  # transformers >= 5 moved rope_theta here
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling and scaling.get("rope_type", scaling.get("type")) not in ("default", "llama3"):
            raise ValueError(f"unsupported rope scaling {scaling}")
        heads = cfg["num_attention_heads"]
        return cls(cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], heads,
                   cfg.get("num_key_value_heads", heads), cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   cfg.get("rms_norm_eps", 1e-6), float(theta), cfg.get("tie_word_embeddings", False),
                   qkv_bias=model_type == "qwen2" or cfg.get("attention_bias", False), qk_norm=model_type == "qwen3",
                   rope_scaling=scaling, hf=dict(cfg))

def rms_norm(x, weight, eps):
    """Normalise in fp32 like the reference implementation, scale in the input dtype."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)

def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = cfg.rope_scaling
    if s and s.get("rope_type", s.get("type")) == "llama3":  # Llama-3.1 long-context frequency remap
        factor, lo, hi, old_len = s["factor"], s["low_freq_factor"], s["high_freq_factor"], \
            s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.float()

def apply_rope(x, cos, sin):
    """x [..., T, H, D]; cos/sin [..., T, 1, D] (the rotate-half convention of HF checkpoints)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin

class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, \
            cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cu_seqlens=None, parents=None, cache=None, layer=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm"):  # Qwen3 normalises q and k per head before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None and cu_seqlens is None:  # decode: one new token per row
            return self.o_proj(cache.decode_attention(layer, q, k, v).reshape(B, T, -1))
        if cache is not None:  # prefill: the prompts' keys and values go to the cache
            cache.write_prefill(layer, k[0], v[0])
        out = attention(q, k, v, cu_seqlens, parents)
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
        self.checkpointing = False  # activation checkpointing: recompute this block in the backward

    def forward(self, x, cos, sin, cu_seqlens=None, parents=None, cache=None, layer=0):
        if self.checkpointing and torch.is_grad_enabled():  # inside FSDP2's hooks, as torchtitan does
            return torch.utils.checkpoint.checkpoint(self._forward, x, cos, sin, cu_seqlens, parents,
                                                     use_reentrant=False)
        return self._forward(x, cos, sin, cu_seqlens, parents, cache, layer)

    def _forward(self, x, cos, sin, cu_seqlens=None, parents=None, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, parents, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))

class Decoder(nn.Module):  # the HF "model." prefix
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

class Transformer(nn.Module):
    """Decoder-only LM, `model(input_ids)` -> fp32 logits. Packed: input_ids [1, T] holds documents back to back,
    cu_seqlens their bounds (section 3); no padding mask anywhere. A value model (critic, Bradley-Terry RM) has no
    output layer and a scalar head, zero at init so a fresh critic predicts 0 (SPEC 1.3)."""

    def __init__(self, cfg: ModelConfig, value_head=False):
        super().__init__()
        self.config, self.model = cfg, Decoder(cfg)
        if not cfg.tie_word_embeddings and not value_head:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.value_head = nn.Linear(cfg.hidden_size, 1) if value_head else None
        if value_head:
            nn.init.zeros_(self.value_head.weight), nn.init.zeros_(self.value_head.bias)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @property
    def layers(self):
        return self.model.layers

    def output_weight(self):
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def hidden_states(self, input_ids, cu_seqlens=None, parents=None, positions=None, cache=None):
        if positions is None:
            positions = packed_positions(input_ids, cu_seqlens, parents)
        x = self.model.embed_tokens(input_ids)
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[..., None, :]  # [B, T, 1, D]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, cu_seqlens, parents, cache, i)
        return self.model.norm(x)

    def lm_head_logits(self, h):
        """fp32 logits; the output layer runs in the weights' dtype, never under autocast."""
        w = self.output_weight()
        with torch.autocast(h.device.type, enabled=False):
            return F.linear(h.to(w.dtype), w).float()

    def forward(self, input_ids, cu_seqlens=None, parents=None, select=None):
        """fp32 logits [B, T, vocab], or [N, vocab] at the packed positions `select` only."""
        h = self.hidden_states(input_ids, cu_seqlens, parents)
        return self.lm_head_logits(h if select is None else h[0, select])

    def values(self, input_ids, cu_seqlens=None, parents=None, select=None):
        """Scalar value per position [B, T] (or [N] at select): critic and Bradley-Terry RM."""
        h = self.hidden_states(input_ids, cu_seqlens, parents)
        return self.value_head(h if select is None else h[0, select]).squeeze(-1).float()

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

# ---- Hugging Face checkpoints in and out -----------------------------------------------------
DEFAULT_MODEL = "smollm2-135m-instruct"  # the embedded default (data/smollm2.py)

def resolve_checkpoint(name_or_path) -> Path:
    """A local folder, the embedded default's cached folder, or a hub snapshot (online only)."""
    if str(name_or_path) == DEFAULT_MODEL:
        return embedded_default_path()
    p = Path(name_or_path)
    if p.is_dir() and not (p / "config.json").exists():
        raise FileNotFoundError(f"{p}: not a checkpoint folder (no config.json)")
    if p.is_dir():
        return p
    if p.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        raise FileNotFoundError(f"{name_or_path}: no such checkpoint folder (and not a hub id 'org/name')")
    from huggingface_hub import snapshot_download  # users who are online may pass a hub id
    return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"]))

def embedded_default_path() -> Path:
    """The embedded default's HF folder in $PERSONARL_CACHE; data/smollm2.py converts it there once."""
    folder = Path(os.environ.get("PERSONARL_CACHE", Path.home() / ".cache" / "personarl")) / DEFAULT_MODEL
    if not (folder / "config.json").exists():
        __import__("data.smollm2").smollm2.convert(folder)
    return folder

def read_hf_state(folder, value_head=False) -> dict:
    """The checkpoint's tensors by HF name, on CPU (plus value_head.* from value_head.safetensors)."""
    from safetensors.torch import load_file
    folder = Path(folder)
    files = sorted(f for f in folder.glob("*.safetensors") if f.name != "value_head.safetensors")
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (only safetensors checkpoints are read)")
    state, head = {}, folder / "value_head.safetensors"
    for f in files + ([head] if value_head and head.exists() else []):
        try:  # a truncated or corrupt file: name it
            state.update({(f"value_head.{k}" if f == head else k): v for k, v in load_file(str(f)).items()})
        except Exception as e:
            raise DataError(f"{f}: cannot read safetensors ({e})") from e
    return state

def load_tokenizer(name_or_path):
    return __import__("transformers").AutoTokenizer.from_pretrained(str(resolve_checkpoint(name_or_path)))

def load_model(name_or_path=None, device="cpu", dtype=torch.float32, value_head=False):
    """(model, tokenizer) from an HF folder, the embedded default or a hub id; value_head=True: a value model."""
    folder = resolve_checkpoint(name_or_path or DEFAULT_MODEL)
    cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        model = Transformer(cfg, value_head=value_head)
    state = fit_state(model, read_hf_state(folder, value_head), folder)
    model.load_state_dict(state, assign=True)
    model.inv_freq = rope_inv_freq(cfg)
    return model.to(device=device, dtype=dtype).eval(), load_tokenizer(folder)

def fit_state(model, state, folder):
    """The checkpoint's tensors this model has (a value model drops the output layer; a missing head is new)."""
    wanted = model.state_dict().keys()
    if "value_head.weight" in wanted and "value_head.weight" not in state:
        state["value_head.weight"] = torch.zeros(1, model.config.hidden_size)
        state["value_head.bias"] = torch.zeros(1)
    missing = [k for k in wanted if k not in state]
    if missing:
        raise DataError(f"{folder}: checkpoint does not match its config: missing {missing[:5]}")
    return {k: state[k] for k in wanted}

def save_model(model, tokenizer, out_dir, max_shard_bytes=4 << 30):
    """An HF checkpoint that transformers and vLLM load (+ value_head.safetensors) in out_dir, beside its metrics;
    staged, then moved in weights first, config.json last. Under torchrun every rank calls it."""
    from safetensors.torch import save_file
    state, out_dir = full_state_dict(model), Path(out_dir)
    if is_rank0():
        head = {k.split(".", 1)[1]: state.pop(k) for k in list(state) if k.startswith("value_head.")}
        shards = [{}]  # shards of at most max_shard_bytes, as transformers writes them
        for k, v in state.items():
            if shards[-1] and sum(x.nbytes for x in shards[-1].values()) + v.nbytes > max_shard_bytes:
                shards.append({})
            shards[-1][k] = v
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        with atomic_dir(out_dir / ".staging_model") as tmp:
            for name, shard in zip(names, shards):
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
            if len(shards) > 1:
                index = {"metadata": {"total_size": sum(v.nbytes for v in state.values())},
                         "weight_map": {k: n for n, sh in zip(names, shards) for k in sh}}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            if head:
                save_file(head, str(tmp / "value_head.safetensors"))
            hf = {**model.config.hf, "torch_dtype": str(next(iter(state.values())).dtype)[6:]}
            hf.pop("quantization_config", None)
            (tmp / "config.json").write_text(json.dumps(hf, indent=2))
            tokenizer.save_pretrained(tmp)
        for old in list(out_dir.glob("*.safetensors")) + list(out_dir.glob("*.safetensors.index.json")):
            old.unlink()  # a previous save may have had a different sharding
        staging = out_dir / ".staging_model"
        for f in sorted(staging.iterdir(), key=lambda f: (f.name == "config.json", f.suffix != ".safetensors")):
            os.replace(f, out_dir / f.name)
        staging.rmdir()
    barrier()


# =============================================================================================
# 2. Attention
# =============================================================================================
# flash-attn for bf16/fp16 CUDA tensors when installed (PERSONARL_ATTN=sdpa forces SDPA), PyTorch SDPA otherwise.

try:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    HAVE_FLASH_ATTN = True
except ImportError:
    HAVE_FLASH_ATTN = False

def use_flash(t: torch.Tensor) -> bool:
    return HAVE_FLASH_ATTN and t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) \
        and os.environ.get("PERSONARL_ATTN", "") != "sdpa"

def attention(q, k, v, cu_seqlens=None, parents=None):
    """Causal self-attention, q [B, T, H, D], k/v [B, T, KV, D] -> [B, T, H, D]; with cu_seqlens (B == 1), within
    each document. parents[j] = i >= 0: segment j continues the shared prefix i (section 3) and attends to all
    of it, then causally to itself, exactly as the document [i, j] alone."""
    B, T = q.shape[:2]
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else None
    if use_flash(q):
        if cu_seqlens is None:
            cu_seqlens = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
        qf, kf, vf, cu_k = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens
        if parents is not None:  # a continuation's keys: its prefix's, then its own
            spans = [[(bounds[p], bounds[p + 1])] * (p >= 0) + [(bounds[j], bounds[j + 1])]
                     for j, p in enumerate(parents)]
            idx = torch.cat([torch.arange(a, b) for sp in spans for a, b in sp]).to(q.device)
            kf, vf = kf[idx], vf[idx]
            cu_k = torch.tensor([0] + list(np.cumsum([sum(b - a for a, b in sp) for sp in spans])), dtype=torch.int32,
                                device=q.device)
        max_q = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        max_k = int((cu_k[1:] - cu_k[:-1]).max())
        # flash-attn aligns the causal mask bottom-right when a query segment is shorter than its keys
        out = flash_attn_varlen_func(qf, kf, vf, cu_seqlens, cu_k, max_q, max_k, causal=True)
        return out.view(B, T, *out.shape[1:])
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
    if cu_seqlens is None:
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True).transpose(1, 2)
    # SDPA has no varlen kernel: one call per document, all from one split (whose backward is one cat;
    # slicing each out adds a whole-row zero tensor per document); a continuation under a bottom-right mask
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
# 3. Packing
# =============================================================================================
# Ragged sequences go into one row [1, T] with cu_seqlens. Sequences that start alike (a PPO prompt's samples,
# the answers a GRM judges for one question, both orders of a PersonaFeedback pair) store their common prefix
# once, as a segment that each rest continues (`parents`): exactly the same logits, losses and gradients.

Packed = namedtuple("Packed", "input_ids cu_seqlens parents where")  # where[i]: packed positions of seqs[i]

def prefix_groups(seqs, min_shared=16):
    """[(shared_len, [indices])]: runs of seqs (in token order) sharing >= min_shared leading tokens, each member
    keeping >= 1 own token; a sequence joins the open group when that saves tokens. A lone one has shared_len 0."""
    groups, limit = [], 0  # limit: the open group's shortest member length - 1
    for i in sorted(range(len(seqs)), key=lambda i: seqs[i]):
        if groups:
            shared, members = groups[-1]
            first, n = seqs[members[0]], 0
            while n < min(len(first), len(seqs[i])) and first[n] == seqs[i][n]:
                n += 1
            new_limit = min(limit, len(seqs[i]) - 1)
            new_shared = min(n, new_limit, shared if len(members) > 1 else n)
            if new_shared >= min_shared and new_shared * len(members) > shared * (len(members) - 1):
                groups[-1], limit = (new_shared, members + [i]), new_limit
                continue
        groups.append((0, [i]))
        limit = len(seqs[i]) - 1
    return [(shared if len(members) > 1 else 0, members) for shared, members in groups]

def packed_size(seqs, share_prefix=False):
    """Tokens of the packed row (what a micro-batch's token budget counts)."""
    if not share_prefix:
        return sum(len(s) for s in seqs)
    return sum(len(s) for s in seqs) - sum(shared * (len(m) - 1) for shared, m in prefix_groups(seqs))

def pack(seqs, device="cpu", share_prefix=False):
    """Token-id lists -> Packed(input_ids [1, T], cu_seqlens, parents or None, where): where[i] holds the packed
    positions of seqs[i]'s tokens, so h[0, where[i]] are its hidden states, whatever was shared."""
    groups = prefix_groups(seqs) if share_prefix and len(seqs) > 1 else [(0, [i]) for i in range(len(seqs))]
    ids, cu, parents, where = [], [0], [], [None] * len(seqs)

    def segment(tokens, parent):
        ids.extend(tokens)
        cu.append(len(ids))
        parents.append(parent)
        return list(range(len(ids) - len(tokens), len(ids)))

    for shared, members in groups:
        root, prefix = -1, []
        if shared:
            root, prefix = len(parents), segment(seqs[members[0]][:shared], -1)
        for i in members:
            where[i] = torch.tensor(prefix + segment(seqs[i][shared:], root), dtype=torch.long, device=device)
    return Packed(torch.tensor([ids], dtype=torch.long, device=device),
                  torch.tensor(cu, dtype=torch.int32, device=device),
                  parents if any(p >= 0 for p in parents) else None, where)

def predictions(packed, seqs, targets):
    """(positions, tokens): for each j in targets[i] (j >= 1), the packed position whose logits predict seqs[i][j]."""
    pos = [packed.where[i][torch.tensor(list(js), dtype=torch.long) - 1] for i, js in enumerate(targets)]
    tok = torch.tensor([seqs[i][j] for i, js in enumerate(targets) for j in js], dtype=torch.long)
    return torch.cat(pos) if pos else tok, tok.to(packed.input_ids.device)

def response_logprobs(model, seqs, starts, temperature=1.0, with_entropy=False, share_prefix=True, entropy_grad=False):
    """Log-probs of seqs[i][starts[i]:] given their prefix, logits divided by the sampling temperature (SPEC 1.3),
    and their entropies if asked: one packed forward, shared prompts once, the autograd graph kept."""
    packed = pack(seqs, next(model.parameters()).device, share_prefix)
    pos, tok = predictions(packed, seqs, [range(s, len(q)) for q, s in zip(seqs, starts)])
    logp_all = torch.log_softmax(model(packed.input_ids, packed.cu_seqlens, packed.parents, select=pos)
                                 / temperature, -1)
    sizes = [len(q) - s for q, s in zip(seqs, starts)]
    logp = list(logp_all.gather(-1, tok[:, None])[:, 0].split(sizes))
    if not with_entropy:
        return logp, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):  # its graph is a [tokens, vocab] tensor
        return logp, list((-(logp_all.exp() * logp_all).sum(-1)).split(sizes))

def last_token_values(model, seqs):
    """A value model's output at each sequence's last token [n] (a scalar reward), one packed forward."""
    packed = pack(seqs, next(model.parameters()).device, share_prefix=True)
    return model.values(packed.input_ids, packed.cu_seqlens, packed.parents,
                        select=torch.stack([w[-1] for w in packed.where]))

def micro_batches(seqs, token_budget, share_prefix=False):
    """Index lists, in order, each packing to <= token_budget tokens (a longer sequence alone)."""
    out, current = [], []
    for i, s in enumerate(seqs):
        if current and packed_size([seqs[j] for j in current + [i]], share_prefix) > token_budget:
            out.append(current)
            current = []
        current.append(i)
    return out + ([current] if current else [])


# =============================================================================================
# 4. Generation engine
# =============================================================================================

class KVCache:
    """Static, pre-allocated cache [layers, B, max_len, KV, D] with a length per row."""

    def __init__(self, cfg: ModelConfig, batch, max_len, device, dtype):
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        self.k, self.v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        self.lengths, self.rows = torch.zeros(batch, device=device).int(), torch.arange(batch, device=device)
        self.max_length, self.plan = 0, None  # host copy of lengths.max(); this step's (write slots, mask)
        self.static = False  # CUDA graph: no host-side lengths; every step attends over max_len

    def start_prefill(self, packed: Packed):
        """The prompts arrive packed (section 3): prompt i's token j sits at packed.where[i][j]."""
        lens = torch.tensor([len(w) for w in packed.where], device=self.lengths.device)
        self.index = (torch.cat(list(packed.where)), torch.repeat_interleave(self.rows, lens),
                      torch.cat([torch.arange(int(n), device=lens.device) for n in lens]))
        self.lengths, self.max_length, self.plan = lens.to(torch.int32), int(lens.max()), None

    def write_prefill(self, layer, k, v):  # k, v [packed tokens, KV, D]
        src, rows, pos = self.index
        self.k[layer][rows, pos], self.v[layer][rows, pos] = k[src], v[src]

    def decode_attention(self, layer, q, k, v):
        """q [B, 1, H, D]; k/v [B, 1, KV, D] are the new token's, written at each row's length."""
        if use_flash(q):
            return flash_attn_with_kvcache(q, self.k[layer], self.v[layer], k, v,
                                           cache_seqlens=self.lengths, causal=True)
        if self.plan is None:
            lengths = self.lengths.long()
            span = self.k.shape[2] if self.static else self.max_length + 1
            visible = torch.arange(span, device=lengths.device)[None, :] <= lengths[:, None]
            mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
            self.plan = (self.rows * self.k.shape[2] + lengths, mask[:, None, None, :])
        slots, mask = self.plan
        self.k[layer].view(-1, *k.shape[2:]).index_copy_(0, slots, k[:, 0])
        self.v[layer].view(-1, *v.shape[2:]).index_copy_(0, slots, v[:, 0])
        span = mask.shape[-1]  # attend only over the filled prefix of the cache
        keys, vals = self.k[layer][:, :span].transpose(1, 2), self.v[layer][:, :span].transpose(1, 2)
        # GQA folded into the query axis [B, KV, H/KV, D]: each KV head's keys read once (enable_gqa expands them)
        B, _, H, D = q.shape
        out = F.scaled_dot_product_attention(q.reshape(B, k.shape[2], H // k.shape[2], D), keys, vals, attn_mask=mask)
        return out.reshape(B, 1, H, D)

class CudaGraphStep:
    """The decode step captured once per generate() call as one CUDA graph, replayed per token (gpt-fast's
    "reduce-overhead", by hand): eagerly a small model's step is hundreds of launches the GPU waits for. The cache
    runs `static` (fixed shapes, no host reads). capture=False: the same step, eagerly (the CPU tests)."""

    def __init__(self, model, cache, capture=True):
        self.model, self.cache, self.graph = model, cache, None
        self.tokens, cache.static = torch.zeros_like(cache.rows), True
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
            finally:  # the warm-up advanced the lengths (its writes are masked, then overwritten)
                cache.lengths.copy_(saved)

    def _step(self):
        cache, self.cache.plan = self.cache, None
        h = self.model.hidden_states(self.tokens[:, None], positions=cache.lengths.long()[:, None], cache=cache)
        cache.lengths += 1
        cache.plan = None
        return self.model.lm_head_logits(h[:, -1])

    def step(self, tokens):
        self.tokens.copy_(tokens)
        self.cache.max_length += 1
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits

    @classmethod
    def for_call(cls, model, cache, max_new_tokens, cuda_graph):
        """The step for one call, or None (op by op): on CUDA with enough steps to repay the capture; "eager": the
        static step without a graph (the CPU tests of its math)."""
        if cuda_graph == "eager" or (cuda_graph and model.output_weight().is_cuda and max_new_tokens >= 8):
            try:
                return cls(model, cache, capture=cuda_graph != "eager")
            except RuntimeError as e:  # an op that cannot be captured here: decode op by op, and say so
                cache.static, cache.plan = False, None
                print0(f"generate: CUDA-graph capture failed ({str(e).splitlines()[0][:200]})", file=sys.stderr)
        return None

Generation = namedtuple("Generation", "tokens logprobs stopped watched", defaults=(None,))

def sample_categorical(probs, generator):
    """Per row of unnormalised probs [B, V], the first index whose float64 running sum passes uniform x total."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True)[:, 0]

def sample_next(logits, temperature, top_p, generator):
    """Pick one token per row from fp32 logits [B, V]; return (tokens, log-probs under the distribution actually
    sampled from: temperature-scaled, top-p truncated, renormalised)."""
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    logits = logits / temperature
    if top_p < 1.0 and logits.shape[-1] > 256:
        # the nucleus is almost always within the top 256 tokens: exact whenever they hold top_p of the mass
        top, order = torch.topk(logits, 256, dim=-1)
        probs = torch.exp(top - torch.logsumexp(logits, -1, keepdim=True))
        if not bool((probs.sum(-1) < top_p).any()):
            kept = probs * ((torch.cumsum(probs, -1) - probs) < top_p)
            pick = sample_categorical(kept, generator)[:, None]
            return order.gather(-1, pick)[:, 0], torch.log(kept.gather(-1, pick)[:, 0] / kept.sum(-1))
    if top_p < 1.0:
        sorted_probs, order = torch.sort(torch.softmax(logits, -1), descending=True, dim=-1)
        keep_sorted = (torch.cumsum(sorted_probs, -1) - sorted_probs) < top_p  # the first always stays
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, keep_sorted)
        logits = logits.masked_fill(~keep, float("-inf"))
    logp = torch.log_softmax(logits, -1)
    tok = sample_categorical(logp.exp(), generator)
    return tok, logp.gather(-1, tok[:, None])[:, 0]

@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=None,
             seed=None, progress=False, watch_ids=None, cuda_graph=True):
    """Batched generation with a static KV cache: a packed prefill (shared prefixes once), then one token per row
    per step at its own position; a row stops at its first stop id (kept). Returns Generation(tokens, logprobs,
    stopped, watched): watched[i], the probabilities of watch_ids at each step of row i (the GRM's score digits)."""
    if not prompts:
        return Generation([], [], [], None if watch_ids is None else [])
    if min(map(len, prompts)) == 0:
        raise ValueError("generate: empty prompt")
    device, dtype, B = model.output_weight().device, model.output_weight().dtype, len(prompts)
    cache = KVCache(model.config, B, max(map(len, prompts)) + max_new_tokens, device, dtype)
    generator = torch.Generator(device=device).manual_seed(seed if seed is not None else random.randrange(1 << 62))
    stop = torch.tensor(sorted(set(stop_ids or [])), device=device, dtype=torch.long)
    packed = pack(prompts, device, share_prefix=True)
    cache.start_prefill(packed)
    h = model.hidden_states(packed.input_ids, packed.cu_seqlens, packed.parents, cache=cache)
    logits = model.lm_head_logits(h[0, torch.stack([w[-1] for w in packed.where])])
    graph_step = CudaGraphStep.for_call(model, cache, max_new_tokens, cuda_graph)
    out_tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    out_logprobs = torch.zeros(B, max_new_tokens, device=device)
    watch = torch.tensor(list(watch_ids or []), dtype=torch.long, device=device)
    out_watched = torch.zeros(B, max_new_tokens, len(watch), device=device)
    n_new, done = torch.zeros(B, dtype=torch.long, device=device), torch.zeros(B, dtype=torch.bool, device=device)
    for step in tqdm(range(max_new_tokens), disable=not progress, desc="generate", leave=False):
        tok, logp = sample_next(logits, temperature, top_p, generator)
        out_tokens[:, step], out_logprobs[:, step] = tok, logp
        if watch_ids is not None:
            out_watched[:, step] = torch.softmax(logits, -1)[:, watch]
        n_new += (~done).long()
        done |= torch.isin(tok, stop)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if graph_step is not None:
            logits = graph_step.step(tok)
        else:
            h = model.hidden_states(tok[:, None], positions=cache.lengths.long()[:, None], cache=cache)
            cache.lengths, cache.max_length, cache.plan = cache.lengths + 1, cache.max_length + 1, None
            logits = model.lm_head_logits(h[:, -1])
    n, toks, lps = n_new.tolist(), out_tokens.tolist(), out_logprobs.tolist()
    watched = None if watch_ids is None else [out_watched[i, :n[i]].cpu() for i in range(B)]
    return Generation([t[:k] for t, k in zip(toks, n)], [lp[:k] for lp, k in zip(lps, n)], done.tolist(), watched)


# =============================================================================================
# 5. Chat formatting and the GRM output format (SPEC 1.1)
# =============================================================================================

def render_persona(persona) -> str:
    """The one way every stage shows a persona: compact JSON of the PersonaFeedback schema (SPEC 3)."""
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
    """Token ids of the conversation in the checkpoint's chat template, ending in the assistant's turn header."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]

def conversation_ids_and_mask(tokenizer, messages):
    """(ids, mask) of a conversation; mask is 1 on assistant turns (text and end-of-turn token), else 0."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []  # character spans of assistant turns in `text`
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            upto = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False).rstrip()
            if not text.startswith(upto):
                raise ValueError("the chat template does not render conversations prefix-by-prefix")
            start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
            spans.append((start, len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= a and b <= e and b > a for s, e in spans)) for a, b in enc["offset_mapping"]]
    return enc["input_ids"], mask

def stop_token_ids(tokenizer):
    """End-of-turn ids: the tokenizer's EOS plus the chat template's end markers when present."""
    ids = {tokenizer.eos_token_id}
    for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>"):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.add(i)
    return sorted(i for i in ids if i is not None)

def response_ids(tokenizer, persona, question, response):
    """(persona prompt, response) up to its end-of-turn token: what a scalar (Bradley-Terry) RM scores."""
    ids, mask = conversation_ids_and_mask(
        tokenizer, persona_messages(persona, question) + [{"role": "assistant", "content": response}])
    return ids[:max(i for i, m in enumerate(mask) if m) + 1]

GRM_WEIGHTS = {"Helpfulness": 0.35, "Personalization": 0.40, "Natural": 0.25}

# The GRM's system turn: SPEC 1.1's rubric in our own words, and the output format it must write
GRM_RUBRIC = (Path(__file__).resolve().parent / "data" / "grm_rubric.txt").read_text().strip()

def grm_messages(persona, question, response, single_turn=False):
    """The GRM's prompt: the rubric as system turn, then profile, question and answer (single_turn: all in one
    user turn, the layout of the release's judge template)."""
    user = (f"User profile:\n{render_persona(persona)}\n\nQuestion: {question}\n\n"
            f"Answer to judge:\n{response}")
    if single_turn:
        return [{"role": "user", "content": f"{GRM_RUBRIC}\n\n{user}"}]
    return [{"role": "system", "content": GRM_RUBRIC}, {"role": "user", "content": user}]

def format_grm_output(critique, scores):
    lines = "\n".join(f"{k}: {int(scores.get(k, 0))}" for k in GRM_WEIGHTS)
    return f"<critique>\n{critique.strip()}\n</critique>\n<scores>\n{lines}\n</scores>"

_FULLWIDTH = str.maketrans("０１２３４５６７８９＋－：　", "0123456789+-: ")
_SCORE_RE = re.compile(r"(helpfulness|personalization|personalisation|natural(?:ness)?)\**\s*[:：=]?\s*"
                       r"\**\s*([+\-−–]?\s*\d+(?:\.\d+)?)", re.IGNORECASE)

def parse_grm_scores(text):
    """{dimension: int in [-5, 5]} read ONLY inside <scores> (a reply cut inside its critique has no reward), or None:
    a parse failure, counted by the caller. Tolerates full-width digits, '+3', '3/5', decimals; a missing one is 0."""
    if not isinstance(text, str):
        return None
    block = re.search(r"<scores>(.*?)(?:</scores>|$)", text.translate(_FULLWIDTH), re.DOTALL | re.IGNORECASE)
    found = {}
    for name, value in _SCORE_RE.findall(block.group(1) if block else ""):
        key = {"h": "Helpfulness", "p": "Personalization", "n": "Natural"}[name[0].lower()]
        v = float(value.replace(" ", "").replace("−", "-").replace("–", "-"))
        found[key] = int(max(-5, min(5, round(v))))  # the last mention of a dimension wins
    return {k: found.get(k, 0) for k in GRM_WEIGHTS} if found else None

def parse_grm_critique(text):
    """The critique of a GRM reply (inside <critique>, or before <scores>); "" when there is none."""
    if not isinstance(text, str):
        return ""
    m = re.search(r"<critique>(.*?)(?:</critique>|<scores>|$)", text, re.DOTALL | re.IGNORECASE)
    return (m.group(1) if m else re.split(r"<scores>", text, flags=re.IGNORECASE)[0]).strip()

def grm_reward(scores):
    """R = 0.35 H + 0.40 P + 0.25 N in [-5, 5] (SPEC 1.1). A parse failure (None) has no reward: callers count it and
    keep it out of training and accuracy."""
    if scores is None:
        raise ValueError("grm_reward: no scores (a parse failure is counted, never a reward)")
    return sum(w * scores.get(k, 0) for k, w in GRM_WEIGHTS.items())

@functools.lru_cache(maxsize=4)
def _grm_value_tokens(tokenizer):
    """Token ids that can start a score value: {id: "+" (a bare space), "-" or the digit's int}."""
    kinds = {}
    for i in range(len(tokenizer)):
        s = tokenizer.decode([i])
        if 0 < len(s) <= 2 and (s.isspace() or s.strip() == "-" or s.strip() in tuple("0123456789")):
            kinds[i] = "+" if s.isspace() else "-" if s.strip() == "-" else int(s.strip())
    return kinds


def grm_watch_ids(tokenizer):
    """The token ids grm_expected_scores reads: pass them to generate's watch_ids."""
    return sorted(_grm_value_tokens(tokenizer))


def grm_expected_scores(tokenizer, reply_ids, watched):
    """Probability-weighted GRM scores (the G-Eval idea): each dimension's expected value under the GRM's own
    distribution where it wrote it (watched: generate's probabilities of grm_watch_ids), so two "1"s differ by how
    sure it was; the sign not taken counts at its value nearest zero. None on a parse failure."""
    text, parsed = tokenizer.decode(reply_ids), parse_grm_scores(tokenizer.decode(reply_ids))
    block = list(re.finditer(r"<scores>", text, re.IGNORECASE))
    if parsed is None or not block:
        return None
    kinds, watch = _grm_value_tokens(tokenizer), grm_watch_ids(tokenizer)
    if tuple(watched.shape) != (len(reply_ids), len(watch)):
        raise ValueError(f"grm_expected_scores: watched {tuple(watched.shape)} for {len(reply_ids)} tokens")
    cols = {k: [c for c, t in enumerate(watch) if kinds[t] == k] for k in ("+", "-")}
    digit_cols = [c for c, t in enumerate(watch) if isinstance(kinds[t], int)]
    digits = torch.tensor([min(kinds[watch[c]], 5) for c in digit_cols], dtype=torch.float32)
    ends = [len(tokenizer.decode(reply_ids[:i])) for i in range(len(reply_ids) + 1)]  # char end of token i-1
    probs, out = watched.float(), {}
    for name in GRM_WEIGHTS:
        m = re.search(name + r"\**\s*[:：=]", text[block[-1].end():], re.IGNORECASE)
        j = next((i for i in range(len(reply_ids)) if ends[i] >= block[-1].end() + m.end() and reply_ids[i] in kinds),
                 None) if m else None  # the first sign/digit token after "Name:"
        if j is not None and kinds[reply_ids[j]] == "+" and kinds.get((reply_ids + [None])[j + 1]) == "-":
            j += 1  # " ", "-", "2": the sign decides
        if j is None:  # no score token to weigh: keep the parsed value
            out[name] = float(parsed[name])
            continue
        p, taken = probs[j], kinds[reply_ids[j]]
        e_taken = None  # the expected digit after the sign or space the reply wrote
        if isinstance(taken, str) and j + 1 < len(reply_ids):
            nxt = probs[j + 1][digit_cols]
            e_taken = float((nxt * digits).sum() / nxt.sum().clamp_min(1e-12))
        e_plus = e_taken if taken == "+" and e_taken is not None else 0.0
        e_minus = -e_taken if taken == "-" and e_taken is not None else -1.0
        p_plus, p_minus, p_digit = float(p[cols["+"]].sum()), float(p[cols["-"]].sum()), p[digit_cols]
        value = (p_plus * e_plus + p_minus * e_minus + float((p_digit * digits).sum())) \
            / max(p_plus + p_minus + float(p_digit.sum()), 1e-12)
        out[name] = max(-5.0, min(5.0, value))
    return out


# =============================================================================================
# 6. torchrun / FSDP2
# =============================================================================================
# One code path for `python stage.py` and `torchrun stage.py`. Precision: "bf16-mixed" computes in bf16 over
# fp32 master weights, gradient reduction and AdamW state (FSDP2's MixedPrecisionPolicy under torchrun, autocast
# in one process); "fp32" (the CPU default); "bf16" keeps bf16 weights: half the memory, but at lr 1e-6 an
# AdamW step is below half a bf16 step for most weights, which then never move.

DistEnv = namedtuple("DistEnv", "rank local_rank world_size device")
PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16")

def is_distributed():
    return dist.is_available() and dist.is_initialized()

def rank():
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", 0))

def is_rank0():
    return rank() == 0

def barrier():
    if is_distributed():
        dist.barrier()

def print0(*args, **kwargs):
    if is_rank0():
        print(*args, **kwargs, flush=True)

def dist_init(device=None):
    """torchrun's rank and world size, the device (cuda:LOCAL_RANK when available), the process group."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank) if device.index is None else device
        torch.cuda.set_device(device)  # nccl and FSDP2 both use the "current" device
    if world_size > 1 and not is_distributed():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                **({"device_id": device} if device.type == "cuda" else {}))
    return DistEnv(rank, local_rank, world_size, device)

def dist_cleanup(release_timeout_s=30.0):
    """End the process group after a last all-reduce, once gloo's worker has let go of its tensor (else it can
    abort a finished process at interpreter shutdown)."""
    if is_distributed():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        done = torch.zeros(1, device=device)
        held_by_us = done._use_count()
        dist.all_reduce(done)
        deadline = time.monotonic() + release_timeout_s
        while done._use_count() > held_by_us and time.monotonic() < deadline:
            time.sleep(0.001)
        dist.destroy_process_group()

def all_reduce_sum(tensor):
    """Sum `tensor` over ranks in place (and return it); unchanged in a single process."""
    if is_distributed():
        on_device = tensor.cuda() if dist.get_backend() == "nccl" and not tensor.is_cuda else tensor
        dist.all_reduce(on_device), tensor.copy_(on_device)
    return tensor

def resolve_precision(precision, device):  # "auto": bf16-mixed on CUDA, fp32 on CPU
    return ("bf16-mixed" if torch.device(device).type == "cuda" else "fp32") if precision == "auto" else precision

def autocast(device, precision):  # the training forwards run under it; a no-op but for "bf16-mixed"
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

def is_fsdp(model):
    return any(isinstance(m, FSDPModule) for m in model.modules())

def load_trainable(name, env, precision="fp32", value_head=False, checkpointing=False, freeze_layers=0):
    """(model, tokenizer) to train (fp32 weights unless "bf16"; the embeddings and bottom freeze_layers blocks fixed).
    Under torchrun FSDP2 per block, then the root: built on the meta device, sharded, then filled shard by shard
    from rank 0's CPU copy of the checkpoint, so no GPU ever holds a full copy."""
    folder = resolve_checkpoint(name)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if env.world_size == 1:
        model, tok = load_model(folder, env.device, dtype, value_head)
    else:
        cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
        with torch.device("meta"):
            model = Transformer(cfg, value_head=value_head).to(dtype)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if precision == "bf16-mixed" else MixedPrecisionPolicy()
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)  # backward needs the root first
        register_fsdp_forward_method(model, "values")  # critics and reward models enter through .values()
        model.to_empty(device=env.device)
        model.inv_freq = rope_inv_freq(cfg).to(env.device)  # a buffer: to_empty left it uninitialised
        state = {k: v.to(dtype) for k, v in fit_state(model, read_hf_state(folder, value_head), folder).items()} \
            if env.rank == 0 else {}
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        tok = load_tokenizer(folder)
    for block in model.layers:
        block.checkpointing = checkpointing
    for module in [model.model.embed_tokens, *model.layers[:freeze_layers]] if freeze_layers else []:
        module.requires_grad_(False)  # the embedding is the tied output layer too
    return model.train(), tok

def full_state_dict(model):
    """Full state dict on CPU; under FSDP2 collective, and only rank 0 receives the tensors."""
    if is_fsdp(model):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

@contextlib.contextmanager
def unsharded(model):
    """Every rank's FSDP2 model holds its full (compute-dtype) parameters in this block: ranks generate apart."""
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp_modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in fsdp_modules:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # load_trainable's layout

def adamw(model, lr, weight_decay, betas=(0.9, 0.999)):
    """AdamW, weight decay on matrices only; fused (one kernel) unless FSDP2 shards the parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=None if is_fsdp(model) else True)

def cosine_lr(step, total_steps, warmup_steps, base_lr, min_ratio=0.0):
    """Linear warmup (step 0 gets base_lr / warmup_steps), then cosine decay to base_lr * min_ratio."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# =============================================================================================
# 7. Files: JSONL, metrics, checkpoints, output folders
# =============================================================================================

class DataError(ValueError):
    """Bad input (data, flags, paths); the message names the file, line and field (main_guard)."""

def read_jsonl(path, skip_bad=False):
    """(rows [(lineno, dict)], skipped): a line that is not a UTF-8 JSON object is a DataError naming file and line,
    or with skip_bad a "path:line: reason" in skipped (callers count and report them)."""
    rows, skipped = [], []
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:  # bytes, so a bad encoding is reported with its line number
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8-sig"))  # -sig: tolerate a BOM
                err = None if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"
            except UnicodeDecodeError as e:
                err = f"not valid UTF-8 ({e.reason} at byte {e.start})"
            except json.JSONDecodeError as e:
                err = f"malformed JSON ({e.msg} at column {e.colno})"
            if err is None:
                rows.append((lineno, row))
            elif skip_bad:
                skipped.append(f"{path}:{lineno}: {err}")
            else:
                raise DataError(f"{path}:{lineno}: {err}")
    return rows, skipped

def require_field(row, name, path, lineno, kind=str):
    """row[name], checked: present, of type `kind` (int rejects booleans, float accepts ints), not an empty string."""
    if name not in row:
        raise DataError(f"{path}:{lineno}: field '{name}' is missing (keys: {sorted(row)})")
    value, kinds = row[name], kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds) \
        or (float in kinds and type(value) is int)
    if not ok:
        raise DataError(f"{path}:{lineno}: field '{name}' should be {' or '.join(k.__name__ for k in kinds)}, "
                        f"got {type(value).__name__} ({json.dumps(value, ensure_ascii=False)[:80]})")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{path}:{lineno}: field '{name}' is an empty string")
    return value

def json_clean(x):
    """Plain JSON values: tensors and numpy scalars as numbers, NaN and infinities as null."""
    if isinstance(x, (torch.Tensor, np.ndarray, np.generic)):
        x = x.tolist()
    if isinstance(x, (dict, list, tuple)):
        return {str(k): json_clean(v) for k, v in x.items()} if isinstance(x, dict) else [json_clean(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else str(x) if isinstance(x, Path) else x

def json_line(row):
    return json.dumps(json_clean(row), ensure_ascii=False, allow_nan=False) + "\n"

def write_jsonl(path, rows):
    """Write rows as JSONL atomically (a temp file beside it, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text("".join(json_line(r) for r in rows), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

def append_jsonl(path, row):
    """Append one row and fsync, so a crash loses at most the row being written."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json_line(row))
        f.flush(), os.fsync(f.fileno())

def drop_torn_tail(path):
    """Remove a last line cut by a kill (no newline), so appending after it stays valid JSONL."""
    data = Path(path).read_bytes() if Path(path).exists() else b""
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)

class MetricsLogger:
    """One JSON line per .log(dict) in `path` (rank 0). A new run starts anew; a resumed one (keep_until_step=N)
    keeps the rows of steps <= N, so each step is logged once."""

    def __init__(self, path, keep_until_step=None):
        self.path = Path(path)
        if is_rank0():
            drop_torn_tail(self.path)
            rows = read_jsonl(self.path, skip_bad=True)[0] if keep_until_step is not None and self.path.exists() else []
            write_jsonl(self.path, [r for _, r in rows if (r.get("step") or 0) <= keep_until_step])

    def log(self, metrics):
        if is_rank0():
            append_jsonl(self.path, {"time": round(time.time(), 3), **metrics})

@contextlib.contextmanager
def atomic_dir(final_dir):
    """Yield a temp folder beside final_dir ('.'-named); it becomes final_dir on success."""
    final, tag = Path(final_dir), uuid.uuid4().hex[:8]
    tmp, old = final.with_name(f".{final.name}.tmp-{tag}"), final.with_name(f".{final.name}.old-{tag}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException as e:
        free = shutil.disk_usage(tmp).free
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)) and free < (256 << 20):  # safetensors/torch errors hide it
            raise OSError(f"writing {final} failed: its disk is full ({free >> 20} MiB free; "
                          f"{str(e).splitlines()[0][:160]}); the previous {final.name}, if any, is intact") from e
        raise
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)

def prepare_out(out_dir, resume=False, overwrite=False):
    """Before training: a finished run (DONE) is kept unless --overwrite; a killed run's temp folders go."""
    out = Path(out_dir)
    if (out / "DONE").exists() and not (resume or overwrite):
        raise DataError(f"{out}: holds a finished run (DONE); pass --overwrite to replace it or pick another --out")
    if is_rank0() and out.is_dir():
        stale = list(out.glob(".*.tmp-*")) + (checkpoints(out) + [out / "DONE"] if overwrite and not resume else [])
        for p in stale:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

def save_training_state(ckpt_dir, model, optimizer, step, extra=None):
    """A resume checkpoint (collective): model and optimizer by torch.distributed.checkpoint, each rank writing
    its own shards, plus step, extra and each rank's RNG state; renamed into place once complete."""
    final = Path(ckpt_dir)
    tmp = final.with_name(f".{final.name}.tmp-{step}")
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_initialized() else {})}
    torch.save({"step": step, "extra": extra or {}, "rng": rng}, tmp / f"meta_rank{rank()}.pt")
    barrier()
    if is_rank0():
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    barrier()

def load_training_state(ckpt_dir, model, optimizer):
    """Restore a save_training_state folder (model and optimizer built as saved) -> (step, extra)."""
    ckpt = Path(ckpt_dir)
    if not (ckpt / ".metadata").exists():
        raise FileNotFoundError(f"{ckpt}: not a training checkpoint (no .metadata)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(ckpt))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    meta_file = ckpt / f"meta_rank{rank()}.pt"
    meta = torch.load(meta_file if meta_file.exists() else ckpt / "meta_rank0.pt", weights_only=False)
    if meta_file.exists():
        rng = meta["rng"]
        random.setstate(rng["python"]), np.random.set_state(rng["numpy"]), torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return meta["step"], meta["extra"]

def checkpoints(out_dir):  # the ckpt_<step> folders, oldest first
    found = [p for p in Path(out_dir).glob("ckpt_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))

def latest_checkpoint(out_dir):
    return (checkpoints(out_dir) or [None])[-1]

def prune_checkpoints(out_dir, keep):
    for p in checkpoints(out_dir)[:-keep] if is_rank0() and keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)

def check_resume(ckpt, saved, current):
    """A resumed run continues the same run: refuse settings that differ from the checkpoint's."""
    diff = [f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)]
    if diff:
        raise DataError(f"--resume: {ckpt} was made with other settings ({'; '.join(diff)}): same flags or a new --out")

def main_guard(main):
    """Run a stage's main(): bad input, a missing file or a refused endpoint is one line and exit code 2."""
    try:
        return main()
    except (DataError, FileNotFoundError, EndpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# =============================================================================================
# 8. The OpenAI-compatible client (judges, teachers, a GRM served by vLLM)
# =============================================================================================

class EndpointError(RuntimeError):
    """A request that failed for good: names the URL, the attempts and the server's own message."""

def endpoint_request(base_url, route, body, timeout=60.0, retries=3, backoff=1.0, api_key_env="OPENAI_API_KEY"):
    """POST {base_url}{route} -> the JSON reply. Retried with backoff * 2^k s (or Retry-After): timeouts, connection
    errors, HTTP 429/5xx, a body without JSON or choices; HTTP 400/401 raise at once with the server's message.
    The API key (from $api_key_env) goes with every request, never into a message."""
    url = base_url.rstrip("/") + route
    headers = {"Content-Type": "application/json"}
    if api_key_env and os.environ.get(api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
    data, error, wait = json.dumps(body).encode("utf-8"), None, 0.0
    for attempt in range(retries + 1):
        time.sleep(wait)
        wait = backoff * 2 ** attempt
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data, headers, method="POST"),
                                        timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            error = f"HTTP {e.code}: {e.read().decode('utf-8', errors='replace')[:2000]}"
            if e.code != 429 and e.code < 500:
                raise EndpointError(f"POST {url}: {error} (not retried)") from None
            after = (e.headers or {}).get("Retry-After", "")
            wait = max(wait, min(float(after), 60.0)) if after.strip().isdigit() else wait
            continue
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"  # refused, reset, timed out
            continue
        try:
            result = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            error = f"malformed JSON ({e}): {raw[:200]!r}"
            continue
        if isinstance(result, dict) and result.get("choices"):
            return result
        error = f"reply without choices: {str(result)[:300]}"
    raise EndpointError(f"POST {url} failed after {retries + 1} attempts; last error: {error}")

def chat_completion(base_url, model, messages, temperature=0.0, max_tokens=512, top_p=1.0, timeout=60.0,
                    retries=3, backoff=1.0, api_key_env="OPENAI_API_KEY", **extra):
    """One chat completion. Sampling parameters are always sent: vLLM fills what a request leaves out from the model's
    generation_config.json, silently changing "greedy" judging. `extra`: more body."""
    body = {"model": model, "messages": messages, "temperature": temperature, "top_p": top_p,
            "max_tokens": max_tokens, **extra}
    return endpoint_request(base_url, "/chat/completions", body, timeout, retries, backoff, api_key_env)

def map_concurrent(fn, items, max_workers=8, desc=None):
    """[fn(x) for x in items] on a thread pool (endpoint calls), in order; an error cancels the rest and is raised."""
    pool, items = ThreadPoolExecutor(max_workers=max_workers), list(items)
    try:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, disable=not is_rank0()))
    finally:
        pool.shutdown(cancel_futures=True)
