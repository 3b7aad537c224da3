"""Built-in tasks with exactly checkable answers, generated here, to show that a LoRA fine-tune learned a skill.

A falling loss says little about whether a small model can now do something. A task with one right answer per
example gives a plain number instead: the share of held-out questions answered exactly, before and after tuning.

`extract`: find the date, amount and currency in a sentence and answer `YYYY-MM-DD;AMOUNT;CUR`:

    Nadia Okafor paid €1,250.50 at Copper Kettle Bakery on 7 Mar 2024.   ->   2024-03-07;1250.50;EUR

Dates come in nine formats (numeric ones state their day/month order), amounts with or without thousands
separators and decimals, currencies as symbols, codes and names, in sentences of many shapes, some with other
numbers (order numbers, counts) in them.

The held-out split (`val`) is honest: its sentence templates, its people and merchants, and its specific dates
and amounts are never used in `train`. Templates and names come from separate hand-written lists; dates and
amounts are split by a fixed hash of the value (one in five held out). Only the formats are shared, so a high
held-out score means the model learned to read and rewrite them, not to recall answers. The split does not
depend on the seed: no seed's training set holds another seed's held-out values.
"""
from __future__ import annotations

import datetime as dt
import random
import re
import tempfile
import zlib
from pathlib import Path
from typing import Callable

from lit_lora.checkpoint import check_checkpoint_dir
from lit_lora.data.dataset import SPLITS
from lit_lora.errors import UserError
from lit_lora.fileio import write_json
from lit_lora.prompts.format import instruction_turn

MAX_EXAMPLES = 100_000  # per split; far more than a quick fine-tune needs

INSTRUCTIONS = (  # shared by both splits: the question is the same, only the sentences differ
    "Pull the date, amount and currency out of this sentence. Answer as YYYY-MM-DD;AMOUNT;CUR with the "
    "amount to two decimals and the three-letter currency code.",
    "Extract the date, the amount and the currency. Reply in the form YYYY-MM-DD;AMOUNT;CUR (amount with two "
    "decimals, ISO currency code), nothing else.",
    "Which date, amount and currency does this text mention? Give them as YYYY-MM-DD;AMOUNT;CUR, the amount "
    "with two decimals and the currency as its ISO code.",
)

# Slots: {date} {money} {person} {other} (a second person) {merchant}, and distractor numbers {n} (2-9),
# {ref} (4-6 digits), {card} (4 digits).
TEMPLATES = {
    "train": (
        "{person} paid {money} at {merchant} on {date}.",
        "On {date}, {person} spent {money} at {merchant}.",
        "{merchant} charged {person} {money} on {date}.",
        "Receipt from {merchant}: {money}, paid {date}.",
        "{date}: {money} to {merchant}.",
        "A payment of {money} was made to {merchant} on {date}.",
        "{person} transferred {money} to {other} on {date}.",
        "Invoice {ref} from {merchant} for {money} is due on {date}.",
        "We received {money} from {person} on {date}, thank you!",
        "{person} bought {n} tickets from {merchant} for {money} on {date}.",
        "Your order {ref} at {merchant} ({money}) shipped on {date}.",
        "Refund of {money} issued by {merchant} on {date}.",
        "On {date} {merchant} refunded {money} to {person}.",
        "{person}'s rent of {money} was paid on {date}.",
        "Total due: {money}. Due date: {date}. Payee: {merchant}.",
        "Spent {money} at {merchant} ({date}).",
        "{person} lent {other} {money} on {date}.",
        "The {merchant} bill, {money}, arrived on {date}.",
        "Paid on {date}: {money} for {n} nights at {merchant}.",
        "Card ending {card} was charged {money} by {merchant} on {date}.",
        "{person} donated {money} to {merchant} on {date}.",
        "Booking {ref}: {money} at {merchant}, check-in {date}.",
        "{person} withdrew {money} on {date}.",
        "Hi {person}, we charged {money} to your account on {date}. - {merchant}",
        "On {date}, {money} left the account of {person}.",
        "{merchant} sent {person} a quote of {money} on {date}.",
        "Dinner for {n} at {merchant} on {date} cost {money}.",
        "{money} was deposited by {person} on {date}.",
        "Expense report: {merchant}, {date}, {money}.",
        "{person} ordered {n} items from {merchant} on {date}, total {money}.",
        "Membership at {merchant} renewed on {date} for {money}.",
        "Subscription fee of {money} collected by {merchant} on {date}.",
        "{person} sold a bike to {other} for {money} on {date}.",
        "Payment reminder: {money} owed to {merchant} since {date}.",
        "As of {date}, {person} owes {merchant} {money}.",
        "{date} - {person} - {merchant} - {money}",
        "{money} was paid to {merchant} by {person} on {date}.",
        "{money} for {n} coffees at {merchant}, {date}.",
        "{money} from {person}, received {date}.",
        "{money} - {merchant} - {date}",
        "{money} charged on {date} by {merchant} (order {ref}).",
        "{date}, {merchant}: {n} items, {money} in total.",
        "{n} guests, {money}, {merchant}, {date}.",
        "{person} (member {ref}) paid {money} on {date}.",
        "Order {ref}, placed {date}: {money}.",
        "{money} arrived in {person}'s account on {date}.",
        "Reference {ref}: {money} sent to {other} by {person} on {date}.",
        "Room {n}, {merchant}: {money} charged on {date}.",
        "{person} and {other} spent {money} on {n} meals at {merchant} on {date}.",
        "{date}. {person} paid {merchant} {money} for {n} hours of work.",
    ),
    "val": (
        "According to the statement, {merchant} debited {money} from {person} on {date}.",
        "{person} covered the {money} tab at {merchant} on {date}.",
        "Transaction {ref} | {date} | {merchant} | {money}",
        "It was on {date} that {person} handed {other} {money}.",
        "{money} went to {merchant} for {n} lessons, settled on {date}.",
        "Please note that {merchant} will collect {money} from you on {date}, {person}.",
        "Ticket {ref}: {person} was reimbursed {money} on {date}.",
        "Last entry in the ledger: {date}, {person} received {money} from {merchant}.",
        "The deposit of {money} for {merchant} cleared on {date}.",
        "{person} split a {money} taxi fare with {other} on {date}.",
        "A fine of {money} was issued to {person} on {date} by {merchant}.",
        "Just paid {merchant} {money} on {date} for {n} boxes of tea!",
    ),
}

FIRST_NAMES = {
    "train": ("Nadia", "Tomas", "Priya", "Jonas", "Amara", "Lukas", "Mei", "Omar", "Sofia", "Kwame", "Elena",
              "Ravi", "Hana", "Diego", "Ingrid", "Yusuf", "Clara", "Mateo", "Aiko", "Felix", "Zara", "Nikolai",
              "Leila", "Bruno", "Freya", "Tariq", "Marta", "Kenji", "Rosa", "Emil", "Asha", "Pavel", "Lucia",
              "Idris", "Greta", "Andre", "Noor", "Stefan", "Chloe", "Malik"),
    "val": ("Beatriz", "Oskar", "Fatima", "Henrik", "Yara", "Dmitri", "Ines", "Kofi", "Annika", "Rafael",
            "Suki", "Viktor"),
}
SURNAMES = {
    "train": ("Okafor", "Novak", "Sharma", "Berg", "Mensah", "Weber", "Chen", "Haddad", "Rossi", "Boateng",
              "Petrova", "Iyer", "Sato", "Alvarez", "Lindqvist", "Demir", "Fischer", "Moreno", "Tanaka", "Keller",
              "Nowak", "Farouk", "Larsen", "Costa", "Kaur", "Dubois", "Hughes", "Kowalski", "Nakamura", "Silva"),
    "val": ("Achterberg", "Quispe", "Vasquez", "Oyelaran", "Brennan", "Hakimi", "Lindgren", "Mwangi",
            "Castellanos", "Ferreira"),
}
MERCHANTS = {
    "train": ("Copper Kettle Bakery", "Northgate Hardware", "Blue Harbor Books", "Maple Street Pharmacy",
              "Riverside Cycles", "Golden Fern Florist", "Summit Outdoor", "Lantern Cafe", "Pinecrest Dental",
              "Harbor Light Hotel", "Oakwood Furniture", "Silver Spoon Bistro", "Brightline Telecom",
              "Greenleaf Grocers", "Stonebridge Garage", "Velvet Note Music", "Cedar Hill Clinic",
              "Sunrise Yoga Studio", "Iron Anvil Gym", "Willow Tree Daycare", "Redwood Insurance",
              "Crescent Moon Tailors", "Meadowbrook Farm Shop", "Quarry Lane Plumbing", "Skyline Airways",
              "Little Owl Toys", "Marble Arch Gallery", "Saffron House", "Tidewater Energy",
              "Foxglove Veterinary", "Hilltop Language School", "Amber Glass Optics", "Orchard Row Cinema",
              "Pebble Beach Rentals", "Starling Coffee Roasters", "Thornfield Books", "Lakeside Marina",
              "Granite Peak Ski School", "Juniper Laundry", "Windmill Print Shop"),
    "val": ("Kestrel Bay Fisheries", "Obsidian Arcade", "Lavender Loft Salon", "Brassworks Locksmiths",
            "Midnight Rail Tours", "Coral Reef Aquarium", "Hazelnut Creamery", "Vantage Point Surveyors",
            "Glacier Spring Water Co", "Mosaic Tile Depot", "Wildflower Wedding Hall", "Tinker's Repair Bench"),
}

MONEY = {  # ISO code -> the ways a sentence writes an amount {n} in it
    "USD": ("${n}", "USD {n}", "{n} USD", "{n} US dollars"),
    "EUR": ("€{n}", "EUR {n}", "{n} EUR", "{n} euros"),
    "GBP": ("£{n}", "GBP {n}", "{n} GBP", "{n} pounds sterling"),
    "JPY": ("¥{n}", "JPY {n}", "{n} JPY", "{n} yen"),
    "CHF": ("CHF {n}", "{n} CHF", "{n} Swiss francs"),
    "CAD": ("C${n}", "CAD {n}", "{n} CAD", "{n} Canadian dollars"),
    "AUD": ("A${n}", "AUD {n}", "{n} AUD", "{n} Australian dollars"),
    "INR": ("₹{n}", "INR {n}", "{n} INR", "{n} Indian rupees"),
    "SEK": ("SEK {n}", "{n} SEK", "{n} Swedish kronor"),
}
NO_CENTS = {"JPY"}  # yen amounts are whole

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
FIRST_DATE, LAST_DATE = dt.date(2010, 1, 1), dt.date(2030, 12, 31)


def ordinal(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


DATE_FORMATS: dict[str, Callable[[dt.date], str]] = {
    "iso": lambda d: d.isoformat(),  # 2024-03-07
    "month_day_year": lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",  # March 7, 2024
    "mon_day_year": lambda d: f"{MONTHS[d.month - 1][:3]} {d.day}, {d.year}",  # Mar 7, 2024
    "day_month_year": lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",  # 7 March 2024
    "day_mon_year": lambda d: f"{d.day} {MONTHS[d.month - 1][:3]} {d.year}",  # 7 Mar 2024
    "ordinal": lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",  # the 7th of March 2024
    "weekday": lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",  # Thursday, March 7, 2024
    "dmy_slash": lambda d: f"{d.day:02d}/{d.month:02d}/{d.year} (day/month/year)",  # 07/03/2024 (day/month/year)
    "mdy_slash": lambda d: f"{d.month:02d}/{d.day:02d}/{d.year} (month/day/year)",  # 03/07/2024 (month/day/year)
}


def is_held_out(kind: str, value: str) -> bool:
    """The fixed rule that splits dates and amounts: one value in five (by CRC-32, the same on every machine)."""
    return zlib.crc32(f"{kind}:{value}".encode()) % 5 == 0


def amount_key(cents: int) -> str:
    """The answer's spelling of an amount: 1250.50"""
    return f"{cents // 100}.{cents % 100:02d}"


def amount_texts(cents: int, currency: str) -> list[str]:
    """Every way a sentence may write the number: 1250.50 and 1,250.50; whole amounts also 1250 and 1,250
    (and yen only so)."""
    whole, frac = divmod(cents, 100)
    texts = [] if currency in NO_CENTS else [f"{whole}.{frac:02d}", f"{whole:,}.{frac:02d}"]
    if frac == 0:
        texts += [str(whole), f"{whole:,}"]
    return list(dict.fromkeys(texts))  # below 1,000 the grouped spellings are the same


def sample_date(rng: random.Random, split: str) -> dt.date:
    while True:
        d = dt.date.fromordinal(rng.randint(FIRST_DATE.toordinal(), LAST_DATE.toordinal()))
        if is_held_out("date", d.isoformat()) == (split == "val"):
            return d


def sample_cents(rng: random.Random, split: str, currency: str) -> int:
    """Amounts from 1 to 99,999 spread over magnitudes; cents on about half of them (never on yen)."""
    while True:
        digits = rng.randint(1, 5)
        whole = rng.randint(10 ** (digits - 1), 10 ** digits - 1)
        cents = 0 if currency in NO_CENTS or rng.random() < 0.4 else rng.randint(1, 99)
        value = whole * 100 + cents
        if is_held_out("amount", amount_key(value)) == (split == "val"):
            return value


def person(rng: random.Random, split: str) -> str:
    first = rng.choice(FIRST_NAMES[split])
    return first if rng.random() < 0.3 else f"{first} {rng.choice(SURNAMES[split])}"


def make_extract_example(rng: random.Random, split: str) -> dict[str, str]:
    """One Alpaca record of the extract task, drawn only from `split`'s templates, names and values."""
    return extract_example(rng, split)[0]


def extract_example(rng: random.Random, split: str) -> tuple[dict[str, str], list[int]]:
    """make_extract_example's record, and the distractor numbers its sentence holds."""
    currency = rng.choice(sorted(MONEY))
    date, cents = sample_date(rng, split), sample_cents(rng, split, currency)
    payer = person(rng, split)
    other = person(rng, split)
    while other.split()[0] == payer.split()[0]:
        other = person(rng, split)
    template = rng.choice(TEMPLATES[split])
    numbers = {"n": rng.randint(2, 9), "ref": rng.randint(1000, 999999), "card": rng.randint(0, 9999)}
    sentence = template.format(
        date=DATE_FORMATS[rng.choice(list(DATE_FORMATS))](date),
        money=rng.choice(MONEY[currency]).format(n=rng.choice(amount_texts(cents, currency))),
        person=payer, other=other, merchant=rng.choice(MERCHANTS[split]),
        n=numbers["n"], ref=numbers["ref"], card=f"{numbers['card']:04d}",
    )
    record = {"instruction": rng.choice(INSTRUCTIONS), "input": sentence,
              "output": f"{date.isoformat()};{amount_key(cents)};{currency}"}
    return record, [value for key, value in numbers.items() if "{" + key + "}" in template]


def make_extract_pair(rng: random.Random, split: str) -> dict[str, str]:
    """make_extract_example's record (the same draws: the same prompts) with a `rejected` answer: the kind of miss a
    tuned small model still makes, a day/month swap or a distractor number (an order number, a count) taken for the
    amount; where the sentence allows neither, the cents dropped or, for whole amounts, the currency mistaken."""
    record, distractors = extract_example(rng, split)
    date, cents, currency = parse_answer(record["output"])
    misses = []
    if date.day <= 12 and date.day != date.month:
        misses.append(f"{date.replace(month=date.day, day=date.month).isoformat()};{amount_key(cents)};{currency}")
    misses += [f"{date.isoformat()};{amount_key(d * 100)};{currency}" for d in distractors if d * 100 != cents]
    if not misses and cents % 100:
        misses.append(f"{date.isoformat()};{amount_key(cents - cents % 100)};{currency}")
    if not misses:
        misses.append(f"{date.isoformat()};{amount_key(cents)};{'EUR' if currency == 'USD' else 'USD'}")
    return {**record, "rejected": random.Random(record["input"]).choice(misses)}


TASKS: dict[str, Callable[[random.Random, str], dict[str, str]]] = {"extract": make_extract_example}
PAIRS = {"extract": make_extract_pair}  # each task's records with a rejected answer, for preference tuning


def check_size(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_EXAMPLES:
        raise UserError(f"{name} must be a whole number from {minimum} to {MAX_EXAMPLES:,}, got {value!r}")
    return value


def make_task(name: str, n_train: int, n_val: int, seed: int = 42, pairs: bool = False
              ) -> dict[str, list[dict[str, str]]]:
    """{"train": [...], "val": [...]} Alpaca records of task `name`; the same seed gives the same records (`pairs`:
    the same ones, each with a `rejected` answer).

    Each split has its own random stream, so changing one split's size leaves the other's records unchanged.
    """
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    sizes = {"train": check_size("n_train", n_train, 1), "val": check_size("n_val", n_val, 0)}
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be a whole number, got {seed!r}")
    make = (PAIRS if pairs else TASKS)[name]
    splits = {}
    for split in SPLITS:
        rng = random.Random(f"{name}:{split}:{seed}")  # string seeds hash the same on every run and machine
        splits[split] = [make(rng, split) for _ in range(sizes[split])]
    return splits


def pair_record(record: dict[str, str], rejected: str) -> dict:
    """A task record as a prepare-preference record: its user turn, its answer chosen, `rejected` rejected."""
    return {"prompt": [instruction_turn(record["instruction"], record["input"])], "chosen": record["output"],
            "rejected": rejected}


def write_task(name: str, directory: Path, n_train: int, n_val: int, seed: int = 42, pairs: bool = False
               ) -> dict[str, Path]:
    """Write task `name` as `train.json` and `val.json` (Alpaca record lists; with `pairs` preference records,
    {"prompt": [user turn], "chosen", "rejected"}) in `directory`; returns the paths."""
    splits = make_task(name, n_train, n_val, seed, pairs)
    if pairs:
        splits = {split: [pair_record(r, r["rejected"]) for r in records] for split, records in splits.items()}
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    paths = {split: directory / f"{split}.json" for split in splits}
    for split, records in splits.items():
        write_json(paths[split], records)
    return paths


# ------------------------------------------------------------------------------------------------- prepared data
def prepare_task(name: str, checkpoint_dir: Path, destination: Path, n_train: int = 3000, n_val: int = 200,
                 seed: int = 42, template: str = "auto", max_seq_length: int = 256, overwrite: bool = False,
                 preference: bool = False) -> dict:
    """Generate task `name` and prepare it like any instruction data, its held-out records as the val split; with
    `preference`, the same prompts as chosen/rejected pairs (prepare-preference), the right answer chosen.

    `auto` asks in the checkpoint's chat format when it has ChatML markers (an instruct model such as
    SmolLM2-Instruct), else in the Alpaca format; returns the meta.json written."""
    from lit_lora.data.preference import prepare_preference
    from lit_lora.data.prepare import prepare
    from lit_lora.prompts.builtin import BUILTINS
    from lit_lora.tokenizer import Tokenizer

    check_size("--n_val", n_val, 1)
    if template == "auto":
        template = "chatml" if BUILTINS["chatml"].fits(Tokenizer(check_checkpoint_dir(checkpoint_dir))) else "alpaca"
    data_name = f"lit-lora task {name} (seed {seed}, {n_train} train, {n_val} held-out)"
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_task(name, Path(tmp), n_train, n_val, seed, preference)
        if preference:  # the built-in as a chat template: the same prompt tokens as the instruction data's
            return prepare_preference(checkpoint_dir, paths["train"], destination, template=template,
                                      max_seq_length=max_seq_length, seed=seed, overwrite=overwrite,
                                      data_name=f"{data_name}, pairs", val_file=paths["val"])
        return prepare(checkpoint_dir, destination, data_file=paths["train"], val_file=paths["val"], format="alpaca",
                       template=template, max_seq_length=max_seq_length, seed=seed, overwrite=overwrite,
                       data_name=data_name)


ANSWER = re.compile(r"(\d{4}-\d{2}-\d{2});(\d+\.\d{2});([A-Z]{3})")


def parse_answer(text: str) -> tuple[dt.date, int, str] | None:
    """(date, cents, currency) of an extract answer, or None when it is not in the answer format."""
    m = ANSWER.fullmatch(text.strip())
    if m is None:
        return None
    try:
        date = dt.date.fromisoformat(m[1])
    except ValueError:
        return None
    whole, frac = m[2].split(".")
    return date, int(whole) * 100 + int(frac), m[3]
