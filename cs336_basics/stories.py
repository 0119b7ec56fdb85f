"""A built-in, deterministic corpus of short TinyStories-like stories.

The quickstart needs a few megabytes of simple English without a download. Stories are assembled
from templates and word lists with a seeded ``random.Random``: a hero (name, kind, trait), a place,
an object, a small problem, a helper with dialogue, a resolution and a closing line. The structure
repeats enough that a tiny LM's loss falls quickly, and varies enough that its samples are readable
rather than memorised. Same ``seed`` -> same text on every platform: ``random.Random`` with an int
seed is specified to give the same ``random()`` and ``choice()`` sequence everywhere.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cs336_basics.fileio import atomic_output

GIRLS = ["Lily", "Mia", "Sue", "Anna", "Lucy", "Emma", "Zoe", "Amy", "Kate", "Rose", "Ella", "Sara", "Jane", "Molly", "Daisy", "Ruby"]
BOYS = ["Tim", "Ben", "Sam", "Max", "Tom", "Jack", "Leo", "Joe", "Finn", "Bob", "Dan", "Noah", "Jake", "Eli", "Ollie", "Timmy"]
ANIMALS = [
    ("dog", "barked"), ("cat", "purred"), ("bunny", "hopped"), ("bird", "sang"), ("duck", "quacked"),
    ("frog", "croaked"), ("bear", "growled"), ("mouse", "squeaked"), ("fox", "yipped"), ("puppy", "wagged its tail"),
    ("kitten", "mewed"), ("owl", "hooted"), ("pig", "oinked"), ("lamb", "bleated"), ("turtle", "smiled"),
]
ANIMAL_NAMES = ["Spot", "Fluffy", "Buddy", "Whiskers", "Pip", "Coco", "Max", "Bella", "Sunny", "Patch", "Hoppy", "Ziggy"]
TRAITS = ["happy", "curious", "kind", "brave", "shy", "funny", "little", "friendly", "clever", "gentle", "playful", "silly"]
PLACES = [
    ("park", "under a big tree"), ("garden", "near the flowers"), ("forest", "by a tall pine"),
    ("beach", "on the warm sand"), ("farm", "next to the red barn"), ("pond", "by the water"),
    ("school", "in the playground"), ("backyard", "behind the fence"), ("meadow", "in the tall grass"),
    ("village", "on a quiet street"), ("zoo", "near the monkeys"), ("hill", "at the very top"),
]
OBJECTS = [
    ("ball", "red"), ("kite", "blue"), ("teddy bear", "soft"), ("toy car", "shiny"), ("box", "big"),
    ("hat", "yellow"), ("book", "old"), ("drum", "loud"), ("balloon", "green"), ("shell", "pretty"),
    ("key", "golden"), ("cup", "small"), ("flower", "pink"), ("rock", "smooth"), ("boat", "wooden"),
    ("doll", "new"), ("map", "secret"), ("bell", "tiny"), ("stick", "long"), ("star", "sparkly"),
]
HELPERS = ["mom", "dad", "grandma", "grandpa", "friend", "teacher", "big sister", "big brother"]
WEATHER = ["sunny", "windy", "rainy", "cold", "warm", "bright", "cloudy", "snowy"]
GOOD_FEELINGS = ["happy", "glad", "proud", "excited", "thankful", "joyful"]
BAD_FEELINGS = ["sad", "worried", "scared", "upset", "lonely", "angry"]
TIMES = ["One day", "One morning", "One sunny day", "One evening", "Later that day", "After lunch"]
OPENINGS = [
    "Once upon a time, there was a {trait} {kind} named {name}.",
    "Once upon a time there was a {trait} {kind} called {name}.",
    "There was once a {trait} {kind} named {name}.",
    "{name} was a {trait} {kind} who lived near the {place}.",
    "In a small town, there lived a {trait} {kind} named {name}.",
]
LIKES = [
    "{sub_cap} loved to play in the {place} every day.",
    "{sub_cap} liked to run and jump and laugh with {pos} friends.",
    "{sub_cap} had a {adj} {obj} that {sub} loved very much.",
    "Every day, {sub} went to the {place} to look for fun things.",
    "{sub_cap} liked to sing songs and draw pictures.",
]
PROBLEMS = [
    ("lost", "{time}, {name} could not find {pos} {adj} {obj}. {sub_cap} looked {spot}, but it was not there."),
    ("stuck", "{time}, {name}'s {adj} {obj} got stuck high up in a tree. {sub_cap} could not reach it."),
    ("broken", "{time}, {name} dropped {pos} {adj} {obj} and it broke. {sub_cap} looked at the pieces."),
    ("alone", "{time}, {name} went to the {place}, but nobody wanted to play. {sub_cap} sat down all alone."),
    ("dark", "{time}, it got very dark in the {place}. {name} could not see the way home."),
    ("share", "{time}, {name} found a {adj} {obj} in the {place}. Another child wanted to play with it too."),
]
FEEL_BAD = [
    "{name} felt {bad}.",
    "{name} was very {bad} and started to cry.",
    "{sub_cap} felt {bad} and did not know what to do.",
]
ASKS = {
    "lost": "\"Can you help me find my {obj}?\" {name} asked.",
    "stuck": "\"My {obj} is stuck! Can you help me?\" {name} said.",
    "broken": "\"My {obj} is broken,\" {name} said. \"Can we fix it?\"",
    "alone": "\"Nobody wants to play with me,\" {name} said.",
    "dark": "\"I am scared of the dark,\" {name} said. \"I want to go home.\"",
    "share": "\"This is my {obj}!\" {name} said. \"I want to keep it.\"",
}
HELPER_REPLIES = {
    "lost": "\"Let's look together,\" said the {helper}. \"Maybe it is {spot}.\"",
    "stuck": "\"Don't worry,\" said the {helper}. \"I will get a long stick.\"",
    "broken": "\"We can fix it with some glue,\" said the {helper} with a smile.",
    "alone": "\"I will play with you,\" said the {helper}. \"Let's play a game!\"",
    "dark": "\"Hold my hand,\" said the {helper}. \"I know the way.\"",
    "share": "\"It is more fun when we share,\" said the {helper}.",
}
RESOLUTIONS = {
    "lost": "They looked and looked. At last, they found the {obj} {spot}!",
    "stuck": "The {helper} used the stick and the {obj} fell down into {name}'s hands.",
    "broken": "They worked together, and soon the {obj} was as good as new.",
    "alone": "They played all afternoon, and soon other children came to play too.",
    "dark": "They walked slowly together, and soon they saw the lights of home.",
    "share": "{name} gave the other child a turn, and they played with the {obj} together.",
}
FEEL_GOOD = [
    "{name} felt {good}. \"Thank you!\" {sub} said.",
    "{name} smiled a big smile. {sub_cap} was so {good}.",
    "{name} hugged the {helper}. \"You are the best!\" {sub} said.",
    "{name} jumped up and down. {sub_cap} felt very {good}.",
]
ANIMAL_BEATS = [
    "{pet_name} the {pet} {pet_sound} and ran to help.",
    "Just then, a {trait2} {pet} named {pet_name} came by. The {pet} {pet_sound}.",
    "{name}'s {pet}, {pet_name}, {pet_sound} and sat next to {obj_pron}.",
]
ENDINGS = [
    "From that day on, {name} always took good care of {pos} {obj}.",
    "{name} learned that it is good to ask for help.",
    "{name} learned that sharing makes everyone happy.",
    "That night, {name} went to bed with a big smile.",
    "And {name} and the {helper} were friends forever.",
    "The end.",
    "It was the best day ever.",
]
SPOTS = ["under the bed", "behind the door", "in the grass", "near the tree", "in the toy box", "under a leaf", "by the window"]


@dataclass(frozen=True)
class _Hero:
    name: str
    kind: str
    sub: str  # he / she
    pos: str  # his / her
    obj_pron: str  # him / her


def _hero(rng: random.Random) -> _Hero:
    if rng.random() < 0.5:
        return _Hero(rng.choice(GIRLS), rng.choice(["girl", "girl", "princess", "kid"]), "she", "her", "her")
    return _Hero(rng.choice(BOYS), rng.choice(["boy", "boy", "prince", "kid"]), "he", "his", "him")


def _story(rng: random.Random) -> str:
    hero = _hero(rng)
    if rng.random() < 0.25:  # sometimes the hero is an animal
        kind, _ = rng.choice(ANIMALS)
        hero = _Hero(rng.choice(ANIMAL_NAMES), kind, hero.sub, hero.pos, hero.obj_pron)
    place, spot_in_place = rng.choice(PLACES)
    obj, adj = rng.choice(OBJECTS)
    pet, pet_sound = rng.choice(ANIMALS)
    problem, problem_text = rng.choice(PROBLEMS)
    words = {
        "name": hero.name, "kind": hero.kind, "sub": hero.sub, "sub_cap": hero.sub.capitalize(),
        "pos": hero.pos, "obj_pron": hero.obj_pron, "trait": rng.choice(TRAITS), "trait2": rng.choice(TRAITS),
        "place": place, "obj": obj, "adj": adj, "helper": rng.choice(HELPERS), "time": rng.choice(TIMES),
        "spot": rng.choice(SPOTS), "bad": rng.choice(BAD_FEELINGS), "good": rng.choice(GOOD_FEELINGS),
        "pet": pet, "pet_sound": pet_sound, "pet_name": rng.choice(ANIMAL_NAMES), "weather": rng.choice(WEATHER),
    }

    opening = [rng.choice(OPENINGS), rng.choice(LIKES)]
    if rng.random() < 0.5:
        opening.append("It was a {weather} day, and the sky was " + rng.choice(["blue", "grey", "clear", "pink"]) + ".")
    middle = [problem_text, rng.choice(FEEL_BAD)]
    if rng.random() < 0.4:
        middle.append(rng.choice(ANIMAL_BEATS))
    middle += [
        "Then {sub} saw {pos} {helper} " + spot_in_place + ".",
        ASKS[problem],
        HELPER_REPLIES[problem],
        RESOLUTIONS[problem],
        rng.choice(FEEL_GOOD),
    ]
    ending = [rng.choice(ENDINGS)]

    paragraphs = [" ".join(opening), " ".join(middle[:3]), " ".join(middle[3:]), " ".join(ending)]
    if rng.random() < 0.5:  # TinyStories mixes one-paragraph and multi-paragraph stories
        paragraphs = [" ".join(paragraphs[:2]), " ".join(paragraphs[2:])]
    return "\n".join(p.format(**words) for p in paragraphs)


def generate_stories(num_stories: int, seed: int = 0) -> Iterator[str]:
    """Yield ``num_stories`` stories; the same ``seed`` always gives the same stories."""
    if num_stories < 0:
        raise ValueError(f"num_stories must be >= 0, got {num_stories}")
    rng = random.Random(seed)
    for _ in range(num_stories):
        yield _story(rng)


def write_corpus(path: str | Path, num_stories: int, seed: int = 0, separator: str = "<|endoftext|>") -> Path:
    """Write stories to ``path`` as TinyStories does ("story\\n<|endoftext|>\\nstory..."), atomically."""

    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for story in generate_stories(num_stories, seed):
            f.write(story)
            f.write(f"\n{separator}\n")
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m cs336_basics.stories", description="Write the built-in story corpus.")
    p.add_argument("output", help="text file to write, e.g. data/stories-train.txt")
    p.add_argument("--num-stories", type=int, default=8000, help="number of stories (~0.56 KB each; default 8000)")
    p.add_argument("--seed", type=int, default=0, help="use a different seed for validation text")
    args = p.parse_args(argv)
    if args.num_stories < 1:
        p.error(f"--num-stories must be at least 1, got {args.num_stories}")
    path = write_corpus(args.output, args.num_stories, seed=args.seed)
    print(f"✓ Wrote {args.num_stories:,} stories to {path} ({path.stat().st_size / 1024**2:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
