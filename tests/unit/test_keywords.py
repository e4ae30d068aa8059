"""infra.keywords: the fast path for text without Chinese characters gives exactly
jieba's TF-IDF keywords (words, weights, order); Chinese text and the few ASCII
words in jieba's dictionary still go through jieba."""

from __future__ import annotations

import random

import jieba.analyse
import pytest

from infra.keywords import JiebaKeywordExtractor


@pytest.fixture(scope="module")
def extractor() -> JiebaKeywordExtractor:
    return JiebaKeywordExtractor(top_k=50)


def jieba_keywords(text: str, top_k: int = 50) -> list[tuple[str, float]]:
    """What extract returned before it had a fast path: jieba all the way."""
    tags = jieba.analyse.extract_tags(text.lower(), topK=top_k, withWeight=True)
    return [(w[:128], float(s)) for w, s in tags if JiebaKeywordExtractor._keep(w)]


ENGLISH = [
    "asyncio.get_running_loop() returns the running event loop in the current OS thread.",
    "Changed in version 3.11: The loop parameter was removed. See PEP 484 and RFC 2616.",
    "Use os.path.join(a, b) -- or pathlib.Path / 'x' -- with 100% of the 3.14 values.",
    "v1.2.3 v2.0% 50% 0.5 x-y x_y a&b #tag e.g. i.e. naïve café Zürich Ωmega",
    "The the THE tHe quick-brown fox's tail; it's over 9000!!! ... -- ++ && %%",
]


@pytest.mark.parametrize("text", ENGLISH)
def test_english_matches_jieba(extractor: JiebaKeywordExtractor, text: str) -> None:
    assert extractor._plain(text.lower())
    ours = extractor.extract(text)
    assert ours == jieba_keywords(text)
    assert ours  # and there is something to compare


def test_random_ascii_and_latin_text_matches_jieba(extractor: JiebaKeywordExtractor) -> None:
    rng = random.Random(3)
    alphabet = "abcxyzABC0129._-%+#&é ü\n\t()[]:;,'\"/\\=*<>!?@$~|Σж"
    words = ["loop", "event", "3.14", "v1.0", "50%", "a-b", "x_y", "api", "API", "http"]
    for _ in range(400):
        text = "".join(
            rng.choice(words) if rng.random() < 0.3 else rng.choice(alphabet)
            for _ in range(rng.randint(1, 200))
        )
        assert extractor.extract(text) == jieba_keywords(text), text


def test_top_k_and_order_match_jieba(extractor: JiebaKeywordExtractor) -> None:
    text = " ".join(f"word{i % 37} term{i % 11}" for i in range(400))
    assert extractor.extract(text, top_k=5) == jieba_keywords(text, top_k=5)
    assert len(extractor.extract(text, top_k=5)) == 5


def test_chinese_text_goes_through_jieba(extractor: JiebaKeywordExtractor) -> None:
    text = "知识库需要把长文档切分成小段，向量索引和关键词索引要保持一致。"
    assert not extractor._plain(text)
    words = [w for w, _ in extractor.extract(text)]
    assert "知识库" in words or "索引" in words
    assert extractor.extract(text) == jieba_keywords(text)


def test_mixed_text_goes_through_jieba(extractor: JiebaKeywordExtractor) -> None:
    text = "kbstream 使用 Kafka 和 Milvus 建立索引"
    assert extractor.extract(text) == jieba_keywords(text)
    assert "kafka" in dict(extractor.extract(text))


def test_ascii_dictionary_words_go_through_jieba(extractor: JiebaKeywordExtractor) -> None:
    # jieba's dictionary knows "c++" and "c#": its DAG cuts them out of any run of letters
    for text in ("Written in C++ and C#, not abc++x", "the c#x and c++ compilers"):
        assert not extractor._plain(text.lower())
        assert extractor.extract(text) == jieba_keywords(text)
    assert "c++" in dict(extractor.extract("Written in C++ and C#"))


def test_query_terms_of_an_english_query(extractor: JiebaKeywordExtractor) -> None:
    terms = extractor.query_terms("How do I cancel an asyncio Task?")
    assert {"cancel", "asyncio", "task"} <= set(terms)
    assert "how" not in terms and "an" not in terms


# -- terms: what the BM25 keyword index stores and a query asks for ---------------


def jieba_terms(text: str) -> list[str]:
    """terms() without its fast path: jieba's search-mode cut all the way."""
    from infra.keywords import _is_term

    words = (w.strip() for w in jieba.cut_for_search(text.lower()))
    return [w for w in words if _is_term(w)]


@pytest.mark.parametrize("text", ENGLISH)
def test_terms_of_english_match_jiebas_cut(extractor: JiebaKeywordExtractor, text: str) -> None:
    assert extractor.terms(text) == jieba_terms(text)


def test_terms_of_random_latin_text_match_jiebas_cut(extractor: JiebaKeywordExtractor) -> None:
    rng = random.Random(5)
    alphabet = "abcxyzABC0129._-%+#&é ü\n\t()[]:;,'\"/\\=*<>!?@$~|Σж"
    words = ["loop", "event", "3.14", "v1.0", "the", "a-b", "x_y", "api", "API", "c++"]
    for _ in range(300):
        text = "".join(
            rng.choice(words) if rng.random() < 0.3 else rng.choice(alphabet)
            for _ in range(rng.randint(1, 200))
        )
        assert extractor.terms(text) == jieba_terms(text), text


def test_terms_cut_chinese_into_words_and_drop_stop_words(
    extractor: JiebaKeywordExtractor,
) -> None:
    assert extractor.terms("如何移除文件") == ["如何", "移除", "文件"]
    # search mode: the dictionary words inside a long word too
    assert {"共和国", "中华人民共和国"} <= set(extractor.terms("中华人民共和国"))
    assert extractor.terms("The Socket, and THE loop!") == ["socket", "loop"]
    assert extractor.terms("... -- !!") == []
