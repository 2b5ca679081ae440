"""The DiT teacher's T5 text tower: a unigram tokenizer over the caption vocabulary and a tiny
``T5EncoderModel`` (the layout of FLUX's ``text_encoder_2`` / ``tokenizer_2`` slots).

FluxPipeline runs the T5 encoder without an attention mask on prompts padded to
``max_sequence_length`` (512 by default), so the encoder is trained on random padded lengths up to
512: what a caption's tokens read must not depend on how many pads follow them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastgen.data import digits as dw

#: Extra words the tokenizer knows besides the captions' (so that a typical prompt is not all characters).
EXTRA_WORDS = ("a", "an", "of", "photo", "image", "cat", "dog", "number", "picture", "drawn")
#: Padded lengths the encoder is trained on (512 is FluxPipeline's default ``max_sequence_length``).
TRAIN_LENGTHS = (16, 24, 32, 48, 64, 128, 256, 512)


def unigram_vocab() -> list[tuple[str, float]]:
    """T5's vocabulary layout (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then pieces with log-probabilities):
    every caption word as a whole ``▁word`` piece, and single characters so that any other lowercase
    ASCII text still tokenizes (as T5's own vocabulary would, piece by piece)."""
    words = sorted({w for c in dw.all_captions() for w in c.lower().split()} | set(EXTRA_WORDS))
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-") | {c for w in words for c in w})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -1.0) for w in words]
    vocab += [(c, -6.0) for c in chars] + [("▁" + c, -5.0) for c in chars if "▁" + c not in dict(vocab)]
    return vocab


def build_t5_tokenizer(out: Path):
    """A ``T5Tokenizer`` (the class FluxPipeline's ``tokenizer_2`` slot expects) over :func:`unigram_vocab`."""
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast(vocab=unigram_vocab(), extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(out)
    return tokenizer


def make_t5_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=16, relative_attention_max_distance=64, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, tie_word_embeddings=False,
    )
    return T5EncoderModel(config)


def build_t5_encoder(out: Path, tokenizer, steps: int, seed: int):
    """Tiny ``T5EncoderModel`` whose caption tokens are trained to name the digit and the colour.

    Runs as FluxPipeline runs it (no attention mask) on captions padded to a random length from
    :data:`TRAIN_LENGTHS`; the heads read the mean over the caption's own tokens (up to ``</s>``), and
    those tokens' outputs are pulled towards their outputs at the shortest length, so that they do not
    depend on the number of pads that follow.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = make_t5_encoder(len(tokenizer))
    heads = torch.nn.Linear(model.config.d_model, 10 + len(dw.PALETTE))
    prompts, digits, colours = dw.labelled_captions()
    opt = torch.optim.AdamW(list(model.parameters()) + list(heads.parameters()), lr=1e-3, weight_decay=0.01)
    model.train()
    loss = torch.tensor(0.0)
    for _ in tqdm(range(steps), desc="t5 encoder", mininterval=5):
        length = TRAIN_LENGTHS[int(torch.randint(0, len(TRAIN_LENGTHS), (1,), generator=gen))]
        batch = 64 if length <= 64 else 16
        idx = torch.randint(0, len(prompts), (batch,), generator=gen)
        texts = [prompts[i] for i in idx]
        tok = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        short = tokenizer(texts, padding="max_length", max_length=TRAIN_LENGTHS[0], truncation=True,
                          return_tensors="pt").input_ids
        hidden = model(tok.input_ids)[0]
        mask = tok.attention_mask.unsqueeze(-1).to(hidden.dtype)
        logits = heads((hidden * mask).sum(1) / mask.sum(1))
        n = TRAIN_LENGTHS[0]
        invariance = ((hidden[:, :n] - model(short)[0]) * mask[:, :n]).square().sum() / (mask[:, :n].sum() * hidden.shape[-1])
        loss = (F.cross_entropy(logits[:, :10], digits[idx]) + F.cross_entropy(logits[:, 10:], colours[idx])
                + invariance)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    from fastgen.io import atomic_folder

    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
    return model, {"final_loss": float(loss.detach())}
