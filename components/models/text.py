"""Text to image in small: captions built from the class names and their synonyms, the prompt
parser that finds which class a prompt names, and a small text encoder trained with the generator.

Everything here is rebuilt from the class names alone (plus the tables below), so a saved model's
vocabulary comes back identical; a fingerprint of it is saved with the weights, and weights saved
under another vocabulary refuse to load instead of mapping words to the wrong embeddings.

Prompts: a prompt must name exactly one class. Class phrases are matched as whole words, longest
first ("ankle boot" before "boot"), after a plural-folding step ("sneakers" = "sneaker"); words
the vocabulary lacks are ignored by the encoder. A prompt naming no class, or two different
classes ("a shirt and a coat"), raises ValueError("prompt: …") listing the words understood.
"""
from __future__ import annotations

import hashlib
import re

import torch
from torch import nn

# What each Fashion-MNIST class is also called (lower-case class name → phrases), besides its
# own words; any other dataset's classes are named by their own words alone.
SYNONYMS: dict[str, list[str]] = {
    "t-shirt/top": ["t-shirt", "tee", "top", "t shirt", "tshirt"],
    "trouser": ["trousers", "pants", "jeans"],
    "pullover": ["pullover", "sweater", "jumper"],
    "dress": ["dress", "gown"],
    "coat": ["coat", "jacket"],
    "sandal": ["sandal", "flip-flops"],
    "shirt": ["shirt", "blouse"],
    "sneaker": ["sneaker", "trainers", "running shoe"],
    "bag": ["bag", "handbag", "purse"],
    "ankle boot": ["ankle boot", "boots"],
}
# Caption templates; the first one, with a class's first phrase, is the class's canonical caption
# (what a request by label is encoded as).
TEMPLATES = ["{}", "a photo of a {}", "a {}", "a pair of {}", "an image of a {}", "a picture of {}"]

PAD = 0  # token id of padding and of words the vocabulary lacks: left out of the average
_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")  # "t-shirt" and "flip-flops" stay one word


def _fold_plural(word: str) -> str:
    """A crude singular: "sneakers" → "sneaker", "dresses" → "dress"; "dress" stays "dress"."""
    if word.endswith("sses"):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def words(text: str) -> tuple[str, ...]:
    return tuple(_fold_plural(w) for w in _WORD.findall(text.lower()))


def class_phrases(classes: list[str]) -> list[list[str]]:
    """Per class, the phrases that name it (lower case, as written; compared through `words`): its
    full name, each of its words that no other class's name shares (so "class 3" is named by
    "class 3" alone), then its synonyms from SYNONYMS unless another class is called that."""
    names = [words(c) for c in classes]
    own = []
    for k, (cls, name) in enumerate(zip(classes, names)):
        others = {w for j, n in enumerate(names) if j != k for w in n}
        own.append([cls.lower()] + [w for w in _WORD.findall(cls.lower()) if _fold_plural(w) not in others])
    taken = {words(p) for ps in own for p in ps}
    phrases = []
    for cls, ps in zip(classes, own):
        synonyms = [s for s in SYNONYMS.get(cls.lower(), []) if words(s) not in taken]
        spelling: dict[tuple[str, ...], str] = {}
        for p in ps + synonyms:
            spelling.setdefault(words(p), p)  # "trouser" and "trousers" are one phrase; the first spelling shows
        unique = [p for key, p in spelling.items() if key]
        if not unique:
            raise ValueError(f"classes: {cls!r} has no word a prompt could name it by; rename the class")
        phrases.append(unique)
    return phrases


class Vocabulary:
    """Class phrases, caption token tables and the prompt parser for one list of class names."""

    def __init__(self, classes: list[str]):
        self.classes = list(classes)
        self.phrases = class_phrases(self.classes)
        owner: dict[tuple[str, ...], int] = {}
        for k, ps in enumerate(self.phrases):
            for p in ps:
                if owner.setdefault(words(p), k) != k:
                    raise ValueError(f"classes: {p!r} names both {self.classes[owner[words(p)]]!r} and "
                                     f"{self.classes[k]!r}; rename one of them")
        self._owner = owner
        self._longest = max(len(p) for p in owner)
        tokens = {w for t in TEMPLATES for w in words(t.format(""))} | {w for p in owner for w in p}
        self.index = {w: i + 1 for i, w in enumerate(sorted(tokens))}  # 0 is PAD
        self.captions = [[t.format(p) for t in TEMPLATES for p in ps] for ps in self.phrases]

    def __len__(self) -> int:
        return len(self.index) + 1

    def fingerprint(self) -> int:
        """A 63-bit hash of what trained weights depend on: the word → id table and the captions
        that requests by label are encoded as."""
        table = [f"{w}\t{i}" for w, i in sorted(self.index.items())]
        blob = "\n".join(table + [self.canonical(k) for k in range(len(self.classes))]).encode()
        return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Token ids, (len(texts), longest) int64, right-padded with PAD; unknown words → PAD."""
        ids = [[self.index.get(w, PAD) for w in words(t)] for t in texts]
        width = max(1, max(len(i) for i in ids))
        return torch.tensor([i + [PAD] * (width - len(i)) for i in ids], dtype=torch.long)

    def prompt_tokens(self, prompts: list[str], n: int) -> torch.Tensor:
        """Prompts (n strings, each naming one class) → token ids (n, L); ValueError "prompt: …" unless
        each names exactly one class."""
        if isinstance(prompts, str) or len(prompts) != n:
            raise ValueError(f"prompts: expected a list of {n} prompts, one per image, got {prompts!r}")
        for p in prompts:
            self.class_of(p)
        return self.encode(list(prompts))

    def canonical(self, k: int) -> str:
        return self.captions[k][0]

    def understood(self) -> str:
        return "; ".join(f"{', '.join(ps)} ({cls})" for cls, ps in zip(self.classes, self.phrases))

    def class_of(self, prompt: str) -> int:
        """The class a prompt names (whole phrases, longest first); ValueError "prompt: …" unless one."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt: expected text, got {type(prompt).__name__}")
        ws, found, i = words(prompt), [], 0
        while i < len(ws):
            for length in range(min(self._longest, len(ws) - i), 0, -1):
                k = self._owner.get(ws[i:i + length])
                if k is not None:
                    found.append(k)
                    i += length
                    break
            else:
                i += 1
        named = list(dict.fromkeys(found))
        if not named:
            raise ValueError(f"prompt: {prompt!r} names no class this model knows; name one of: {self.understood()}")
        if len(named) > 1:
            raise ValueError(f"prompt: {prompt!r} names {len(named)} classes "
                             f"({', '.join(self.classes[k] for k in named)}); ask for one class per prompt")
        return named[0]


class TextEncoder(nn.Module):
    """Caption → condition vector: word embeddings averaged (padding and unknown words left out),
    then a two-layer MLP; (N, L) token ids → (N, dim). Trained jointly with the generator.

    Buffers hold every training caption's tokens, so drawing one caption per image is a tensor
    lookup on the training device (no per-sample Python in the step)."""

    def __init__(self, vocab: Vocabulary, dim: int):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(len(vocab), dim, padding_idx=PAD)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(0.2, True), nn.Linear(dim, dim))
        counts = torch.tensor([len(c) for c in vocab.captions])
        self.register_buffer("caption_tokens", vocab.encode([c for cs in vocab.captions for c in cs]),
                             persistent=False)  # (all captions, longest)
        self.register_buffer("caption_start", torch.cumsum(counts, 0) - counts, persistent=False)  # (K,)
        self.register_buffer("caption_count", counts, persistent=False)  # (K,)
        self.register_buffer("canonical_tokens", vocab.encode([vocab.canonical(k) for k in range(len(counts))]),
                             persistent=False)  # (K, longest)
        self.register_buffer("vocab_fingerprint", torch.tensor(vocab.fingerprint()))  # saved with the weights

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        known = (tokens != PAD).unsqueeze(-1).to(self.embed.weight.dtype)  # (N, L, 1)
        mean = (self.embed(tokens) * known).sum(1) / known.sum(1).clamp(min=1)  # (N, dim)
        return self.mlp(mean)

    def random_captions(self, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One caption per label, uniformly among its class's captions: (N,) → (N, L) token ids."""
        u = torch.rand(y.shape, device=y.device, generator=generator)
        pick = self.caption_start[y] + (u * self.caption_count[y]).long().clamp(max=self.caption_count[y] - 1)
        return self.caption_tokens[pick]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "vocab_fingerprint")
        if saved is not None and int(saved) != int(self.vocab_fingerprint):
            raise ValueError("these weights were trained with another text vocabulary (class names, synonyms or "
                             "caption templates changed since); retrain the model")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
