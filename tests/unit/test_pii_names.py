"""Person names beyond the NER model (eyas.pii.names): cues, the given-name lexicon, repeated mentions.

Pure string functions: no presidio, no spaCy model. Every name here is made up.
"""

from __future__ import annotations

import importlib.util
import time

import pytest

from eyas.pii import names


def _found(spans: list[tuple[int, int, float]], text: str) -> list[str]:
    return [text[start:end] for start, end, _ in spans]


@pytest.mark.parametrize(("text", "name"), [
    ("Her maiden name is van der Berg", "van der Berg"),
    ("What's your first name? Ingeborg", "Ingeborg"),
    ("Name:    Jildau S. Bouts\nAddress: unknown", "Jildau S. Bouts"),
    ("I'd like to join accounts with ms. Ljubica", "Ljubica"),
    ("Kind regards,\nSvetlana Orlova", "Svetlana Orlova"),
    ("Thanks,\n  Aino", "Aino"),
    ("Hi Kim, my name is Ana Perić.", "Ana Perić"),
    ("Signed: Olek Nowak", "Olek Nowak"),
    ("I am Jindřich Š. Holinka from the bank.", "Jindřich Š. Holinka"),
])
def test_cues_announce_names(text, name):
    assert name in _found(names.find_person_names(text), text)


@pytest.mark.parametrize("text", [
    "Dear Sir or Madam,", "Hello World in Java", "Best Practices for Python", "I'm Sorry, Dave.",
    "Contact Information: see the form.", "Thanks,\nThe Team", "product name: 42", "Hi There!",
    "Signed Copy attached.", "Regards, Best Practices",
])
def test_cues_skip_words_that_are_not_names(text):
    assert names.find_person_names(text) == [], text


LEXICON = names.NameLexicon(frozenset({"star", "war", "line", "chart", "driver", "grace"}),
                            given={"Oksana", "Yuito", "Star", "Zlata", "Isabell", "Grace"})


@pytest.mark.parametrize(("text", "expected"), [
    ("Oksana Petrenko called twice.", ["Oksana Petrenko"]),
    ("Isabell E. Torvik signed it.", ["Isabell E. Torvik"]),
    ("Hirai, Yuito will come.", ["Hirai, Yuito"]),
    ("It was Zlata's kid.", ["Zlata"]),
    ("They had three: Zlata, Zlata and Zlata.", ["Zlata", "Zlata", "Zlata"]),
    ("Thanks Oksana, see you.", ["Oksana"]),  # a capitalised stop word is no part of a name
    ("Star Wars is a film.", []),  # "Star" is an English word: no given name here
    ("Oksana Driver", []),  # "Driver" is a word: not a surname, and Oksana is not alone
    ("Grace periods apply.", []),
    ("OKSANA PETRENKO", []),
])
def test_lexicon_finds_names_around_given_names(text, expected):
    assert _found(LEXICON.find(text), text) == expected


def test_lexicon_without_given_names_finds_nothing():
    assert names.NameLexicon(frozenset(), given=set()).find("Oksana Petrenko") == []


@pytest.mark.skipif(importlib.util.find_spec("faker") is None, reason="Faker not installed (.ci/pii_names.txt)")
def test_faker_lexicon_has_names_of_many_languages_and_no_stop_words():
    given = names.faker_given_names()
    assert {"Aino", "Júlia", "Ingeborg", "Grzegorz", "Sigrún"} <= given
    assert not {"May", "Will", "An"} & given
    assert "Grace" not in names.NameLexicon(frozenset({"grace"}), given=given).given


def test_repeated_mentions_find_the_other_occurrences_of_a_name():
    text = "Patrizia Colombo sang it first; Colombo's version and COLOMBO's are better."
    mentions = names.repeated_mentions(text, [(0, 16, 0.85)])
    assert _found(mentions, text) == ["Patrizia", "Colombo", "Colombo"]
    assert {score for _, _, score in mentions} == {0.85}
    assert _found(names.outside(mentions, [(0, 16)]), text) == ["Colombo"]
    assert names.repeated_mentions("The Queen met the queen.", [(4, 9, 0.8)]) == [(4, 9, 0.8)]


def test_outside_keeps_spans_that_overlap_no_range():
    spans = [(0, 2, 1.0), (3, 5, 1.0), (6, 8, 1.0), (10, 12, 1.0)]
    assert names.outside(spans, [(1, 4), (2, 3), (9, 10)]) == [(6, 8, 1.0), (10, 12, 1.0)]
    assert names.outside(spans, []) == spans


def test_plausible_name():
    assert names.plausible_name("van der Berg") and names.plausible_name("Ana Perić")
    for span in ("ana lopez", "van der", "S186077957507", "Grüße 🙂", "Server 8.127.3.196"):
        assert not names.plausible_name(span), span


@pytest.mark.parametrize("text", ["A1-" * 30000, "Ab. " * 30000, "name is " + "de " * 30000,
                                  "Oksana, " * 30000, "Oksana Petrenko " * 20000])
def test_name_finders_stay_linear(text):
    start = time.perf_counter()
    names.find_person_names(text)
    LEXICON.find(text)
    names.repeated_mentions(text, [(0, 15, 0.6)])
    assert time.perf_counter() - start < 3
