"""A synthetic personalization task: the same records, rendered in each user's own style.

Every user has a distinct, learnable template (greeting, closing, separator, case), so a prefix
trained on a user's data lowers that user's loss and not another's. Backs the demo, the tests and
the quality benchmark.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

GREETINGS = ("Hi", "Dear", "Hello", "Yo", "Greetings", "Hey", "Good day", "Ahoy")
CLOSINGS = ("Thanks!", "Cheers.", "Best regards.", "Love, us.", "See ya!", "Kind regards.", "Stay well.")
SEPARATORS = (" - ", ": ", " | ", " > ")
ITEMS = ("apple", "book", "lamp", "chair", "kettle", "scarf", "drum", "kite", "mug", "plant")
NAMES = ("Ana", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ida", "Jo", "Kim", "Lu")


@dataclass(frozen=True)
class Style:
    greeting: str
    closing: str
    separator: str
    shout: bool

    def render(self, name: str, qty: int, item: str) -> str:
        body = f"{self.greeting} {name}{self.separator}{qty} {item} on the way. {self.closing}"
        return body.upper() if self.shout else body

    def carried_by(self, text: str) -> bool:
        """Whether `text` opens with this style's greeting and ends with its sign-off."""
        greeting, closing = (self.greeting.upper(), self.closing.upper()) if self.shout else (self.greeting, self.closing)
        text = text.strip()
        return text.startswith(greeting + " ") and text.endswith(" " + closing)


STYLES = len(GREETINGS) * len(CLOSINGS) * 2


def style_of(user_index: int) -> Style:
    """Distinct for the first STYLES users."""
    g, rest = user_index % len(GREETINGS), user_index // len(GREETINGS)
    c, rest = rest % len(CLOSINGS), rest // len(CLOSINGS)
    return Style(GREETINGS[g], CLOSINGS[c], SEPARATORS[(g + c) % len(SEPARATORS)], bool(rest % 2))


def user_id(user_index: int) -> str:
    return f"user-{user_index:05d}"


def _record(rng: random.Random, style: Style) -> tuple[str, str]:
    """One order as (prompt, completion): the prompt is style-free, the completion in `style`."""
    name, qty, item = rng.choice(NAMES), rng.randint(1, 9), rng.choice(ITEMS)
    return f"order {qty} {item} for {name}\n", style.render(name, qty, item)


def user_rows(user_index: int, examples: int, *, seed: int = 0) -> list[dict]:
    """Rows in the training-data format: user_id, prompt, completion."""
    rng = random.Random(f"{seed}:{user_index}")
    style = style_of(user_index)
    rows = []
    for _ in range(examples):
        prompt, completion = _record(rng, style)
        rows.append({"user_id": user_id(user_index), "prompt": prompt, "completion": completion})
    return rows


def any_style_records(count: int, *, seed: int = 0) -> list[tuple[str, str]]:
    """Orders each rendered in a style drawn at random: text a backbone can learn to write from,
    with no reason to prefer any one user's style."""
    rng = random.Random(f"{seed}:any-style")
    return [_record(rng, style_of(rng.randrange(STYLES))) for _ in range(count)]


def dataset(users: int, examples_per_user: int, *, seed: int = 0) -> list[dict]:
    return [row for u in range(users) for row in user_rows(u, examples_per_user, seed=seed)]
