"""Write `sentences.txt` and `short_utterances.txt`: the project's part of the English bank the synthetic
corpora are spoken from.

Every sentence is written for this project (templates and word lists below, no copied corpus), so the
bank is license-clean. `short_utterances.txt` holds what people say in one to four words and WordNet's
examples (five words and more) never give: digit strings, numbers, dates and times said alone, commands,
answers, names and single words. A student that never hears a clip end after one word learns to keep going. It mixes plain prose with the things Whisper's English normaliser has to
handle: cardinals, ordinals, years, clock times, money, percentages, names and titles (Mr., Mrs.,
Dr., St.), and punctuation. Money is written "42 dollars" rather than "$42" because espeak-ng reads
"$42" as "dollar forty-two", which would make the reference disagree with the audio.

Deterministic: `python distil/data/resources/make_sentences.py` rewrites the same files byte for byte.
"""

from __future__ import annotations

import random
from pathlib import Path

FIRST = """Anna Peter Maria James Olivia Thomas Grace Daniel Sofia Henry Laura Samuel Emma Oliver Chloe
Victor Nina Robert Alice George Helen Martin Ruth Edward Clara Lucas Hannah Isaac Julia Frank Rosa Leo
Megan Arthur Irene Oscar Paula Simon Lily Walter""".split()
SURNAME = """Smith Patel Garcia Brown Nguyen Walker Murphy Fischer Cohen Rossi Baker Turner Hughes Kim
Lopez Morgan Reed Carter Bennett Foster Hall Price Ward Shaw Young Grant Palmer Wells Fraser Lambert""".split()
TITLE = ["Mr.", "Mrs.", "Ms.", "Dr."]
CITY = """London Chicago Boston Dublin Seattle Denver Toronto Sydney Madrid Berlin Paris Edinburgh Atlanta
Houston Oslo Vienna Lisbon Austin Portland Glasgow Melbourne Montreal Phoenix Rome""".split()
SAINT = [
    "St. Louis",
    "St. Paul's Cathedral",
    "St. Andrews",
    "St. Mary's Church",
    "St. James's Park",
    "St. Ives",
]
WEEKDAY = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTH = "January February March April May June July August September October November December".split()
RELATIVE = "sister brother cousin uncle aunt neighbour grandfather grandmother friend colleague".split()
COLOUR = "red blue green silver white black yellow grey".split()
VEHICLE = ["bicycle", "car", "van", "scooter", "pickup truck", "motorbike", "camper van"]
ITEM = """umbrella notebook phone charger passport wallet scarf calculator torch kettle ticket""".split()
ITEMS = [
    "apples",
    "candles",
    "notebooks",
    "tickets",
    "loaves of bread",
    "light bulbs",
    "stamps",
    "pencils",
    "oranges",
    "plates",
]
SHOP = ["market", "corner shop", "bakery", "bookshop", "hardware store", "post office", "pharmacy"]
CONTAINER = [
    "drawer",
    "blue box",
    "kitchen cupboard",
    "glove compartment",
    "top shelf",
    "back pocket of my bag",
]
FURNITURE = ["sofa", "desk", "bookcase", "window", "front door", "fridge", "bed"]
BUILDING = [
    "library",
    "town hall",
    "station",
    "museum",
    "hospital",
    "cinema",
    "post office",
    "stadium",
    "school",
]
OCCUPATION = [
    "nurse",
    "pilot",
    "baker",
    "teacher",
    "engineer",
    "gardener",
    "lawyer",
    "plumber",
    "journalist",
    "chef",
]
ANIMAL = ["cat", "dog", "fox", "rabbit", "goat", "parrot", "horse", "owl", "puppy", "hedgehog"]
ADJ = ["old", "sleepy", "small", "grumpy", "friendly", "tired", "curious", "quiet", "hungry", "clever"]
LANDSCAPE = ["river", "coast", "canal", "valley", "old railway line", "lake", "beach", "forest path"]
RIVER = ["Thames", "Hudson", "Danube", "Shannon", "Mississippi", "Clyde", "Seine", "Tagus"]
PLAN = ["budget", "timetable", "parking scheme", "school building", "library wing", "bus route", "park"]
GROUP = ["members", "residents", "parents", "staff", "students", "voters", "shareholders", "neighbours"]
INGREDIENT = ["flour", "sugar", "rice", "milk", "oats", "water", "chopped nuts", "grated cheese"]
SUBJECT = ["history", "chemistry", "maths", "biology", "geography", "French", "physics", "music"]
CONTEST = [
    "baking contest",
    "chess tournament",
    "photo competition",
    "spelling bee",
    "garden show",
    "poetry prize",
]
TASK = ["report", "kitchen", "website", "garden fence", "translation", "new album", "survey", "book"]
EVENT = ["concert", "wedding", "match", "school play", "dentist appointment", "book club", "team dinner"]
LANDMARK = [
    "the old church",
    "the fountain",
    "the petrol station",
    "the big oak tree",
    "the traffic lights",
    "the bakery",
]
FOOD = ["soup", "pasta", "curry", "pie", "salad", "bread", "rice pudding", "stew"]
WEATHER = ["rain", "snow", "fog", "wind", "storms", "thunder", "hail"]
PERIOD = ["month", "year", "quarter", "week", "spring", "winter"]
ORD = {
    1: "1st", 2: "2nd", 3: "3rd", 21: "21st", 22: "22nd", 23: "23rd", 31: "31st",
}  # fmt: skip


def ordinal(n: int) -> str:
    return ORD.get(n, f"{n}th")


def clock(r: random.Random) -> str:
    hour, minute = r.randint(1, 12), r.choice([0, 5, 10, 15, 20, 30, 40, 45, 50])
    suffix = r.choice(["a.m.", "p.m.", "", "", ""])
    if minute == 0 and not suffix:
        return f"{hour} o'clock"
    text = f"{hour}:{minute:02d}" if minute else f"{hour}"
    return f"{text} {suffix}".strip()


def money(r: random.Random) -> str:
    kind = r.random()
    if kind < 0.5:
        return f"{r.choice([3, 5, 8, 12, 15, 20, 25, 40, 60, 75, 99, 120, 250, 480])} dollars"
    if kind < 0.75:
        return f"{r.randint(2, 30)} dollars and {r.choice([10, 25, 40, 50, 75, 99])} cents"
    return f"{r.choice([1, 2, 3, 5, 12, 40])},{r.choice(['000', '200', '500', '750'])} pounds"


def pct(r: random.Random) -> str:
    return f"{r.choice([2, 3, 5, 7, 10, 12, 15, 18, 20, 25, 30, 40, 45, 60, 75, 80, 90])}%"


def year(r: random.Random) -> str:
    return str(r.choice([r.randint(1890, 1999), r.randint(2000, 2024)]))


def date(r: random.Random) -> str:
    day = r.randint(1, 28)
    return r.choice([f"{r.choice(MONTH)} {ordinal(day)}", f"the {ordinal(day)} of {r.choice(MONTH)}"])


def person(r: random.Random) -> str:
    return r.choice(
        [f"{r.choice(TITLE)} {r.choice(SURNAME)}", r.choice(FIRST), f"{r.choice(FIRST)} {r.choice(SURNAME)}"]
    )


def big(r: random.Random) -> str:
    return f"{r.randint(2, 95)},{r.randint(0, 9)}00"


# Each template is a function of the random source, so slots can depend on each other.
TEMPLATES = [
    lambda r: (
        f"{r.choice(TITLE)} {r.choice(SURNAME)} will arrive in {r.choice(CITY)} at {clock(r)} on {r.choice(WEEKDAY)}."
    ),
    lambda r: f"The train to {r.choice(CITY)} leaves from platform {r.randint(1, 14)} at {clock(r)}.",
    lambda r: (
        f"{r.choice(FIRST)} paid {money(r)} for {r.randint(2, 12)} {r.choice(ITEMS)} at the {r.choice(SHOP)}."
    ),
    lambda r: f"Prices rose by {pct(r)} last {r.choice(PERIOD)}, according to the new report.",
    lambda r: f"Please meet me outside the {r.choice(BUILDING)} at a quarter past {r.randint(1, 12)}.",
    lambda r: (
        f"The meeting has been moved to the {ordinal(r.randint(2, 12))} floor, room {r.randint(101, 950)}."
    ),
    lambda r: (
        f"In {year(r)}, {r.choice(FIRST)} opened a small {r.choice(['bakery', 'bookshop', 'cafe', 'garage', 'flower shop'])} in {r.choice(CITY)}."
    ),
    lambda r: (
        f"Did you know that {r.choice(TITLE)} {r.choice(SURNAME)} was born on {r.choice(MONTH)} {ordinal(r.randint(1, 28))}, {r.randint(1920, 1999)}?"
    ),
    lambda r: f"Our team finished {ordinal(r.randint(1, 9))} out of {r.randint(10, 40)} teams this season.",
    lambda r: (
        "{} and {} walked".format(*r.sample(FIRST, 2))
        + f" {r.randint(3, 19)} miles along the {r.choice(LANDSCAPE)} before lunch."
    ),
    lambda r: (
        f"The {r.choice(ADJ)} {r.choice(ANIMAL)} slept under the {r.choice(['sofa', 'desk', 'bed', 'kitchen table', 'stairs', 'piano'])} all afternoon."
    ),
    lambda r: f"Could you call {r.choice(TITLE)} {r.choice(SURNAME)} back before {clock(r)} tomorrow?",
    lambda r: f"The invoice for {money(r)} is due on {date(r)}.",
    lambda r: f"About {pct(r)} of the {r.choice(GROUP)} voted in favour of the new {r.choice(PLAN)}.",
    lambda r: f"We stayed at a small hotel near {r.choice(SAINT)} for {r.randint(2, 9)} nights.",
    lambda r: f"The recipe needs {r.randint(2, 6)} cups of {r.choice(INGREDIENT)} and a pinch of salt.",
    lambda r: (
        f"{r.choice(FIRST)}'s flight from {r.choice(CITY)} was delayed by {r.choice([15, 20, 35, 40, 45, 90])} minutes."
    ),
    lambda r: f"I think the {r.choice(ITEM)} is in the {r.choice(CONTAINER)}, next to the {r.choice(ITEMS)}.",
    lambda r: (
        f"The {r.choice(BUILDING)} opens at {r.randint(7, 10)} a.m. and closes at {r.randint(4, 9)} p.m. on weekends."
    ),
    lambda r: (
        f"After {r.randint(3, 12)} years of work, the bridge over the {r.choice(RIVER)} finally opened in {year(r)}."
    ),
    lambda r: f"Why did the {r.choice(OCCUPATION)} leave the {r.choice(BUILDING)} so early yesterday?",
    lambda r: (
        f"{r.choice(TITLE)} {r.choice(SURNAME)} says the new {r.choice(PLAN)} will cost roughly {r.choice([2, 3, 4, 7, 12, 15, 40])} million {r.choice(['dollars', 'pounds'])}."
    ),
    lambda r: f"The score was {r.randint(0, 5)} to {r.randint(0, 5)} at half time, and the crowd went quiet.",
    lambda r: (
        f"Turn left at {r.choice(LANDMARK)}, then walk another {r.choice([50, 100, 200, 300, 400, 500])} metres."
    ),
    lambda r: f"My {r.choice(RELATIVE)} still remembers the {r.choice(WEATHER)} in the winter of {year(r)}.",
    lambda r: f"The library in {r.choice(CITY)} holds more than {big(r)} books, maps, and old letters.",
    lambda r: (
        f"My {r.choice(RELATIVE)} bought a {r.choice(COLOUR)} {r.choice(VEHICLE)} for {money(r)} last {r.choice(MONTH)}."
    ),
    lambda r: "Wait, is the {} on {} or on {}?".format(r.choice(EVENT), *r.sample(WEEKDAY, 2)),
    lambda r: (
        f"{r.choice(FIRST)} reads {r.choice([10, 15, 20, 25, 30, 40, 50])} pages every night before going to sleep."
    ),
    lambda r: (
        f"The temperature in {r.choice(CITY)} dropped to {r.randint(-12, 9)} degrees just after midnight."
    ),
    lambda r: f"Our {ordinal(r.randint(2, 30))} anniversary falls on a {r.choice(WEEKDAY)} this year.",
    lambda r: (
        f"Only {r.randint(3, 19)} of the {r.randint(20, 35)} students passed the {r.choice(SUBJECT)} exam."
    ),
    lambda r: f"The company's profits grew by {pct(r)} in {year(r)}, its best year so far.",
    lambda r: (
        f"Dr. {r.choice(SURNAME)} asked {r.choice(FIRST)} to rest for at least {r.randint(2, 14)} days."
    ),
    lambda r: f"The bus stops at {r.choice(LANDMARK)}, the {r.choice(BUILDING)}, and the old market.",
    lambda r: (
        f"{r.choice(FIRST)} won {ordinal(r.randint(1, 3))} prize in the {r.choice(CONTEST)} and a cheque for {money(r)}."
    ),
    lambda r: (
        lambda h: f"The {r.choice(EVENT)} starts at {h}:30 p.m., so let's leave the house by {h - 1}:45."
    )(r.randint(6, 9)),
    lambda r: f"Can we finish the {r.choice(TASK)} by the end of {r.choice(MONTH)}?",
    lambda r: (
        f"{r.choice(TITLE)} {r.choice(SURNAME)} gave a short talk about the history of {r.choice(CITY)}."
    ),
    lambda r: (
        f"There were {r.randint(12, 480)} people at the {r.choice(['concert', 'wedding', 'match', 'school play', 'summer fair', 'opening night'])}, far more than we expected!"
    ),
    lambda r: f"Honestly, {r.choice(FIRST)}, I have never tasted {r.choice(FOOD)} as good as this.",
    lambda r: f"The {r.choice(WEATHER)} kept us indoors for {r.randint(2, 6)} days in {r.choice(MONTH)}.",
    lambda r: f"{person(r)} has worked as a {r.choice(OCCUPATION)} in {r.choice(CITY)} since {year(r)}.",
    lambda r: f"Room {r.randint(2, 60)} is booked from {r.randint(8, 11)} until noon on {r.choice(WEEKDAY)}.",
    lambda r: (
        f"Unemployment fell to {r.randint(3, 9)}.{r.randint(1, 9)}% in {r.choice(MONTH)}, the lowest level in years."
    ),
    lambda r: f'"Where did you put the {r.choice(ITEM)}?" asked {r.choice(FIRST)}.',
    lambda r: (
        f'The {r.choice(OCCUPATION)} said, "Come back on {r.choice(WEEKDAY)}, and bring the {r.choice(ITEM)}."'
    ),
    lambda r: (
        f"{r.choice(FIRST)} counted {r.randint(11, 99)} {r.choice(['birds', 'boats', 'sheep', 'cars', 'bicycles'])} from the top of the hill."
    ),
    lambda r: f"Mr. and Mrs. {r.choice(SURNAME)} moved to {r.choice(CITY)} on {date(r)}.",
    lambda r: f"The {ordinal(r.randint(2, 9))} chapter is much shorter than the first, thank goodness.",
    lambda r: (
        f"Last {r.choice(WEEKDAY)}, the {r.choice(ANIMAL)} escaped through a gap in the {r.choice(['fence', 'hedge', 'gate', 'wall'])}."
    ),
    lambda r: f"Is it true that the {r.choice(BUILDING)} was built in {year(r)}?",
    lambda r: f"We need {r.randint(2, 9)} more chairs, {r.randint(2, 5)} tables, and a long extension cable.",
    lambda r: (
        f"{r.choice(FIRST)} sent the {r.choice(TASK)} to {r.choice(TITLE)} {r.choice(SURNAME)} just before {clock(r)}."
    ),
    lambda r: (lambda p: f"The tickets cost {p} dollars each, or {3 * p} dollars for a family of four.")(
        r.randint(4, 40)
    ),
    lambda r: f"Around {pct(r)} of the {r.choice(FOOD)} was gone before the speeches even began.",
    lambda r: (
        f"I'll be in {r.choice(CITY)} from the {ordinal(r.randint(1, 14))} to the {ordinal(r.randint(15, 28))} of {r.choice(MONTH)}."
    ),
    lambda r: (
        f"{r.choice(FIRST)} is {r.randint(6, 92)} years old and still rides a {r.choice(COLOUR)} {r.choice(VEHICLE)}."
    ),
    lambda r: f"Sorry, {r.choice(TITLE)} {r.choice(SURNAME)} is in a meeting until {clock(r)}.",
    lambda r: (
        f"The {r.choice(ADJ)} {r.choice(OCCUPATION)} fixed the {r.choice(ITEM)} in under {r.randint(2, 20)} minutes."
    ),
]

# Plain sentences with no slots, for rhythm and vocabulary that templates do not give.
PLAIN = """\
The kettle clicked off just as the phone began to ring.
Nobody expected the little shop on the corner to stay open so late.
She folded the map carefully and put it back in the glove box.
Let's take the long way home and stop for ice cream.
The children built a sandcastle with a moat and three towers.
He forgot his keys again, so he waited on the steps.
A gentle breeze came in through the open kitchen window.
Could you turn the music down a little, please?
The old clock in the hall has not worked for years.
We painted the fence white and planted roses along it.
The bakery sells out of brown bread by nine every morning.
I'm afraid the last bus has already gone.
Write your name at the top of the page, then begin.
They argued about the rules for an hour and never played the game.
The garden looks wonderful after a week of rain.
If the lights go out, the candles are in the second drawer.
My grandfather kept every letter he ever received.
The river was so calm that it looked like glass.
Please leave your muddy boots by the back door.
The new bridge makes the trip to town much shorter.
Our neighbours are having a party, and we were invited.
The soup needs more pepper, but otherwise it's perfect.
When the storm passed, the whole street came out to look.
She laughed so hard that she had to sit down.
Don't forget to water the plants while we're away.
The film was long, but the ending made it worth it.
A small boat drifted slowly across the harbour.
He signed the form, dated it, and handed it back.
It's colder today than it was yesterday, isn't it?
The station was crowded with people going home for the holidays.
I've never been good at remembering birthdays.
The cat watched the birds from behind the curtain.
Tomorrow we'll start painting the spare bedroom.
The teacher read the story aloud, and everyone listened.
Somebody left a bunch of flowers on the doorstep.
The lift is broken, so we'll have to take the stairs.
Fresh bread, strong coffee, and a quiet morning: that's all I want.
He spent the whole weekend fixing the old radio.
The path through the woods is muddy after the rain.
Why is the dog barking at the washing machine?
Our flight was cancelled, so we drove through the night.
She keeps her grandmother's recipes in a worn leather folder.
The hotel room had a view of the mountains.
Nobody knows who planted the apple tree behind the school.
The printer jammed again, right in the middle of the report.
We heard an owl calling from somewhere in the dark.
The market is busiest on Saturday mornings.
Hold the ladder steady while I change the bulb.
The museum guide spoke quietly, as if the paintings were asleep.
He whistled a tune that nobody recognised.
The snow had covered every car in the car park.
Put the heavy boxes at the bottom and the light ones on top.
The orchestra tuned up while the audience found their seats.
It took us ages to find a parking space.
She answered every question calmly and clearly.
The lighthouse still flashes every ten seconds.
Let me know when you've finished with the newspaper.
The whole village turned out for the summer fair.
His handwriting is so small that I need a magnifying glass.
The puppy chewed one shoe from every pair in the house.
"""


def draw_distinct(
    templates: list, n: int, r: random.Random, lines: list[str], key=str, keep=lambda text: True
) -> list[str]:
    """Add template outputs to `lines` until it holds `n` distinct ones (by `key`) that `keep` accepts;
    the templates take turns, each drawing its slots from `r`. Returns `lines` shuffled."""
    seen = {key(line) for line in lines}
    attempts = 0
    while len(lines) < n:
        attempts += 1
        if attempts > 200 * n:
            raise RuntimeError("templates cannot produce enough distinct lines")
        # a clock time like "3 p.m." may already end the sentence with its own full stop
        text = templates[attempts % len(templates)](r).replace(".m..", ".m.")
        if key(text) in seen or not keep(text):
            continue
        seen.add(key(text))
        lines.append(text)
    r.shuffle(lines)
    return lines


def build(n_sentences: int = 1200, seed: int = 20240917) -> list[str]:
    sentences = list(dict.fromkeys(PLAIN.splitlines()))
    return draw_distinct(
        TEMPLATES, n_sentences, random.Random(seed), sentences, keep=lambda t: 5 <= len(t.split()) <= 20
    )


DIGIT_WORDS = "zero one two three four five six seven eight nine".split()
ANSWERS = """Yes|No|Okay|Sure|Thanks|Thank you|Hello|Hi there|Goodbye|Sorry?|Please|Maybe|Of course|Right|Wait|Not yet
Me too|Good morning|Good night|Excuse me|Never mind|Hold on|All right|Exactly|No thanks|Yes please|Well done
See you|Cheers|Really?|Why not?|Go ahead|Not really|I agree""".replace("\n", "|").split("|")
COMMAND_VERB_OBJECT = {
    "Turn on": ["the lights", "the radio", "the heating", "the fan", "the television", "the oven"],
    "Turn off": ["the lights", "the radio", "the heating", "the alarm", "the tap", "the engine"],
    "Open": ["the door", "the window", "the garage", "the curtains", "a new tab", "the map"],
    "Close": ["the door", "the window", "the gate", "the app", "the blinds"],
    "Play": ["some music", "the next song", "the news", "my playlist", "the radio"],
    "Call": FIRST[:20],
    "Text": FIRST[20:],
    "Find": ["a pharmacy", "the nearest station", "a cheap hotel", "my phone", "a parking space"],
}
COMMAND_PLAIN = """Stop|Go back|Start again|Pause|Next page|Volume up|Volume down|Cancel that|Repeat that
Skip this one|Louder, please|Mute|Undo|Scroll down|Go home|Take a photo|Read it again|Save it""".replace(
    "\n", "|"
).split("|")


def spoken_digits(r: random.Random, n: int) -> str:
    # never a leading "zero": Whisper's normaliser turns "zero four one" into "41" but "041" stays "041"
    return " ".join([r.choice(DIGIT_WORDS[1:])] + [r.choice(DIGIT_WORDS) for _ in range(n - 1)])


# Each returns one short utterance (one to about six words), the way a person would write it down.
SHORT = [
    lambda r: spoken_digits(r, r.randint(2, 7)).capitalize() + ".",
    lambda r: (
        f"{r.choice(['My number is', 'The code is', 'Extension', 'Room', 'Gate', 'Flight'])} {spoken_digits(r, r.randint(3, 5))}."
    ),
    lambda r: f"{r.randint(2, 999)}.",
    lambda r: (
        f"{r.choice(['Page', 'Chapter', 'Platform', 'Bus', 'Row', 'Seat', 'Level'])} {r.randint(1, 120)}."
    ),
    lambda r: f"{r.choice(MONTH)} {ordinal(r.randint(1, 28))}.",
    lambda r: f"The {ordinal(r.randint(1, 28))} of {r.choice(MONTH)}.",
    lambda r: f"{r.choice(MONTH)} {year(r)}.",
    lambda r: f"{r.choice(WEEKDAY)} at {clock(r)}.",
    lambda r: f"At {clock(r)}.",
    lambda r: (
        f"{r.choice(['Half past', 'Quarter past', 'Quarter to'])} {r.choice(DIGIT_WORDS[1:] + ['ten', 'eleven', 'twelve'])}."
    ),
    lambda r: f"{money(r).capitalize()}.",
    lambda r: f"{pct(r)}.",
    lambda r: f"In {year(r)}.",
    lambda r: (lambda verb: f"{verb} {r.choice(COMMAND_VERB_OBJECT[verb])}.")(
        r.choice(list(COMMAND_VERB_OBJECT))
    ),
    lambda r: f"{r.choice(COMMAND_PLAIN)}.",
    lambda r: f"Set an alarm for {clock(r)}.",
    lambda r: f"Set a timer for {r.choice([2, 3, 5, 10, 15, 20, 25, 30, 45])} minutes.",
    lambda r: f"Remind me on {r.choice(WEEKDAY)}.",
    lambda r: (lambda a: a if a.endswith("?") else f"{a}.")(r.choice(ANSWERS)),
    lambda r: f"{r.choice(ANSWERS).rstrip('?')}, {r.choice(FIRST)}.",
    lambda r: f"{r.choice(WEEKDAY + MONTH + CITY)}.",
    lambda r: f"{r.choice(FIRST)} {r.choice(SURNAME)}.",
    lambda r: f"{r.choice(TITLE)} {r.choice(SURNAME)}, please.",
    lambda r: f"The {r.choice(COLOUR)} {r.choice(ITEM + ANIMAL)}.",
    lambda r: f"{r.choice(COLOUR + ADJ).capitalize()}.",
    lambda r: f"{r.choice(['A', 'The'])} {r.choice(ANIMAL + ITEM + FOOD + OCCUPATION)}.",
    lambda r: f"To {r.choice(CITY)}, please.",
    lambda r: f"{r.randint(2, 12)} {r.choice(ITEMS)}.",
]


def build_short(n_utterances: int = 2500, seed: int = 20261207) -> list[str]:
    return draw_distinct(SHORT, n_utterances, random.Random(seed), [], key=str.lower)


if __name__ == "__main__":
    for name, lines in (("sentences.txt", build()), ("short_utterances.txt", build_short())):
        out = Path(__file__).with_name(name)
        out.write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")
