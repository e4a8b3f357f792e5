"""Word pools of the synthetic datasets: people, places, organisations and products.

Every pool is partitioned by :func:`common.partition` into disjoint train/valid/test parts; valid and test
sentences are built only from their own part, so a model cannot memorise their names. Multi-word entries
never share a word with another entry of the same kind, so "no word of a test name occurs in train" holds
word by word, not only for whole names. ORG_SUFFIXES are the one shared vocabulary of names: "Corp" in
"Acme Corp" is a cue a model should learn, not a name to memorise.
"""

from .common import split_pools

FIRST_NAMES = (
    "Alice Bruno Carla Dmitri Elena Farid Greta Hugo Ingrid Jonas Keiko Lars Maria Nadia Oscar Priya "
    "Quentin Sofia Tomas Ulla Viktor Wanda Xavier Yara Zoltan Amir Bianca Cedric Daria Emil Fatima Gustav "
    "Hana Igor Julia Kofi Lena Marco Nina Olga Pablo Rania Stefan Tara Umar Vera Walter Yusuf Zara Anton "
    "Beatriz Carlos Diana Erik Freya George Helga Ivan Jasmine Karim Lucia Mateo Noor Otto Paula Ravi "
    "Sanjay Tobias Ursula Vivian Wesley Yvonne Zachary Adrian Brenda Clara Dennis Esther Felix Gloria "
    "Harold Irene Jerome Kevin Leona Martin Nora Oliver Petra Rupert Selma Theo Valerie Wilma"
).split()
LAST_NAMES = (
    "Smith Garcia Novak Tanaka Okafor Jensen Rossi Kowalski Fischer Moreau Silva Nguyen Ivanova Haddad "
    "Larsen Costa Petrov Weber Dubois Santos Kim Patel Mueller Lindqvist Horvat Brennan Castillo Takahashi "
    "Andersen Romano Schultz Mendes Popescu Yilmaz Kovacs Hughes Bauer Ferreira Ortiz Nakamura Olsen Russo "
    "Wagner Laurent Suzuki Duarte Lambert Sorensen"
).split()
CITIES = (
    "Paris Oslo Lima Cairo Dublin Madrid Vienna Prague Lisbon Berlin Tokyo Seoul Nairobi Quito Bogota "
    "Havana Athens Warsaw Helsinki Munich Zurich Geneva Milan Naples Porto Seville Krakow Budapest Riga "
    "Tallinn Vilnius Reykjavik Montreal Toronto Chicago Boston Denver Sydney Perth Auckland Manila Jakarta "
    "Hanoi Bangkok Mumbai Delhi Lagos Accra Dakar Tunis Casablanca Istanbul Ankara Beirut Amman Doha Dubai "
    "Santiago Caracas Montevideo"
).split()
# Two-word places give I-LOC tags; partitioned on their own so every split has some.
CITIES_TWO_WORDS = [
    "New York",
    "Buenos Aires",
    "Cape Town",
    "Hong Kong",
    "Kuala Lumpur",
    "Tel Aviv",
    "Los Angeles",
    "Las Vegas",
    "Addis Ababa",
    "Sao Paulo",
    "Abu Dhabi",
    "San Francisco",
    "Mexico City",
]
ORG_ROOTS = (
    "Acme Delta Zenith Orion Apex Nimbus Vertex Summit Horizon Pioneer Quantum Sterling Atlas Beacon "
    "Cobalt Falcon Granite Harbor Ionic Juniper Keystone Lumen Meridian Nova Onyx Polaris Quasar Redwood "
    "Sapphire Titan Umbra Vanguard Willow Xenon Yonder Zephyr"
).split()
ORG_ROOTS_TWO_WORDS = [
    "Blue River",
    "Red Oak",
    "Silver Lake",
    "Green Field",
    "Iron Gate",
    "Golden Bay",
    "Black Rock",
    "White Cliff",
    "North Star",
    "Bright Path",
]
ORG_SUFFIXES = "Corp Labs Group Systems Bank Motors Foods Energy Media Airlines".split()

PRODUCTS = (
    "blender toaster kettle backpack jacket umbrella headset keyboard monitor printer charger speaker "
    "camera tent mattress pillow blanket sofa desk chair lamp heater drill ladder bicycle helmet scooter "
    "stroller suitcase wallet watch phone tablet laptop router microwave oven fridge dishwasher vacuum "
    "mixer grill skillet teapot mug thermos bottle raincoat novel cookbook puzzle candle mirror rug "
    "curtain clock radio projector tripod guitar violin hotel restaurant movie album cafe bakery museum "
    "podcast course"
).split()
BRANDS = (
    "Zorva Kelto Brimo Quandex Velora Talvik Norbo Plexa Drovik Sunqua Mirelo Graxton Lumova Tesko Fyndra "
    "Korvex Ambrel Ostina Rivelle Pentar Jovix Calmera Vexley Ondrin Huxa Trelmo Wistra Baldor Cresko Yolva"
).split()


def _assert_words_unique() -> None:
    """No word belongs to two entries of the pools, so held-out entries share no word with train ones."""
    entries = (
        FIRST_NAMES
        + LAST_NAMES
        + CITIES
        + CITIES_TWO_WORDS
        + ORG_ROOTS
        + ORG_ROOTS_TWO_WORDS
        + ORG_SUFFIXES
        + PRODUCTS
        + BRANDS
    )
    words = [word.lower() for entry in entries for word in entry.split()]
    assert len(words) == len(set(words)), sorted({w for w in words if words.count(w) > 1})


_assert_words_unique()
POOLS = split_pools(
    {
        "first_names": FIRST_NAMES,
        "last_names": LAST_NAMES,
        "cities": CITIES,
        "cities_two_words": CITIES_TWO_WORDS,
        "org_roots": ORG_ROOTS,
        "org_roots_two_words": ORG_ROOTS_TWO_WORDS,
        "products": PRODUCTS,
        "brands": BRANDS,
    }
)


def cities(split: str) -> list:
    """Places of ``split``: one-word and two-word."""
    return POOLS[split]["cities"] + POOLS[split]["cities_two_words"]


def org_roots(split: str) -> list:
    """Organisation name roots of ``split`` (a suffix from ORG_SUFFIXES completes them)."""
    return POOLS[split]["org_roots"] + POOLS[split]["org_roots_two_words"]
