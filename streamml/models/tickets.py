"""Synthetic support tickets for the ``tickets`` pipeline: text to classify, with drift.

A ticket is composed from many templates per category with slot fillers (products,
amounts, dates, error codes, devices), greetings, sign-offs, call notes and the odd
typo. Some templates are ambiguous on purpose ("charged after I cancelled": billing or
cancellation) and a few labels are wrong (``NOISE``), so no model reaches 100%. After
``drift_at`` of the stream a new product, the Nimbus Hub, appears -- never named before
-- and brings a new kind of technical complaint (pairing and sync failures).

>>> ticket = list(tickets(10, drift_at=1.0))[3]
>>> ticket.label, ticket.record["channel"], ticket.record["subject"]
('shipping', 'phone', 'Tracking')
>>> call, said = ticket.record["body"].split(": ", 1)
>>> call
'Phone call, the customer says'
>>> said
'My package has been stuck in customs for 6 days. I need it before April 3.'
>>> new = [NEW_PRODUCT in str(e.record) for e in tickets(1000, drift_at=0.5)]
>>> new.index(True) >= 500, sum(new[500:])
(True, 206)
"""

from __future__ import annotations

import datetime as dt
import random
import re
from collections.abc import Iterator

from streamml.models.synthetic import Example

CATEGORIES = ["billing", "technical", "account", "shipping", "feature_request", "cancellation"]
# before the drift: roughly balanced, technical and billing a little more common
PRIOR = [0.19, 0.21, 0.17, 0.17, 0.12, 0.14]
NEW_PRODUCT = "Nimbus Hub"
NEW_SHARE = 0.4  # of the tickets after the drift that are about the new product
# the new product's tickets are mostly pairing and sync failures
NEW_PRIOR = [0.07, 0.68, 0.04, 0.11, 0.06, 0.04]
NOISE = 0.03  # share of labels replaced by another category
PRODUCTS = [
    "Aurora Cam",
    "Pulse Speaker",
    "Lumen Doorbell",
    "Orbit Thermostat",
    "Vega Router",
    "Halo Light Strip",
]
CHANNELS = ["email", "chat", "web", "phone"]
PLANS = ["free", "pro", "enterprise"]

# A template is its text, or (text, another category, the chance the label is that one).
Template = str | tuple[str, str, float]
CORE: dict[str, list[Template]] = {
    "billing": [
        "I was charged {amount} twice for my {plan} subscription this month.",
        "There is a charge of {amount} on my card from {when} that I don't recognise.",
        "My invoice for {month} says {amount} but my plan should cost less than that.",
        "Can I get a refund for the {amount} you billed me {when}?",
        "The promo code was not applied and I paid full price for the {product}.",
        "I upgraded to {plan} and was billed for the whole year instead of monthly.",
        "The VAT number on my last {n} invoices is wrong, please correct it.",
        "My bank shows a pending payment of {amount} even though the card was declined.",
        "Why did my monthly price go up from {amount} to {amount} without any notice?",
        "I need a receipt for order {order} for my expense report.",
        "You charged me {amount} for the {product} which was supposed to be in my bundle.",
        "I think I was overcharged on my last bill, what is the extra fee of {amount}?",
        "I got an email saying a refund of {amount} was issued but the money never arrived.",
        "How do I switch from paying by card to paying by bank transfer?",
        "The auto-renewal took {amount} from my account, I thought it was a one-time payment.",
        ("I cancelled {when} but I was still charged {amount}.", "cancellation", 0.4),
        (
            "I returned the {product} {n} weeks ago and still have not been refunded.",
            "shipping",
            0.3,
        ),
    ],
    "technical": [
        "The {product} keeps crashing whenever I open the app on my {device}.",
        "I get error {code} when I try to set up the {product}.",
        "The {product} disconnects from the wifi every few hours.",
        "Since the last firmware update the {product} is stuck on a blinking light.",
        "The app freezes on the loading screen on my {device}.",
        "Live view from the {product} only shows a black screen.",
        "Alerts from the {product} arrive ten minutes late or not at all.",
        "The {product} restarts by itself in the middle of the night.",
        "The battery of the {product} is empty after one day since the update.",
        "Your website shows a blank page in {browser}.",
        "The sound on the {product} cuts out and the volume resets itself.",
        "The {product} does not respond to voice commands anymore.",
        "The firmware update stops at 80% with error {code}.",
        "The app says the {product} is offline although it is plugged in and the light is green.",
        ("The checkout page shows error {code} when I press pay.", "billing", 0.25),
        (
            "The login screen of the app crashes on my {device} before I can sign in.",
            "account",
            0.3,
        ),
    ],
    "account": [
        "I can't log in, it says my password is wrong even after I reset it.",
        "The password reset email never arrives, I checked the spam folder too.",
        "My account got locked after too many login attempts.",
        "I lost my phone and can't get past the two-factor authentication.",
        "How do I change the email address of my account?",
        "Someone logged into my account from {city}, I think I was hacked.",
        "I want to add my partner as a second user on our household account.",
        "The verification code you text me is rejected every time.",
        "I somehow have two accounts and would like to merge them.",
        "My username was changed and I did not do it.",
        "Since my role changed I no longer have access to the admin settings.",
        "How do I transfer the {product} to my new account?",
        "The sign-in page keeps sending me back to the login screen.",
        ("I can't sign in to update my payment method.", "billing", 0.3),
        ("Please delete my account and all the personal data you hold on me.", "cancellation", 0.4),
    ],
    "shipping": [
        "My order {order} has not arrived, the tracking has not moved since {date}.",
        "The {product} arrived damaged, the box was completely crushed.",
        "I ordered the {product} but received a {other} instead.",
        "{carrier} says the parcel was delivered but there was nothing at my door.",
        "Can I change the delivery address for order {order}?",
        "My package has been stuck in customs for {n} days.",
        "The order shows as shipped but {carrier} has no record of the tracking number.",
        "Only part of my order came, the {accessory} is missing.",
        "My {product} order has been delayed twice now, when will it be in stock?",
        "Delivery was planned for {date} and has been pushed back by a week.",
        "Do you ship to {country}? The checkout does not accept my address.",
        "The courier left my parcel with a neighbour I have never met.",
        "I placed order {order} {n} days ago and it still says processing.",
        ("I'd like to send back the {product}, how do I get a return label?", "billing", 0.2),
        ("Please cancel order {order} before it ships.", "cancellation", 0.45),
    ],
    "feature_request": [
        "It would be great if the {product} supported {feature}.",
        "Please add {feature} to the app.",
        "Are there any plans to support {feature}? It is the one thing I miss.",
        "Suggestion: let us {capability}.",
        "I would love an option to {capability}.",
        "Could you add {feature}? My whole family keeps asking for it.",
        "Idea for the {product}: {feature}.",
        "Will the {product} ever work with {integration}?",
        "It's a pity there is no {feature}, other brands have had it for years.",
        "It would be handy to {capability} without opening the app.",
        ("Please make {feature} available on the {plan} plan too.", "billing", 0.2),
    ],
    "cancellation": [
        "Please cancel my subscription with immediate effect.",
        "I want to cancel my {plan} plan, it is too expensive for what I use.",
        "How do I turn off the automatic renewal? I don't want to continue.",
        "I am moving to another provider, please end my service at the end of the month.",
        "I no longer use the {product}, please end my membership.",
        "I'd like to downgrade to the free plan and stop all payments.",
        "We are closing our office, please terminate our {plan} contract.",
        "Please do not renew my plan next month.",
        "I have decided to leave, how do I close my subscription?",
        ("I'm unhappy with the service and want to cancel and get my money back.", "billing", 0.3),
        ("The cancel button in the app does nothing, please cancel for me.", "technical", 0.2),
    ],
}
NEW_CORE: list[str] = [  # technical, after the drift only
    "My Nimbus Hub won't pair with the {product}, it times out every time.",
    "The Nimbus Hub lost sync with all my sensors after the update.",
    "Devices keep dropping off the Nimbus Hub and I have to pair them again.",
    "In pairing mode the Nimbus Hub never finds my {product}.",
    "Scenes on the Nimbus Hub stopped syncing to the app, error {code}.",
    "The Nimbus Hub shows a red ring and won't sync with the cloud.",
    "Since I added a second Nimbus Hub nothing syncs anymore.",
    "After a reset the Nimbus Hub won't pair back with the app.",
    "Zigbee devices show as unavailable on the Nimbus Hub.",
    "Automations on the Nimbus Hub run hours late, its clock is out of sync.",
    "The Nimbus Hub pairs with the {product} and then drops it a minute later.",
]
DETAIL: dict[str, list[str]] = {
    "billing": [
        "I have a screenshot of the bank statement if you need it.",
        "The payment went to the card ending in {last4}.",
        "I would like the difference refunded to my card.",
    ],
    "technical": [
        "I already tried unplugging it and reinstalling the app.",
        "It happens on my {device} and on my laptop.",
        "A factory reset did not help.",
    ],
    "account": [
        "I have tried three different browsers.",
        "The account is under my work email.",
        "I still have access to my old email address.",
    ],
    "shipping": [
        "I need it before {date}.",
        "The tracking number is {tracking}.",
        "Nobody has answered at the courier's number.",
    ],
    "feature_request": [
        "I would happily test a beta.",
        "Otherwise I really like the product.",
        "Many people on the forum want this too.",
    ],
    "cancellation": [
        "Please confirm by email once it's done.",
        "I don't want to be contacted with offers to stay.",
        "Please make sure there are no more charges after this.",
    ],
}
NEUTRAL = [
    "I've been a customer for {n} years.",
    "This is the second time I'm writing about this.",
    "I'm on the {plan} plan.",
    "Thanks in advance for your help.",
    "This is really frustrating.",
    "Please get back to me as soon as you can.",
    "Could you look into this?",
    "I bought the {product} {when}.",
]
GREETINGS = ["Hi,", "Hello,", "Hey team,", "Dear support,", "Good morning,", "Hi there,"]
SIGNOFFS = ["Thanks,", "Thank you!", "Best regards.", "Cheers.", "Kind regards,", "thx"]
SUBJECTS: dict[str, list[str]] = {
    "billing": ["Double charge", "Refund request", "Question about my invoice", "Wrong amount"],
    "technical": ["App keeps crashing", "Error {code}", "{product} not working", "Bug report"],
    "account": ["Can't log in", "Password reset", "Account locked", "2FA problem"],
    "shipping": ["Where is my order?", "Order {order}", "Damaged delivery", "Tracking"],
    "feature_request": ["Feature request", "Suggestion", "Idea for the app", "Please add this"],
    "cancellation": ["Cancel subscription", "Cancellation", "Stop renewal", "Please cancel"],
}
NEW_SUBJECTS = ["Nimbus Hub won't pair", "Sync problem", "Nimbus Hub offline", "Pairing fails"]
GENERIC_SUBJECTS = ["Help", "Question", "Urgent", "Issue with my {product}", "Support request"]

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "September"]
CHOICES: dict[str, list[str]] = {  # slots filled by one of a list
    "device": ["iPhone 13", "Pixel 7", "Galaxy S23", "iPad", "Android tablet"],
    "browser": ["Chrome", "Safari", "Firefox", "Edge"],
    "carrier": ["UPS", "FedEx", "DHL", "USPS", "the courier"],
    "country": ["Canada", "Norway", "Brazil", "Ireland", "Mexico"],
    "city": ["Lagos", "Moscow", "Lima", "Manila", "a city I've never been to"],
    "month": MONTHS,
    "accessory": ["power adapter", "mounting bracket", "USB cable", "wall plate"],
    "integration": ["Google Home", "Alexa", "HomeKit", "IFTTT", "Home Assistant"],
    "feature": [
        "a dark mode",
        "an export to CSV",
        "a web dashboard",
        "multiple user profiles",
        "a public API",
        "offline mode",
        "custom alert sounds",
        "a widget for the home screen",
    ],
    "capability": [
        "schedule things by sunrise and sunset",
        "share access with guests for a day",
        "group devices into rooms",
        "set quiet hours for notifications",
        "see a history of the last 30 days",
    ],
}


def _generated(r: random.Random, name: str) -> str:
    """A slot filled by a made-up value: amounts, dates, order numbers, error codes."""
    if name == "amount":
        return f"{r.choice('$$$€£')}{r.randint(4, 260)}.{r.choice(['00', '99', '49'])}"
    if name == "date":
        return f"{r.choice(MONTHS)} {r.randint(1, 28)}"
    if name == "when":
        if r.random() < 0.5:
            return r.choice(["yesterday", "last Monday", "last week", "two weeks ago"])
        return f"on {r.choice(MONTHS)} {r.randint(1, 28)}"
    if name == "order":
        return f"#{r.randint(100000, 999999)}"
    if name == "code":
        return r.choice(["E-{}", "ERR_{}", "0x{:X}", "code {}"]).format(r.randint(100, 9999))
    if name == "n":
        return str(r.randint(2, 9))
    if name == "last4":
        return f"{r.randint(0, 9999):04d}"
    if name == "tracking":
        return f"1Z{r.randint(10**9, 10**10 - 1)}"
    raise KeyError(name)


_SLOT = re.compile(r"\{(\w+)\}")

_OK = b'"channel": "email", "plan": "pro", "subject": "Help", "product": "Aurora Cam"'
_ID = b'{"event_id": "bad", "ts": "2026-01-01T00:00:00+00:00", "customer_id": "c0001", '
BAD_RECORDS: list[bytes] = [
    _ID + b'"body": "My order has not',  # truncated JSON
    _ID + b'"body": "' + b"x" * 5000 + b'", ' + _OK + b"}",  # body over max_length
    _ID + b'"body": "hi", ' + _OK.replace(b'"subject": "Help", ', b"") + b"}",  # no subject
    _ID + b'"body": "hi", ' + _OK.replace(b"email", b"fax") + b"}",  # bad channel
    _ID + b'"body": 42, ' + _OK + b"}",  # wrong type
    _ID + b'"body": null, ' + _OK + b"}",  # null body
    _ID + b'"body": "hi", ' + _OK + b', "priority": "high"}',  # unexpected field
    b'["not", "an", "object"]',
    _ID.replace(b"2026-01-01T00:00:00+00:00", b"yesterday") + b'"body": "hi", ' + _OK + b"}",
]


def tickets(
    n: int,
    seed: int = 7,
    drift_at: float = 0.5,
    unlabelled: float = 0.3,
    start: dt.datetime | None = None,
    span_s: float | None = None,
    bad_every: int = 0,
    customers: int = 400,
) -> Iterator[Example]:
    """Support tickets whose label (``CATEGORIES``) is the ticket's category.

    ``unlabelled`` of the tickets come without a label (``label=None``); which ones is
    drawn from its own random stream, so the records themselves do not depend on it:

    >>> a = [e.record for e in tickets(30, unlabelled=0.0)]
    >>> b = [e.record for e in tickets(30, unlabelled=0.9)]
    >>> a == b, sum(e.label is None for e in tickets(1000, unlabelled=0.3))
    (True, 294)
    """
    rng, hidden = random.Random(seed), random.Random(f"unlabelled-{seed}")
    owners = random.Random(f"customers-{seed}")
    owned = [(owners.choice(PRODUCTS), owners.choice(PLANS)) for _ in range(customers)]
    t0 = start or dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    step_s = (span_s / n) if span_s else 0.5
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            yield Example(f"bad{i}", BAD_RECORDS[(i // bad_every) % len(BAD_RECORDS)], None)
            continue
        c = rng.randrange(customers)
        product, plan = owned[c]
        new = i >= drift_at * n and rng.random() < NEW_SHARE
        if new:
            product = NEW_PRODUCT
        category = rng.choices(CATEGORIES, NEW_PRIOR if new else PRIOR)[0]
        channel = rng.choice(CHANNELS)
        subject, body, label = _compose(rng, category, product, plan, channel, new)
        if rng.random() < NOISE:
            label = rng.choice([k for k in CATEGORIES if k != label])
        ts = t0 + dt.timedelta(seconds=i * step_s)
        record = {
            "event_id": f"tkt-{seed}-{i}",
            "ts": ts.isoformat(),
            "customer_id": f"c{c:04d}",
            "channel": channel,
            "plan": plan,
            "subject": subject,
            "body": body,
            "product": product,
        }
        yield Example(
            record["customer_id"], record, None if hidden.random() < unlabelled else label
        )


def _compose(
    rng: random.Random, category: str, product: str, plan: str, channel: str, new: bool
) -> tuple[str, str, str]:
    """(subject, body, label) of one ticket."""
    label = category
    if new and category == "technical" and rng.random() < 0.85:
        core: Template = rng.choice(NEW_CORE)
        subjects = NEW_SUBJECTS
    else:
        core = rng.choice(CORE[category])
        subjects = SUBJECTS[category]
    if isinstance(core, tuple):
        core, other, p = core
        label = other if rng.random() < p else category
    others = [p for p in PRODUCTS if p != product]

    def fill(text: str) -> str:
        def slot(m: re.Match[str]) -> str:
            name = m.group(1)
            if name == "product":
                return (
                    product
                    if product != NEW_PRODUCT or "Nimbus" not in text
                    else rng.choice(others)
                )
            if name == "other":
                return rng.choice(others)
            if name == "plan":  # a free customer writes about the plan they had or want
                return "Pro" if plan == "free" else plan.capitalize()
            if name in CHOICES:
                return rng.choice(CHOICES[name])
            return _generated(rng, name)

        return _SLOT.sub(slot, text)

    sentences = [fill(core)]
    if rng.random() < 0.5:
        sentences.append(fill(rng.choice(DETAIL[category])))
    if rng.random() < 0.4:
        extra = fill(rng.choice(NEUTRAL))
        sentences.insert(0 if rng.random() < 0.3 else len(sentences), extra)
    if channel == "phone":
        body = "Phone call, the customer says: " + " ".join(sentences)
    else:
        if channel == "email" and rng.random() < 0.7:
            sentences.insert(0, rng.choice(GREETINGS))
        if channel != "chat" and rng.random() < 0.5:
            sentences.append(rng.choice(SIGNOFFS))
        body = " ".join(sentences)
    if channel == "chat" and rng.random() < 0.4:
        body = body.lower()
    if rng.random() < 0.08:
        body = _typo(rng, body)
    subject = fill(rng.choice(GENERIC_SUBJECTS if rng.random() < 0.25 else subjects))
    return subject, body, label


def _typo(rng: random.Random, text: str) -> str:
    """Swap two neighbouring letters inside one longer word.

    >>> _typo(random.Random(1), "please refund the payment")
    'pelase refund the payment'
    """
    words = text.split(" ")
    spots = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not spots:
        return text
    i = rng.choice(spots)
    w = words[i]
    j = rng.randrange(1, len(w) - 1)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)
