"""The converted CLIP vocabulary tokenizes exactly as CLIP's own BPE rules say.

`reference_encode` below is an independent, pure-python transcription of CLIP's
`SimpleTokenizer` (lower-case, split with CLIP's regex, map bytes to unicode, apply the
ranked merges), reading the packaged gzip directly, not the converted files.
"""

import gzip
import html
from importlib import resources

import pytest
import regex

from scanner.clip_vocab import write_clip_tokenizer

CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)

LONG_PROMPT = " ".join(f"word{i}" for i in range(100))
PROMPTS = [
    "",
    "a photo of an astronaut riding a horse on mars",
    "The No Limits Business Woman Podcast",
    "Mothers influence on her young hippo",
    "\"Watch: Passion Pit's New Video, \"\"Lifted Up (1985)\"\"\"",
    "Sony Won't Release <i>The Interview</i> on VOD",
    "<em>South Park: The Stick of Truth</em> Review (Multi-Platform)",
    "Shaw Floors All Star Weekend I 15′ Castaway 00400_E0141",
    "Big Brows – Juicy Palette • iPhone Case",
    "Шина Pirelli Scorpion Verde All Season 255/60 R18 112H",
    "cohesion, wedding, flowers, hair, red hair, red ro barely there iPhone 6 case",
    "Air Conditioners & Parts",
    "café crème brûlée über naïve façade",
    "I'm sure they'll say you've done it, we'd've known",
    "UPPER lower MiXeD CaSe",
    "numbers 1234567890 and 3.14159 and -42",
    "emoji 🎨🐍 rocket 🚀 and symbols @#$%^&*()",
    "tabs\tand\nnewlines   and    spaces",
    "hyphen-ated words_with_underscores and/slashes",
    "a red circle at the top left",
    "photo of a small blue square in the middle",
    "Ελληνικά γράμματα και λέξεις",
    "!!!???...,,,;;;",
    "<|startoftext|> literal special tokens <|endoftext|>",
    "zxqv qwxz jjjjjjjjjj aaaaaaaaaaaaaaaaaaaa",
    "Renegade RSS Laptop Backpack - View 51",
    "the the the the the",
    "Pencil pleat curtains in collection Velvet, fabric: 704-83",
    "a" * 300,
    " ".join(["long prompt"] * 60),
    LONG_PROMPT,
    "Tiger Wisdom - Throw Pillow",
    "Design Art Abstract Watercolor Canvas Print",
]
# CJK is left out: CLIP's regex keeps a run of ideographs as one word, Hugging Face's
# pre-tokenizer isolates each one (Stable Diffusion itself uses the latter).


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ReferenceBPE:
    """CLIP's SimpleTokenizer, transcribed."""

    def __init__(self):
        raw = resources.files("scanner.data").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
        merges = [tuple(m.split()) for m in gzip.decompress(raw).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]]
        self.byte_encoder = _bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab.extend(["<|startoftext|>", "<|endoftext|>"])
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}

    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            bigram = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if bigram not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == bigram:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text):
        text = " ".join(html.unescape(html.unescape(text)).split()).lower()
        ids = []
        for token in CLIP_PATTERN.findall(text):
            if token in ("<|startoftext|>", "<|endoftext|>"):
                ids.append(self.encoder[token])
                continue
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token))
        return ids

    def sd_input_ids(self, text):
        """Stable Diffusion's 77 ids: BOS, up to 75 tokens, EOS, padded with EOS."""
        body = self.encode(text)[:75]
        ids = [49406] + body + [49407]
        return ids + [49407] * (77 - len(ids))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def reference():
    return ReferenceBPE()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_token_ids_match_clip_bpe(tokenizer, reference, prompt):
    got = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert got == reference.sd_input_ids(prompt)


def test_vocabulary_shape(tokenizer):
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert tokenizer.model_max_length == 77


def test_long_prompts_truncate_at_77(tokenizer, reference):
    ids = tokenizer(LONG_PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407
    assert len(reference.encode(LONG_PROMPT)) > 75
