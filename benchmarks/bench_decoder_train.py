"""Decoder training throughput on precomputed features: capkit vs the usual Show, Attend and Tell code.

One training step = forward + loss (cross-entropy + doubly stochastic regulariser) + backward + Adam step,
on a batch of 64 captions of 10 to 16 words over an 8x8x2048 grid (inception_v3's), vocabulary 5,000,
embedding / hidden / attention size 512, ``show_attend_tell`` decoder with ``bahdanau`` attention.

The baseline (``NaiveShowAttendTell`` below) is the straightforward implementation, in the style of the widely
used PyTorch tutorials (sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning): its own LSTMCell / Linear layers,
the encoder-side attention projection recomputed at every step, a Python loop over the full padded length
with the whole batch at every step (that tutorial also sorts the batch by length and shrinks it as captions
end; this baseline does not, capkit does), and the context as an elementwise weighted sum. It computes the same
model as capkit's: the same weights are loaded into both (parameter by parameter) and both must give the
same loss on the same batch (to 1e-5) before either is timed.

On CUDA (when available) both run under bf16 autocast. Prints a table and writes
``benchmarks/results/bench_decoder_train.json``. Run: ``python -m benchmarks`` (or ``make bench``).
"""
from __future__ import annotations

import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import sync, write_results
from capkit.models.attention.bahdanau import BahdanauAttention
from capkit.models.decoders.show_attend_tell import ShowAttendTellDecoder
from capkit.types import BOS_ID, EOS_ID, PAD_ID, EncoderOutput

BATCH, GRID, CHANNELS, VOCAB, DIM = 64, (8, 8), 2048, 5000, 512
WORDS = (10, 16)  # caption length range, in words
WARMUP, TIMED = 1, 5  # iterations per implementation (interleaved); the median is reported


class NaiveShowAttendTell(nn.Module):
    """The usual implementation of capkit's ``show_attend_tell`` + ``bahdanau`` model (same math, same weights)."""

    def __init__(self, channels: int, vocab: int, embed: int, hidden: int, attn: int, dropout: float):
        super().__init__()
        self.encoder_att = nn.Linear(channels, attn)
        self.decoder_att = nn.Linear(hidden, attn, bias=False)
        self.full_att = nn.Linear(attn, 1, bias=False)
        self.embedding = nn.Embedding(vocab, embed, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(dropout)
        self.init_h = nn.Linear(channels, hidden)
        self.init_c = nn.Linear(channels, hidden)
        self.f_beta = nn.Linear(hidden, 1)
        self.decode_step = nn.LSTMCell(embed + channels, hidden)
        self.L_h = nn.Linear(hidden, embed)
        self.L_z = nn.Linear(channels, embed, bias=False)
        self.fc = nn.Linear(embed, vocab)

    def attend(self, feats: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        att1 = self.encoder_att(feats)  # (B, N, A), recomputed at every step
        att2 = self.decoder_att(h)  # (B, A)
        alpha = self.full_att((att1 + att2.unsqueeze(1)).tanh()).squeeze(2).softmax(dim=1)  # (B, N)
        return (feats * alpha.unsqueeze(2)).sum(dim=1), alpha

    def forward(self, feats: Tensor, captions: Tensor) -> tuple[Tensor, Tensor]:
        batch, steps = captions.shape[0], captions.shape[1] - 1
        embeddings = self.embedding(captions)  # (B, L, E)
        mean = feats.mean(dim=1)
        h, c = self.init_h(mean).tanh(), self.init_c(mean).tanh()
        logits = feats.new_zeros(batch, steps, self.fc.out_features)
        alphas = feats.new_zeros(batch, steps, feats.shape[1])
        for t in range(steps):
            context, alpha = self.attend(feats, h)
            context = torch.sigmoid(self.f_beta(h)) * context
            emb = embeddings[:, t]
            h, c = self.decode_step(torch.cat([emb, context], dim=1), (h, c))
            deep = (emb + self.L_h(h) + self.L_z(context)).tanh()
            logits[:, t] = self.fc(self.dropout(deep))
            alphas[:, t] = alpha
        return logits, alphas


# capkit parameter name -> baseline parameter name
NAME_MAP = {
    "attention.key_proj": "encoder_att",
    "attention.query_proj": "decoder_att",
    "attention.score": "full_att",
    "embed": "embedding",
    "init_h": "init_h",
    "init_c": "init_c",
    "f_beta": "f_beta",
    "lstm": "decode_step",
    "out_hidden": "L_h",
    "out_context": "L_z",
    "out": "fc",
}


def baseline_from(decoder: ShowAttendTellDecoder) -> NaiveShowAttendTell:
    """A baseline holding a copy of ``decoder``'s weights."""
    naive = NaiveShowAttendTell(
        decoder.feature_dim, decoder.vocab_size, decoder.embed.embedding_dim, decoder.hidden_dim,
        decoder.attention.key_proj.out_features, decoder.dropout.p,
    )
    state = {}
    for name, value in decoder.state_dict().items():
        module, _, param = name.rpartition(".")
        state[f"{NAME_MAP[module]}.{param}"] = value.clone()
    naive.load_state_dict(state)  # strict: every parameter mapped exactly once
    return naive.to(next(decoder.parameters()).device)


def sat_loss(logits: Tensor, alphas: Tensor, captions: Tensor) -> Tensor:
    """Cross-entropy over the non-pad targets + the doubly stochastic regulariser (weight 1), as capkit's trainer."""
    targets = captions[:, 1:]
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD_ID)
    coverage = (alphas.float() * (targets != PAD_ID).unsqueeze(2)).sum(dim=1)
    return ce + (1.0 - coverage).square().mean()


def make_batch(batch: int, grid: tuple[int, int], channels: int, vocab: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.rand(batch, grid[0] * grid[1], channels, generator=g)  # post-ReLU-like features
    lengths = torch.randint(WORDS[0], WORDS[1] + 1, (batch,), generator=g)
    captions = torch.full((batch, WORDS[1] + 2), PAD_ID, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        captions[i, 0] = BOS_ID
        captions[i, 1 : n + 1] = torch.randint(4, vocab, (n,), generator=g)
        captions[i, n + 1] = EOS_ID
    return feats.to(device), captions.to(device)


def run(
    batch: int = BATCH, grid: tuple[int, int] = GRID, channels: int = CHANNELS, vocab: int = VOCAB, dim: int = DIM,
    warmup: int = WARMUP, timed: int = TIMED, device: torch.device | None = None,
) -> dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    decoder = ShowAttendTellDecoder(
        partial(BahdanauAttention, attn_dim=dim), channels, vocab, embed_dim=dim, hidden_dim=dim, dropout=0.5
    ).to(device)
    naive = baseline_from(decoder)
    feats, captions = make_batch(batch, grid, channels, vocab, device)
    enc = EncoderOutput(feats, grid)

    def capkit_loss() -> Tensor:
        out = decoder(enc, captions)
        return sat_loss(out.logits, out.alphas, captions)

    def naive_loss() -> Tensor:
        return sat_loss(*naive(feats, captions), captions)

    # same model, same batch, same loss (fp32, dropout off) before anything is timed
    decoder.eval(), naive.eval()
    with torch.no_grad():
        ours, theirs = capkit_loss().item(), naive_loss().item()
    assert abs(ours - theirs) <= 1e-5, f"capkit loss {ours} != baseline loss {theirs}"
    decoder.train(), naive.train()

    impls = {
        "baseline": (naive_loss, torch.optim.Adam(naive.parameters(), lr=4e-4)),
        "capkit": (capkit_loss, torch.optim.Adam(decoder.parameters(), lr=4e-4)),
    }
    times: dict[str, list[float]] = {name: [] for name in impls}
    for i in range(warmup + timed):
        for name, (loss_fn, optimizer) in impls.items():  # interleaved: background load hits both alike
            sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = loss_fn()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    rows = []
    for name, ts in times.items():
        median = statistics.median(ts)
        rows.append({"impl": name, "step_s": median, "captions_per_s": batch / median, "all_step_s": ts})
    speedup = rows[1]["captions_per_s"] / rows[0]["captions_per_s"]
    return {
        "device": device.type, "amp": str(amp) if amp else "fp32", "batch": batch, "grid": list(grid),
        "channels": channels, "vocab": vocab, "dim": dim, "words": list(WORDS), "max_steps": captions.shape[1] - 1,
        "mean_steps": float((captions[:, 1:] != PAD_ID).sum(1).float().mean()), "loss_check": [ours, theirs],
        "warmup": warmup, "timed": timed, "results": rows, "speedup": speedup,
    }


def main() -> None:
    result = run()
    print(f"decoder training step: batch {result['batch']}, grid {result['grid'][0]}x{result['grid'][1]}x"
          f"{result['channels']}, vocab {result['vocab']}, dim {result['dim']}, "
          f"{result['words'][0]}-{result['words'][1]} "
          f"words, {result['device']} {result['amp']}, {torch.get_num_threads()} threads, median of {result['timed']}")
    print(f"same loss before timing: capkit {result['loss_check'][0]:.6f}, baseline {result['loss_check'][1]:.6f}")
    print(f"{'implementation':<16}{'step (s)':>10}{'captions/s':>12}")
    for r in result["results"]:
        print(f"{r['impl']:<16}{r['step_s']:>10.3f}{r['captions_per_s']:>12.1f}")
    print(f"speedup (capkit / baseline captions/s): {result['speedup']:.2f}x")
    write_results("bench_decoder_train", torch.device(result["device"]), result)


if __name__ == "__main__":
    main()
