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


def style_of(user_index: int) -> Style:
    """Distinct for the first len(GREETINGS) * len(CLOSINGS) * 2 users."""
    g, rest = user_index % len(GREETINGS), user_index // len(GREETINGS)
    c, rest = rest % len(CLOSINGS), rest // len(CLOSINGS)
    return Style(GREETINGS[g], CLOSINGS[c], SEPARATORS[(g + c) % len(SEPARATORS)], bool(rest % 2))


def user_id(user_index: int) -> str:
    return f"user-{user_index:05d}"


def user_rows(user_index: int, examples: int, *, seed: int = 0) -> list[dict]:
    """Rows in the training-data format: user_id, prompt, completion."""
    rng = random.Random(f"{seed}:{user_index}")
    style = style_of(user_index)
    rows = []
    for _ in range(examples):
        name, qty, item = rng.choice(NAMES), rng.randint(1, 9), rng.choice(ITEMS)
        rows.append({"user_id": user_id(user_index), "prompt": f"order {qty} {item} for {name}\n",
                     "completion": style.render(name, qty, item)})
    return rows


def dataset(users: int, examples_per_user: int, *, seed: int = 0) -> list[dict]:
    return [row for u in range(users) for row in user_rows(u, examples_per_user, seed=seed)]
