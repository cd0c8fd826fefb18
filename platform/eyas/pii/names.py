"""Person names the NER model misses: naming cues, a given-name lexicon, repeated mentions.

Pure functions of a string returning ``(start, end, score)`` character spans, like
``eyas.pii.patterns`` (``eyas.pii.local`` wraps them as presidio recognizers):

- cues (``find_person_names``): a capitalised name after a title (``Mr``, ``ms.``, ``Dr``), a
  naming phrase (``my name is``, ``maiden name is``, ``What's your last name?``, ``Name:``,
  ``named``, ``call me``), a greeting (``Dear``, ``Hi``) or a sign-off on its own line
  (``Regards,\\nAna``): 0.6.
- lexicon (``NameLexicon``): given names of many languages (Faker's per-locale person lists,
  MIT, installed by ``.ci/setup`` pinned by hash; without Faker it finds nothing), less every
  English word and stop word ("Star", "Royal", "May"). A given name followed by a capitalised
  word that is not an English word (``Norea Blomqvist``, ``Isabell E. Torvik``), after
  ``Surname,`` (``Smith, Ágatha``), or alone between words that are not capitalised
  (``Klaus, Klaus and Klaus``): 0.6.
- repeated mentions (``repeated_mentions``): once a name is found, the other occurrences of its
  capitalised words in the same text are names too (``Colombo`` after ``Patrizia Colombo``),
  at the score of the finding they repeat.
"""

from __future__ import annotations

import bisect
import importlib
import pkgutil
import re
import unicodedata

from spacy.lang.en.stop_words import STOP_WORDS

Span = tuple[int, int, float]
_Word = tuple[int, int, str]  # start, end, word

PERSON_CUE_SCORE = LEXICON_SCORE = 0.6

# Words are bounded in length: an unbounded run would make every start position rescan it.
_UPPER = r"[^\W\d_a-zß-ÿ][\w'’\-]{0,40}"  # a word starting with an upper-case letter
_PARTICLE = r"(?:de|du|la|le|des|di|del|della|da|do|dos|das|van|von|der|den|ter|ten|y|bin|al)"
_TITLE = r"(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Madam|Mme|Mlle|Herr|Frau)\.?|(?:mr|mrs|ms|dr)\."
_PHRASE = (
    r"(?i:(?:first |last |full |maiden |middle |given |family |sur|nick)?name(?: is| was|'s|:|\?))"
    r"|[Dd]ear|[Hh]i|[Hh]ello|[Hh]ey|[Aa]ttn:?|[Aa]ttention:|[Cc]/[Oo]|[Ss]igned(?: by|:)|I am|I'm|"
    r"this is|[Cc]all me|named|called"
)
_SIGN_OFF = (
    r"(?:(?:[Bb]est|[Kk]ind|[Ww]arm) )?(?:[Rr]egards|[Ww]ishes)|[Bb]est|[Cc]heers|[Tt]hanks|"
    r"[Tt]hank you|[Ss]incerely|[Yy]ours(?: truly| sincerely)?|[Ll]ove"
)
# The name: capitalised words, initials ("E.") and particles ("van den Heuvel").
_NAME = rf"(?P<name>(?:{_PARTICLE} ){{0,3}}{_UPPER}(?: (?:[^\W\d_]\.|{_UPPER}|{_PARTICLE})){{0,3}})"
_PERSON_CUE = re.compile(
    rf"(?:\b(?:{_TITLE}|{_PHRASE})[ \t]+|\b(?:{_SIGN_OFF}),?[ \t]*\n[ \t]*){_NAME}"
)
# Capitalised words that open a phrase after a cue but are not names ("Dear Sir", "I'm Sorry").
NOT_NAMES = {
    "I", "The", "A", "An", "This", "That", "It", "We", "You", "He", "She", "They", "There", "Here",
    "Thank", "Thanks", "Please", "Sorry", "Yes", "No", "Ok", "OK", "Okay", "So", "Well", "All",
    "Everyone", "Team", "Sir", "Madam", "Customer", "Support", "Sure", "Good", "Not", "Just", "Also",
    "And", "But", "Or", "If", "When", "What", "How", "Why", "Who", "My", "Your", "Our", "In", "On",
    "At", "For", "With", "From", "To", "Of", "Is", "Are", "Do", "Can", "Will", "AI", "Hi", "Hello",
    "Hey", "Dear", "Regards", "Best", "Cheers", "Sincerely", "Mr", "Mrs", "Ms", "Dr", "Prof", "Miss",
    "Name", "Re", "Fwd", "Subject", "Note", "Everybody", "Folks", "Guys", "Mom", "Dad", "Now",
    "Today", "Tomorrow", "Yesterday", "As", "By", "World",
}
_WORD = re.compile(r"[^\W\d_]+(?:['’\-][^\W\d_]+)*")
_PARTICLES = re.compile(rf"(?:{_PARTICLE} ){{0,3}}")
_INITIAL = re.compile(r" [^\W\d_]\. ")  # the gap around a middle initial: "Isabell E. Torvik"
# Faker's given-name lists: first_names, first_names_female, first_romanized_names, ...
_GIVEN_LISTS = re.compile(r"first_(?:romanized_)?names(?:_male|_female|_nonbinary)?")


def find_person_names(text: str) -> list[Span]:
    """Names announced by a title, a naming phrase, a greeting or a sign-off (module docstring)."""
    out = []
    for m in _PERSON_CUE.finditer(text):
        name = m.group("name")
        first = next((w for w in _WORD.findall(name) if w[0].isupper()), None)  # after "van den"
        if first is None or not _capitalised(first) or any(c.isdigit() for c in name):
            continue
        out.append((m.start("name"), m.start("name") + len(name), PERSON_CUE_SCORE))
    return out


def plausible_name(span: str) -> bool:
    """Starts with a capital, maybe after particles ("van der Berg"), and holds no digit or symbol
    ("S186077957507", "Grüße 🙂" are no names)."""
    return span[_PARTICLES.match(span).end():][:1].isupper() \
        and not any(c.isdigit() or unicodedata.category(c)[0] == "S" for c in span)


def _capitalised(word: str) -> bool:
    """Capitalised ("Ana", not "ANA" or "ana"), not a stop word ("May") nor a cue word ("Dear")."""
    return word[0].isupper() and not word.isupper() and word.lower() not in STOP_WORDS \
        and word not in NOT_NAMES


def _latin_name(name: str) -> bool:
    """One capitalised word in Latin script ("Júlia", "Jean-Luc")."""
    return bool(_WORD.fullmatch(name)) and len(name) > 1 and _capitalised(name) \
        and all("LATIN" in unicodedata.name(c, "") for c in name if c.isalpha())


def faker_given_names() -> set[str]:
    """The given names of Faker's person providers, every locale, Latin script (none without Faker)."""
    try:
        import faker.providers.person as providers
    except ImportError:
        return set()
    names: set[str] = set()
    for module in pkgutil.iter_modules(providers.__path__):
        provider = importlib.import_module(f"{providers.__name__}.{module.name}").Provider
        for attr in dir(provider):
            values = getattr(provider, attr)
            if _GIVEN_LISTS.fullmatch(attr) and isinstance(values, list | tuple | dict | set):
                names.update(n for n in values if isinstance(n, str) and _latin_name(n))
    return names


class NameLexicon:
    """Finds names around given names that are not English words (see the module docstring).

    Args:
        english: lower-case English words (``eyas.pii.local.english_words``). A given name that is
            also a word ("Star", "Royal", "Long") is dropped, and a word is no surname ("Star
            Wars", "Line Chart", "Adam Driver"): the NER model knows the names those would miss.
        given: the given names (default: ``faker_given_names()``).
    """

    def __init__(self, english: frozenset[str], given: set[str] | None = None) -> None:
        self.english = english
        given = faker_given_names() if given is None else given
        self.given = frozenset(n for n in given if not self._is_word(n))

    def _is_word(self, word: str) -> bool:
        lower = word.lower()
        return lower in self.english or (lower.endswith("s") and lower[:-1] in self.english) \
            or (lower.endswith("es") and lower[:-2] in self.english)

    def _surname(self, word: str) -> bool:
        return _capitalised(word) and not self._is_word(word)

    def find(self, text: str) -> list[Span]:
        """Spans of "Given [I.] Surname", "Surname, Given" and lone given names, LEXICON_SCORE."""
        if not self.given:
            return []
        words = _words(text)
        spans = (self._name_at(text, words, i) for i, (_, _, word) in enumerate(words) if word in self.given)
        return [span for span in spans if span is not None]

    def _name_at(self, text: str, words: list[_Word], i: int) -> Span | None:
        start, end, _ = words[i]
        before = words[i - 1] if i > 0 else None
        after = words[i + 1] if i + 1 < len(words) else None
        if after and (text[end:after[0]] == " " or _INITIAL.fullmatch(text[end:after[0]])) \
                and self._surname(after[2]):
            return start, after[1], LEXICON_SCORE
        if before and text[before[1]:start] == ", " and before[2] not in self.given \
                and self._surname(before[2]):
            return before[0], end, LEXICON_SCORE
        # Alone: not next to another capitalised word ("Los Angeles"); "Hi Ana" counts as alone.
        if before and text[before[1]:start] == " " and _capitalised(before[2]) \
                or after and text[end:after[0]] == " " and _capitalised(after[2]):
            return None
        return start, end, LEXICON_SCORE


def _words(text: str) -> list[_Word]:
    """The words of ``text`` without initials ("E.") and possessive "'s" ("Rože's" -> "Rože")."""
    out = []
    for m in _WORD.finditer(text):
        word = m.group()[:-2] if m.group().endswith(("'s", "’s")) else m.group()
        if not (len(word) == 1 and text[m.end():m.end() + 1] == "."):
            out.append((m.start(), m.start() + len(word), word))
    return out


def repeated_mentions(text: str, spans: list[Span]) -> list[Span]:
    """Occurrences in ``text`` of the capitalised words of the names at ``spans``, with their score.

    Occurrences inside ``spans`` are included (``outside`` drops them).
    """
    scores: dict[str, float] = {}
    for start, end, score in spans:
        for _, _, word in _words(text[start:end]):
            if len(word) > 1 and _capitalised(word):
                scores[word] = max(score, scores.get(word, 0.0))
    return [(start, end, scores[word]) for start, end, word in (_words(text) if scores else [])
            if word in scores]


def outside(spans: list[Span], taken: list[tuple[int, int]]) -> list[Span]:
    """The ``spans`` that overlap none of the ``taken`` ranges (n log n)."""
    starts: list[int] = []
    ends: list[int] = []
    for start, end in sorted(taken):  # merged into disjoint, sorted ranges
        if ends and start <= ends[-1]:
            ends[-1] = max(ends[-1], end)
        else:
            starts.append(start)
            ends.append(end)
    out = []
    for start, end, score in spans:
        i = bisect.bisect_right(starts, start) - 1  # the last range starting at or before start
        if not (i >= 0 and ends[i] > start or i + 1 < len(starts) and starts[i + 1] < end):
            out.append((start, end, score))
    return out
