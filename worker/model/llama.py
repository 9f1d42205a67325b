"""Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2) over a preallocated, slotted KV cache.

One `forward_step` serves a whole continuous batch: each row has its own cache slot, its own
context length and its own number of new tokens (1 for decode, k + 1 for verification, the prompt
for prefill), attending causally. Parameter names follow Hugging Face's, except
that q/k/v and gate/up projections are fused into one matrix each (`fuse_hf_checkpoint`): one
larger matmul instead of three (two) is ~20-30% faster on CPU at batch 16+ tokens.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import ModelConfig
from .rope import apply_rope, rope_tables

HALF_DTYPES = (torch.bfloat16, torch.float16)

# Attention kernels the step may use. Not cuDNN's: it builds an execution plan per new input shape,
# and a serving step's shapes change every step (context length, batch, k), so on an H200 each bf16
# decode step paid ~40 ms of planning for ~1 ms of attention (measured: 47 ms vs 4.9 ms per step).
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class LogitsRows(str, enum.Enum):
    """Which next-token logits `forward_step` returns (the plain strings work too: "last", "packed")."""

    ALL = "all"        # [B, S, V], zeros at padding (also what None asks for)
    LAST = "last"      # [B, 1, V]: each row's last real token
    PACKED = "packed"  # [N, V]: every real token, row after row


class KVCache:
    """Storage for every slot's keys and values; the caller owns each slot's length.

    k, v: [layers, slots, kv_heads, max_tokens, head_dim]. Position p of a slot holds the K/V of
    that sequence's p-th token (RoPE already applied to K). Entries past a slot's length are stale
    and never attended, so rolling back is just passing a smaller start position next time.
    """

    def __init__(self, config: ModelConfig, num_slots: int, max_tokens: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        if num_slots < 1 or max_tokens < 1:
            raise ValueError(f"num_slots and max_tokens must be >= 1, got {num_slots}, {max_tokens}")
        shape = (config.num_hidden_layers, num_slots, config.num_key_value_heads, max_tokens, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_tokens(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in at least fp32 even for bf16/fp16 weights, as the reference implementation does.
        xf = x.float() if x.dtype in HALF_DTYPES else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


@dataclass
class ForwardLayout:
    """Index tensors shared by every layer of one forward_step (computed once per step).

    Token-wise work (projections, MLP, norms, lm_head) runs on the N real tokens packed as
    [N, H]; only attention uses the right-padded [B, S] layout. `packed_index` maps the two.
    """
    cos: torch.Tensor            # [N, 1, D] RoPE of each real token
    sin: torch.Tensor            # [N, 1, D]
    batch: int                   # B
    seq: int                     # S
    packed_index: torch.Tensor | None  # [N] row * S + column of each real token; None: no padding (N == B*S)
    write_slots: torch.Tensor    # [N] cache slot each real token goes to
    write_positions: torch.Tensor  # [N] cache position it goes to
    read_slots: slice | torch.Tensor  # slots to attend over: a slice when they are consecutive
    context_length: int          # L: cache positions attended over (max of start + query_length)
    mask: torch.Tensor | None    # [B, 1, S, L] bool, True = may attend; None: see is_causal
    is_causal: bool = False      # with mask None: plain causal (True) or everything visible (False)

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, S, ...] with zeros at padding positions."""
        tail = packed.shape[1:]
        if self.packed_index is None:
            return packed.view(self.batch, self.seq, *tail)
        padded = packed.new_zeros((self.batch * self.seq, *tail))                        # [B*S, ...]
        padded.index_copy_(0, self.packed_index, packed)
        return padded.view(self.batch, self.seq, *tail)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] -> [N, ...]: the real tokens only, row-major."""
        flat = padded.reshape(self.batch * self.seq, *padded.shape[2:])                  # [B*S, ...]
        return flat if self.packed_index is None else flat.index_select(0, self.packed_index)


def attention_mask(starts: torch.Tensor, lengths: torch.Tensor, seq: int, context_length: int) -> torch.Tensor:
    """Which cache positions each query may attend to: [B, 1, S, L] bool.

    starts, lengths: [B]. A real query sees the row's cached context [0, start) and the new tokens
    up to itself (causal); a padding query sees the row's real tokens (so its softmax is finite;
    its output is unused). Cache positions past start + length hold stale K/V and are never visible.
    """
    batch = starts.shape[0]
    columns = torch.arange(seq, device=starts.device)                                      # [S]
    sees_new = columns[None, None, :] <= columns[None, :, None]                            # [1, S, S] causal
    rel = torch.arange(context_length, device=starts.device)[None, :] - starts[:, None]   # [B, L] key - start
    in_context = (rel < 0)[:, None, :]                                                     # [B, 1, L]
    is_new = ((rel >= 0) & (rel < lengths[:, None]))[:, None, :]                           # [B, 1, L]
    rel_index = rel.clamp(0, seq - 1)[:, None, :].expand(batch, seq, context_length)       # [B, S, L]
    new_visible = sees_new.expand(batch, seq, seq).gather(2, rel_index)                    # [B, S, L]
    is_real = (torch.arange(seq, device=starts.device)[None, :] < lengths[:, None])[:, :, None]   # [B, S, 1]
    mask = torch.where(is_real, in_context | (is_new & new_visible), in_context | is_new)  # [B, S, L]
    return mask[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.split = (self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim)
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.split), bias=config.attention_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, layout: ForwardLayout) -> torch.Tensor:
        tokens = x.shape[0]                                                              # x: [N, H]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)                             # [N, (H|Hkv)*D]
        q = apply_rope(q.view(tokens, self.heads, self.head_dim), layout.cos, layout.sin)    # [N, H, D]
        k = apply_rope(k.view(tokens, self.kv_heads, self.head_dim), layout.cos, layout.sin)  # [N, Hkv, D]
        v = v.view(tokens, self.kv_heads, self.head_dim)                                 # [N, Hkv, D]

        # Only real tokens exist here, so padding never lands in a slot.
        layer_k, layer_v = cache.k[layer], cache.v[layer]                                # [slots, Hkv, T, D]
        layer_k[layout.write_slots, :, layout.write_positions] = k
        layer_v[layout.write_slots, :, layout.write_positions] = v

        length = layout.context_length
        if isinstance(layout.read_slots, slice):
            keys = layer_k[layout.read_slots, :, :length]                                  # [B, Hkv, L, D] view
            values = layer_v[layout.read_slots, :, :length]
        else:
            keys = layer_k[:, :, :length].index_select(0, layout.read_slots)               # [B, Hkv, L, D] copy
            values = layer_v[:, :, :length].index_select(0, layout.read_slots)
        queries = layout.pad(q).transpose(1, 2)                                            # [B, H, S, D]
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=layout.mask, is_causal=layout.is_causal,
                                             enable_gqa=self.heads != self.kv_heads)     # [B, H, S, D]
        out = layout.pack(out.transpose(1, 2))                                             # [N, H, D]
        return self.o_proj(out.reshape(tokens, self.heads * self.head_dim))              # [N, H]


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)                                  # [N, I] each
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, layout: ForwardLayout) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), layer, cache, layout)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausal(nn.Module):
    """The decoder plus LM head; `forward_step` is the only entry point the serving path uses."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def allocate_cache(self, num_slots: int, max_tokens: int) -> KVCache:
        return KVCache(self.config, num_slots, max_tokens, self.device, self.dtype)

    def _rope_for(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        needed = max(length, self.config.max_position_embeddings)
        tables = self._rope
        if tables is None or tables[0].shape[0] < needed or tables[0].dtype != self.dtype \
                or tables[0].device != self.device:
            tables = self._rope = rope_tables(self.config.head_dim, self.config.rope_theta, self.config.rope_scaling,
                                               needed, self.device, self.dtype)
        return tables

    @torch.inference_mode()
    def forward_step(
        self,
        cache: KVCache,
        input_ids: torch.Tensor,        # [B, S] long, right-padded
        slots: torch.Tensor,            # [B] long
        start_positions: torch.Tensor,  # [B] long: tokens already in each slot
        query_lengths: torch.Tensor,    # [B] long: real tokens per row, 1..S
        logits_rows: LogitsRows | str | None = None,  # None / ALL -> [B, S, V]; LAST -> [B, 1, V]; PACKED -> [N, V]
    ) -> torch.Tensor:
        """Write the new tokens' K/V into their slots and return their next-token logits.

        Each row attends over its slot's positions [0, start) plus its own new tokens, causally.

        Everything but attention runs on the N = sum(query_lengths) real tokens only, so a row
        with a short query does not pay for the widest row in the projections, MLP and lm_head.
        "packed" returns the logits of those N tokens row after row (row i's at
        offsets sum(query_lengths[:i]) ...), without materialising the padded [B, S, V].
        """
        rows = _logits_rows(logits_rows)
        layout = self._lay_out(cache, input_ids, slots, start_positions, query_lengths)
        ids = layout.pack(input_ids.to(self.device))                                        # [N]
        hidden = self.model.embed_tokens(ids)                                             # [N, H]
        with sdpa_kernel(ATTENTION_BACKENDS):
            for index, layer in enumerate(self.model.layers):
                hidden = layer(hidden, index, cache, layout)
        if rows is LogitsRows.LAST:
            last = query_lengths.to(device=hidden.device, dtype=torch.long).cumsum(0) - 1  # [B] packed index
            hidden = hidden.index_select(0, last)                                          # [B, H]
        logits = self.lm_head(self.model.norm(hidden))                                     # [N|B, V]
        # At least fp32 logits whatever the weights' dtype, so drafts and targets compare like for like.
        logits = logits.float() if logits.dtype in HALF_DTYPES else logits
        if rows is LogitsRows.LAST:
            return logits.unsqueeze(1)                                                     # [B, 1, V]
        if rows is LogitsRows.PACKED:
            return logits                                                                  # [N, V]
        return layout.pad(logits)                                                            # [B, S, V], zeros at padding

    def _lay_out(self, cache: KVCache, input_ids: torch.Tensor, slots: torch.Tensor, start_positions: torch.Tensor,
              query_lengths: torch.Tensor) -> ForwardLayout:
        batch, seq = _check_shapes(input_ids, slots, start_positions, query_lengths)
        device = self.device
        slots = slots.to(device=device, dtype=torch.long)                                # [B]
        starts = start_positions.to(device=device, dtype=torch.long)                     # [B]
        lengths = query_lengths.to(device=device, dtype=torch.long)                      # [B]

        # One host sync for all the checks and the attended length.
        slot_list = slots.tolist()
        ends = (starts + lengths).tolist()
        min_len, max_len = int(lengths.min()), int(lengths.max())
        if min_len < 1 or max_len > seq:
            raise ValueError(f"query_lengths must be in 1..{seq}, got {lengths.tolist()}")
        if int(starts.min()) < 0 or max(ends) > cache.max_tokens:
            raise ValueError(f"start + query_length must fit the cache's {cache.max_tokens} tokens, got {ends}")
        if min(slot_list) < 0 or max(slot_list) >= cache.num_slots or len(set(slot_list)) != batch:
            raise ValueError(f"slots must be distinct and in 0..{cache.num_slots - 1}, got {slot_list}")
        context_length = max(ends)

        is_real = torch.arange(seq, device=device)[None, :] < lengths[:, None]          # [B, S]
        write_rows, write_cols = is_real.nonzero(as_tuple=True)                          # [N], [N] row-major
        positions = starts[write_rows] + write_cols                                      # [N] cache = RoPE position
        cos, sin = self._rope_for(cache.max_tokens)
        cos = cos[positions].unsqueeze(1)                                                # [N, 1, D]
        sin = sin[positions].unsqueeze(1)

        # Two common shapes need no mask, which lets SDPA take its faster unmasked kernels:
        # a plain prefill of whole rows (causal over L == S keys) and a decode step where every
        # row has the same length (each query sees all L keys).
        plain_prefill = max(ends) == min(ends) == seq and int(starts.max()) == 0
        even_decode = seq == 1 and max(ends) == min(ends)
        mask = None if plain_prefill or even_decode else attention_mask(starts, lengths, seq, context_length)

        first = slot_list[0]
        consecutive = slot_list == list(range(first, first + batch))
        return ForwardLayout(
            cos=cos, sin=sin, batch=batch, seq=seq,
            packed_index=None if min_len == seq else write_rows * seq + write_cols,
            write_slots=slots[write_rows], write_positions=positions,
            read_slots=slice(first, first + batch) if consecutive else slots,
            context_length=context_length,
            mask=mask,                                                                   # [B, 1, S, L]
            is_causal=plain_prefill,
        )


def _logits_rows(logits_rows: LogitsRows | str | None) -> LogitsRows:
    if logits_rows is None:
        return LogitsRows.ALL
    try:
        return LogitsRows(logits_rows)
    except ValueError:
        raise ValueError(f"logits_rows must be None, 'last' or 'packed', got {logits_rows!r}") from None


def _check_shapes(input_ids: torch.Tensor, slots: torch.Tensor, start_positions: torch.Tensor,
                  query_lengths: torch.Tensor) -> tuple[int, int]:
    """(B, S) once input_ids is [B, S] and the per-row tensors are [B]."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    batch, seq = input_ids.shape
    for name, tensor in (("slots", slots), ("start_positions", start_positions), ("query_lengths", query_lengths)):
        if tuple(tensor.shape) != (batch,):
            raise ValueError(f"{name} must have shape [{batch}], got {tuple(tensor.shape)}")
    return batch, seq


FUSED_PROJECTIONS = {   # this module's fused Linear -> the Hugging Face Linears it stacks, in row order
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def fuse_hf_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face parameter names -> this module's: stack q/k/v and gate/up along output rows.

    Row order matters: `Attention.forward` splits the fused output as [q | k | v] and
    `MLP.forward` as [gate | up].
    """
    fused = dict(state)
    for key in state:
        for target, parts in FUSED_PROJECTIONS.items():
            for suffix in (".weight", ".bias"):
                if not key.endswith("." + parts[0] + suffix):
                    continue
                prefix = key[: -len(parts[0] + suffix)]
                names = [prefix + part + suffix for part in parts]
                missing = [name for name in names if name not in fused]
                if missing:
                    raise ValueError(f"checkpoint has {key} but not {missing}")
                fused[prefix + target + suffix] = torch.cat([fused.pop(name) for name in names], dim=0)
    return fused
