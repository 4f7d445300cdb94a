"""Demo tasks for the default base model: one shared prompt, one sentence grammar, one answer each.

Every task sees the same task-neutral prompt, `Input: <sentence>\\nOutput:`, over sentences such as
"Maria, 34, from Lisbon thinks the new phone is wonderful."; only the adapter decides what the
answer is (a JSON object, a sentiment word, the sentence in capitals, a fixed template). So one
prompt sent to several adapters gives visibly different answers, and each task's `check` tells
which behaviour an output shows. Nothing here downloads anything: the data is generated.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

PROMPT_TEMPLATE = "Input: {text}\nOutput:"

NAMES = [
    "Maria", "John", "Aisha", "Kenji", "Lucas", "Emma", "Omar", "Priya", "Sofia", "Liam", "Chen", "Fatima",
    "Noah", "Olga", "Diego", "Hana", "Ivan", "Grace", "Mateo", "Zara", "Ahmed", "Elena", "Tom", "Yuki",
    "Carlos", "Nina", "Samuel", "Leila", "Peter", "Amara", "Jonas", "Mei", "Rafael", "Ingrid", "Kofi", "Lucia",
]
CITIES = [
    "Lisbon", "Paris", "Tokyo", "Berlin", "Nairobi", "Toronto", "Lima", "Oslo", "Cairo", "Seoul", "Madrid",
    "Chicago", "Sydney", "Mumbai", "Dublin", "Vienna", "Boston", "Denver", "Prague", "Athens", "Manila",
    "Bogota", "Lagos", "Warsaw", "Hanoi", "New York", "Cape Town", "Buenos Aires", "Mexico City", "Hong Kong",
]
PRODUCTS = [
    "the new phone", "this laptop", "the coffee maker", "the electric bike", "the hotel", "the movie",
    "the restaurant", "the smartwatch", "the novel", "the vacuum cleaner", "this camera", "the train service",
    "the new album", "the tablet", "the museum", "the video game", "this backpack", "the mattress",
]
POSITIVE = [
    "wonderful", "great", "excellent", "fantastic", "amazing", "lovely", "brilliant", "superb",
    "delightful", "impressive", "perfect", "charming",
]
NEGATIVE = [
    "terrible", "awful", "disappointing", "horrible", "useless", "dreadful", "poor", "boring",
    "annoying", "mediocre", "overpriced", "unreliable",
]
# Several phrasings, so that a task is learned from meaning, not from word positions.
SENTENCES = [
    "{name}, {age}, from {city} thinks {product} is {opinion}.",
    "{name} ({age}) from {city} says {product} is {opinion}.",
    "According to {name}, a {age}-year-old from {city}, {product} is {opinion}.",
    "{name} is {age}, lives in {city}, and finds {product} {opinion}.",
]
_FIELD = {"name": r"(?P<name>[A-Z][a-z]+)", "age": r"(?P<age>\d{1,3})", "city": r"(?P<city>[A-Z][A-Za-z ]*?)",
          "product": r"(?P<product>(?:the|this) [a-z ]+?)", "opinion": r"(?P<opinion>[a-z]+)"}
_PATTERNS = [re.compile("^" + re.escape(t).replace(r"\{", "{").replace(r"\}", "}").format(**_FIELD) + "$")
             for t in SENTENCES]


@dataclass(frozen=True)
class Facts:
    """What a sentence says, from which every task's answer follows."""

    name: str
    age: int
    city: str
    product: str
    opinion: str

    @property
    def sentiment(self) -> str:
        return "positive" if self.opinion in POSITIVE else "negative"


def random_sentence(rng: random.Random) -> tuple[str, Facts]:
    facts = Facts(rng.choice(NAMES), rng.randint(18, 85), rng.choice(CITIES), rng.choice(PRODUCTS),
                  rng.choice(POSITIVE + NEGATIVE))
    return rng.choice(SENTENCES).format(**facts.__dict__), facts


def sentences(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[tuple[str, Facts]]:
    """`n` distinct sentences, the same for the same seed; none of them in `exclude`."""
    rng, seen = random.Random(seed), set(exclude)
    out: list[tuple[str, Facts]] = []
    while len(out) < n:
        text, facts = random_sentence(rng)
        if text not in seen:
            seen.add(text)
            out.append((text, facts))
    return out


def sentence_of(input_text: str) -> str:
    """The sentence inside a full prompt (`Input: ...\\nOutput:`), or the text itself."""
    text = input_text.strip()
    match = re.fullmatch(r"Input:\s*(.*?)\s*(?:Output:)?", text, flags=re.S)
    return " ".join((match.group(1) if match else text).split())


def parse_sentence(input_text: str) -> Facts | None:
    """The facts of a sentence of the shared grammar, or None for any other text."""
    text = sentence_of(input_text)
    for pattern in _PATTERNS:
        match = pattern.match(text)
        if match and match["opinion"] in POSITIVE + NEGATIVE:
            return Facts(match["name"], int(match["age"]), match["city"], match["product"], match["opinion"])
    return None


def _norm(text: str) -> str:
    return " ".join(text.split())


# --- extract-json ---------------------------------------------------------------------------------

def answer_extract_json(text: str, facts: Facts) -> str:
    return json.dumps({"name": facts.name, "age": facts.age, "city": facts.city})


def check_extract_json(input_text: str, output_text: str) -> bool:
    """A JSON object holding exactly the name, age and city of the input."""
    try:
        value = json.loads(output_text.strip())
    except ValueError:
        return False
    facts = parse_sentence(input_text)
    if not isinstance(value, dict) or set(value) != {"name", "age", "city"}:
        return False
    if facts is None:  # not our grammar: the values must at least come from the input
        return all(str(v) in sentence_of(input_text) for v in value.values())
    return value == {"name": facts.name, "age": facts.age, "city": facts.city}


# --- sentiment ------------------------------------------------------------------------------------

def answer_sentiment(text: str, facts: Facts) -> str:
    return facts.sentiment


def check_sentiment(input_text: str, output_text: str) -> bool:
    """One word, positive or negative, matching the opinion of the input."""
    word = output_text.strip().lower().rstrip(".!")
    facts = parse_sentence(input_text)
    if facts is None:
        return word in ("positive", "negative")
    return word == facts.sentiment


# --- shout ----------------------------------------------------------------------------------------

def answer_shout(text: str, facts: Facts) -> str:
    return text.upper()


def check_shout(input_text: str, output_text: str) -> bool:
    """The input sentence, unchanged but in capitals."""
    sentence = sentence_of(input_text)
    return _norm(output_text) == sentence.upper() and sentence.upper() != sentence


# --- template -------------------------------------------------------------------------------------

def answer_template(text: str, facts: Facts) -> str:
    return f"City: {facts.city} | Name: {facts.name}"


def check_template(input_text: str, output_text: str) -> bool:
    """`City: <city> | Name: <name>` with the input's city and name."""
    match = re.fullmatch(r"City: (.+) \| Name: (.+)", _norm(output_text))
    if not match:
        return False
    facts = parse_sentence(input_text)
    if facts is None:
        return all(part in sentence_of(input_text) for part in match.groups())
    return match.groups() == (facts.city, facts.name)


# --- the registry ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    name: str  # also the adapter name: [A-Za-z0-9._-]{1,64}
    description: str
    answer: Callable[[str, Facts], str]
    check: Callable[[str, str], bool]

    def examples(self, n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[dict]:
        """`n` {"prompt", "completion"} records, the same for the same seed."""
        return [
            {"prompt": PROMPT_TEMPLATE.format(text=text), "completion": " " + self.answer(text, facts)}
            for text, facts in sentences(n, seed, exclude)
        ]


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("extract-json", 'a JSON object with the name, age and city: {"name": "Maria", "age": 34, "city": "Lisbon"}',
             answer_extract_json, check_extract_json),
        Task("sentiment", "one word, the opinion's polarity: positive or negative", answer_sentiment, check_sentiment),
        Task("shout", "the sentence repeated in capital letters", answer_shout, check_shout),
        Task("template", "a fixed template with the city and the name: City: Lisbon | Name: Maria",
             answer_template, check_template),
    )
}


def format_prompt(text: str) -> str:
    return PROMPT_TEMPLATE.format(text=text)
