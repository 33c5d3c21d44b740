"""A causal Transformer caption decoder with cross-attention to the encoder grid and a key/value cache."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capkit.models.attention.base import AttentionMemory
from capkit.models.decoders.base import AttentionFactory, Decoder
from capkit.registry import DECODERS
from capkit.types import PAD_ID, DecoderOutput, EncoderOutput

__all__ = ["TransformerDecoder", "POSITIONAL_ENCODINGS"]

POSITIONAL_ENCODINGS = ("sinusoidal", "learned")


@DECODERS.register("transformer")
class TransformerDecoder(Decoder):
    """Pre-norm Transformer decoder (Vaswani et al. 2017): causal self-attention over the words so far,
    multi-head cross-attention to the encoder grid, feed-forward; then a final LayerNorm and the output layer.

    The encoder features are projected to ``d_model`` (Linear + LayerNorm) and every layer's cross-attention
    keys and values are computed once per image (``prepare``). Teacher forcing (``forward``) runs the whole
    caption in one parallel pass under a causal mask. Generation runs ``step`` one token at a time: with
    ``use_cache`` (default) each layer's self-attention keys and values of the past steps are kept in the
    state (``self_k_<i>``, ``self_v_<i>``: (B, t, d_model), batch-first, growing by one step per call, so beam
    search reorders them with ``index_select``) and the prefix is never recomputed; without it the state holds
    the token history (``tokens``: (B, t)) and every step re-runs the prefix (for tests and the benchmark).

    The attention weights ``alpha`` (what the visualiser, beam search and the matrix tests see) are the
    cross-attention probabilities of layer ``attention_layer``, averaged over the heads: (B, N), summing to 1.

    The model config's ``attention`` section must be ``{name: none}``: the decoder's own multi-head
    cross-attention takes the place of a registered attention (``supported_attentions``; the builder says so
    for any other name). The builder's attention factory is accepted and not used.

    Args:
        attention, encoder_dim, vocab_size: set by the builder (see ``Decoder``).
        d_model: model width (embeddings, attention, residual stream).
        num_layers: decoder layers.
        num_heads: attention heads (``d_model`` must be divisible by it).
        ffn_dim: hidden size of the feed-forward blocks.
        dropout: dropout on embeddings, attention probabilities, residual branches and before the output.
        positional: ``sinusoidal`` (fixed) or ``learned`` position embeddings.
        max_len: most input tokens (``<start>`` + words) a caption may have, in training and generation
            (generation with ``max_len=M`` feeds up to M + 1 tokens).
        attention_layer: which layer's cross-attention gives ``alpha`` (negative counts from the end).
        use_cache: cache self-attention keys/values during generation (``False`` recomputes the prefix).
    """

    supported_attentions = ("none",)

    def __init__(
        self,
        attention: AttentionFactory,
        encoder_dim: int,
        vocab_size: int,
        d_model: int = 512,
        num_layers: int = 3,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        positional: str = "sinusoidal",
        max_len: int = 128,
        attention_layer: int = -1,
        use_cache: bool = True,
    ):
        super().__init__()
        del attention  # replaced by the layers' own cross-attention (see the class docstring)
        if d_model % num_heads:
            raise ValueError(f"transformer decoder: d_model {d_model} is not divisible by num_heads {num_heads}")
        if positional not in POSITIONAL_ENCODINGS:
            raise ValueError(f"transformer decoder: positional must be one of {POSITIONAL_ENCODINGS}, got {positional!r}")
        if not -num_layers <= attention_layer < num_layers:
            raise ValueError(f"transformer decoder: attention_layer {attention_layer} out of range for {num_layers} layers")
        if num_layers < 1 or max_len < 1:
            raise ValueError("transformer decoder: num_layers and max_len must be at least 1")
        self.vocab_size = vocab_size
        self.hidden_dim = self.d_model = d_model
        self.num_layers, self.num_heads, self.max_len = num_layers, num_heads, max_len
        self.attention_layer = attention_layer % num_layers
        self.use_cache = use_cache
        self.positional = positional
        self.feature_proj = nn.Sequential(nn.Linear(encoder_dim, d_model), nn.LayerNorm(d_model))
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=PAD_ID)
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)  # scaled by sqrt(d_model) in use: unit variance
        with torch.no_grad():
            self.embed.weight[PAD_ID].zero_()
        if positional == "learned":
            self.pos_embed: nn.Embedding | None = nn.Embedding(max_len, d_model)
            nn.init.normal_(self.pos_embed.weight, std=0.02)
        else:
            self.pos_embed = None
            self.register_buffer("pos_table", sinusoidal_table(max_len, d_model), persistent=False)
        self.layers = nn.ModuleList(_DecoderLayer(d_model, num_heads, ffn_dim, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, vocab_size)

    # ------------------------------------------------------------------------------------------ shared
    def prepare(self, enc: EncoderOutput) -> AttentionMemory:
        """Per image, once: projected features (``values``) and every layer's cross keys/values (``keys``,
        (B, N, num_layers * 2 * d_model))."""
        feats = self.feature_proj(enc.feats)  # (B, N, D)
        keys = torch.cat([layer.cross_kv(feats) for layer in self.layers], dim=-1)
        return AttentionMemory(values=feats, keys=keys, grid=enc.grid)

    def _layer_memory(self, memory: AttentionMemory, i: int) -> tuple[Tensor, Tensor]:
        d = self.d_model
        kv = memory.keys[..., 2 * d * i : 2 * d * (i + 1)]  # type: ignore[index]
        return self.layers[i].heads(kv[..., :d]), self.layers[i].heads(kv[..., d:])  # (B, h, N, dh) each

    def _embed(self, tokens: Tensor, start: int) -> Tensor:
        """tokens (B, T) at positions start .. start + T - 1 -> (B, T, D)."""
        end = start + tokens.shape[1]
        if end > self.max_len:
            raise ValueError(
                f"transformer decoder: {end} input tokens exceed its max_len {self.max_len}; raise "
                f"model.decoder.max_len (generation with max_len M needs M + 1)"
            )
        positions = torch.arange(start, end, device=tokens.device)
        pos = self.pos_embed(positions) if self.pos_embed is not None else self.pos_table[start:end]
        return self.dropout(self.embed(tokens) * math.sqrt(self.d_model) + pos)

    def _decode(self, tokens: Tensor, memory: AttentionMemory) -> tuple[Tensor, Tensor]:
        """The parallel pass: tokens (B, T) -> logits (B, T, V), alphas (B, T, N)."""
        x = self._embed(tokens, 0)
        alphas = None
        for i, layer in enumerate(self.layers):
            x, _, _, alpha = layer(x, self._layer_memory(memory, i), need_alpha=i == self.attention_layer)
            alphas = alpha if alpha is not None else alphas
        return self.out(self.dropout(self.norm(x))), alphas  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------ interface
    def forward(self, enc: EncoderOutput, captions: Tensor) -> DecoderOutput:
        """Teacher forcing in one pass. captions (B, L) = <start> w_1 .. w_n <end> <pad>..; predicts captions[:, 1:]."""
        memory = self.prepare(enc)
        logits, alphas = self._decode(captions[:, :-1], memory)
        mask = captions[:, 1:] != PAD_ID
        return DecoderOutput(logits, alphas, self.aux_losses(alphas, mask))

    def init_state(self, memory: AttentionMemory) -> dict[str, Tensor]:
        """Empty history: per-layer key/value caches (B, 0, D), or the token history (B, 0) without a cache."""
        b, device = memory.values.shape[0], memory.values.device
        if not self.use_cache:
            return {"tokens": torch.empty(b, 0, dtype=torch.long, device=device)}
        empty = memory.values.new_zeros(b, 0, self.d_model)
        return {f"self_{kv}_{i}": empty for i in range(self.num_layers) for kv in ("k", "v")}

    def step(
        self, tokens: Tensor, state: dict[str, Tensor], memory: AttentionMemory
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """tokens (B,) -> logits (B, V), alpha (B, N), next state (one more step of history)."""
        if "tokens" in state:  # no cache: recompute the whole prefix, keep the last position
            history = torch.cat([state["tokens"], tokens.unsqueeze(1)], dim=1)
            logits, alphas = self._decode(history, memory)
            return logits[:, -1], alphas[:, -1], {"tokens": history}
        x = self._embed(tokens.unsqueeze(1), state["self_k_0"].shape[1])  # (B, 1, D)
        new_state, alpha = {}, None
        for i, layer in enumerate(self.layers):
            cache = (state[f"self_k_{i}"], state[f"self_v_{i}"])
            x, k, v, a = layer(x, self._layer_memory(memory, i), cache=cache, need_alpha=i == self.attention_layer)
            new_state[f"self_k_{i}"], new_state[f"self_v_{i}"] = k, v
            alpha = a if a is not None else alpha
        logits = self.out(self.dropout(self.norm(x)))
        return logits[:, 0], alpha[:, 0], new_state  # type: ignore[index]


class _DecoderLayer(nn.Module):
    """Pre-norm layer: x += SelfAttn(LN x); x += CrossAttn(LN x, memory); x += FFN(LN x)."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.norm_self, self.norm_cross, self.norm_ffn = (nn.LayerNorm(d_model) for _ in range(3))
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.self_out = nn.Linear(d_model, d_model)
        self.cross_q = nn.Linear(d_model, d_model)
        self.cross_kv = nn.Linear(d_model, 2 * d_model)  # applied once per image in ``prepare``
        self.cross_out = nn.Linear(d_model, d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, d_model)
        )
        self.attn_dropout = dropout
        self.dropout = nn.Dropout(dropout)

    def heads(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, h, T, dh)."""
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    @staticmethod
    def merge(x: Tensor) -> Tensor:
        """(B, h, T, dh) -> (B, T, D)."""
        b, h, t, dh = x.shape
        return x.transpose(1, 2).reshape(b, t, h * dh)

    def forward(
        self,
        x: Tensor,
        cross: tuple[Tensor, Tensor],
        cache: tuple[Tensor, Tensor] | None = None,
        need_alpha: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """x (B, T, D). Without ``cache``: causal self-attention over the T positions. With ``cache`` (past
        keys, values (B, t, D)): the T new positions follow them (generation: T = 1).

        Returns x, the keys and values of all positions so far (B, t + T, D), and, if ``need_alpha``, the
        head-averaged cross-attention (B, T, N).
        """
        p = self.attn_dropout if self.training else 0.0
        q, k, v = self.qkv(self.norm_self(x)).chunk(3, dim=-1)
        if cache is not None:  # one new position attends to every cached one: no mask
            if x.shape[1] != 1:
                raise ValueError(f"a cached step takes one new position, got {x.shape[1]}")
            k, v = torch.cat([cache[0], k], dim=1), torch.cat([cache[1], v], dim=1)
        y = F.scaled_dot_product_attention(
            self.heads(q), self.heads(k), self.heads(v), dropout_p=p, is_causal=cache is None
        )
        x = x + self.dropout(self.self_out(self.merge(y)))

        keys, values = cross  # (B, h, N, dh)
        qc = self.heads(self.cross_q(self.norm_cross(x)))  # (B, h, T, dh)
        probs = (qc @ keys.transpose(-2, -1) / math.sqrt(self.head_dim)).softmax(dim=-1)  # (B, h, T, N)
        context = F.dropout(probs, p, self.training) @ values
        x = x + self.dropout(self.cross_out(self.merge(context)))
        x = x + self.dropout(self.ffn(self.norm_ffn(x)))
        return x, k, v, probs.mean(dim=1) if need_alpha else None


def sinusoidal_table(length: int, dim: int) -> Tensor:
    """(length, dim) fixed position encodings: sin on even, cos on odd channels (Vaswani et al. 2017)."""
    position = torch.arange(length, dtype=torch.float).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table
