"""Every registered encoder x attention x decoder: shapes, attention sums, gradients and exact decoding."""
from __future__ import annotations

import itertools

import pytest
import torch

import capkit
from capkit.models.decoders.lstm import LSTMDecoder
from capkit.types import BOS_ID, EOS_ID, PAD_ID

VOCAB = 7  # 4 specials + 3 words
WORDS = [t for t in range(VOCAB) if t not in (PAD_ID, BOS_ID, EOS_ID)]  # what generation may emit
IMAGE = 96  # test_efficientnet reduces by 32: a 3 x 3 grid

ENCODER_KWARGS = {
    "timm": {"model_name": "test_efficientnet", "finetune": "all"},
    # a tiny random ViT: 96 px in 32 px patches, the same 3 x 3 grid
    "hf": {
        "config": {"model_type": "vit", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "intermediate_size": 32, "image_size": IMAGE, "patch_size": 32},
        "finetune": "all",
    },
}
ATTENTION_VARIANTS = {
    "bahdanau": [{"attn_dim": 8}],
    "luong_global": [{"score": "dot"}, {"score": "general"}, {"score": "concat", "attn_dim": 8}],
    "luong_local": [{"window": 1.0, "attn_dim": 8}],
}
LSTM_KWARGS = {"embed_dim": 12, "hidden_dim": 16, "feature_dim": 16, "dropout": 0.1}
DECODER_KWARGS = {  # per decoder name; a decoder not listed (a plugin's) gets LSTM_KWARGS
    "show_attend_tell": LSTM_KWARGS,
    "luong": LSTM_KWARGS,
    "transformer": {"d_model": 16, "num_layers": 2, "num_heads": 2, "ffn_dim": 24, "dropout": 0.1, "max_len": 16},
}


def attention_configs():
    for name in capkit.ATTENTIONS.names():
        for kwargs in ATTENTION_VARIANTS.get(name, [{}]):
            yield {"name": name, **kwargs}


def supports(decoder: str, attention: dict) -> bool:
    """A decoder may declare the only attentions it takes (``supported_attentions``); others are skipped."""
    supported = getattr(capkit.DECODERS.get(decoder), "supported_attentions", None)
    return supported is None or attention["name"] in supported


def combo_id(encoder: str, attention: dict, decoder: str) -> str:
    score = f"_{attention['score']}" if "score" in attention else ""
    return f"{encoder}-{attention['name']}{score}-{decoder}"


COMBOS = [
    pytest.param(enc, att, dec, id=combo_id(enc, att, dec))
    for enc, att, dec in itertools.product(capkit.ENCODERS.names(), attention_configs(), capkit.DECODERS.names())
    if supports(dec, att)
]


def build(encoder: str, attention: dict, decoder: str, seed: int = 0) -> capkit.Captioner:
    torch.manual_seed(seed)
    return capkit.build_captioner(
        {
            "encoder": {"name": encoder, **ENCODER_KWARGS.get(encoder, {})},
            "attention": attention,
            "decoder": {"name": decoder, **DECODER_KWARGS.get(decoder, LSTM_KWARGS)},
        },
        vocab_size=VOCAB,
    )


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def caption_batch() -> torch.Tensor:
    return torch.tensor([[BOS_ID, 4, 5, 6, EOS_ID, PAD_ID], [BOS_ID, 6, 3, 4, 5, EOS_ID]])


def sequence(tokens: list[int], length: int) -> list[int]:
    return [BOS_ID, *tokens, EOS_ID] + [PAD_ID] * (length - len(tokens))


def greedy(model: capkit.Captioner, image: torch.Tensor, max_len: int) -> tuple[list[int], float]:
    """Reference greedy decoding written directly against the decoder's step function."""
    memory = model.decoder.prepare(model.encode(image))
    state = model.decoder.init_state(memory)
    token, tokens, score = torch.tensor([BOS_ID]), [], 0.0
    for t in range(max_len + 1):
        logits, _, state = model.decoder.step(token, state, memory)
        logp = logits.log_softmax(-1)[0]
        allowed = [EOS_ID] if t == max_len else [EOS_ID, *WORDS]
        best = max(allowed, key=lambda i: logp[i].item())
        score += logp[best].item()
        if best == EOS_ID:
            return tokens, score
        tokens.append(best)
        token = torch.tensor([best])
    raise AssertionError("unreachable")


@pytest.mark.parametrize("encoder,attention,decoder", COMBOS)
def test_shapes_and_attention_sums(encoder, attention, decoder):
    model = build(encoder, attention, decoder).eval()
    captions = caption_batch()
    out = model(captions, images=images(2))
    n = 9
    assert out.logits.shape == (2, captions.shape[1] - 1, VOCAB)
    assert out.alphas.shape == (2, captions.shape[1] - 1, n)
    running = captions[:, 1:] != PAD_ID  # (B, T): the targets up to each caption's <end>
    assert torch.allclose(out.alphas.sum(-1)[running], torch.ones(int(running.sum())), atol=1e-5)
    assert (out.alphas >= 0).all()
    generation = model.generate(images=images(2), beam_size=2, max_len=4, n_best=2)
    assert generation.grid == (3, 3)
    for hyps in generation.hypotheses:
        assert 1 <= len(hyps) <= 2
        for hyp in hyps:
            assert hyp.alphas.shape == (len(hyp.tokens) + 1, n)
            assert torch.allclose(hyp.alphas.sum(-1), torch.ones(len(hyp.tokens) + 1), atol=1e-5)
            assert len(hyp.tokens) <= 4


@pytest.mark.parametrize("encoder,attention,decoder", COMBOS)
def test_gradients_reach_every_trainable_parameter(encoder, attention, decoder):
    model = build(encoder, attention, decoder).train()
    captions = caption_batch()
    out = model(captions, images=images(2))
    loss = torch.nn.functional.cross_entropy(
        out.logits.reshape(-1, VOCAB), captions[:, 1:].reshape(-1), ignore_index=PAD_ID
    )
    loss = loss + sum(out.aux_losses.values())
    loss.backward()
    missing = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)
    ]
    assert not missing


@pytest.mark.parametrize("encoder,attention,decoder", COMBOS)
def test_teacher_forcing_equals_stepping_the_whole_batch(encoder, attention, decoder):
    """forward computes only the captions still running (sorted by length); step runs every row at every step."""
    model = build(encoder, attention, decoder).eval()
    captions = torch.tensor([sequence([4], 6), sequence([5, 6, 4, 5, 6], 6), sequence([6, 6, 3], 6)])  # all padded
    x = images(3)
    with torch.no_grad():
        out = model(captions, images=x)
        memory = model.decoder.prepare(model.encode(x))
        state = model.decoder.init_state(memory)
        expected_logits, expected_alphas = [], []
        for t in range(captions.shape[1] - 1):
            logits, alpha, state = model.decoder.step(captions[:, t], state, memory)
            expected_logits.append(logits)
            expected_alphas.append(alpha)
    running = captions[:, 1:] != PAD_ID  # (B, T); what comes after <end> is the decoder's choice
    assert torch.allclose(out.logits[running], torch.stack(expected_logits, 1)[running], atol=1e-5)
    assert torch.allclose(out.alphas[running], torch.stack(expected_alphas, 1)[running], atol=1e-5)
    if isinstance(model.decoder, LSTMDecoder):  # the recurrent decoders stop each caption at its <end>
        assert (out.logits[~running] == 0).all() and (out.alphas[~running] == 0).all()


@pytest.mark.parametrize("encoder,attention,decoder", COMBOS)
def test_teacher_forced_log_prob_equals_generation_score(encoder, attention, decoder):
    model = build(encoder, attention, decoder).eval()
    x = images(3)
    generation = model.generate(images=x, beam_size=3, max_len=5)
    longest = max(len(t) for t in generation.tokens)
    captions = torch.tensor([sequence(t, longest) for t in generation.tokens])
    with torch.no_grad():
        log_prob = model.log_prob(captions, images=x)
    assert torch.allclose(log_prob, generation.scores, atol=1e-5)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
@pytest.mark.parametrize("encoder,attention,decoder", COMBOS)
def test_wide_beam_equals_exhaustive_search(encoder, attention, decoder, length_penalty):
    max_len = 3
    model = build(encoder, attention, decoder).eval()
    x = images(2)
    everything = [list(seq) for n in range(max_len + 1) for seq in itertools.product(WORDS, repeat=n)]
    captions = torch.tensor([sequence(seq, max_len) for seq in everything])  # (S, max_len + 2)
    generation = model.generate(images=x, beam_size=len(everything), max_len=max_len, length_penalty=length_penalty)
    with torch.no_grad():
        features = model.encode(x)
        for b in range(2):
            feats = capkit.EncoderOutput(features.feats[b : b + 1].expand(len(everything), -1, -1), features.grid)
            scores = model.log_prob(captions, features=feats)
            lengths = torch.tensor([len(seq) + 1 for seq in everything], dtype=torch.float)
            best = int((scores / lengths.pow(length_penalty)).argmax())
            assert generation.best[b].tokens == everything[best]
            assert generation.best[b].score == pytest.approx(float(scores[best]), abs=1e-5)


@pytest.mark.parametrize("encoder,attention,decoder", COMBOS)
def test_beam_one_is_greedy(encoder, attention, decoder):
    model = build(encoder, attention, decoder).eval()
    x = images(2)
    generation = model.generate(images=x, beam_size=1, max_len=6)
    with torch.no_grad():
        for b in range(2):
            tokens, score = greedy(model, x[b : b + 1], max_len=6)
            assert generation.best[b].tokens == tokens
            assert generation.best[b].score == pytest.approx(score, abs=1e-5)


@pytest.mark.parametrize("encoder,attention,decoder", COMBOS)
def test_batched_beam_search_equals_one_image_at_a_time(encoder, attention, decoder):
    model = build(encoder, attention, decoder).eval()
    x = images(4)
    batched = model.generate(images=x, beam_size=3, max_len=6)
    for b in range(4):
        alone = model.generate(images=x[b : b + 1], beam_size=3, max_len=6)
        assert alone.best[0].tokens == batched.best[b].tokens
        assert alone.best[0].score == pytest.approx(batched.best[b].score, abs=1e-5)


@pytest.mark.parametrize("decoder", capkit.DECODERS.names())
def test_a_caption_that_never_ends_stops_at_max_len(decoder):
    attention = {"name": "bahdanau", "attn_dim": 8}
    model = build("timm", attention if supports(decoder, attention) else {"name": "none"}, decoder).eval()
    with torch.no_grad():
        model.decoder.out.bias[EOS_ID] = -1e4  # <end> is (almost) impossible
    generation = model.generate(images=images(2), beam_size=3, max_len=5, n_best=3)
    for hyps in generation.hypotheses:
        assert len(hyps) == 3
        assert all(len(h.tokens) == 5 and torch.isfinite(torch.tensor(h.score)) for h in hyps)


def test_doubly_stochastic_regulariser_known_answer():
    decoder = build("timm", {"name": "none"}, "show_attend_tell").decoder
    alphas = torch.full((2, 3, 4), 0.25)  # (B, T, N) uniform attention
    mask = torch.tensor([[True, True, False], [True, True, True]])  # the first caption has 2 valid steps
    loss = decoder.aux_losses(alphas, mask)["doubly_stochastic"]
    # coverage: 0.5 on every cell of image 0, 0.75 on image 1 -> mean of 0.25 and 0.0625
    assert loss.item() == pytest.approx((0.25 + 0.0625) / 2)


@pytest.mark.parametrize("decoder", [d for d in capkit.DECODERS.names() if not supports(d, {"name": "bahdanau"})])
def test_an_unsupported_attention_is_a_clear_builder_error(decoder):
    with pytest.raises(ValueError, match=f"decoder '{decoder}' does not take attention 'bahdanau'"):
        build("timm", {"name": "bahdanau", "attn_dim": 8}, decoder)


def test_image_features_needs_exactly_one_of_images_and_features():
    model = build("timm", {"name": "bahdanau", "attn_dim": 8}, "show_attend_tell").eval()
    x = images(1)
    features = model.encode(x)
    assert model.image_features(features=features) is features
    assert torch.equal(model.image_features(x).feats, features.feats)
    for kwargs in ({}, {"images": x, "features": features}):
        with pytest.raises(ValueError, match="pass exactly one of images= or features="):
            model.image_features(**kwargs)
