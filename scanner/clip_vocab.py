"""CLIP's byte-level BPE vocabulary, converted into the files `CLIPTokenizer` reads.

OpenAI ships the vocabulary as one gzipped merges list (`bpe_simple_vocab_16e6.txt.gz`);
Hugging Face's `CLIPTokenizer` reads `vocab.json` + `merges.txt`. The conversion below is
the one CLIP's own `SimpleTokenizer` performs when it builds its encoder table.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# CLIP keeps the first 49152 - 256 - 2 merges: 256 byte tokens, their `</w>` twins, the
# merges and two special tokens make the 49408-entry vocabulary.
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def load_merges(bpe_gz: Path | None = None) -> list[tuple[str, str]]:
    """The merges list from the gzipped BPE file (the packaged copy by default)."""
    if bpe_gz is None:
        data = resources.files("scanner.data").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    else:
        data = Path(bpe_gz).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # type: ignore[misc]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id, in CLIP's order: bytes, bytes + `</w>`, merges, special tokens."""
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def write_clip_tokenizer(out_dir: str | Path, bpe_gz: Path | None = None, pad_token: str = EOS_TOKEN) -> Path:
    """Write `vocab.json`, `merges.txt` and the configs of Stable Diffusion's CLIP tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = load_merges(bpe_gz)
    (out / "vocab.json").write_text(json.dumps(build_vocab(merges), ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return out
