"""Text data: a text column and a class column (``text``), a text column alone to
model (``corpus``, for language models), or a source and a target text (``text_pair``,
for sequence-to-sequence).

Cleaning is the tokenizer's normalizer (Unicode NFKC, URLs and @mentions replaced,
lowercase), so serving cleans exactly as training did. The WordPiece vocabulary is
trained with Hugging Face ``tokenizers`` on the training split only, streamed from Ray
Data to the driver, and stored in ``preprocessor.json`` with the rest of the state.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from forgeml.config import CorpusFeatures as CorpusConfig
from forgeml.config import ExperimentConfig
from forgeml.config import TextFeatures as TextConfig
from forgeml.config import TextPairFeatures as TextPairConfig
from forgeml.data.base import ModelInputs, TargetSpec, register_features, register_preprocessor
from forgeml.data.columns import (
    first_reason,
    mark_class_rejects,
    no_rejects,
    parse_categories,
    unseen_class_reasons,
)

PAD, UNKNOWN = "[PAD]", "[UNK]"
#: Where a text starts and ends, for language models.
BOS, EOS = "[BOS]", "[EOS]"
URL_OR_MENTION = r"https?://\S+|www\.\S+|@\w+"


def normalizer(cfg: TextConfig) -> normalizers.Normalizer:
    steps = [normalizers.NFKC()]
    if cfg.strip_urls_and_mentions:
        steps.append(normalizers.Replace(Regex(URL_OR_MENTION), " "))
    if cfg.lowercase:
        steps.append(normalizers.Lowercase())
    return normalizers.Sequence(steps)


def _texts(values) -> list[str | None]:
    return [value if isinstance(value, str) else None for value in values]


def empty_text_reasons(values, column: str, clean: normalizers.Normalizer | None) -> np.ndarray:
    """Reasons for texts that are missing, or blank once cleaned (if ``clean`` is given)."""
    reasons = no_rejects(len(values))
    for i, value in enumerate(_texts(values)):
        if value is None or not (clean.normalize_str(value) if clean else value).strip():
            reasons[i] = f"{column}: empty text"
    return reasons


def train_wordpiece(
    texts: Iterable[str], cfg: TextConfig | CorpusConfig, special_tokens: list[str]
) -> Tokenizer:
    """A WordPiece tokenizer with the config's cleaning, trained on ``texts`` (read once);
    the special tokens get the first ids, in order ([PAD] is 0)."""
    tokenizer = Tokenizer(models.WordPiece(unk_token=UNKNOWN))
    tokenizer.normalizer = normalizer(cfg)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(
        texts,
        trainers.WordPieceTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=special_tokens,
            show_progress=False,
        ),
    )
    return tokenizer


def text_request_columns(instances, column: str) -> dict[str, np.ndarray]:
    """Request instances of the form ``{column: text}`` as a text column."""
    texts = []
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict) or set(instance) != {column}:
            raise ValueError(f"instances.{i}: expected an object with one field, {column!r}")
        value = instance[column]
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"instances.{i}.{column}: expected non-empty text")
        texts.append(value)
    return {column: np.array(texts, dtype=object)}


@dataclass(frozen=True)
class TextColumns:
    """What the text kinds share before fitting: the columns they read (the ones each
    kind's ``named`` property lists, and the id column if any; without one, rows are
    known by their position), no classes unless the kind has them, and no compaction."""

    cfg: TextConfig | CorpusConfig | TextPairConfig  # each kind narrows it
    id_column: str | None
    columns: list[str] = field(init=False)
    augmentable = False

    def __post_init__(self):
        extra = [self.id_column] if self.id_column else []
        object.__setattr__(self, "columns", [*self.named, *extra])

    def classes(self, batch):
        return None

    def compact(self, batch, reasons):
        return batch


@dataclass(frozen=True)
class TextColumnFeatures(TextColumns):
    """The text and class columns ``data.features`` names, checked before fitting."""

    cfg: TextConfig

    @property
    def named(self) -> list[str]:
        return [self.cfg.text, self.cfg.target]

    def classes(self, batch):
        return parse_categories(batch[self.cfg.target])

    def reject_reasons(self, batch):
        """Texts that are missing or empty once cleaned, and missing or undeclared classes."""
        text, target = self.cfg.text, self.cfg.target
        reasons = empty_text_reasons(batch[text], text, normalizer(self.cfg))
        mark_class_rejects(reasons, batch[target], target, self.cfg.class_names)
        return reasons

    def fit(self, train):
        """Train the vocabulary on the training texts, streamed to this process once."""
        return self.fit_batches(train.iter_batches(batch_size=4096, batch_format="numpy"))

    def fit_batches(self, batches) -> TextPreprocessor:
        """Fit on an iterable of raw training batches (read once)."""
        labels: Counter[str] = Counter()

        def texts():
            for batch in batches:
                labels.update(parse_categories(batch[self.cfg.target]))
                yield from (text for text in _texts(batch[self.cfg.text]) if text)

        tokenizer = train_wordpiece(texts(), self.cfg, [PAD, UNKNOWN])
        if not labels:
            raise ValueError("the training split is empty: add data or lower the split fractions")
        classes = self.cfg.class_names or sorted(labels)
        if len(classes) < 2:
            raise ValueError(
                f"column {self.cfg.target!r}: the training split holds {len(classes)} class "
                f"({classes}); classification needs at least 2"
            )
        return TextPreprocessor(
            tokenizer=tokenizer.to_str(),
            max_length=self.cfg.max_length,
            text_column=self.cfg.text,
            target_column=self.cfg.target,
            target_spec=TargetSpec(classes=tuple(classes), name=self.cfg.target),
        )


@dataclass(frozen=True)
class TokenizedText:
    """What both text kinds store: the trained tokenizer (JSON), the token length of the
    model's input, and the text column."""

    tokenizer: str
    max_length: int
    text_column: str

    def __post_init__(self):
        object.__setattr__(self, "_tokenizer", Tokenizer.from_str(self.tokenizer))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def model_inputs(self) -> ModelInputs:
        return ModelInputs(
            shape=(self.max_length,), data=self.data, dtype="int64", vocab_size=self.vocab_size
        )

    def request_columns(self, instances):
        return text_request_columns(instances, self.text_column)

    def token_attributions(self, ids: np.ndarray, attributions: np.ndarray) -> list[list]:
        """Per row of (N, L) token ids, its real tokens (as the vocabulary spells them)
        with their attributions, in text order."""
        return [
            [
                (f"{position}:{self._tokenizer.id_to_token(int(token))}", float(value))
                for position, (token, value) in enumerate(zip(row, values, strict=True))
                if token != 0
            ]
            for row, values in zip(ids, attributions, strict=True)
        ]

    def input_summary(self, inputs):
        """Tokens per text and the share of them outside the vocabulary."""
        real = inputs != 0
        tokens = real.sum(1)
        unknown = (inputs == self._tokenizer.token_to_id(UNKNOWN)).sum(1)
        return {"tokens": tokens.astype(float), "unknown_share": unknown / np.maximum(tokens, 1)}

    def describe(self) -> dict:
        return {
            "kind": "text",
            "field": self.text_column,
            "max_length": self.max_length,
            "vocab_size": self.vocab_size,
        }

    def _state(self) -> dict:
        return {
            "kind": self.kind,
            "tokenizer": json.loads(self.tokenizer),
            "max_length": self.max_length,
            "text_column": self.text_column,
        }

    @staticmethod
    def _fields(state: dict) -> dict:
        fields = {k: v for k, v in state.items() if k != "kind"}
        return {**fields, "tokenizer": json.dumps(fields["tokenizer"])}


@register_preprocessor
@dataclass(frozen=True)
class TextPreprocessor(TokenizedText):
    """Texts padded or cut to ``max_length`` tokens, and the classes of the target column."""

    target_column: str
    target_spec: TargetSpec

    kind = "text-wordpiece"
    data = "text"
    refuses_rows = True  # a class the training split lacks

    def __post_init__(self):
        super().__post_init__()
        self._tokenizer.enable_truncation(self.max_length)
        self._tokenizer.enable_padding(
            length=self.max_length, pad_id=self._tokenizer.token_to_id(PAD), pad_token=PAD
        )

    @property
    def target(self) -> TargetSpec:
        return self.target_spec

    def reject_reasons(self, batch):
        return unseen_class_reasons(
            batch[self.target_column], self.target_column, self.target_spec.classes
        )

    def token_ids(self, texts: list[str]) -> np.ndarray:
        """(N, max_length) int64 ids, padded with 0."""
        encoded = self._tokenizer.encode_batch([t or "" for t in texts])
        return np.array([e.ids for e in encoded], dtype=np.int64).reshape(len(texts), -1)

    def transform(self, batch):
        out = {"inputs": self.token_ids(_texts(batch[self.text_column]))}
        if self.target_column in batch:
            index = {name: i for i, name in enumerate(self.target_spec.classes)}
            labels = parse_categories(batch[self.target_column])
            out["target"] = np.array([index[label] for label in labels], dtype=np.int64)
        return out

    def to_dict(self) -> dict:
        return {
            **self._state(),
            "target_column": self.target_column,
            "target_spec": self.target_spec.to_dict(),
        }

    @classmethod
    def from_dict(cls, state: dict) -> TextPreprocessor:
        fields = cls._fields(state)
        return cls(**{**fields, "target_spec": TargetSpec.from_dict(fields["target_spec"])})


# ----------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class CorpusFeatures(TextColumns):
    """The text column of a corpus to model, checked before fitting."""

    cfg: CorpusConfig

    @property
    def named(self) -> list[str]:
        return [self.cfg.text]

    def reject_reasons(self, batch):
        return empty_text_reasons(batch[self.cfg.text], self.cfg.text, normalizer(self.cfg))

    def fit(self, train):
        """Train the vocabulary on the training texts, streamed to this process once."""
        return self.fit_batches(train.iter_batches(batch_size=4096, batch_format="numpy"))

    def fit_batches(self, batches) -> CorpusPreprocessor:
        seen = 0

        def texts():
            nonlocal seen
            for batch in batches:
                for text in _texts(batch[self.cfg.text]):
                    if text:
                        seen += 1
                        yield text

        tokenizer = train_wordpiece(texts(), self.cfg, [PAD, UNKNOWN, BOS, EOS])
        if not seen:
            raise ValueError("the training split is empty: add data or lower the split fractions")
        return CorpusPreprocessor(
            tokenizer=tokenizer.to_str(), max_length=self.cfg.max_length, text_column=self.cfg.text
        )


@register_preprocessor
@dataclass(frozen=True)
class CorpusPreprocessor(TokenizedText):
    """Each text as [BOS] tokens [EOS], cut to ``max_length`` + 1 tokens and padded: the
    model reads the first ``max_length`` and predicts each next one."""

    kind = "text-corpus"
    data = "corpus"
    refuses_rows = False

    @property
    def target(self) -> TargetSpec:
        return TargetSpec(name=self.text_column, vocab_size=self.vocab_size)

    def reject_reasons(self, batch):
        return no_rejects(len(batch[self.text_column]))

    @property
    def start_id(self) -> int:
        return self._tokenizer.token_to_id(BOS)

    @property
    def end_id(self) -> int:
        return self._tokenizer.token_to_id(EOS)

    def prompt_ids(self, text: str) -> list[int]:
        """[BOS] and the tokens of ``text``: the start of a text to continue."""
        return [self.start_id, *self._tokenizer.encode(text).ids]

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def transform(self, batch):
        texts = [text or "" for text in _texts(batch[self.text_column])]
        framed = np.zeros((len(texts), self.max_length + 1), dtype=np.int64)
        for row, encoding in enumerate(self._tokenizer.encode_batch(texts)):
            ids = [self.start_id, *encoding.ids, self.end_id][: self.max_length + 1]
            framed[row, : len(ids)] = ids
        return {"inputs": framed[:, :-1], "target": framed[:, 1:]}

    def to_dict(self) -> dict:
        return self._state()

    @classmethod
    def from_dict(cls, state: dict) -> CorpusPreprocessor:
        return cls(**cls._fields(state))


# ----------------------------------------------------------------------- text pairs


def train_byte_bpe(texts: Iterable[str], cfg: TextPairConfig) -> Tokenizer:
    """A byte-level BPE tokenizer trained on ``texts`` (read once): every text encodes and
    decodes back to itself, spaces and case included, which exact-match scoring needs."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNKNOWN))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=[PAD, UNKNOWN, BOS, EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return tokenizer


@dataclass(frozen=True)
class TextPairFeatures(TextColumns):
    """The source and target columns of a text-to-text task, checked before fitting."""

    cfg: TextPairConfig

    @property
    def named(self) -> list[str]:
        return [self.cfg.source, self.cfg.target]

    def reject_reasons(self, batch):
        source, target = self.cfg.source, self.cfg.target
        return first_reason(
            empty_text_reasons(batch[source], source, None),
            empty_text_reasons(batch[target], target, None),
        )

    def fit(self, train):
        """Train one vocabulary on both sides' training texts, streamed here once."""
        return self.fit_batches(train.iter_batches(batch_size=4096, batch_format="numpy"))

    def fit_batches(self, batches) -> TextPairPreprocessor:
        seen = 0

        def texts():
            nonlocal seen
            for batch in batches:
                seen += len(batch[self.cfg.source])
                yield from _texts(batch[self.cfg.source])
                yield from _texts(batch[self.cfg.target])

        tokenizer = train_byte_bpe(texts(), self.cfg)
        if not seen:
            raise ValueError("the training split is empty: add data or lower the split fractions")
        return TextPairPreprocessor(
            tokenizer=tokenizer.to_str(),
            max_length=self.cfg.max_length,
            text_column=self.cfg.source,
            target_column=self.cfg.target,
        )


@register_preprocessor
@dataclass(frozen=True)
class TextPairPreprocessor(TokenizedText):
    """Inputs (2, max_length): the source's tokens, and the decoder's input ([BOS] and
    the target's tokens); the target is the target's tokens and [EOS]. Padded with 0."""

    target_column: str

    kind = "text-pair"
    refuses_rows = True  # texts longer than max_length: cut, they could not be learned

    @property
    def model_inputs(self) -> ModelInputs:
        return ModelInputs(
            shape=(2, self.max_length), data="text_pair", dtype="int64", vocab_size=self.vocab_size
        )

    @property
    def target(self) -> TargetSpec:
        return TargetSpec(name=self.target_column, vocab_size=self.vocab_size)

    @property
    def start_id(self) -> int:
        return self._tokenizer.token_to_id(BOS)

    @property
    def end_id(self) -> int:
        return self._tokenizer.token_to_id(EOS)

    def reject_reasons(self, batch):
        """Sources longer than ``max_length`` tokens, targets longer than one less (the
        room [BOS] or [EOS] takes)."""
        reasons = no_rejects(len(batch[self.text_column]))
        for column, room in (
            (self.text_column, self.max_length),
            (self.target_column, self.max_length - 1),
        ):
            encoded = self._tokenizer.encode_batch([t or "" for t in _texts(batch[column])])
            long = np.array([len(e.ids) > room for e in encoded]) & (reasons == "")
            reasons[long] = f"{column}: longer than {room} tokens (data.features.max_length)"
        return reasons

    def _padded(self, sequences: list[list[int]]) -> np.ndarray:
        out = np.zeros((len(sequences), self.max_length), dtype=np.int64)
        for row, ids in enumerate(sequences):
            ids = ids[: self.max_length]
            out[row, : len(ids)] = ids
        return out

    def source_ids(self, texts) -> np.ndarray:
        """(N, max_length) token ids of source texts."""
        encoded = self._tokenizer.encode_batch([text or "" for text in _texts(texts)])
        return self._padded([e.ids for e in encoded])

    def decode(self, ids) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def check_sources(self, texts: list[str]) -> None:
        """ValueError naming the first text that is blank or longer than the model reads."""
        for i, text in enumerate(texts):
            if not text.strip():
                raise ValueError(f"prompt {i + 1}: empty text")
            tokens = len(self._tokenizer.encode(text).ids)
            if tokens > self.max_length:
                raise ValueError(
                    f"prompt {i + 1}: {tokens} tokens, more than the {self.max_length} "
                    "the model reads (data.features.max_length)"
                )

    def describe(self) -> dict:
        return {**super().describe(), "kind": "text_pair"}

    def transform(self, batch):
        source = self.source_ids(batch[self.text_column])
        if self.target_column not in batch:
            return {"inputs": np.stack([source, np.zeros_like(source)], axis=1)}
        targets = [
            e.ids
            for e in self._tokenizer.encode_batch(
                [text or "" for text in _texts(batch[self.target_column])]
            )
        ]
        decoder_input = self._padded([[self.start_id, *ids] for ids in targets])
        return {
            "inputs": np.stack([source, decoder_input], axis=1),
            "target": self._padded([[*ids, self.end_id] for ids in targets]),
        }

    def input_summary(self, inputs):
        return super().input_summary(inputs[:, 0])

    def to_dict(self) -> dict:
        return {**self._state(), "target_column": self.target_column}

    @classmethod
    def from_dict(cls, state: dict) -> TextPairPreprocessor:
        return cls(**cls._fields(state))


@register_features("text")
def text_features(cfg: ExperimentConfig) -> TextColumnFeatures:
    return TextColumnFeatures(cfg.data.features, cfg.data.source.id_column)


@register_features("corpus")
def corpus_features(cfg: ExperimentConfig) -> CorpusFeatures:
    return CorpusFeatures(cfg.data.features, cfg.data.source.id_column)


@register_features("text_pair")
def text_pair_features(cfg: ExperimentConfig) -> TextPairFeatures:
    return TextPairFeatures(cfg.data.features, cfg.data.source.id_column)
