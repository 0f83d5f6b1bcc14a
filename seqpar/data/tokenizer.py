"""Tokenizers: the built-in byte-level one (offline, the demo) or any Hugging Face one.

`ByteTokenizer` needs no files and no network: ids 0..255 are the UTF-8 bytes, 256..258
are bos/eos/pad, 259 is unk (never produced); vocab_size 260. `save_pretrained` writes a
small `seqpar_tokenizer.json` (what `load_tokenizer` reads back) and, next to it, an
equivalent Hugging Face `tokenizer.json`, so an exported model directory also loads with
plain `transformers.AutoTokenizer.from_pretrained` and gives the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SeqparError

BYTE_CONFIG = "seqpar_tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as tokens. Enough of the HF tokenizer interface for seqpar and `datasets.map`."""

    identity = "seqpar-byte-v1"  # part of the packed-data cache key
    name_or_path = "byte"
    bos_token_id, eos_token_id, pad_token_id, unk_token_id = 256, 257, 258, 259
    bos_token, eos_token, pad_token, unk_token = "<bos>", "<eos>", "<pad>", "<unk>"
    vocab_size = 260
    SPECIALS = {256: "<bos>", 257: "<eos>", 258: "<pad>", 259: "<unk>"}

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=260, bos=256, eos=257, pad=258)"

    def encode(self, text: str, add_special_tokens: bool = False, **_) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = False, **_) -> str:
        if hasattr(ids, "tolist"):  # tensors / numpy arrays
            ids = ids.tolist()
        out, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special_tokens:
                out.append(self.SPECIALS.get(i, "<unk>"))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def __call__(self, text, add_special_tokens: bool = False, return_attention_mask: bool = False, **_) -> dict:
        """`tok("a")` -> {"input_ids": [...]}; `tok(["a", "b"])` -> {"input_ids": [[...], [...]]}."""
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            mask = [1] * len(ids)
        else:
            ids = [self.encode(t, add_special_tokens) for t in text]
            mask = [[1] * len(x) for x in ids]
        return {"input_ids": ids, "attention_mask": mask} if return_attention_mask else {"input_ids": ids}

    def save_pretrained(self, save_directory) -> tuple[str, ...]:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / BYTE_CONFIG).write_text(json.dumps(
            {"type": "byte", "version": 1, "vocab_size": self.vocab_size, "bos_token_id": self.bos_token_id,
             "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
             "unk_token_id": self.unk_token_id}, indent=2) + "\n")
        hf_files = self.to_hf().save_pretrained(str(path))
        return (str(path / BYTE_CONFIG), *hf_files)

    @classmethod
    def from_pretrained(cls, directory) -> "ByteTokenizer":
        meta = json.loads((Path(directory) / BYTE_CONFIG).read_text())
        if meta.get("type") != "byte" or meta.get("version") != 1:
            raise SeqparError(f"{directory}/{BYTE_CONFIG} is not a seqpar byte tokenizer (v1); "
                              "re-export it with this version of seqpar.")
        return cls()

    def to_hf(self):
        """The same tokenizer as a transformers fast tokenizer (identical ids, no merges)."""
        from tokenizers import Tokenizer, decoders, models  # deferred: tokenizers, only for the byte tokenizer's HF form
        from tokenizers.pre_tokenizers import ByteLevel  # deferred: as above
        from transformers import PreTrainedTokenizerFast  # deferred: transformers (heavy), as above
        from transformers.convert_slow_tokenizer import bytes_to_unicode  # deferred: as above

        # ByteLevel maps each byte to a printable character; give that character the byte's id.
        vocab = {char: byte for byte, char in bytes_to_unicode().items()}
        vocab.update({name: i for i, name in self.SPECIALS.items()})
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=self.unk_token))
        tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=self.bos_token, eos_token=self.eos_token,
                                       pad_token=self.pad_token, unk_token=self.unk_token)


def load_tokenizer(name_or_path):
    """"byte" (or a directory saved by ByteTokenizer) -> ByteTokenizer; else a transformers
    AutoTokenizer from a local directory (or a hub name, when a hub is reachable)."""
    if name_or_path is None:
        raise SeqparError("no tokenizer given; set model.tokenizer to 'byte' (the built-in byte-level "
                          "tokenizer) or to a Hugging Face tokenizer name or directory.")
    name = str(name_or_path)
    if name == "byte" or (Path(name) / BYTE_CONFIG).is_file():
        return ByteTokenizer() if name == "byte" else ByteTokenizer.from_pretrained(name)
    from transformers import AutoTokenizer  # deferred: transformers (heavy), only for a named tokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise SeqparError(f"cannot load tokenizer '{name}' ({exc}); give a local directory with "
                          "tokenizer files, a hub name when online, or 'byte' for the built-in one.") from exc


def tokenizer_identity(tokenizer) -> str:
    """A string that changes whenever the tokenizer would produce different ids (cache key)."""
    ident = getattr(tokenizer, "identity", None)
    if isinstance(ident, str):
        return ident
    from datasets.fingerprint import Hasher  # deferred: datasets (heavy)

    # datasets knows how to hash transformers tokenizers deterministically (vocab, merges, specials).
    return f"{getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}:{Hasher.hash(tokenizer)}"
