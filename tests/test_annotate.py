import pyarrow as pa
import pytest

from curate.stages.annotate import annotate_text, detect_languages, domain_and_suffix, normalize_url


@pytest.mark.parametrize(
    "host,domain,suffix",
    [
        ("i0.wp.com", "wp.com", "com"),
        ("www.bbc.co.uk", "bbc.co.uk", "co.uk"),
        ("images.example.com.au", "example.com.au", "com.au"),
        ("127.0.0.2", "127.0.0.2", None),
        ("", None, None),
    ],
)
def test_registered_domain_uses_the_public_suffix_list_offline(host, domain, suffix):
    assert domain_and_suffix(host) == (domain, suffix)


@pytest.mark.parametrize(
    "url,norm",
    [
        ("HTTP://Example.COM:80/a/B.jpg#frag", "http://example.com/a/B.jpg"),
        ("https://example.com:443/x?q=1", "https://example.com/x?q=1"),
        ("http://example.com:8080", "http://example.com:8080/"),
        ("http://[::1]:99/x", "http://[::1]:99/x"),
        ("https://a.com/i.jpg?utm_source=x&w=640&fbclid=abc&UTM_medium=y", "https://a.com/i.jpg?w=640"),
        ("https://a.com/i.jpg?utm_source=x", "https://a.com/i.jpg"),
        ("https://a.com/i.jpg?b=2&a=1", "https://a.com/i.jpg?b=2&a=1"),
        (None, None),
    ],
)
def test_normalised_url(url, norm):
    assert normalize_url(url) == norm


def test_languages_of_real_sentences():
    langs, scores = detect_languages(
        ["a photograph of a dog running on the beach", "ein Hund läuft am Strand entlang", "", None]
    )
    assert langs[:2] == ["en", "de"]
    assert langs[2:] == [None, None]
    assert 0.5 < scores[0] <= 1.0


def test_annotations_survive_hostile_text():
    huge = "word " * 200_000  # a 1 MB caption
    t = pa.table(
        {
            "shard": ["s"] * 4,
            "row": [0, 1, 2, 3],
            "uid": ["0" * 32] * 4,
            "url": ["http://a.com/x.jpg", "javascript:alert(1)", None, "http://[broken/x"],
            "caption": [huge, "line one\nline two\x00", None, "ok caption here"],
        }
    )
    out = annotate_text(t).to_pydict()
    assert out["caption_chars"][0] == len(huge) and out["caption_words"][0] == 200_000
    assert out["language"][0] == "en"
    assert out["caption_chars"][2] == 0 and out["language"][2] is None
    assert out["domain"][0] == "a.com" and out["domain"][2] is None
    assert len(out["row"]) == 4
