"""Decoder training throughput on precomputed features: capkit (fp32, and bf16 where the device computes it
natively) against the code of the tutorial most Show, Attend and Tell users start from.

One training step = forward + loss (cross-entropy + doubly stochastic regulariser) + backward + optimizer step
(the tutorial's ``torch.optim.Adam``; capkit's trainer's ``adamw``, the same update with no weight decay, fused),
on a batch of 64 captions of 10 to 16 words over an 8x8x2048 grid (inception_v3's), vocabulary 5,000,
embedding / hidden / attention size 512, ``show_attend_tell`` decoder with ``bahdanau`` attention.

The baseline (``TutorialShowAttendTell`` below) does what sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning
(``models.py``, ``train.py``) does: it sorts the batch by caption length and shrinks the batch at every step to
the captions still running, recomputes the encoder-side attention projection at every step, scores with a ReLU
(``full_att(relu(att1 + att2))``), and computes its loss over ``pack_padded_sequence`` targets plus the
regulariser ``((1 - alphas.sum(1)) ** 2).mean()``. Its output layer is capkit's (the paper's deep output, where
the tutorial has ``fc(dropout(h))``), so that both hold the same weights: they are loaded parameter by parameter,
and with the ReLU swapped for capkit's tanh both must give the same loss on the same batch (to 1e-5) before
anything is timed. Times are interleaved (one step of each in turn), the median of each is reported.

Prints a table and writes ``benchmarks/results/bench_decoder_train.json`` (with the CPU's name and bf16 flags).
Run: ``python -m benchmarks decoder_train``.
"""
from __future__ import annotations

import copy
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from benchmarks.common import sync, write_results
from capkit.engine.device import cpu_has_native_bf16
from capkit.engine.optim import adamw
from capkit.models.attention.bahdanau import BahdanauAttention
from capkit.models.decoders.show_attend_tell import ShowAttendTellDecoder
from capkit.types import BOS_ID, EOS_ID, PAD_ID, EncoderOutput

BATCH, GRID, CHANNELS, VOCAB, DIM = 64, (8, 8), 2048, 5000, 512
WORDS = (10, 16)  # caption length range, in words
WARMUP, TIMED = 1, 5  # iterations per implementation (interleaved); the median is reported


class TutorialShowAttendTell(nn.Module):
    """sgrvinod's ``DecoderWithAttention`` and its training loss, with capkit's output layer (see the module
    docstring); ``score_activation`` is the tutorial's ReLU, or tanh to check it against capkit."""

    def __init__(self, channels: int, vocab: int, embed: int, hidden: int, attn: int, dropout: float,
                 score_activation=F.relu):
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
        self.score_activation = score_activation

    def attend(self, feats: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        att1 = self.encoder_att(feats)  # (B_t, N, A), recomputed at every step
        att2 = self.decoder_att(h)  # (B_t, A)
        alpha = self.full_att(self.score_activation(att1 + att2.unsqueeze(1))).squeeze(2).softmax(dim=1)  # (B_t, N)
        return (feats * alpha.unsqueeze(2)).sum(dim=1), alpha

    def loss(self, feats: Tensor, captions: Tensor) -> Tensor:
        """The tutorial's forward and its training loss: sort, decode the running captions step by step, pack."""
        caption_lengths = (captions != PAD_ID).sum(dim=1)  # <start> .. <end>
        caption_lengths, sort_ind = caption_lengths.sort(dim=0, descending=True)
        feats, captions = feats[sort_ind], captions[sort_ind]
        embeddings = self.embedding(captions)  # (B, L, E)
        mean = feats.mean(dim=1)
        h, c = self.init_h(mean), self.init_c(mean)
        h, c = h.tanh(), c.tanh()  # capkit's initial state (the tutorial's has no tanh)
        decode_lengths = (caption_lengths - 1).tolist()
        batch, steps = captions.shape[0], max(decode_lengths)
        predictions = feats.new_zeros(batch, steps, self.fc.out_features)
        alphas = feats.new_zeros(batch, steps, feats.shape[1])
        for t in range(steps):
            batch_t = sum(length > t for length in decode_lengths)
            context, alpha = self.attend(feats[:batch_t], h[:batch_t])
            context = torch.sigmoid(self.f_beta(h[:batch_t])) * context
            emb = embeddings[:batch_t, t]
            h, c = self.decode_step(torch.cat([emb, context], dim=1), (h[:batch_t], c[:batch_t]))
            deep = (emb + self.L_h(h) + self.L_z(context)).tanh()
            predictions[:batch_t, t] = self.fc(self.dropout(deep))
            alphas[:batch_t, t] = alpha
        targets = captions[:, 1:]
        scores = pack_padded_sequence(predictions, decode_lengths, batch_first=True).data
        targets = pack_padded_sequence(targets, decode_lengths, batch_first=True).data
        return F.cross_entropy(scores.float(), targets) + ((1.0 - alphas.float().sum(dim=1)) ** 2).mean()


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


def baseline_from(decoder: ShowAttendTellDecoder, score_activation=F.relu) -> TutorialShowAttendTell:
    """A baseline holding a copy of ``decoder``'s weights."""
    naive = TutorialShowAttendTell(
        decoder.feature_dim, decoder.vocab_size, decoder.embed.embedding_dim, decoder.hidden_dim,
        decoder.attention.key_proj.out_features, decoder.dropout.p, score_activation,
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
    bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
    torch.manual_seed(0)
    decoder = ShowAttendTellDecoder(
        partial(BahdanauAttention, attn_dim=dim), channels, vocab, embed_dim=dim, hidden_dim=dim, dropout=0.5
    ).to(device)
    feats, captions = make_batch(batch, grid, channels, vocab, device)
    enc = EncoderOutput(feats, grid)

    # same model, same batch, same loss (fp32, dropout off, the tutorial's ReLU swapped for capkit's tanh)
    check = baseline_from(decoder, torch.tanh).eval()
    decoder.eval()
    with torch.no_grad():
        out = decoder(enc, captions)
        ours, theirs = sat_loss(out.logits, out.alphas, captions).item(), check.loss(feats, captions).item()
    assert abs(ours - theirs) <= 1e-5, f"capkit loss {ours} != baseline loss {theirs}"

    def capkit_step(model: ShowAttendTellDecoder) -> Tensor:
        out = model(enc, captions)
        return sat_loss(out.logits, out.alphas, captions)

    tutorial = baseline_from(decoder).train()
    impls = {"tutorial baseline (fp32)": (lambda: tutorial.loss(feats, captions), tutorial, None)}
    for name, dtype in [("capkit fp32", None), *([("capkit bf16", torch.bfloat16)] if bf16 else [])]:
        model = copy.deepcopy(decoder).train()
        impls[name] = (partial(capkit_step, model), model, dtype)
    # each side's own optimizer: the tutorial's torch.optim.Adam, capkit's trainer's AdamW (fused where supported)
    optimizers = {name: adamw(model.parameters(), lr=4e-4) for name, (_, model, _) in impls.items()}
    optimizers["tutorial baseline (fp32)"] = torch.optim.Adam(tutorial.parameters(), lr=4e-4)
    times: dict[str, list[float]] = {name: [] for name in impls}
    for i in range(warmup + timed):
        for name, (loss_fn, _, dtype) in impls.items():  # interleaved: background load hits all alike
            sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_fn()
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    rows = []
    for name, ts in times.items():
        median = statistics.median(ts)
        rows.append({"impl": name, "step_s": median, "captions_per_s": batch / median, "all_step_s": ts})
    base = rows[0]["captions_per_s"]
    return {
        "device": device.type, "native_bf16": bf16, "batch": batch, "grid": list(grid),
        "channels": channels, "vocab": vocab, "dim": dim, "words": list(WORDS), "max_steps": captions.shape[1] - 1,
        "mean_steps": float((captions[:, 1:] != PAD_ID).sum(1).float().mean()), "loss_check": [ours, theirs],
        "warmup": warmup, "timed": timed, "results": rows,
        "speedup": {r["impl"]: r["captions_per_s"] / base for r in rows[1:]},
    }


def main() -> None:
    result = run()
    print(f"decoder training step: batch {result['batch']}, grid {result['grid'][0]}x{result['grid'][1]}x"
          f"{result['channels']}, vocab {result['vocab']}, dim {result['dim']}, "
          f"{result['words'][0]}-{result['words'][1]} "
          f"words, {result['device']}, {torch.get_num_threads()} threads, median of {result['timed']}"
          + ("" if result["native_bf16"] else "; no native bf16 here: bf16 not run"))
    print(f"same loss before timing: capkit {result['loss_check'][0]:.6f}, baseline {result['loss_check'][1]:.6f}")
    print(f"{'implementation':<28}{'step (s)':>10}{'captions/s':>12}{'vs tutorial':>13}")
    for r in result["results"]:
        ratio = result["speedup"].get(r["impl"], 1.0)
        print(f"{r['impl']:<28}{r['step_s']:>10.3f}{r['captions_per_s']:>12.1f}{ratio:>12.2f}x")
    write_results("bench_decoder_train", torch.device(result["device"]), result)


if __name__ == "__main__":
    main()
