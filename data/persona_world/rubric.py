"""A deterministic rubric critic for the offline persona world (SPEC 1.1).

Given a persona, a question and a response, `rubric_judge` writes what the personalized GRM
writes: a critique naming what is wrong, with 2-3 concrete edits (add / delete / reorder,
shortening preferred), and three integer scores in [-5, 5]. `rubric_grm_output` renders it in
the GRM text format with `common.format_grm_output`, so `common.parse_grm_scores` reads it back.

It plays three roles: the offline teacher that annotates GRM training data (grm.jsonl), an
offline reward for checking PPO, and the ground-truth judge of the offline evaluation.

Every rule is one small function below, in the order it is applied, citing the SPEC 1.1 line it
encodes. A rule only fires on what a program can check: the machine-readable preferences of a
persona-world persona (its "Checkable_Preferences" key, written by prepare.py) and surface
features of the text. On a persona without that key (e.g. a real PersonaFeedback persona) only
the generic rules apply (name, meta notes, stuffing, length, off-topic, repetition).

Token counting (the SPEC length rule): by default a word-based estimate,
tokens = round(1.3 * number of whitespace-separated words), so the rubric needs no tokenizer
and gives the same score everywhere; pass `tokenizer=` to count real tokens instead.

    from data.persona_world.rubric import rubric_judge
    critique, scores = rubric_judge(persona, question, response)
"""

import json
import math
import re
from dataclasses import dataclass, field

DIMENSIONS = ("Helpfulness", "Personalization", "Natural")
TOKENS_PER_WORD = 1.3
SIMPLE_QUESTION_TOKEN_BUDGET = 80   # SPEC 1.1 length rule: a simple question deserves ~60 words
SCORE_MIN, SCORE_MAX = -5, 5

# ---------------------------------------------------------------------------------------------
# Lexicons (prepare.py builds personas and rule-based variants from the same tables)

MEAT = ["meat", "beef", "steak", "pork", "bacon", "ham", "chicken", "turkey", "lamb", "sausage",
        "sausages", "salami", "pepperoni", "veal", "duck", "prosciutto", "chorizo", "meatballs",
        "ribs", "brisket", "mince", "jerky"]
SEAFOOD = ["fish", "salmon", "tuna", "cod", "shrimp", "prawn", "prawns", "sardines", "anchovies",
           "crab", "lobster", "seafood", "oysters", "mussels", "trout", "tilapia"]
DAIRY = ["milk", "cheese", "butter", "yogurt", "yoghurt", "cream", "ice cream", "parmesan",
         "mozzarella", "feta", "ghee", "whey", "cheddar"]
EGGS_HONEY = ["egg", "eggs", "honey", "mayonnaise", "omelette", "omelet", "gelatin"]
GLUTEN = ["wheat", "bread", "pasta", "flour", "barley", "rye", "couscous", "bagel", "bagels",
          "toast", "croissant", "crackers", "seitan", "spaghetti", "pizza", "noodles", "muffin",
          "muffins", "pancakes", "cereal", "sandwich", "sandwiches", "oats"]
NUTS = ["nut", "nuts", "almond", "almonds", "peanut", "peanuts", "walnut", "walnuts", "cashew",
        "cashews", "pecan", "pecans", "hazelnut", "hazelnuts", "pistachio", "pistachios",
        "peanut butter", "almond milk", "nutella", "pesto"]

# diet -> words that break it, words that honour it out loud, a safe swap for the critique.
# "safe_prefixes": a forbidden word right after one of these is not a violation
# ("oat milk", "gluten-free bread", "vegan cheese").
DIETS = {
    "none": {"forbidden": [], "honor": [], "swap": "", "text": ""},
    "vegetarian": {"forbidden": MEAT + SEAFOOD,
                   "honor": ["vegetarian", "meat-free", "meatless", "plant-based", "veggie"],
                   "swap": "beans, tofu or halloumi",
                   "text": "Vegetarian: eats no meat and no fish."},
    "vegan": {"forbidden": MEAT + SEAFOOD + DAIRY + EGGS_HONEY,
              "honor": ["vegan", "plant-based", "dairy-free"],
              "swap": "tofu, lentils or oat milk",
              "text": "Vegan: no meat, fish, dairy, eggs or honey."},
    "pescatarian": {"forbidden": MEAT,
                    "honor": ["pescatarian", "meat-free", "seafood", "fish"],
                    "swap": "fish, beans or eggs",
                    "text": "Pescatarian: eats fish but never meat or poultry."},
    "gluten-free": {"forbidden": GLUTEN,
                    "honor": ["gluten-free", "gluten free", "coeliac", "celiac"],
                    "swap": "rice, potatoes or corn tortillas",
                    "text": "Coeliac: strictly gluten-free, so no wheat, bread, pasta or oats."},
    "dairy-free": {"forbidden": DAIRY,
                   "honor": ["dairy-free", "dairy free", "lactose-free", "plant-based"],
                   "swap": "olive oil, oat milk or coconut yogurt",
                   "text": "Lactose intolerant: avoids milk, cheese, butter and cream."},
    "nut-free": {"forbidden": NUTS,
                 "honor": ["nut-free", "nut free", "allergy", "allergic"],
                 "swap": "sunflower seeds or pumpkin seeds",
                 "text": "Severe nut allergy: no nuts of any kind, peanut butter or pesto."},
}
SAFE_FOOD_PREFIXES = {"oat", "soy", "almond", "coconut", "rice", "plant", "plant-based", "vegan",
                      "vegetarian", "veggie", "dairy-free", "lactose-free", "gluten-free",
                      "meat-free", "meatless", "mock", "faux", "nut-free", "cashew", "tofu",
                      "corn", "buckwheat", "chickpea", "lentil", "cauliflower", "peanut-free"}
NEGATORS = {"no", "not", "without", "avoid", "avoiding", "skip", "skipping", "instead", "free",
            "replace", "swap", "substitute", "never", "nor", "than", "except", "minus"}

# Things a persona asks answers to avoid: id -> (how the persona says it, what the critique
# calls it, checker kind, words for topic checkers). Format checkers look at the text shape.
AVOIDS = {
    "emojis": ("Finds emojis in answers childish.", "emojis", "emoji", []),
    "exclamation": ("Dislikes exclamation marks; prefers a calm tone.", "exclamation marks",
                    "exclamation", []),
    "lists": ("Wants flowing sentences, not bullet-point or numbered lists.", "lists", "list", []),
    "alcohol": ("Does not drink alcohol and does not want it suggested.", "alcohol", "topic",
                ["alcohol", "wine", "beer", "cocktail", "cocktails", "vodka", "whiskey",
                 "whisky", "champagne", "rum", "gin", "pub", "bar", "brewery", "sake"]),
    "caffeine": ("Avoids coffee and caffeine entirely.", "caffeine", "topic",
                 ["coffee", "espresso", "caffeine", "energy drink", "energy drinks", "latte",
                  "cappuccino", "cola"]),
    "social_media": ("Keeps away from social media; never suggest it.", "social media", "topic",
                     ["social media", "instagram", "facebook", "tiktok", "twitter", "youtube",
                      "reddit", "influencer", "influencers"]),
    "driving": ("Does not own a car and cannot drive.", "driving", "topic",
                ["drive", "driving", "car", "road trip", "rental car", "parking"]),
}

JARGON = ["algorithm", "algorithms", "paradigm", "leverage", "synergy", "optimize", "optimise",
          "optimization", "methodology", "framework", "infrastructure", "metrics", "parameters",
          "bandwidth", "scalable", "holistic", "implementation", "quantitative", "iteration",
          "heuristic", "heuristics", "granular", "kpi", "kpis", "protocol", "modality",
          "biomechanics", "periodization", "macronutrients", "physiological", "cognitive"]
HAND_HOLDING = ["in simple terms", "in simpler terms", "simply put", "basically", "don't worry",
                "do not worry", "for beginners", "as a beginner", "it's easy", "it is easy",
                "just remember", "in other words", "think of it like", "imagine that",
                "let me explain"]
FORMAL_MARKERS = ["furthermore", "moreover", "therefore", "thus", "hence", "additionally",
                  "consequently", "in conclusion", "it is important to note", "it is essential",
                  "it is recommended", "one should", "nevertheless", "henceforth", "whereby",
                  "in addition"]
CASUAL_MARKERS = ["hey", "gonna", "wanna", "awesome", "cool", "stuff", "kinda", "yeah", "lol",
                  "super", "totally", "guys", "btw", "grab", "chill"]
META_PHRASES = ["this answer considers", "this answer takes", "this answer is tailored",
                "tailored to your", "tailored to you", "tailored for you", "personalized for you",
                "personalised for you", "based on your profile", "based on your persona",
                "based on your background", "based on your preferences",
                "considering your background", "considering your profile",
                "taking into account your", "takes into account your", "given your profile",
                "i have considered your", "i've considered your", "with your background in mind",
                "keeping your preferences in mind", "as per your preferences",
                "according to your profile", "your persona"]
FLOWERY = ["tapestry", "symphony", "embark", "realm", "delve", "testament", "beacon",
           "kaleidoscope", "tantalizing", "enchanting", "mesmerizing", "breathtaking",
           "unleash", "odyssey", "boundless", "treasure trove", "labyrinth"]

# The persona world's interests and jobs: words that show an answer draws on them.
INTEREST_KEYWORDS = {
    "hiking": ["hike", "hikes", "hiking", "trail", "trails", "mountain", "mountains"],
    "gardening": ["garden", "gardening", "plants", "seeds", "soil", "compost", "vegetables"],
    "photography": ["photo", "photos", "photography", "camera", "lens", "photograph"],
    "chess": ["chess", "openings", "endgame", "endgames", "tactics", "grandmaster"],
    "baking": ["bake", "baking", "bread", "sourdough", "oven", "dough", "cake"],
    "cycling": ["bike", "bikes", "cycling", "bicycle", "ride", "rides", "cyclist"],
    "astronomy": ["stars", "telescope", "astronomy", "planets", "constellations", "night sky",
                  "galaxy"],
    "jazz": ["jazz", "saxophone", "improvisation", "improvise", "chords", "swing"],
    "board games": ["board game", "board games", "catan", "dice", "tabletop"],
    "watercolour painting": ["painting", "watercolour", "watercolor", "paint", "brush", "canvas",
                             "sketch"],
    "running": ["run", "runs", "running", "runner", "marathon", "jog", "jogging", "10k"],
    "history": ["history", "historical", "ancient", "museum", "museums", "empire"],
    "birdwatching": ["bird", "birds", "birding", "birdwatching", "binoculars"],
    "knitting": ["knit", "knitting", "yarn", "needles", "scarf", "sweater"],
    "yoga": ["yoga", "stretch", "stretching", "poses", "mat", "breathing"],
    "pottery": ["pottery", "clay", "ceramics", "wheel", "glaze", "kiln"],
    "science fiction": ["science fiction", "sci-fi", "novel", "novels", "books", "reading"],
    "swimming": ["swim", "swimming", "pool", "laps", "swimmer"],
}
CAREER_KEYWORDS = {
    "nurse": ["nurse", "nursing", "hospital", "patients", "ward"],
    "teacher": ["teacher", "teaching", "classroom", "students", "pupils", "school"],
    "software engineer": ["software", "engineer", "coding", "developer", "programming"],
    "accountant": ["accountant", "accounting", "audit", "spreadsheets", "tax"],
    "electrician": ["electrician", "wiring", "electrical"],
    "graphic designer": ["designer", "design", "freelance"],
    "university student": ["student", "studying", "biology", "lectures", "exams", "university"],
    "retired librarian": ["librarian", "library", "retired", "retirement", "volunteer"],
    "truck driver": ["truck", "trucker", "long-haul", "delivery", "route"],
    "pharmacist": ["pharmacist", "pharmacy", "prescriptions"],
    "architect": ["architect", "architecture", "building", "buildings"],
    "chef": ["chef", "line cook", "kitchen", "restaurant"],
    "journalist": ["journalist", "reporter", "newsroom", "articles", "deadlines"],
    "physiotherapist": ["physiotherapist", "physio", "clinic", "patients", "rehab"],
    "farmer": ["farmer", "farm", "farming", "harvest", "crops"],
    "barista": ["barista", "cafe", "café"],
}

# Question lexicons: which persona facts a question makes relevant (SPEC 1.1 "obviously
# relevant persona facts ignored"), and which questions are simple (SPEC 1.1 length rule).
FOOD_WORDS = ["cook", "cooking", "dinner", "lunch", "breakfast", "recipe", "recipes", "meal",
              "meals", "snack", "snacks", "eat", "eating", "food", "dish", "dishes",
              "restaurant", "picnic", "potluck", "dessert", "menu", "bake", "baking"]
DISHES = ["curry", "rice", "soup", "salad", "stew", "chilli", "chili", "beans", "lentils", "tofu",
          "vegetables", "stir-fry", "stir fry", "potatoes", "potato", "fruit", "oatmeal",
          "porridge",
          "wrap", "wraps", "tacos", "burrito", "risotto", "quinoa", "hummus", "smoothie",
          "granola", "apple", "banana", "berries", "tomato", "tomatoes", "spinach", "mushrooms",
          "pie", "casserole", "bowl", "dal", "chickpeas", "avocado", "roast", "grilled", "baked"]
FOOD_NAMES = DISHES + MEAT + SEAFOOD + DAIRY + EGGS_HONEY + GLUTEN + NUTS
LEISURE_WORDS = ["weekend", "relax", "relaxing", "hobby", "hobbies", "free time", "fun",
                 "vacation", "holiday", "evening", "gift", "bored", "unwind", "day off",
                 "birthday", "spare time", "recharge", "saturday", "sunday"]
WORK_WORDS = ["at work", "my work", "job", "career", "colleague", "colleagues", "boss", "office",
              "shift", "shifts", "workplace", "productive", "productivity", "meeting", "meetings",
              "coworkers", "workday"]
SIMPLE_OPENERS = ("what is", "what are", "what does", "what's", "who ", "who's", "when ",
                  "where ", "how many", "how much", "how far", "how long", "which ", "define",
                  "why is", "why do", "why does", "is it true", "what causes")
STOPWORDS = set("""a an the and or but if of to in on at for from by with about as into like
through after over between out against during without before under around among is are was were
be been being have has had do does did can could should would will shall may might must i me my
mine we our you your yours he she it its they them their this that these those what which who
whom whose when where why how all any both each few more most other some such no nor not only
own same so than too very just also get got make made good best way ways some tips tip thing
things give need want know there here then one ones much many lot lots really""".split())
CONCRETE_MARKERS = ["for example", "for instance", "such as", "e.g.", "try ", "start with",
                    "first,", "step", "minutes", "hours", "per day", "a day", "each day"]
SUMMARY_OPENERS = ("in summary", "in conclusion", "overall,", "to sum up", "in short")

# ---------------------------------------------------------------------------------------------
# Text helpers


def load_persona(persona):
    """A persona dict from a dict or a JSON string (accept both everywhere, API.md)."""
    if isinstance(persona, dict):
        return persona
    try:
        value = json.loads(persona)
        return value if isinstance(value, dict) else {}
    except (TypeError, ValueError):
        return {}


def word_list(text):
    return text.split()


def count_tokens(text, tokenizer=None):
    """Tokens of a response: round(1.3 * words) unless a tokenizer is given (module docstring)."""
    if tokenizer is not None:
        return len(tokenizer.encode(text, add_special_tokens=False))
    return int(round(TOKENS_PER_WORD * len(word_list(text))))


def stem(word):
    """A tiny suffix stripper, enough to match 'recipes' with 'recipe' and 'hiking' with 'hike'."""
    w = word.lower().strip("'")
    for _ in range(2):   # 'openings' -> 'opening' -> 'open'
        for suffix in ("ing", "ies", "es", "ed", "ly", "s"):
            if len(w) > len(suffix) + 3 and w.endswith(suffix):
                w = w[: -len(suffix)]
                break
    return w.rstrip("e")


def content_stems(text):
    return {stem(w) for w in re.findall(r"[A-Za-z][A-Za-z'-]+", text.lower())
            if w not in STOPWORDS and len(w) > 2}


def sentences(text):
    parts = re.split(r"(?<=[.!?])\s+|\n+", text.strip())
    return [p.strip() for p in parts if p.strip()]


def find_terms(text, terms):
    """Terms (words or phrases) present as whole words, in first-occurrence order."""
    low = text.lower()
    hits = []
    for term in terms:
        m = re.search(r"(?<![A-Za-z])" + re.escape(term.lower()) + r"(?![A-Za-z])", low)
        if m:
            hits.append((m.start(), term))
    return [t for _, t in sorted(hits)]


def find_unnegated(text, terms, safe_prefixes=frozenset()):
    """Terms mentioned as something to do or use: not after 'no', 'without', 'instead of', ...,
    not in 'X-free', and not right after a safe prefix ('oat milk', 'gluten-free bread')."""
    low = text.lower()
    hits = []
    for term in terms:
        for m in re.finditer(r"(?<![A-Za-z])" + re.escape(term.lower()) + r"(?![A-Za-z])", low):
            after = low[m.end(): m.end() + 5]
            before = re.findall(r"[a-z][a-z'-]*", low[max(0, m.start() - 40): m.start()])[-3:]
            if after.startswith("-free") or after.startswith(" free"):
                continue
            if any(w in NEGATORS or w.endswith("-free") or w.endswith("n't") for w in before):
                continue
            if before and before[-1] in safe_prefixes:
                continue
            hits.append((m.start(), term))
            break
    return [t for _, t in sorted(hits)]


def short_quote(text, n_words=8):
    words = word_list(text)
    return " ".join(words[:n_words]) + (" ..." if len(words) > n_words else "")


# ---------------------------------------------------------------------------------------------
# What the rubric knows about the persona and the question


def persona_facts(persona):
    """(field, terms) pairs a response could mention; each field counts once for stuffing."""
    prefs = persona.get("Checkable_Preferences") or {}
    demo = persona.get("Demographics") if isinstance(persona.get("Demographics"), dict) else {}
    facts = []
    name = persona.get("Name")
    if isinstance(name, str) and name.strip() and name.isascii():
        facts.append(("name", [name.strip()]))
    age = demo.get("Age")
    if isinstance(age, int):
        facts.append(("age", [f"{age}-year-old", f"{age} year old", f"{age} years old",
                              f"age {age}", f"aged {age}", f"at {age}"]))
    nationality = demo.get("Nationality")
    if isinstance(nationality, str) and nationality.strip() and nationality.isascii():
        facts.append(("nationality", [nationality.strip()]))
    if prefs.get("city"):
        facts.append(("city", [prefs["city"]]))
    if prefs.get("career"):
        facts.append(("career", CAREER_KEYWORDS.get(prefs["career"], [prefs["career"]])))
    for topic in prefs.get("interests", []):
        facts.append(("interest:" + topic, INTEREST_KEYWORDS.get(topic, [topic])))
    diet = prefs.get("diet", "none")
    if diet in DIETS and DIETS[diet]["honor"]:
        facts.append(("diet", [w for w in DIETS[diet]["honor"] if w not in ("fish", "seafood")]))
    pers = persona.get("Personality") if isinstance(persona.get("Personality"), dict) else {}
    letters = [pers.get(k) for k in ("Extraversion_or_Introversion", "Sensing_or_Intuition",
                                     "Thinking_or_Feeling", "Judging_or_Perceiving")]
    if all(isinstance(x, str) and len(x) == 1 and x.isascii() for x in letters):
        facts.append(("mbti", ["".join(letters)]))
    return facts


def mentioned_facts(persona, text):
    """{field: first matching term} for the persona facts a text mentions."""
    found = {}
    for fld, terms in persona_facts(persona):
        case_sensitive = fld in ("name", "mbti")
        for term in terms:
            pattern = r"(?<![A-Za-z])" + re.escape(term) + r"(?![A-Za-z])"
            if re.search(pattern, text, 0 if case_sensitive else re.IGNORECASE):
                found[fld] = term
                break
    return found


def question_profile(question):
    """Which kind of question this is, from its words alone (so PPO rollouts get judged the
    same way as the data): food / leisure / work make persona facts relevant; simple questions
    get the SPEC length budget."""
    q = question.strip().lower()
    food = bool(find_terms(q, FOOD_WORDS))
    leisure = bool(find_terms(q, LEISURE_WORDS))
    work = bool(find_terms(q, WORK_WORDS))
    personal = bool(re.search(r"\b(i|my|me|i'm)\b", q))
    simple = (q.startswith(SIMPLE_OPENERS) and len(q.split()) <= 12 and not personal
              and not (food or leisure or work))
    return {"food": food, "leisure": leisure, "work": work, "simple": simple}


@dataclass
class Case:
    """Everything the rules look at, computed once."""
    persona: dict
    prefs: dict
    question: str
    response: str
    profile: dict
    n_words: int
    n_tokens: int
    facts: dict
    topic_stems: set
    response_stems: set


@dataclass
class Finding:
    """One rule's verdict: score changes, optional caps, a critique note, an optional edit."""
    note: str
    delta: dict = field(default_factory=dict)
    cap: dict = field(default_factory=dict)
    edit: str = ""
    priority: int = 0    # higher = more important edit


# ---------------------------------------------------------------------------------------------
# The rules, in the order they are applied. Each returns a Finding or None.


def rule_off_topic(c):
    """SPEC 1.1 Helpfulness: -3..-5 off-topic or wrong. Off-topic = shares no content word
    (after stemming) with the question, and for food questions names no food word either."""
    if not c.topic_stems or c.topic_stems & c.response_stems:
        return None
    if c.profile["food"] and find_terms(c.response, FOOD_WORDS + FOOD_NAMES):
        return None
    return Finding("The response does not address the question at all.",
                   cap={"Helpfulness": -4, "Personalization": -1},
                   edit=f"Replace the text with a direct answer to the question "
                        f"\"{short_quote(c.question, 12)}\".", priority=100)


def rule_too_short(c):
    """SPEC 1.1 Helpfulness: too short to be complete -2..-3 (under 8 words: -3, and a fragment
    reads badly: Natural -1)."""
    if c.n_words >= 8:
        return None
    return Finding("It is too short to be a complete answer.",
                   delta={"Helpfulness": -3, "Natural": -1},
                   edit="Add one or two sentences that give the concrete answer.", priority=90)


FINISHED_ENDINGS = ".!?)\"'*:;`"   # last characters of a text that does not stop mid-sentence


def rule_unfinished(c):
    """SPEC 1.1 Helpfulness/Natural: an answer cut off mid-sentence is incomplete and reads
    badly (the 0-1 'basic' band at best)."""
    text = c.response.rstrip()
    if not text or text[-1] in FINISHED_ENDINGS or c.n_words < 8:
        return None
    return Finding("It stops in the middle of a sentence.",
                   delta={"Helpfulness": -1, "Natural": -1},
                   edit=f"Delete or finish the cut-off last sentence "
                        f"(\"...{' '.join(word_list(text)[-5:])}\").", priority=60)


def rule_repetition(c):
    """SPEC 1.1 Helpfulness 4-5 needs 'no redundancy'; repeated sentences also read unnaturally."""
    seen, repeated = set(), None
    for s in sentences(c.response):
        key = re.sub(r"[^a-z0-9 ]", "", s.lower()).strip()
        if len(key.split()) >= 4 and key in seen:
            repeated = s
            break
        seen.add(key)
    words = [w.lower() for w in re.findall(r"[A-Za-z']+", c.response)]
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    loop = len(grams) >= 20 and len(set(grams)) / len(grams) < 0.7
    if not repeated and not loop:
        return None
    what = f"\"{short_quote(repeated)}\"" if repeated else "the looping phrases"
    return Finding("It repeats itself.", delta={"Helpfulness": -1, "Natural": -2},
                   edit=f"Delete the repetition ({what}).", priority=70)


def rule_simple_length(c):
    """SPEC 1.1 Length: for a simple question every extra 100 tokens over budget costs 1 point
    on Helpfulness and Natural (-1 per started 100 tokens over SIMPLE_QUESTION_TOKEN_BUDGET)."""
    over = c.n_tokens - SIMPLE_QUESTION_TOKEN_BUDGET
    if not c.profile["simple"] or over <= 0:
        return None
    k = math.ceil(over / 100)
    budget_words = int(SIMPLE_QUESTION_TOKEN_BUDGET / TOKENS_PER_WORD)
    return Finding(f"It is about {c.n_tokens} tokens long for a simple question "
                   f"(budget {SIMPLE_QUESTION_TOKEN_BUDGET}).",
                   delta={"Helpfulness": -k, "Natural": -k},
                   edit=f"Cut the answer to about {budget_words} words; the question is simple.",
                   priority=65)


def rule_simple_show_off(c):
    """SPEC 1.1: forced, unrelated personal details -2 (Personalization); leaving a clear simple
    question to show off personalization -3 (Helpfulness) when the first sentence is about the
    user instead of the answer."""
    if not c.profile["simple"]:
        return None
    # facts the question itself names (a gardening question mentioning plants) are not forced
    personal = {f: t for f, t in c.facts.items()
                if f != "name" and not find_terms(c.question, [t])}
    if not personal:
        return None
    first = sentences(c.response)[0] if c.response.strip() else ""
    opens_with_user = bool(mentioned_facts(c.persona, first)) and not (
        content_stems(first) & c.topic_stems)
    term = next(iter(personal.values()))
    return Finding(f"It drags persona details (\"{term}\") into a simple factual question.",
                   delta={"Personalization": -2, "Helpfulness": -3 if opens_with_user else 0},
                   edit=f"Delete the personal remark about \"{term}\" and answer in the first "
                        f"sentence.", priority=75)


def rule_diet(c):
    """SPEC 1.1 Personalization: a stated preference violated (food the diet forbids). On a food
    question the advice is also unusable for this user (Helpfulness -1). A food question
    answered with named foods that fit the diet earns +1, +1 more for saying so."""
    diet = c.prefs.get("diet", "none")
    if diet not in DIETS or diet == "none":
        return None
    bad = find_unnegated(c.response, DIETS[diet]["forbidden"], SAFE_FOOD_PREFIXES)
    if bad:
        return Finding(f"It suggests {', '.join(bad[:3])}, which the user's {diet} diet rules out.",
                       delta={"Personalization": -3 if c.profile["food"] else -2,
                              "Helpfulness": -1 if c.profile["food"] else 0},
                       edit=f"Replace \"{bad[0]}\" with {DIETS[diet]['swap']}.", priority=85)
    if not c.profile["food"] or not find_terms(c.response, FOOD_NAMES):
        return None   # no food named: nothing to credit
    if find_terms(c.response, DIETS[diet]["honor"]):
        return Finding(f"It respects the {diet} diet and says so.", delta={"Personalization": 2})
    return Finding(f"Its food suggestions fit the {diet} diet.", delta={"Personalization": 1})


def rule_avoid(c):
    """SPEC 1.1 Personalization: things the persona asked to avoid (-2 each, at most -4)."""
    hits = []
    for avoid_id in c.prefs.get("avoid", []):
        _, label, kind, words = AVOIDS[avoid_id]
        if kind == "emoji" and re.search("[\U0001F300-\U0001FAFF\u2600-\u27BF]", c.response):
            hits.append((label, "Delete the emojis."))
        elif kind == "exclamation" and "!" in c.response:
            hits.append((label, "Replace the exclamation marks with full stops."))
        elif kind == "list" and len(re.findall(r"(?m)^\s*(?:[-*\u2022]|\d+[.)])\s+",
                                               c.response)) >= 2:
            hits.append((label, "Rewrite the list as two or three plain sentences."))
        elif kind == "topic":
            terms = find_unnegated(c.response, words)
            if terms:
                hits.append((label, f"Delete the suggestion involving \"{terms[0]}\"; the user "
                                    f"avoids {label}."))
    if not hits:
        return None
    return Finding(f"It uses {', '.join(h[0] for h in hits)}, which the user asked to avoid.",
                   delta={"Personalization": max(-4, -2 * len(hits))},
                   edit=hits[0][1], priority=80)


def rule_relevant_facts(c):
    """SPEC 1.1 Personalization: 2-3 for useful, natural use of the persona; -1 when obviously
    relevant persona facts are ignored. Leisure questions make interests relevant, work
    questions the career (food questions: see rule_diet)."""
    wanted = []
    if c.profile["leisure"] and c.prefs.get("interests"):
        wanted.append(("interests", [f for f in c.facts if f.startswith("interest:")],
                       c.prefs["interests"][0]))
    if c.profile["work"] and c.prefs.get("career"):
        wanted.append(("career", [f for f in c.facts if f == "career"],
                       c.prefs["career"]))
    if not wanted:
        return None
    used = [w for w in wanted if w[1]]
    missed = [w for w in wanted if not w[1]]
    if used:
        return Finding(f"It connects the answer to the user's {used[0][0]} "
                       f"(\"{c.facts[used[0][1][0]]}\").", delta={"Personalization": 2})
    kind, _, example = missed[0]
    return Finding(f"It ignores the user's {kind}, which this question clearly calls for.",
                   delta={"Personalization": -1},
                   edit=f"Add one clause tying the answer to the user's {kind} "
                        f"(e.g. {example}).", priority=50)


def rule_stuffing(c):
    """SPEC 1.1 Personalization: persona stuffing / dumping persona fields: -3..-5 band
    (Personalization capped at -3), and it reads unnaturally (Natural -1). Stuffing = four or
    more distinct persona facts in one answer."""
    if len(c.facts) < 4:
        return None
    shown = ", ".join(f"\"{t}\"" for t in list(c.facts.values())[:4])
    return Finding(f"It dumps persona details ({shown}) instead of using one that matters.",
                   cap={"Personalization": -3}, delta={"Natural": -1},
                   edit="Delete the list of personal details; keep at most one that matters "
                        "for this question.", priority=78)


def rule_persona_length(c):
    """SPEC 1.1 Personalization: the persona's wanted answer length is a stated preference:
    within it +1 (for answers of at least 15 words); over 1.5x -1; over 2.5x -2."""
    limit = c.prefs.get("max_words")
    if not limit:
        return None
    if 15 <= c.n_words <= limit:   # a fragment gets no credit for being short
        return Finding(f"It keeps to the user's preferred length (at most {limit} words).",
                       delta={"Personalization": 1})
    if c.n_words <= 1.5 * limit:
        return None
    return Finding(f"At {c.n_words} words it ignores the user's wish for answers of at most "
                   f"{limit} words.", delta={"Personalization": -2 if c.n_words > 2.5 * limit
                                             else -1},
                   edit=f"Cut the answer to at most {limit} words, keeping the concrete advice.",
                   priority=55)


def rule_expertise(c):
    """SPEC 1.1 Personalization: a stated preference ignored: jargon for a beginner (two or
    more jargon words), or basic hand-holding for an expert (-1)."""
    level = c.prefs.get("expertise")
    if level == "beginner":
        terms = find_terms(c.response, JARGON)
        if len(terms) >= 2:
            return Finding(f"It uses jargon (\"{terms[0]}\", \"{terms[1]}\") with a beginner.",
                           delta={"Personalization": -1},
                           edit=f"Replace \"{terms[0]}\" and \"{terms[1]}\" with plain words.",
                           priority=40)
    if level == "expert":
        terms = find_terms(c.response, HAND_HOLDING)
        if terms:
            return Finding(f"It talks down to an expert (\"{terms[0]}\").",
                           delta={"Personalization": -1},
                           edit=f"Delete the basic explanation starting \"{terms[0]}\".",
                           priority=40)
    return None


def rule_register(c):
    """SPEC 1.1 Personalization: the persona's register (casual / formal) ignored (-1)."""
    register = c.prefs.get("register")
    if register == "casual":
        terms = find_terms(c.response, FORMAL_MARKERS)
        if len(terms) >= 2:
            return Finding(f"It is stiff and formal (\"{terms[0]}\", \"{terms[1]}\") for a user "
                           f"who likes a casual tone.", delta={"Personalization": -1},
                           edit=f"Replace \"{terms[0]}\" and \"{terms[1]}\" with plain, casual "
                                f"wording.", priority=35)
    if register == "formal":
        contractions = re.findall(r"\b\w+'(?:re|ll|ve|m|d|t)\b|\b\w+n't\b", c.response.lower())
        terms = find_terms(c.response, CASUAL_MARKERS) + contractions
        if len(terms) >= 3:
            return Finding(f"It is too casual (\"{terms[0]}\") for a user who prefers a formal "
                           f"tone.", delta={"Personalization": -1},
                           edit=f"Replace casual wording such as \"{terms[0]}\" with formal "
                                f"phrasing.", priority=35)
    return None


def rule_flowery(c):
    """SPEC 1.1 Personalization: flowery rhetoric / odd metaphors -3 (two or more flowery words)."""
    terms = find_terms(c.response, FLOWERY)
    if len(terms) < 2:
        return None
    return Finding(f"It uses flowery rhetoric (\"{terms[0]}\", \"{terms[1]}\").",
                   delta={"Personalization": -3},
                   edit=f"Replace \"{terms[0]}\" and \"{terms[1]}\" with plain statements.",
                   priority=45)


def rule_name(c):
    """SPEC 1.1 Natural: addressing the user by name -1."""
    if "name" not in c.facts:
        return None
    return Finding("It addresses the user by name.", delta={"Natural": -1},
                   edit=f"Delete the form of address \"{c.facts['name']}\".", priority=30)


def rule_meta(c):
    """SPEC 1.1 Natural: meta notes such as 'this answer considers your background' -2."""
    terms = find_terms(c.response, META_PHRASES)
    if not terms:
        return None
    return Finding(f"It adds a meta note (\"{terms[0]}\") about being personalized.",
                   delta={"Natural": -2},
                   edit=f"Delete the meta note containing \"{terms[0]}\".", priority=72)


def rule_substance(c):
    """SPEC 1.1 Helpfulness bands: -1..-2 superficial (neither covers the question's key words
    nor gives a concrete detail: -1); 0-1 basic; 2-3 accurate and specific (covers the key
    words: +1; concrete details such as numbers or examples: +1); 4 (rare) when it is also
    dense: within the wanted length and nothing else to fault (see rubric_judge)."""
    if not c.topic_stems:
        coverage = 1.0
    else:
        coverage = len(c.topic_stems & c.response_stems) / len(c.topic_stems)
    concrete = c.n_words >= 15 and (bool(re.search(r"\d", c.response))
                                    or bool(find_terms(c.response, CONCRETE_MARKERS)))
    delta = (1 if coverage >= 0.5 else 0) + (1 if concrete else 0)
    delta = delta if delta else -1
    note = {-1: "The content is generic and superficial.", 1: "It answers the question in part.",
            2: "It answers the question with concrete details."}[delta]
    return Finding(note, delta={"Helpfulness": delta})


RULES = [rule_off_topic, rule_too_short, rule_unfinished, rule_repetition, rule_simple_length,
         rule_simple_show_off, rule_diet, rule_avoid, rule_relevant_facts, rule_stuffing,
         rule_persona_length, rule_expertise, rule_register, rule_flowery, rule_name, rule_meta,
         rule_substance]
BASE_SCORES = {"Helpfulness": 1, "Personalization": 0, "Natural": 3}

# ---------------------------------------------------------------------------------------------
# The judge


def make_case(persona, question, response, tokenizer=None):
    persona = load_persona(persona)
    prefs = persona.get("Checkable_Preferences") or {}
    return Case(persona=persona, prefs=prefs, question=question, response=response.strip(),
                profile=question_profile(question), n_words=len(word_list(response)),
                n_tokens=count_tokens(response.strip(), tokenizer),
                facts=mentioned_facts(persona, response), topic_stems=content_stems(question),
                response_stems=content_stems(response))


def rule_findings(c):
    """[(rule name, Finding)] of every rule that fires on the case, in RULES order."""
    return [(rule.__name__, f) for rule in RULES for f in [rule(c)] if f is not None]


def fallback_edits(c):
    """Edits when the rules found little to fix: shorten or reorder, never 'write more'
    (SPEC 1.1: prefer shortening, never ask for more text when unsure)."""
    edits = []
    last = sentences(c.response)[-1] if c.response.strip() else ""
    if last.lower().startswith(SUMMARY_OPENERS):
        edits.append("Delete the closing summary sentence; it repeats what was said.")
    if c.n_words > 40:
        edits.append(f"Cut the answer to about {max(30, int(c.n_words * 0.7))} words by deleting "
                     f"its least specific sentence.")
    edits.append("Move the most direct answer to the question into the first sentence.")
    edits.append("Delete generic filler phrases and keep only the concrete advice.")
    return edits


def rubric_judge(persona, question, response, tokenizer=None):
    """Critique and scores of `response` to `question` for `persona` (dict or JSON string).
    Returns (critique: str, scores: {"Helpfulness", "Personalization", "Natural"} ints in
    [-5, 5]). Deterministic: the same inputs always give the same output."""
    c = make_case(persona, question, response, tokenizer)
    findings = [f for _, f in rule_findings(c)]
    scores = dict(BASE_SCORES)
    for f in findings:
        for dim, d in f.delta.items():
            scores[dim] += d
    for f in findings:
        for dim, cap in f.cap.items():
            scores[dim] = min(scores[dim], cap)
    # 4-5 are rare (SPEC 1.1 bands): only a clean, concise answer gets one more point.
    flawless = not any(f.edit for f in findings)
    limit = c.prefs.get("max_words") or 90
    if flawless and c.n_words <= limit and scores["Helpfulness"] == 3:
        scores["Helpfulness"] = 4
    if flawless and c.n_words <= limit:
        scores["Natural"] += 1
    scores = {d: max(SCORE_MIN, min(SCORE_MAX, int(scores[d]))) for d in DIMENSIONS}

    # The gravest problem first (the same order as the edits), then what the answer does well:
    # the critique's opening sentence carries the verdict that the scores follow.
    notes = " ".join(f.note for f in sorted(findings, key=lambda f: -f.priority if f.edit else 0))
    edits = [f.edit for f in sorted(findings, key=lambda f: -f.priority) if f.edit]
    for e in fallback_edits(c):
        if len(edits) >= 2:
            break
        if e not in edits:
            edits.append(e)
    edits = edits[:3]
    critique = notes + "\nSuggested edits:\n" + "\n".join(
        f"{i + 1}. {e}" for i, e in enumerate(edits))
    return critique, scores


def weighted_score(scores):
    """SPEC 1.1 scalar reward R = 0.35 H + 0.40 P + 0.25 N (same weights as common.GRM_WEIGHTS)."""
    return (0.35 * scores["Helpfulness"] + 0.40 * scores["Personalization"]
            + 0.25 * scores["Natural"])


def rubric_grm_output(persona, question, response, tokenizer=None):
    """The rubric's judgement as GRM output text (SPEC 1.1 format via common.format_grm_output)."""
    from common import format_grm_output
    critique, scores = rubric_judge(persona, question, response, tokenizer)
    return format_grm_output(critique, scores)
