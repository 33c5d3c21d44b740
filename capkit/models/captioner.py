"""The Captioner: an encoder and a decoder, fed images or precomputed features."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from capkit.models.decoders.base import Decoder
from capkit.models.encoders.base import Encoder
from capkit.types import PAD_ID, DecoderOutput, EncoderOutput, Generation, SampledCaptions

__all__ = ["Captioner"]


class Captioner(nn.Module):
    """Encoder + decoder.

    Every method takes either ``images`` (B, 3, H, W) or ``features`` (an ``EncoderOutput`` from the
    feature cache or a previous ``encode``), so cached and raw-image training share one model.
    """

    def __init__(self, encoder: Encoder, decoder: Decoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def encode(self, images: Tensor) -> EncoderOutput:
        return self.encoder(images)

    def image_features(self, images: Tensor | None = None, features: EncoderOutput | None = None) -> EncoderOutput:
        """The encoder's output for ``images``, or from precomputed ``features`` (``Encoder.finish``: as given
        unless they are the cached output of the encoder's frozen part only); pass exactly one."""
        if (images is None) == (features is None):
            raise ValueError("pass exactly one of images= or features=")
        return self.encode(images) if features is None else self.encoder.finish(features)

    def forward(
        self,
        captions: Tensor | None = None,
        images: Tensor | None = None,
        features: EncoderOutput | None = None,
        *,
        captions_per_image: int = 1,
        num_samples: int = 0,
        max_len: int = 16,
        temperature: float = 1.0,
    ) -> DecoderOutput | SampledCaptions:
        """Teacher forcing: captions (B, L) -> logits (B, L-1, V), alphas (B, L-1, N), aux losses.

        With ``captions_per_image`` K > 1, captions (B * K, L) hold K captions of each of B images, image-major:
        the encoder runs once per image and its output is repeated for the decoder (``data.captions_per_image``,
        self-critical candidates).

        With ``num_samples`` S > 0 and no captions: S captions drawn per image from softmax(logits /
        ``temperature``) (at most ``max_len`` words), with gradients, for self-critical training. Both go
        through ``forward`` so that DistributedDataParallel synchronises the gradients of either.
        """
        if (captions is None) == (num_samples == 0):
            raise ValueError("pass captions= (teacher forcing) or num_samples= (sampling), not both or neither")
        if captions_per_image < 1 or (captions is None and captions_per_image != 1):
            raise ValueError(f"captions_per_image={captions_per_image}: a whole number of at least 1, with captions=")
        enc = self.image_features(images, features)
        if captions is None:
            return self.decoder.sample(enc, num_samples=num_samples, max_len=max_len, temperature=temperature)
        if captions.shape[0] != enc.feats.shape[0] * captions_per_image:
            raise ValueError(
                f"{captions.shape[0]} captions for {enc.feats.shape[0]} images at captions_per_image="
                f"{captions_per_image}: pass exactly captions_per_image captions per image, image-major"
            )
        if captions_per_image > 1:
            enc = enc.with_feats(enc.feats.repeat_interleave(captions_per_image, dim=0))  # (B * K, N, C)
        return self.decoder(enc, captions)

    def log_prob(
        self, captions: Tensor, images: Tensor | None = None, features: EncoderOutput | None = None
    ) -> Tensor:
        """Log-probability (B,) of each caption, ``<end>`` included, under teacher forcing."""
        out = self.forward(captions, images, features)
        targets = captions[:, 1:]  # (B, T)
        logp = out.logits.float().log_softmax(dim=-1).gather(2, targets.unsqueeze(2)).squeeze(2)
        return logp.masked_fill(targets == PAD_ID, 0.0).sum(dim=1)

    @torch.no_grad()
    def generate(
        self,
        images: Tensor | None = None,
        features: EncoderOutput | None = None,
        *,
        beam_size: int = 3,
        max_len: int = 16,
        length_penalty: float = 0.0,
        n_best: int = 1,
        no_repeat_ngram_size: int = 0,
        suppress_unk: bool = False,
    ) -> Generation:
        """Batched beam search; call ``eval()`` first (dropout stays as the module's mode says)."""
        return self.decoder.generate(
            self.image_features(images, features),
            beam_size=beam_size,
            max_len=max_len,
            length_penalty=length_penalty,
            n_best=n_best,
            no_repeat_ngram_size=no_repeat_ngram_size,
            suppress_unk=suppress_unk,
        )
