"""domain.cleaning and domain.splitting: max_tokens means the model's tokens,
paragraphs and sentences (English and Chinese) stay whole, and the three
document forms (text, Q&A, parent-child)."""

from __future__ import annotations

import itertools
import random

import pytest

from domain.cleaning import clean_text
from domain.errors import DocumentError, SplitRuleError
from domain.events import DocForm, ProcessRule
from domain.segments import ChunkText
from domain.splitting import CHARS_PER_TOKEN, DEFAULT_SEPARATORS, resolve_rule, split_document
from infra.embedding import ModelTokenCounter, bundled_model_dir
from tests.conftest import HashingEmbeddingDouble

MODEL_LIMIT = 512  # the doubles' "model" input limit


class WordCounter:
    """One token per whitespace-separated word (English-like)."""

    def count_tokens(self, text: str) -> int:
        return len(text.split())


class CharCounter:
    """One token per non-space character (Chinese-like: no spaces between words)."""

    def count_tokens(self, text: str) -> int:
        return sum(1 for ch in text if not ch.isspace())


def rule(**kw: object) -> ProcessRule:
    return ProcessRule(mode="custom", **kw)  # type: ignore[arg-type]


def split(
    text: str,
    counter: object | None = None,
    doc_form: DocForm = DocForm.TEXT,
    model_limit: int = MODEL_LIMIT,
    **kw: object,
) -> list[ChunkText]:
    return split_document(
        text,
        doc_form,
        rule(**kw),
        counter or WordCounter(),
        model_limit,  # type: ignore[arg-type]
    )


def contents(chunks: list[ChunkText]) -> list[str]:
    return [c.content for c in chunks]


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


ZH_SENTENCES = [
    "今天的天气非常好",
    "我们一起去公园散步吧",
    "知识库需要把长文档切分成小段",
    "每一段都不能超过模型的上限",
    "你听说过检索增强生成吗",
    "向量索引和关键词索引要保持一致",
    "这真是太好了",
    "请不要在句子中间切断",
]


def zh_text(n: int, seed: int = 0, enders: str = "。！？") -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(ZH_SENTENCES) + rng.choice(enders) for _ in range(n))


class TestParagraphs:
    def test_paragraphs_that_fit_stay_whole(self) -> None:
        paras = [words(10, 0), words(12, 100), words(9, 200)]
        chunks = split("\n\n".join(paras), max_tokens=16, chunk_overlap=0)
        assert contents(chunks) == paras
        assert [c.tokens for c in chunks] == [10, 12, 9]

    def test_small_paragraphs_are_merged_up_to_max_tokens(self) -> None:
        paras = [words(5, 0), words(5, 100), words(5, 200), words(5, 300)]
        chunks = split("\n\n".join(paras), max_tokens=16, chunk_overlap=0)
        assert contents(chunks) == ["\n\n".join(paras[:3]), paras[3]]

    def test_long_paragraph_is_split_but_its_neighbours_are_not(self) -> None:
        long = ". ".join(words(6, 10 * i) for i in range(5)) + "."
        paras = [words(8, 1000), long, words(8, 2000)]
        chunks = split("\n\n".join(paras), max_tokens=16, chunk_overlap=0)
        assert chunks[0].content == paras[0]
        assert chunks[-1].content == paras[2]
        assert len(chunks) > 3
        assert all(c.tokens <= 16 for c in chunks)
        # no text lost or invented
        assert " ".join(contents(chunks)).split() == " ".join(paras).split()

    def test_empty_after_cleaning_is_a_document_error(self) -> None:
        with pytest.raises(DocumentError, match="no text"):
            split(" \n\t\n  ", max_tokens=16)


class TestSentences:
    def test_english_split_at_sentence_ends(self) -> None:
        sentences = [f"{words(7, 10 * i)}." for i in range(12)]
        chunks = split(" ".join(sentences), max_tokens=16, chunk_overlap=0)
        assert len(chunks) == 6
        for c in chunks:
            assert c.content.endswith("."), c.content
            assert c.tokens <= 16
        assert " ".join(contents(chunks)) == " ".join(sentences)

    def test_english_question_and_exclamation_marks(self) -> None:
        text = f"{words(9, 0)}? {words(9, 100)}! {words(9, 200)}?"
        chunks = split(text, max_tokens=16, chunk_overlap=0)
        assert contents(chunks) == [f"{words(9, 0)}?", f"{words(9, 100)}!", f"{words(9, 200)}?"]

    def test_chinese_chunks_end_at_sentence_ends(self) -> None:
        text = zh_text(40)
        chunks = split(text, CharCounter(), max_tokens=32, chunk_overlap=0)
        assert len(chunks) > 5
        for c in chunks:
            assert c.content[-1] in "。！？", c.content
            assert c.tokens <= 32
        assert "".join(contents(chunks)) == text

    def test_chinese_exclamation_and_question_marks_split_when_needed(self) -> None:
        # no 。 at all: only ！ and ？ separate sentences
        text = zh_text(30, seed=3, enders="！？")
        chunks = split(text, CharCounter(), max_tokens=24, chunk_overlap=0)
        assert len(chunks) > 5
        assert all(c.content[-1] in "！？" for c in chunks)
        assert "".join(contents(chunks)) == text

    def test_sentence_longer_than_max_falls_back_to_clauses(self) -> None:
        text = "，".join(["这是一个很长的从句"] * 8) + "。"
        chunks = split(text, CharCounter(), max_tokens=20, chunk_overlap=0)
        assert all(c.tokens <= 20 for c in chunks)
        assert all(c.content.endswith(("，", "。")) for c in chunks)
        assert "".join(contents(chunks)) == text

    def test_text_without_any_separator_still_fits(self) -> None:
        text = "字" * 100
        chunks = split(text, CharCounter(), max_tokens=16, chunk_overlap=0)
        assert all(c.tokens <= 16 for c in chunks)
        assert "".join(contents(chunks)) == text


class TestOverlap:
    def test_overlap_repeats_the_end_of_the_previous_chunk(self) -> None:
        text = words(60)
        chunks = split(text, max_tokens=16, chunk_overlap=5)
        assert len(chunks) >= 4
        for prev, nxt in itertools.pairwise(chunks):
            prev_words, next_words = prev.content.split(), nxt.content.split()
            shared = [w for w in next_words if w in prev_words]
            assert shared, (prev.content, nxt.content)
            assert len(shared) <= 5
            assert prev_words[-len(shared) :] == next_words[: len(shared)]
        assert all(c.tokens <= 16 for c in chunks)

    def test_zero_overlap_shares_nothing(self) -> None:
        chunks = split(words(60), max_tokens=16, chunk_overlap=0)
        seen: set[str] = set()
        for c in chunks:
            ws = set(c.content.split())
            assert not ws & seen
            seen |= ws
        assert len(seen) == 60

    def test_custom_rule_without_overlap_defaults_to_a_tenth(self) -> None:
        settings = resolve_rule(rule(max_tokens=100), model_max_tokens=512)
        assert settings.chunk_overlap == 10


class TestSeparatorsAndRules:
    def test_custom_separator_is_preferred_over_sentences(self) -> None:
        pieces = [f"{words(4, 10 * i)}. {words(4, 10 * i + 5)}." for i in range(4)]
        text = " | ".join(pieces)
        chunks = split(text, max_tokens=16, separator="|", chunk_overlap=0)
        # each |-delimited piece (10 words) fits alone, two do not: one chunk each,
        # never broken at the ". " inside a piece
        assert len(chunks) == 4
        for c, piece in zip(chunks, pieces, strict=True):
            assert piece in c.content

    def test_custom_separator_text_does_not_end_up_in_chunks(self) -> None:
        pieces = [words(10, 0), words(10, 100), words(10, 200)]
        chunks = split("\n###\n".join(pieces), max_tokens=16, separator="###", chunk_overlap=0)
        assert all("###" not in c.content for c in chunks), contents(chunks)

    def test_escaped_separator_from_json_config(self) -> None:
        settings = resolve_rule(rule(separator="\\n\\n"), model_max_tokens=512)
        assert settings.separator == "\n\n"
        settings = resolve_rule(rule(separator="###"), model_max_tokens=512)
        assert settings.separator == "###"

    def test_automatic_mode_ignores_custom_fields(self) -> None:
        settings = resolve_rule(
            ProcessRule(mode="automatic", max_tokens=16, separator="|"), model_max_tokens=254
        )
        assert settings.max_tokens == 254
        assert settings.chunk_overlap == 25
        assert settings.separator is None

    def test_max_tokens_above_model_limit_is_rejected(self) -> None:
        with pytest.raises(SplitRuleError) as caught:
            split(words(10), max_tokens=300, model_limit=254)
        reason = caught.value.reason
        assert "300" in reason
        assert "254" in reason

    def test_max_tokens_equal_to_model_limit_is_fine(self) -> None:
        chunks = split(words(10), max_tokens=254, model_limit=254)
        assert contents(chunks) == [words(10)]

    def test_parent_size_default(self) -> None:
        assert resolve_rule(rule(max_tokens=64), 254).parent_max_tokens == 512
        assert resolve_rule(rule(max_tokens=200), 254).parent_max_tokens == 800
        assert (
            resolve_rule(rule(max_tokens=64, parent_max_tokens=100), 254).parent_max_tokens == 100
        )


class TestCleaning:
    def test_extra_whitespace_collapsed(self) -> None:
        raw = "  Hello \t  world\u3000again  \r\n\r\n\r\n\n  next\u00a0\u00a0line  \n"
        assert clean_text(raw, ProcessRule()) == "Hello world again\n\nnext line"

    def test_whitespace_kept_when_not_asked(self) -> None:
        raw = "a   b\n\n\n\nc"
        assert clean_text(raw, rule(remove_extra_whitespace=False)) == raw

    def test_control_characters_removed_always(self) -> None:
        assert clean_text("a\x00b\x07c\ufffe", rule(remove_extra_whitespace=False)) == "abc"

    URLS = "See https://example.com/a?b=1 or www.example.org and mail bob.smith@example.co.uk now"

    def test_urls_and_emails_kept_by_default(self) -> None:
        assert clean_text(self.URLS, ProcessRule()) == self.URLS

    def test_urls_and_emails_removed_when_asked(self) -> None:
        out = clean_text(self.URLS, rule(remove_urls_emails=True))
        assert "example" not in out
        assert "@" not in out
        assert out == "See or and mail now"

    def test_url_inside_chinese_parentheses(self) -> None:
        out = clean_text("见（https://example.com/x）说明", rule(remove_urls_emails=True))
        assert out == "见（）说明"

    def test_email_between_chinese_characters(self) -> None:
        out = clean_text("联系张三bob@example.com谢谢", rule(remove_urls_emails=True))
        assert out == "联系张三谢谢"

    def test_url_removal_keeps_following_chinese_text(self) -> None:
        out = clean_text(
            "请访问https://example.com/docs查看详情。下一句话", rule(remove_urls_emails=True)
        )
        assert out == "请访问查看详情。下一句话"

    def test_url_removal_keeps_the_sentence_end(self) -> None:
        out = clean_text("Docs: https://example.com/a. Then stop.", rule(remove_urls_emails=True))
        assert out == "Docs: . Then stop."

    def test_cleaning_applies_before_splitting(self) -> None:
        chunks = split(
            "one   two\n\n\n\nthree https://x.io four",
            max_tokens=16,
            remove_urls_emails=True,
        )
        assert contents(chunks) == ["one two\n\nthree four"]


class TestQA:
    def test_english_pairs(self) -> None:
        text = (
            "Q: What is kbstream?\nA: A streaming indexer.\nIt keeps indexes in step.\n\n"
            "Q: Does it use Kafka?\nA: Yes."
        )
        chunks = split(text, doc_form=DocForm.QA, max_tokens=16)
        assert [(c.content, c.answer) for c in chunks] == [
            ("What is kbstream?", "A streaming indexer.\nIt keeps indexes in step."),
            ("Does it use Kafka?", "Yes."),
        ]
        assert [c.tokens for c in chunks] == [3, 4]

    def test_chinese_pairs_and_long_markers(self) -> None:
        text = "问：什么是向量索引？\n答：把文本变成向量。\n问题: 支持中文吗\n答案：支持。"
        chunks = split(text, CharCounter(), doc_form=DocForm.QA, max_tokens=16)
        assert [(c.content, c.answer) for c in chunks] == [
            ("什么是向量索引？", "把文本变成向量。"),
            ("支持中文吗", "支持。"),
        ]

    def test_question_and_answer_words(self) -> None:
        text = "question: one?\nanswer: two\nQUESTION：three?\nAnswer : four"
        chunks = split(text, doc_form=DocForm.QA, max_tokens=16)
        assert [(c.content, c.answer) for c in chunks] == [("one?", "two"), ("three?", "four")]

    def test_no_pairs_is_a_document_error(self) -> None:
        with pytest.raises(DocumentError) as caught:
            split("Just prose.\nNo questions here.", doc_form=DocForm.QA, max_tokens=16)
        assert "Q:" in caught.value.reason
        assert "问：" in caught.value.reason

    def test_question_without_answer_is_not_a_pair(self) -> None:
        with pytest.raises(DocumentError):
            split("Q: only a question?", doc_form=DocForm.QA, max_tokens=16)

    def test_question_over_max_tokens_is_a_document_error(self) -> None:
        with pytest.raises(DocumentError, match="above the limit of 16"):
            split(f"Q: {words(20)}?\nA: short", doc_form=DocForm.QA, max_tokens=16)

    def test_long_answer_is_kept_whole(self) -> None:
        chunks = split(f"Q: why?\nA: {words(100)}", doc_form=DocForm.QA, max_tokens=16)
        assert chunks[0].answer == words(100)

    def test_answer_text_is_never_silently_dropped(self) -> None:
        text = (
            "Q: Which colours are allowed?\nA: Two of them:\n"
            "a: red for errors\nb: blue for links\n\nQ: Anything else?\nA: No."
        )
        chunks = split(text, doc_form=DocForm.QA, max_tokens=16)
        assert "red for errors" in (chunks[0].answer or "")
        assert "blue for links" in (chunks[0].answer or "")


class TestParentChild:
    def test_children_carry_their_parent_and_fit(self) -> None:
        paras = [". ".join(words(6, 100 * p + 10 * s) for s in range(5)) + "." for p in range(3)]
        text = "\n\n".join(paras)
        chunks = split(
            text,
            doc_form=DocForm.PARENT_CHILD,
            max_tokens=16,
            chunk_overlap=0,
            parent_max_tokens=32,
        )
        parents = list(dict.fromkeys(c.parent for c in chunks))
        assert parents == paras  # each 30-word paragraph is one parent
        for c in chunks:
            assert c.parent is not None
            assert c.content in c.parent
            assert c.tokens <= 16
            assert c.answer is None
        for p in parents:
            kids = [c.content for c in chunks if c.parent == p]
            assert len(kids) >= 2
            assert " ".join(kids).split() == p.split()

    def test_short_document_is_one_parent_one_child(self) -> None:
        chunks = split("tiny text", doc_form=DocForm.PARENT_CHILD, max_tokens=16)
        assert [(c.content, c.parent) for c in chunks] == [("tiny text", "tiny text")]


class TestWithEmbeddingDouble:
    def test_hashing_double_counts_words(self) -> None:
        double = HashingEmbeddingDouble()
        chunks = split_document(
            words(100), DocForm.TEXT, ProcessRule(), double, double.max_input_tokens
        )
        assert all(c.tokens <= double.max_input_tokens for c in chunks)
        assert len(chunks) >= 2


# --- the real model tokenizer ----------------------------------------------------

_EN_WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "retrieval", "augmented",
    "generation", "tokenizer", "embedding", "vectors", "internationalization",
    "anthropomorphically", "2024", "e.g.", "U.S.A.", "don't", "it's", "naïve", "café",
    "co-operate", "3.14159", "https://example.com/path?q=1",
]  # fmt: skip
_ZH_CHARS = "我们今天天气很好知识库检索增强生成向量索引中文分词的测试数据处理系统用户文档"


def _english(rng: random.Random, paragraphs: int) -> str:
    out = []
    for _ in range(paragraphs):
        sents = [
            " ".join(rng.choice(_EN_WORDS) for _ in range(rng.randint(3, 45))).capitalize()
            + rng.choice([".", "!", "?", ";", ","])
            for _ in range(rng.randint(1, 8))
        ]
        out.append(" ".join(sents))
    return "\n\n".join(out)


def _chinese(rng: random.Random, paragraphs: int) -> str:
    out = []
    for _ in range(paragraphs):
        out.append(
            "".join(
                "".join(rng.choice(_ZH_CHARS) for _ in range(rng.randint(3, 70)))
                + rng.choice(["。", "！", "？", "，", "；"])
                for _ in range(rng.randint(1, 8))
            )
        )
    return "\n".join(out)


@pytest.fixture(scope="module")
def model_tokens() -> ModelTokenCounter:
    return ModelTokenCounter(bundled_model_dir())


class TestRealModelTokens:
    """max_tokens is checked in all-MiniLM-L6-v2's own WordPiece tokens."""

    def test_counter_is_the_models(self, model_tokens: ModelTokenCounter) -> None:
        assert model_tokens.max_input_tokens == 254  # max_seq_length 256 minus CLS/SEP
        # characters are not tokens: a long word is several, a CJK char is one
        assert model_tokens.count_tokens("internationalization") > 1
        assert model_tokens.count_tokens("知识库") == 3
        assert model_tokens.count_tokens("") == 0

    @pytest.mark.parametrize(
        "text_of",
        [
            pytest.param(lambda rng: _english(rng, 50), id="english"),
            pytest.param(lambda rng: _chinese(rng, 50), id="chinese"),
            pytest.param(lambda rng: _english(rng, 15) + "\n" + _chinese(rng, 15), id="mixed"),
            pytest.param(
                lambda rng: "".join(rng.choice(_ZH_CHARS) for _ in range(2000)), id="zh-no-punct"
            ),
        ],
    )
    @pytest.mark.parametrize(
        "process_rule",
        [
            pytest.param(ProcessRule(), id="automatic"),
            pytest.param(rule(max_tokens=64, chunk_overlap=16), id="64-overlap16"),
            pytest.param(rule(max_tokens=16, chunk_overlap=0), id="16"),
        ],
    )
    def test_no_chunk_exceeds_max_tokens(
        self, model_tokens: ModelTokenCounter, text_of: object, process_rule: ProcessRule
    ) -> None:
        text = text_of(random.Random(7))  # type: ignore[operator]
        limit = process_rule.max_tokens or model_tokens.max_input_tokens
        chunks = split_document(
            text, DocForm.TEXT, process_rule, model_tokens, model_tokens.max_input_tokens
        )
        assert len(chunks) > 1
        real = [model_tokens.count_tokens(c.content) for c in chunks]
        assert max(real) <= limit
        assert [c.tokens for c in chunks] == real
        # chunks are not tiny: the splitter packs them (guards against char-counting)
        assert sum(real) / len(real) > limit / 3

    def test_chinese_sentence_ends_with_real_tokens(self, model_tokens: ModelTokenCounter) -> None:
        text = zh_text(80, seed=11)
        chunks = split(text, model_tokens, max_tokens=48, chunk_overlap=0, model_limit=254)
        assert len(chunks) > 3
        for c in chunks:
            assert c.content[-1] in "。！？"
            assert model_tokens.count_tokens(c.content) <= 48
        assert "".join(contents(chunks)) == text

    def test_english_sentence_ends_with_real_tokens(self, model_tokens: ModelTokenCounter) -> None:
        rng = random.Random(5)
        text = " ".join(
            " ".join(rng.choice(_EN_WORDS[:12]) for _ in range(rng.randint(4, 14))).capitalize()
            + "."
            for _ in range(60)
        )
        chunks = split(text, model_tokens, max_tokens=40, chunk_overlap=0, model_limit=254)
        assert len(chunks) > 3
        for c in chunks:
            assert c.content.endswith(".")
            assert model_tokens.count_tokens(c.content) <= 40

    def test_parent_child_children_fit_in_real_tokens(
        self, model_tokens: ModelTokenCounter
    ) -> None:
        text = _chinese(random.Random(3), 20) + "\n\n" + _english(random.Random(4), 20)
        chunks = split_document(
            text,
            DocForm.PARENT_CHILD,
            rule(max_tokens=32, chunk_overlap=0, parent_max_tokens=128),
            model_tokens,
            model_tokens.max_input_tokens,
        )
        assert len({c.parent for c in chunks}) > 1
        for c in chunks:
            assert model_tokens.count_tokens(c.content) <= 32
            assert model_tokens.count_tokens(c.parent or "") <= 128
            assert c.content in (c.parent or "")

    def test_max_tokens_above_real_model_limit(self, model_tokens: ModelTokenCounter) -> None:
        with pytest.raises(SplitRuleError, match=r"max_tokens 512 .*254"):
            split_document(
                "text",
                DocForm.TEXT,
                rule(max_tokens=512),
                model_tokens,
                model_tokens.max_input_tokens,
            )


def test_default_separators_cover_both_scripts() -> None:
    for sep in ("\n\n", "\n", "。", "！", "？", ". ", "! ", "? ", ""):
        assert sep in DEFAULT_SEPARATORS
    assert DEFAULT_SEPARATORS[-1] == ""


class TestCharacterCap:
    """The tokenizer maps an over-long word to one unknown token: chunks are
    capped by characters too, CHARS_PER_TOKEN per token."""

    @staticmethod
    def long_words(n: int = 3, length: int = 300_000) -> str:
        rng = random.Random(0)
        return " ".join("".join(rng.choices("abcdefgh", k=length)) for _ in range(n))

    def test_three_huge_words_are_cut_to_the_cap(self, model_tokens: ModelTokenCounter) -> None:
        text = self.long_words()
        assert model_tokens.count_tokens(text) == 3  # what let them through as one chunk
        limit = model_tokens.max_input_tokens
        for process_rule in (ProcessRule(), rule(max_tokens=limit, chunk_overlap=0)):
            chunks = split_document(text, DocForm.TEXT, process_rule, model_tokens, limit)
            assert max(len(c.content) for c in chunks) <= limit * CHARS_PER_TOKEN
            assert max(c.tokens for c in chunks) <= limit
        # nothing lost (without overlap, the chunks are the text without its spaces)
        assert "".join(contents(chunks)) == text.replace(" ", "")

    def test_word_counter_gets_the_cap_too(self) -> None:
        text = self.long_words(3, 5000)
        chunks = split(text, max_tokens=16, chunk_overlap=0)
        assert max(len(c.content) for c in chunks) <= 16 * CHARS_PER_TOKEN
        assert "".join(contents(chunks)) == text.replace(" ", "")

    def test_normal_text_is_not_affected(self) -> None:
        paras = [words(10, 0), words(12, 100), words(9, 200)]
        chunks = split("\n\n".join(paras), max_tokens=16, chunk_overlap=0)
        assert contents(chunks) == paras

    def test_a_long_word_among_sentences_keeps_the_sentences_whole(self) -> None:
        word = "x" * 1000
        text = f"{words(6)}. {word} {words(6, 50)}."
        chunks = split(text, max_tokens=16, chunk_overlap=0)
        assert all(len(c.content) <= 16 * CHARS_PER_TOKEN for c in chunks)
        assert chunks[0].content == f"{words(6)}."
        assert "".join(contents(chunks)).replace(" ", "") == text.replace(" ", "")

    def test_indented_code_over_the_cap_is_split_again(self) -> None:
        # many characters per token: within max_tokens, over the character cap
        lines = [" " * 60 + f"x{i}" for i in range(40)]
        chunks = split(
            "\n".join(lines),
            WordCounter(),
            max_tokens=16,
            chunk_overlap=0,
            remove_extra_whitespace=False,
        )
        assert all(len(c.content) <= 16 * CHARS_PER_TOKEN for c in chunks)
        assert all(c.tokens <= 16 for c in chunks)
        assert " ".join(contents(chunks)).split() == [f"x{i}" for i in range(40)]

    def test_qa_question_over_the_cap_is_a_document_error(self) -> None:
        with pytest.raises(DocumentError, match="characters, above the limit of 128"):
            split(f"Q: {'y' * 200}?\nA: short", doc_form=DocForm.QA, max_tokens=16)


class TestTokenCountsOnce:
    """Each piece is tokenized once per document, and chunks are counted in one
    batch when the counter can."""

    class CountingCounter(WordCounter):
        def __init__(self) -> None:
            self.calls: list[str] = []
            self.batches: list[list[str]] = []

        def count_tokens(self, text: str) -> int:
            self.calls.append(text)
            return super().count_tokens(text)

        def count_tokens_batch(self, texts: list[str]) -> list[int]:
            self.batches.append(list(texts))
            return [super(TestTokenCountsOnce.CountingCounter, self).count_tokens(t) for t in texts]

    def test_no_text_is_counted_twice(self) -> None:
        counter = self.CountingCounter()
        text = "\n\n".join(
            ". ".join(words(7, 100 * p + 10 * s) for s in range(6)) for p in range(8)
        )
        chunks = split(text, counter, max_tokens=16, chunk_overlap=4)
        assert len(chunks) > 8
        every = counter.calls + [t for b in counter.batches for t in b]
        assert len(every) == len(set(every))
        assert [c.tokens for c in chunks] == [WordCounter().count_tokens(c.content) for c in chunks]

    def test_a_text_that_fits_is_counted_once_and_stays_whole(self) -> None:
        """Small documents (FAQ entries, tickets) are the common case: one count,
        not one per paragraph, sentence and merged chunk (issue 17)."""
        counter = self.CountingCounter()
        text = "\n\n".join(". ".join(words(3, 10 * p + s) for s in range(2)) for p in range(3))
        chunks = split(text, counter, max_tokens=64)
        assert contents(chunks) == [text]
        assert chunks[0].tokens == WordCounter().count_tokens(text)
        assert len(counter.calls) + sum(len(b) for b in counter.batches) == 1

    def test_the_model_counter_counts_a_batch_like_one_by_one(
        self, model_tokens: ModelTokenCounter
    ) -> None:
        texts = ["", "hello world", "知识库", "internationalization " * 30, "a\n\nb"]
        assert model_tokens.count_tokens_batch(texts) == [
            model_tokens.count_tokens(t) for t in texts
        ]


class SuperadditiveCounter:
    """More tokens for a whole than for its parts: one extra per five words, the
    way WordPiece can cut a joined word into more pieces than its halves."""

    def count_tokens(self, text: str) -> int:
        n = len(text.split())
        return n + n // 5


def test_a_chunk_is_never_over_max_tokens_even_when_counts_do_not_add_up() -> None:
    text = ", ".join(words(2, 10 * i) for i in range(60))
    counter = SuperadditiveCounter()
    chunks = split(text, counter, max_tokens=16, chunk_overlap=0)
    assert all(counter.count_tokens(c.content) <= 16 for c in chunks)
    assert [c.tokens for c in chunks] == [counter.count_tokens(c.content) for c in chunks]
    assert " ".join(contents(chunks)).split() == text.split()


def prose(chars: int, seed: int = 20) -> str:
    """English-like paragraphs of about ``chars`` characters."""
    rng = random.Random(seed)
    vocab = [
        "the",
        "tide",
        "harbour",
        "arrives",
        "forty",
        "minutes",
        "later",
        "each",
        "day",
        "moon",
        "pull",
        "ocean",
    ]
    out: list[str] = []
    size = 0
    while size < chars:
        sentence = " ".join(rng.choice(vocab) for _ in range(rng.randint(6, 18))).capitalize()
        out.append(sentence + (".\n\n" if rng.random() < 0.2 else ". "))
        size += len(out[-1])
    return "".join(out)[:chars]


class TestAmplification:
    """Issue 20 item 10: max_tokens 16 with chunk_overlap 15 made 9,267 segments from
    a 61,000-character document (48 under the automatic rule)."""

    TEXT = prose(61_000)

    def test_the_repro_is_refused_with_a_reason(self) -> None:
        with pytest.raises(ValueError, match=r"more than half of max_tokens 16 \(at most 8\)"):
            rule(max_tokens=16, chunk_overlap=15)

    def test_overlap_against_the_models_own_size_is_bounded_too(self) -> None:
        # no max_tokens in the rule: the model's input (254) is the size
        with pytest.raises(SplitRuleError, match="chunk_overlap 200 is more than half"):
            resolve_rule(rule(chunk_overlap=200), model_max_tokens=254)
        assert resolve_rule(rule(chunk_overlap=127), model_max_tokens=254).chunk_overlap == 127

    def test_too_many_segments_is_a_document_error(self, model_tokens: ModelTokenCounter) -> None:
        allowed = rule(max_tokens=16, chunk_overlap=8)
        with pytest.raises(SplitRuleError) as caught:
            split_document(self.TEXT, DocForm.TEXT, allowed, model_tokens, 254, max_segments=1000)
        reason = caught.value.reason
        assert "segments of at most 16 tokens (overlap 8), above the limit of 1000" in reason
        assert "raise max_tokens or lower chunk_overlap" in reason
        made = int(reason.split("would make ")[1].split()[0])
        assert 1000 < made < 9267  # bounded by the overlap rule, still above this cap

    def test_the_automatic_rule_is_unaffected(self, model_tokens: ModelTokenCounter) -> None:
        chunks = split_document(
            self.TEXT, DocForm.TEXT, ProcessRule(), model_tokens, 254, max_segments=10_000
        )
        assert 30 < len(chunks) < 100

    @pytest.mark.parametrize("form", [DocForm.QA, DocForm.PARENT_CHILD])
    def test_the_cap_holds_for_every_form(self, form: DocForm) -> None:
        text = "\n".join(f"Q: question {i}?\nA: answer {i}." for i in range(20))
        with pytest.raises(SplitRuleError, match="would make"):
            split_document(text, form, rule(max_tokens=16), WordCounter(), 512, max_segments=5)
