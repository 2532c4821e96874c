"""One forward pass of a Llama-family model over the engine's KV cache, with per-row LoRA.

The weights are the loaded model's own modules (embedding, norms, projections, head: plain, 4-bit or
Unsloth-loaded alike); what this module owns is the shape of a step. A step is a flat list of
tokens: first one row per KV slot in use (the decode rows: row i is slot i), then chunks of prompts
being prefilled. Every token carries its position, the cache cell it writes and its adapter slot,
so one pass serves any mix of adapters and of decoding and prefilling sequences:

    [ decode rows: slots 0..n-1 | prompt chunk of seq a | prompt chunk of seq b | ... ]   T tokens

Decode rows attend over the view K[:n, :, :span] under a length mask; each prompt chunk attends
causally over its own slot. The projections, norms and MLP run once over all T tokens.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from contract.lora import MLP_PROJECTIONS, PROJECTIONS
from server.engine.fused import Kernels
from server.engine.kv_cache import SlotKVCache
from server.engine.lora_slots import EXPAND_KERNEL_ROWS, KERNEL_MAX_RANK, LoraSlots, RowAdapters
from server.engine.projections import layer_projections
from server.engine.trust import passes

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Not cuDNN: it builds a plan for every new attention shape, and a step's shapes change with its mix of
# prompt chunks and decode rows (measured on an H200: each new batch size's first wave lost 0.5-1.5 s).
_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class Chunk:
    slot: int
    start: int  # position of its first token
    length: int


@dataclass
class StepContext:
    """What every layer reads of a step's tokens, computed once per pass."""

    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin [T, 1, D]; None: the fused q/k/v kernel applies RoPE
    lora_rows: RowAdapters | None  # None: no token has an adapter


@dataclass
class Step:
    ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] RoPE positions
    write_slots: torch.Tensor  # [T] the KV cell each token writes: (slot, position)
    write_positions: torch.Tensor  # [T]
    lora_slots: torch.Tensor  # [T] adapter slot per token, -1 for the base model
    decode_rows: int  # n: tokens 0..n-1 are the decode rows, row i in KV slot i
    decode_lengths: torch.Tensor  # [n] positions each decode row attends (1 for rows riding along)
    decode_span: int  # max(decode_lengths), known on the host: no device sync to learn it
    chunks: list[Chunk]
    logit_rows: torch.Tensor  # [R] tokens whose next-token logits are wanted
    any_adapter: bool  # some token has a lora slot >= 0 (else the LoRA terms are skipped)


def check_architecture(config) -> None:
    """Refuse models whose layers this decoder would run wrongly (a silent wrong answer is worse)."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {config.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in _STATIC_ROPE_TYPES:
        raise ValueError(f"rope type {rope!r} is not supported (supported: {', '.join(_STATIC_ROPE_TYPES)})")
    window = getattr(config, "sliding_window", None)
    if window and (config.model_type == "mistral" or getattr(config, "use_sliding_window", False)):
        raise ValueError("sliding-window attention is not supported")


class Decoder:
    def __init__(
        self, model, *, cache: SlotKVCache, lora: LoraSlots, kernels: Kernels | None = None, projections=None
    ) -> None:
        config = model.config
        self.kernels = kernels or Kernels(compiled=False)
        self.silu = getattr(config, "hidden_act", "silu") == "silu"  # else the module's own activation
        self.cache, self.lora = cache, lora
        self.layers = list(model.model.layers)
        self.projections = projections or [layer_projections(layer) for layer in self.layers]  # fuses q/k/v, gate/up
        self.norm = model.model.norm
        self.embed = model.get_input_embeddings()
        self.head = model.get_output_embeddings()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = head_dim(config)
        self.cos, self.sin = rope_tables(
            config, length=cache.max_len + 1, device=cache.K[0].device, dtype=cache.K[0].dtype
        )  # [max_len + 1, D]
        self.qkv_kernel = None  # qkv_kernel.py once trusted here (use_qkv_kernel): small steps' q/k/v epilogue
        self.decode_kernel = None  # decode_attention.py once trusted here (use_decode_attention_kernel)
        if cache.K[0].is_cuda:
            self.use_qkv_kernel()
            self.use_decode_attention_kernel()

    def use_qkv_kernel(self, enabled: bool = True) -> bool:
        """Run the q/k/v epilogue of steps of at most EXPAND_KERNEL_ROWS tokens (LoRA terms, RoPE, cache
        writes) as one kernel, once it matches the unfused ops here; else, or without Triton, unfused."""
        self.qkv_kernel = None
        if not enabled:
            return False

        def check() -> bool:
            from server.engine import qkv_kernel

            return qkv_kernel.serves_here(self.cos.device, self.cos.dtype, **self._head_shape())

        if not passes(check, kernel="q/k/v", instead="running RoPE and the cache writes unfused"):
            return False
        from server.engine import qkv_kernel

        self.qkv_kernel = qkv_kernel
        return True

    def use_decode_attention_kernel(self, enabled: bool = True) -> bool:
        """Attend the decode rows with the split-KV kernel (many SMs, where SDPA has one per row and KV head),
        reading their lengths itself, once it matches the SDPA call here; else, or without Triton, SDPA."""
        self.decode_kernel = None
        if not enabled:
            return False

        def check() -> bool:
            from server.engine import decode_attention

            return decode_attention.serves_here(self.cos.device, self.cos.dtype, **self._head_shape())

        if not passes(check, kernel="decode attention", instead="attending with SDPA under a length mask"):
            return False
        from server.engine import decode_attention

        self.decode_kernel = decode_attention
        return True

    def _head_shape(self) -> dict[str, int]:
        return dict(heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim)

    def forward(self, step: Step) -> torch.Tensor:
        """Run the step, writing its keys and values into the cache; logits [R, V] float32."""
        with running():
            return self._forward(step)

    def _forward(self, step: Step) -> torch.Tensor:
        x, h, context = self.begin(step, self._input_ids(step))
        masks = self.attention_masks(step)  # the same for every layer: built once
        for index in range(len(self.layers)):
            q = self.qkv(index, h, step, context)
            o = self.attend(index, q, step, masks)
            x, h = self.finish_layer(index, o, x, context)
        return self.logits(x, step.logit_rows)

    # The pass in pieces (piecewise_graphs.py replays all but `attend` from CUDA graphs): begin, then per
    # layer qkv → attend → finish_layer, then logits. Only `attend` reads the step's chunks and decode rows.
    def begin(self, step: Step, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, StepContext]:
        """The embedded stream x [T, H], its first norm h, and what every layer reads of the step's tokens."""
        x = self.embed(ids)  # [T, H]: the residual stream
        fused_qkv = (
            self.qkv_kernel is not None and ids.shape[0] <= EXPAND_KERNEL_ROWS and self.lora.rank <= KERNEL_MAX_RANK
        )
        # [T, 1, D] each; the fused q/k/v kernel reads the tables itself
        rope = None if fused_qkv else (self.cos[step.positions].unsqueeze(1), self.sin[step.positions].unsqueeze(1))
        lora_rows = self.lora.row_adapters(step.lora_slots) if step.any_adapter else None
        return x, self.kernels.rms_norm(x, *_norm(self.layers[0].input_layernorm)), StepContext(rope, lora_rows)

    def qkv(self, index: int, h, step: Step, context: StepContext) -> torch.Tensor:
        """Layer `index`'s queries [T, Hq, D]; its keys and values written into the cache at the tokens' cells."""
        if context.rope is None:
            return self._fused_qkv(index, h, step, context.lora_rows)
        return self._qkv(index, h, step, context.rope, context.lora_rows)

    def attend(self, index: int, q: torch.Tensor, step: Step, masks) -> torch.Tensor:
        """Attention of layer `index` for the step's decode rows and chunks: [T, Hq * D]."""
        return self._attention(q, self.cache.K[index], self.cache.V[index], step, masks)

    def finish_layer(self, index: int, o: torch.Tensor, x, context: StepContext):
        """o_proj into the residual stream, then the MLP: the new stream and its norm under the next layer's
        input norm (None after the last layer)."""
        layer, lora_rows = self.layers[index], context.lora_rows
        x, h = self._into_residual(index, "o_proj", o, x, lora_rows, _norm(layer.post_attention_layernorm))
        following = self.layers[index + 1].input_layernorm if index + 1 < len(self.layers) else None
        return self._mlp_block(index, layer, x, h, lora_rows=lora_rows, next_norm=following)

    def logits(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[R, V] float32 next-token logits of the stream's `rows`."""
        return self.head(self.kernels.rms_norm(x[rows], *_norm(self.norm))).float()

    def _input_ids(self, step: Step) -> torch.Tensor:
        """[T]: decode row i's token is the one slot i drew last (kept on the device); then the chunks' ids."""
        n = step.decode_rows
        if not n:
            return step.ids
        drawn = self.cache.last_token[:n]
        return drawn if n == step.ids.shape[0] else torch.cat([drawn, step.ids[n:]])

    def _qkv(self, index: int, h, step: Step, rope, lora_rows) -> torch.Tensor:
        """q [T, Hq, D] rotated; k (rotated) and v written into the cache at the tokens' cells."""
        qkv = self._proj(index, "qkv", h, lora_rows)  # [T, (Hq + 2 Hkv) * D]
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        qk = self.kernels.rope(qkv[:, : q_width + kv_width].view(-1, self.heads + self.kv_heads, self.head_dim), *rope)
        q, k = qk[:, : self.heads], qk[:, self.heads :]  # [T, Hq, D], [T, Hkv, D]
        v = qkv[:, q_width + kv_width :].view(-1, self.kv_heads, self.head_dim)
        self.cache.K[index][step.write_slots, :, step.write_positions] = k
        self.cache.V[index][step.write_slots, :, step.write_positions] = v
        return q

    def _fused_qkv(self, index: int, h, step: Step, lora_rows) -> torch.Tensor:
        """_qkv's result and cache writes, after the GEMM in one kernel (qkv_kernel.py)."""
        out = self.projections[index]["qkv"](h, riders=lora_rows is not None)
        base, terms = self.lora.operands(index, "qkv", h, out, lora_rows)
        return self.qkv_kernel.qkv_epilogue(
            base,
            heads=self.heads,
            kv_heads=self.kv_heads,
            cos=self.cos,
            sin=self.sin,
            positions=step.positions,
            K=self.cache.K[index],
            V=self.cache.V[index],
            write_slots=step.write_slots,
            write_positions=step.write_positions,
            lora=terms,
        )

    def _mlp_block(self, index: int, layer, x, h, *, lora_rows, next_norm):
        """The MLP over h: the new stream, and its norm under the next layer's input norm (None: last layer)."""
        out = self.projections[index]["gate_up"](h, riders=lora_rows is not None)
        act = self.lora.gated(index, "gate_up", h, out, lora_rows) if self.silu else None  # one launch, or None
        if act is None:
            gate, up = self.lora.apply(index, "gate_up", h, out, lora_rows).chunk(2, dim=-1)
            act = self.kernels.silu_mul(gate, up) if self.silu else layer.mlp.act_fn(gate) * up
        if next_norm is None:
            return x + self._proj(index, "down_proj", act, lora_rows), None
        return self._into_residual(index, "down_proj", act, x, lora_rows, _norm(next_norm))

    def _into_residual(self, index: int, group: str, inputs, x, lora_rows, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream x plus the group's output (LoRA terms included), and its norm."""
        return self.kernels.add_rms_norm(x, self._proj(index, group, inputs, lora_rows), *norm)

    def _proj(self, index: int, group: str, x: torch.Tensor, lora_rows) -> torch.Tensor:
        out = self.projections[index][group](x, riders=lora_rows is not None)  # no adapter row: no shrink either
        return self.lora.apply(index, group, x, out, lora_rows)

    def attention_masks(self, step: Step) -> list[torch.Tensor | None]:
        """Additive masks (0 = attend, -inf = not): the decode rows' [n, 1, 1, span] (None where the decode
        kernel reads their lengths itself), then each chunk's causal [G * S, start + S] (the G query heads of
        a KV head are stacked along the query axis). Built once per step in the attention's dtype, on storage
        whose rows are 16-aligned: handed a boolean or unaligned mask, SDPA converts and pads it again in
        every layer (kernels per layer)."""
        masks, group = [], self.heads // self.kv_heads
        device, dtype = step.ids.device, self.cache.K[0].dtype
        if step.decode_rows:
            kernel = self.decode_kernel is not None
            masks.append(None if kernel else decode_mask(step.decode_lengths, step.decode_span, dtype))
        for chunk in step.chunks:
            rows = chunk.start + torch.arange(chunk.length, device=device)  # [S] absolute positions
            causal = torch.arange(chunk.start + chunk.length, device=device)[None, :] <= rows[:, None]  # [S, span]
            masks.append(additive_mask(causal.repeat(group, 1), dtype))
        return masks

    def _attention(self, q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, step: Step, masks) -> torch.Tensor:
        parts, masks = [], iter(masks)
        if step.decode_rows:
            parts.append(self._decode_attention(q[: step.decode_rows], K, V, step, mask=next(masks)))
        offset = step.decode_rows
        for chunk in step.chunks:
            parts.append(self._chunk_attention(q[offset : offset + chunk.length], K, V, chunk, mask=next(masks)))
            offset += chunk.length
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _decode_attention(self, q: torch.Tensor, K, V, step: Step, *, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:  # attention_masks left the lengths to the kernel, which reads them on the device
            return self.decode_kernel.decode_attention(q, K, V, step.decode_lengths, span=step.decode_span)
        return decode_sdpa(q, K, V, mask)

    def _chunk_attention(self, q: torch.Tensor, K, V, chunk: Chunk, *, mask: torch.Tensor) -> torch.Tensor:
        s, span, group = chunk.length, chunk.start + chunk.length, self.heads // self.kv_heads
        q = (
            q.view(s, self.kv_heads, group, self.head_dim)
            .permute(1, 2, 0, 3)
            .reshape(1, self.kv_heads, group * s, self.head_dim)
        )
        keys, values = (
            K[chunk.slot : chunk.slot + 1, :, :span],
            V[chunk.slot : chunk.slot + 1, :, :span],
        )  # [1, Hkv, span, D]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [1, Hkv, G*S, D]
        return (
            out.view(self.kv_heads, group, s, self.head_dim).permute(2, 0, 1, 3).reshape(s, self.heads * self.head_dim)
        )


def decode_sdpa(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The decode rows' attention by definition: row i's queries q [n, Hq, D] over KV slot i of K, V [slots, Hkv,
    L, D] under the additive mask [n, 1, 1, span] (decode_mask); [n, Hq * D]."""
    n, heads, head_dim = q.shape
    kv_heads, span = K.shape[1], mask.shape[-1]
    # The query heads sharing a KV head ride in the query-length axis: no repeated keys.
    grouped = q.view(n, kv_heads, heads // kv_heads, head_dim)  # [n, Hkv, G, D]
    out = F.scaled_dot_product_attention(grouped, K[:n, :, :span], V[:n, :, :span], attn_mask=mask)  # [n, Hkv, G, D]
    return out.reshape(n, heads * head_dim)


def decode_mask(lengths: torch.Tensor, span: int, dtype) -> torch.Tensor:
    """[n, 1, 1, span]: decode row i sees positions 0..lengths[i]-1 of its slot."""
    visible = torch.arange(span, device=lengths.device)[None, :] < lengths[:, None]  # [n, span]
    return additive_mask(visible, dtype)[:, None, None, :]


def additive_mask(visible: torch.Tensor, dtype) -> torch.Tensor:
    """[rows, span] bool → [rows, span] 0 / -inf in `dtype`, rows 16-aligned in memory."""
    rows, span = visible.shape
    storage = torch.full((rows, _round_up(span, 16)), float("-inf"), dtype=dtype, device=visible.device)
    return storage[:, :span].masked_fill_(visible, 0.0)


@contextmanager
def running():
    """What every pass of the decoder (whole or in pieces) runs under: no autograd, our attention backends."""
    with torch.inference_mode(), sdpa_kernel(_ATTENTION_BACKENDS):
        yield


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _norm(norm) -> tuple[torch.Tensor, float]:
    """An RMSNorm module's weight and epsilon: computed here because Unsloth swaps its forward for its own."""
    return norm.weight, getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)


def rope_tables(config, *, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions 0..length-1, [length, D]: computed in float32, then cast, as
    transformers does. From the config, not the model's rotary module (Unsloth replaces it)."""
    inv_freq, scaling = _inverse_frequencies(config)
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq.float().cpu())  # [length, D/2]
    angles = torch.cat((freqs, freqs), dim=-1)
    return (angles.cos() * scaling).to(device, dtype), (angles.sin() * scaling).to(device, dtype)


def head_dim(config) -> int:
    """A head's width: the config's own, or the hidden size shared among the query heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _inverse_frequencies(config) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": config.rope_theta}
    if params.get("rope_type", "default") == "default":
        dim = head_dim(config)
        return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None)


def projection_shapes(model) -> dict[tuple[int, str], tuple[int, int]]:
    """(layer, projection) → (in_features, out_features) of the modules LoRA may target."""
    shapes = {}
    for index, layer in enumerate(model.model.layers):
        for name in PROJECTIONS:
            parent = layer.mlp if name in MLP_PROJECTIONS else layer.self_attn
            module = getattr(parent, name)
            shapes[(index, name)] = (int(module.in_features), int(module.out_features))
    return shapes
