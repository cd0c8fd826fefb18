"""A labelled PII sentence set, generated deterministically from the shared assets at bench time.

Sentences come from presidio-research's templates (``datasets/pii/presidio_templates.txt``) and
from templates below that vary the context (no context word, context after the value, fax / desk
/ cell lines), filled with the fake identities of ``FakeNameGenerator.com_3000.csv``. Values are
written in many formats: every card brand and length (Luhn-valid, plain, spaced, dashed), phone
numbers in national and international notation (``+46 (0)8 ...``, ``(99) 645-791``, extensions,
compact local numbers), IBANs of several countries, SSNs with and without separators. Nothing is
copied into the repository: ``labelled_sentences(root)`` rebuilds the same set from the assets.

Samples use presidio-research's format (``full_text``, ``spans[entity_type, entity_value,
start_position, end_position]``) with canonical (Cloud DLP) entity names, so
``eyas.pii.evaluate.recall_per_entity`` scores them directly.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

PII_DIR = Path("datasets") / "pii"
SFT_FILES = {  # prose without personal data: the false-redaction set
    "alpaca": Path("datasets") / "sft" / "llamafactory_alpaca_en_demo.json",
    "dummy": Path("datasets") / "sft" / "fastchat_dummy_conversation.json",
    "mt_bench": Path("datasets") / "prompts" / "mt_bench_question.jsonl",
    "vicuna": Path("datasets") / "prompts" / "vicuna_bench_question.jsonl",
}
STRUCTURED_TYPES = ("CREDIT_CARD_NUMBER", "EMAIL_ADDRESS", "IBAN_CODE", "IP_ADDRESS", "PHONE_NUMBER",
                    "US_DRIVERS_LICENSE_NUMBER", "US_SOCIAL_SECURITY_NUMBER")
NER_TYPES = ("PERSON_NAME", "STREET_ADDRESS")

# Extra templates: contexts the presidio list lacks. ``{type}`` placeholders, one value each.
EXTRA_TEMPLATES = [
    "You can reach me on {phone} after 6pm.",
    "Fax: {phone}",
    "My desk line is {phone} and my cell is {phone}.",
    "Call me on {phone} if the parcel is late.",
    "The office number {phone} goes straight to voicemail.",
    "Text {phone} when you arrive at the gate.",
    "{person} ({phone}) will meet you in the lobby.",
    "{phone} (mobile), {phone} (office)",
    "Please ring {phone} between 9 and 5.",
    "Is {phone} still your number?",
    "Tel. {phone}",
    "whatsapp me at {phone}",
    "Charge it to {card}, expiry 04/27.",
    "Card number: {card}",
    "I paid with {card} yesterday and was charged twice.",
    "The refund went to card {card} instead of my account.",
    "{card}",
    "Why was {card} declined at the store?",
    "Wire the money to {iban} please.",
    "IBAN {iban}, reference invoice 2291.",
    "My SSN is {ssn} and my phone is {phone}.",
    "social security no. {ssn}",
    "Send it to {email} or post it to {address}.",
    "{person} lives at {address}.",
    "Ship the parcel to {address}, second floor.",
    "The customer {person} called from {phone} about card {card}.",
    "Server {ip} keeps refusing connections.",
    "Please whitelist {ip} for the VPN.",
    "My driving licence number is {dl}.",
    "DL# {dl}, issued in Ohio.",
    "Contact {person} at {email}.",
    "Dear {person}, your order ships to {address}.",
    "I met {person} at the conference last week.",
    "{person} said the invoice was wrong.",
    "The new tenant at {address} is {person}.",
    "Mail for {person}: {address}",
    "Can you update my e-mail to {email}?",
    "my email is {email} thanks",
]

# presidio placeholders -> (our generator key, labelled type or None for unlabelled filler)
PLACEHOLDERS: dict[str, tuple[str, str | None]] = {
    "credit_card_number": ("card", "CREDIT_CARD_NUMBER"), "phone_number": ("phone", "PHONE_NUMBER"),
    "email": ("email", "EMAIL_ADDRESS"), "iban": ("iban", "IBAN_CODE"),
    "ssn": ("ssn", "US_SOCIAL_SECURITY_NUMBER"), "ip_address": ("ip", "IP_ADDRESS"),
    "us_driver_license": ("dl", "US_DRIVERS_LICENSE_NUMBER"), "address": ("address", "STREET_ADDRESS"),
    "person": ("person", "PERSON_NAME"), "name": ("person", "PERSON_NAME"),
    "name_female": ("person", "PERSON_NAME"), "name_male": ("person", "PERSON_NAME"),
    "first_name": ("first", "PERSON_NAME"), "first_name_male": ("first", "PERSON_NAME"),
    "first_name_female": ("first", "PERSON_NAME"), "first_name_nonbinary": ("first", "PERSON_NAME"),
    "last_name": ("last", "PERSON_NAME"), "last_name_male": ("last", "PERSON_NAME"),
    "last_name_female": ("last", "PERSON_NAME"),
    "prefix": ("title", None), "prefix_male": ("title", None), "prefix_female": ("title", None),
    "city": ("city", None), "country": ("country", None), "organization": ("company", None),
    "job": ("job", None), "age": ("age", None), "year": ("year", None), "nationality": ("country", None),
    "date_time": ("date", None), "date_of_birth": ("date", None), "day_of_week": ("weekday", None),
    "state_abbr": ("state", None), "url": ("url", None),
}
EXTRA_KEYS = {"phone": "PHONE_NUMBER", "card": "CREDIT_CARD_NUMBER", "iban": "IBAN_CODE",
              "ssn": "US_SOCIAL_SECURITY_NUMBER", "email": "EMAIL_ADDRESS", "address": "STREET_ADDRESS",
              "person": "PERSON_NAME", "ip": "IP_ADDRESS", "dl": "US_DRIVERS_LICENSE_NUMBER"}

# (prefixes, lengths) per brand; every prefix/length pair a real issuer uses.
CARD_BRANDS = {
    "visa": (["4"], [13, 16, 19]),
    "mastercard": (["51", "52", "53", "54", "55", "2221", "2300", "2500", "2720"], [16]),
    "amex": (["34", "37"], [15]),
    "discover": (["6011", "644", "65"], [16, 19]),
    "jcb": (["3528", "3555", "3589"], [16, 17, 18, 19]),
    "jcb15": (["2131", "1800"], [15]),
    "diners": (["300", "305", "36", "38"], [14]),
    "maestro": (["5018", "5020", "6304", "6759", "6761"], [12, 13, 15, 16, 19]),
    "unionpay": (["62"], [16, 17, 18, 19]),
}
# IBAN: country, BBAN length (digits only, which every country's format accepts here).
IBAN_COUNTRIES = [("DE", 18), ("ES", 20), ("PL", 24), ("SE", 20), ("PT", 21), ("FI", 14), ("NO", 11),
                  ("DK", 14), ("BE", 12), ("AT", 16)]


def luhn_check_digit(digits: str) -> str:
    """The digit that makes ``digits + d`` pass the Luhn check."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return str((10 - total % 10) % 10)


def luhn_valid(digits: str) -> bool:
    return len(digits) > 1 and luhn_check_digit(digits[:-1]) == digits[-1]


def _card(rng: random.Random) -> str:
    prefixes, lengths = CARD_BRANDS[rng.choice(sorted(CARD_BRANDS))]
    prefix, length = rng.choice(prefixes), rng.choice(lengths)
    body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    number = body + luhn_check_digit(body)
    style = rng.choice(["plain", "space", "dash", "space", "dash"])
    if style == "plain":
        return number
    groups = [number[i:i + 4] for i in range(0, len(number), 4)]
    if length == 15 and rng.random() < 0.5:  # Amex-style 4-6-5
        groups = [number[:4], number[4:10], number[10:]]
    return (" " if style == "space" else "-").join(groups)


def _iban(rng: random.Random) -> str:
    country, n = rng.choice(IBAN_COUNTRIES)
    bban = "".join(rng.choice("0123456789") for _ in range(n))
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    iban = f"{country}{98 - int(numeric) % 97:02d}{bban}"
    return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4)) if rng.random() < 0.5 else iban


def _ssn(rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    group, serial = rng.randint(1, 99), rng.randint(1, 9999)
    sep = rng.choice(["-", "-", " ", ""])
    return f"{area:03d}{sep}{group:02d}{sep}{serial:04d}"


def _phone(rng: random.Random, who: dict[str, str]) -> str:
    national, cc = who["TelephoneNumber"], who["TelephoneCountryCode"]
    digits = re.sub(r"\D", "", national)
    style = rng.randrange(10)
    if style <= 2:
        return national
    if style == 3:
        return f"+{cc} {national.lstrip('0')}"
    if style == 4:
        return f"+{cc} (0){national.lstrip('0')}"
    if style == 5:
        return f"00{cc} {national.lstrip('0')}"
    if style == 6:  # Faker-like short formats with an area code in parentheses
        return f"({digits[:2]}) {digits[2:5]}-{digits[5:8]}"
    if style == 7:  # compact 8-digit local number
        return (digits + "1234567")[:8]
    us = "".join(str(rng.randint(2, 9) if i in (0, 3) else rng.randint(0, 9)) for i in range(10))
    return rng.choice([f"({us[:3]}) {us[3:6]}-{us[6:]}", f"{us[:3]}.{us[3:6]}.{us[6:]}",
                       f"+1-{us[:3]}-{us[3:6]}-{us[6:]}", f"{us[:3]}-{us[3:6]}-{us[6:]}x{rng.randint(10, 99999)}",
                       f"001-{us[:3]}-{us[3:6]}-{us[6:]}", f"1 {us[:3]} {us[3:6]} {us[6:]}"])


def _dl(rng: random.Random) -> str:
    letter = rng.choice("ABCDEFGHJKLMNPRSTW")
    return rng.choice([f"{letter}{rng.randint(10**6, 10**7 - 1)}", f"{rng.randint(10**8, 10**9 - 1)}",
                       f"{letter}{rng.randint(10**11, 10**12 - 1)}", f"{letter}{rng.randint(10**7, 10**8 - 1)}"])


def _address(rng: random.Random, who: dict[str, str]) -> str:
    street, city, zipc = who["StreetAddress"], who["City"], who["ZipCode"]
    return rng.choice([street, f"{street}, {city} {zipc}", f"{street}\n{city}, {who['State']} {zipc}",
                       f"{street}, {city}, {who['CountryFull']}"])


def _person(rng: random.Random, who: dict[str, str]) -> str:
    first, middle, last = who["GivenName"], who["MiddleInitial"], who["Surname"]
    return rng.choice([f"{first} {last}", f"{first} {last}", f"{first} {middle}. {last}", f"{last}, {first}"])


def _value(key: str, rng: random.Random, who: dict[str, str]) -> str:
    simple: dict[str, Callable[[], str]] = {
        "card": lambda: _card(rng), "iban": lambda: _iban(rng), "ssn": lambda: _ssn(rng),
        "phone": lambda: _phone(rng, who), "dl": lambda: _dl(rng), "address": lambda: _address(rng, who),
        "person": lambda: _person(rng, who), "first": lambda: who["GivenName"], "last": lambda: who["Surname"],
        "email": lambda: who["EmailAddress"] if rng.random() < 0.6 else
        f"{who['GivenName'][0].lower()}.{who['Username'].lower()}@{who['Domain'].lower()}",
        "ip": lambda: ".".join(str(rng.randint(1, 254)) for _ in range(4)) if rng.random() < 0.8 else
        f"2001:db8:{rng.randint(1, 0xffff):x}::{rng.randint(1, 0xffff):x}",
        "title": lambda: who["Title"], "city": lambda: who["City"], "country": lambda: who["CountryFull"],
        "company": lambda: who["Company"], "job": lambda: who["Occupation"], "age": lambda: who["Age"],
        "year": lambda: str(rng.randint(1950, 2024)), "date": lambda: who["Birthday"],
        "weekday": lambda: rng.choice(["Monday", "Tuesday", "Friday"]), "state": lambda: who["State"],
        "url": lambda: f"https://www.{who['Domain'].lower()}/",
    }
    return simple[key]()


def _fill(template: str, pattern: re.Pattern[str], lookup: Callable[[str], tuple[str, str | None]],
          rng: random.Random, who: dict[str, str]) -> dict[str, Any]:
    text, spans, pos = [], [], 0
    length = 0
    for m in pattern.finditer(template):
        text.append(template[pos:m.start()])
        length += m.start() - pos
        key, label = lookup(m.group(1))
        value = _value(key, rng, who)
        if label is not None:
            spans.append({"entity_type": label, "entity_value": value, "start_position": length,
                          "end_position": length + len(value)})
        text.append(value)
        length += len(value)
        pos = m.end()
    text.append(template[pos:])
    return {"full_text": "".join(text), "spans": spans}


def _presidio_templates(root: Path) -> list[str]:
    lines = (root / PII_DIR / "presidio_templates.txt").read_text(encoding="utf-8", errors="replace")
    out = []
    for line in lines.splitlines():
        names = re.findall(r"{{(\w+)}}", line)
        if line.strip() and all(n in PLACEHOLDERS for n in names):
            out.append(line.strip().replace("\\n", "\n").replace("\\,", ","))
    return out


def identities(root: Path) -> list[dict[str, str]]:
    """FakeNameGenerator's 3,000 fake identities, one dict per row."""
    with (root / PII_DIR / "FakeNameGenerator.com_3000.csv").open(encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def labelled_sentences(root: Path, n: int = 1200, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` labelled sentences, the same ones for the same ``root``, ``n`` and ``seed``.

    Half come from presidio's templates (those whose placeholders all map to a value here), half
    from ``EXTRA_TEMPLATES``; sentences without any labelled span are kept (they measure
    false positives on names of cities and companies)."""
    rng = random.Random(seed)
    people = identities(root)
    presidio = _presidio_templates(root)
    presidio_pattern, extra_pattern = re.compile(r"{{(\w+)}}"), re.compile(r"{(\w+)}")
    samples = []
    for i in range(n):
        who = people[rng.randrange(len(people))]
        if i % 2 == 0:
            template = presidio[(i // 2) % len(presidio)]
            sample = _fill(template, presidio_pattern, PLACEHOLDERS.__getitem__, rng, who)
        else:
            template = EXTRA_TEMPLATES[(i // 2) % len(EXTRA_TEMPLATES)]
            sample = _fill(template, extra_pattern, lambda k: (k, EXTRA_KEYS[k]), rng, who)
        samples.append(sample)
    return samples


def _sft_texts(root: Path) -> list[str]:
    texts: list[str] = []
    for name, rel in SFT_FILES.items():
        path = root / rel
        if not path.is_file():
            continue
        raw = path.read_text(encoding="utf-8")
        records = [json.loads(line) for line in raw.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else json.loads(raw)
        for rec in records:
            if name == "alpaca":
                texts += [rec.get("instruction", ""), rec.get("input", ""), rec.get("output", "")]
            elif name == "dummy":
                texts += [turn.get("value", "") for turn in rec.get("conversations", [])]
            else:
                texts += [t for t in rec.get("turns", []) if isinstance(t, str)]
    return texts


def sft_sentences(root: Path, n: int = 1000, seed: int = 0) -> list[str]:
    """``n`` sentences (20-400 characters) of the SFT and prompt sets: text without personal data,
    on which every redaction is a false one."""
    sentences = []
    for text in _sft_texts(root):
        for sentence in re.split(r"(?<=[.!?])\s+|\n+", text):
            if 20 <= len(sentence.strip()) <= 400:
                sentences.append(sentence.strip())
    unique = sorted(set(sentences))
    random.Random(seed).shuffle(unique)
    return unique[:n]
