"""Build the offline persona world: the nanoGPT `data/shakespeare_char` of this repository.

Small English personas in the PersonaFeedback schema (SPEC 3), each with explicit, checkable
preferences (diet, answer length, expertise, register, things to avoid, interests), questions
for them, answers sampled from the embedded default model with the repository's own generation
engine (common.generate), labelled by the rubric critic (rubric.py, SPEC 1.1). Writes, next to
this file (or to --out_dir):

  personas.jsonl  {"user_id", "persona", "split"}                  (no model needed)
  prompts.jsonl   {"user_id", "persona", "question", "category"}    RL prompts (train personas)
  sft.jsonl       {"persona", "question", "response"}               best answer per train prompt
  grm.jsonl       {"persona", "question", "response", "critique", "scores", "grm_output", "split"}
  pairs.jsonl     {"user_id", "persona", "question", "chosen", "reject", "tier", "category",
                   "split"}
  eval.jsonl      {"user_id", "persona", "question", "response", "category"}  held-out personas
  manifest.json   settings, counts, score histograms, sha256 of every file, timings

Run (from the repository root; single process, CPU is fine, ~10-15 min on 2 cores):
  python data/persona_world/prepare.py                       # the committed files
  python data/persona_world/prepare.py --no_model            # personas.jsonl + prompts.jsonl only
  python data/persona_world/prepare.py --limit 1 --max_new_tokens 16 --out_dir /tmp/pw  # smoke
  python data/persona_world/prepare.py --n_train 80 --n_eval 24   # a bigger world
  python data/persona_world/prepare.py --eval_questions 8 --pairs_prefer_longer --out_dir out/ablation/world
                                       # the reward ablation's world (experiments/ablation.sh)
There is nothing to gain from torchrun here: it is a one-process data script.
"""

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))   # the repository root, for `common` and `data.*`

from data.persona_world.rubric import (AVOIDS, DIETS, FINISHED_ENDINGS,  # noqa: E402
                                       META_PHRASES, make_case, rubric_judge, rule_findings,
                                       weighted_score)

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--seed", type=int, default=1234, help="seed for personas, questions, sampling")
parser.add_argument("--n_train", type=int, default=40, help="number of train personas")
parser.add_argument("--n_eval", type=int, default=12, help="number of evaluation personas")
parser.add_argument("--gen_specific", type=int, default=1,
                    help="persona-specific questions per persona that get sampled answers")
parser.add_argument("--gen_general", type=int, default=1,
                    help="general questions per persona that get sampled answers")
parser.add_argument("--samples_persona", type=int, default=1,
                    help="sampled answers per prompt WITH the persona in the prompt")
parser.add_argument("--samples_plain", type=int, default=1,
                    help="sampled answers per question WITHOUT the persona (shared by personas)")
parser.add_argument("--temperatures", type=str, default="0.8",
                    help="sampling temperatures, cycled over the samples of a prompt")
parser.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling top-p")
parser.add_argument("--max_new_tokens", type=int, default=128, help="answer length cap in tokens")
parser.add_argument("--batch_size", type=int, default=16, help="prompts per generate() call")
parser.add_argument("--variants", type=int, default=3,
                    help="rule-based variants per prompt (besides the cleaned edit), see README")
parser.add_argument("--pairs_per_prompt", type=int, default=3, help="at most one pair per tier")
parser.add_argument("--pairs_prefer_longer", action="store_true",
                    help="per tier, draw a pair whose chosen answer is the longer one when there is "
                         "such a pair (human preference data favours longer answers; the ablation "
                         "uses it so that a Bradley-Terry model can learn the length shortcut)")
parser.add_argument("--eval_questions", type=int, default=0,
                    help="questions with a reference answer per eval persona, half specific "
                         "(0 = --gen_specific + --gen_general, as for train personas)")
parser.add_argument("--model", type=str, default=None,
                    help="model name or HF folder (default: common.DEFAULT_MODEL)")
parser.add_argument("--limit", type=int, default=0,
                    help="if > 0, only this many personas per split get generated answers (smoke)")
parser.add_argument("--no_model", action="store_true",
                    help="write personas.jsonl and prompts.jsonl only (no generation)")
parser.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0 = torch's default; 1 is fastest on a busy machine)")
parser.add_argument("--resume_cache", type=str, default="",
                    help="file that finished generation batches are appended to and resumed from")
parser.add_argument("--out_dir", type=str, default=str(HERE), help="where the files go")

# ---------------------------------------------------------------------------------------------
# The world: tables personas and questions are drawn from

FEMALE_NAMES = ["Maya", "Ingrid", "Lucia", "Aiko", "Sofia", "Priya", "Hannah", "Elif", "Camila",
                "Freya", "Nadia", "Leilani", "Anouk", "Yuki", "Fatima", "Zanele", "Rosa", "Amara",
                "Mei", "Greta", "Chiara", "Ayesha", "Sigrid", "Lena", "Beatriz", "Thandiwe",
                "Noor", "Ines", "Esther", "Astrid", "Mirela", "Saoirse", "Yasmin", "Adaeze",
                "Paloma", "Elin"]
MALE_NAMES = ["Tomasz", "Kwame", "Dmitri", "Rahul", "Ewan", "Mateo", "Oluwaseun", "Jonas",
              "Bilal", "Tariq", "Henrik", "Marcus", "Diego", "Connor", "Andrei", "Kenji", "Felix",
              "Samir", "Nikhil", "Tobias", "Rafael", "Emeka", "Arjun", "Oskar", "Viktor",
              "Callum", "Hiroshi", "Pablo", "Kofi", "Dario", "Luca", "Stellan", "Teodor", "Rohan"]
NAMES = [(n, "Female") for n in FEMALE_NAMES] + [(n, "Male") for n in MALE_NAMES]
COUNTRIES = [("Canada", "Canadian", "Toronto"), ("Ireland", "Irish", "Cork"),
             ("Australia", "Australian", "Brisbane"), ("United Kingdom", "British", "Leeds"),
             ("United States", "American", "Denver"),
             ("New Zealand", "New Zealander", "Wellington"),
             ("India", "Indian", "Pune"), ("Nigeria", "Nigerian", "Lagos"),
             ("Germany", "German", "Hamburg"), ("Brazil", "Brazilian", "Curitiba"),
             ("Kenya", "Kenyan", "Nairobi"), ("Sweden", "Swedish", "Uppsala"),
             ("Spain", "Spanish", "Valencia"), ("Japan", "Japanese", "Osaka"),
             ("South Africa", "South African", "Durban"), ("Poland", "Polish", "Krakow")]
CAREERS = [  # title, description (the rubric's CAREER_KEYWORDS say how answers mention it)
    ("nurse", "Night-shift nurse in a busy hospital ward"),
    ("teacher", "Primary school teacher of eight-year-olds"),
    ("software engineer", "Backend software engineer at a logistics start-up"),
    ("accountant", "Accountant at a small auditing firm"),
    ("electrician", "Self-employed electrician doing house rewiring"),
    ("graphic designer", "Freelance graphic designer making book covers"),
    ("university student", "Second-year biology student"),
    ("retired librarian", "Retired librarian who volunteers at a reading club"),
    ("truck driver", "Long-haul truck driver"),
    ("pharmacist", "Pharmacist in a neighbourhood pharmacy"),
    ("architect", "Architect designing schools and libraries"),
    ("chef", "Line cook in a busy restaurant kitchen"),
    ("journalist", "Local news journalist"),
    ("physiotherapist", "Physiotherapist at a sports clinic"),
    ("farmer", "Dairy and vegetable farmer"),
    ("barista", "Barista and part-time music student"),
]
INTERESTS = {  # topic -> persona-specific questions (rubric.INTEREST_KEYWORDS: how it shows)
    "hiking": ["What should I pack for a day hike?",
               "How can I build stamina for longer hikes?"],
    "gardening": ["Which vegetables are easy to grow on a small balcony?",
                  "How do I start composting at home?"],
    "photography": ["How can I take sharper photos in low light?",
                    "What makes a good composition in landscape photography?"],
    "chess": ["How should I study chess openings?",
              "How can I stop blundering pieces in my chess games?"],
    "baking": ["Why does my homemade bread come out dense?",
               "How do I keep a sourdough starter alive?"],
    "cycling": ["How do I prepare for my first 100 km bike ride?",
                "How often should I service my bicycle?"],
    "astronomy": ["What can I see with a small telescope?",
                  "How do I find constellations in the night sky?"],
    "jazz": ["How do I start learning jazz improvisation?",
             "Which jazz albums should I listen to first?"],
    "board games": ["Which board games work well for two players?",
                    "How can I teach a complex board game to new players?"],
    "watercolour painting": ["How do I stop my watercolour paintings from getting muddy?",
                             "What painting exercises help with drawing light?"],
    "running": ["How should I train for my first 10k race?",
                "How do I avoid knee pain when running?"],
    "history": ["Which history books are good for getting started?",
                "How can I make visiting a history museum more interesting?"],
    "birdwatching": ["How do I identify birds by their songs?",
                     "What binoculars are good for birdwatching?"],
    "knitting": ["What is a good first knitting project?",
                 "How do I fix a dropped stitch in my knitting?"],
    "yoga": ["Which yoga poses help with a stiff back?",
             "How can I keep a daily yoga habit?"],
    "pottery": ["How do I center clay on the pottery wheel?",
                "Why do my pottery pieces crack in the kiln?"],
    "science fiction": ["Which science fiction novels should I read next?",
                        "How can I find time to read more books?"],
    "swimming": ["How can I swim longer without getting tired?",
                 "How do I improve my breathing when swimming freestyle?"],
}
# Persona-specific questions that make the persona's diet, interests or career relevant
# (rubric.question_profile detects which): asked of every persona.
FOOD_QUESTIONS = ["What should I cook for dinner tonight?",
                  "Can you suggest a quick lunch I can pack?",
                  "What is a good breakfast to start a busy day?",
                  "What snacks should I bring on a long day out?",
                  "What dish should I bring to a friend's potluck?"]
LEISURE_QUESTIONS = ["What should I do this weekend?",
                     "How can I relax after a stressful week?",
                     "What is a good gift to treat myself for my birthday?",
                     "How should I spend a rainy day off?",
                     "What new hobby could I pick up in my spare time?"]
WORK_QUESTIONS = ["How can I stay focused during long days at work?",
                  "How do I handle a difficult colleague?",
                  "How can I be more productive at my job?",
                  "How do I avoid burnout in my career?"]
# General questions, asked of any persona: simple factual ones (the SPEC length rule applies,
# persona details are forced there) and open ones.
SIMPLE_QUESTIONS = ["What is photosynthesis?", "How many bones are in the human body?",
                    "What does a CPU do?", "Why is the sky blue?", "What is inflation?",
                    "How far is the Moon from Earth?", "What causes the seasons?",
                    "What is the difference between weather and climate?",
                    "What does a vaccine do?", "What is a prime number?",
                    "Who wrote Pride and Prejudice?", "What is compound interest?",
                    "How long does it take light to reach Earth from the Sun?",
                    "What is the boiling point of water at sea level?"]
OPEN_QUESTIONS = ["How can I sleep better?", "Give me tips for saving money each month.",
                  "How do I learn a new language as an adult?",
                  "How can I make my small flat feel less cluttered?",
                  "How do I write a polite email declining an invitation?",
                  "How can I drink more water during the day?",
                  "How can I keep my back healthy?",
                  "How do I prepare for a job interview?"]

MAX_WORDS = [50, 80, 120]
EXPERTISE_TEXT = {
    "beginner": "New to most technical subjects; wants plain words and no jargon.",
    "intermediate": "Comfortable with everyday technical terms.",
    "expert": "Deeply knowledgeable in their field; wants precise answers without basic "
              "explanations or hand-holding.",
}
REGISTER_TEXT = {
    "casual": "Likes a relaxed, casual tone, as if talking to a friend.",
    "formal": "Prefers a formal, polite tone without slang or contractions.",
    "neutral": "Fine with a plain, neutral tone.",
}

# ---------------------------------------------------------------------------------------------
# Personas and questions (no model: cheap, seeded, reproducible)


def make_persona(rng, name, gender):
    _, nationality, city = rng.choice(COUNTRIES)
    title, career_text = rng.choice(CAREERS)
    topics = rng.sample(sorted(INTERESTS), 2)
    diet = rng.choice(["none", "none", "vegetarian", "vegan", "pescatarian", "gluten-free",
                       "dairy-free", "nut-free"])
    max_words = rng.choice(MAX_WORDS)
    expertise = rng.choice(sorted(EXPERTISE_TEXT))
    register = rng.choice(sorted(REGISTER_TEXT))
    avoid = sorted(rng.sample(sorted(AVOIDS), rng.choice([1, 1, 2])))
    age = rng.randint(19, 68) if title != "retired librarian" else rng.randint(62, 75)
    mbti = [rng.choice(p) for p in ("EI", "SN", "TF", "JP")]
    t1, t2 = topics
    article = "an" if title[0] in "aeiou" else "a"
    food_text = DIETS[diet]["text"] or "Eats everything; enjoys trying new dishes."
    length_text = {50: f"Wants short answers: at most {max_words} words.",
                   80: f"Likes answers of at most {max_words} words.",
                   120: f"Is fine with answers of up to {max_words} words."}[max_words]
    avoid_text = " ".join(AVOIDS[a][0] for a in avoid)
    persona = {
        "Name": name,
        "Demographics": {"Age": age, "Gender": gender, "Nationality": nationality,
                         "Language": ["English"], "Career_Information": career_text + "."},
        "Personality": {"Extraversion_or_Introversion": mbti[0], "Sensing_or_Intuition": mbti[1],
                        "Thinking_or_Feeling": mbti[2], "Judging_or_Perceiving": mbti[3],
                        "Values_and_Interests": [f"Passionate about {t1}.",
                                                 f"Spends free time on {t2}.",
                                                 length_text, EXPERTISE_TEXT[expertise],
                                                 REGISTER_TEXT[register]]},
        "Preference": {
            "Local_Life": {"Food_Drinks": food_text,
                           "Entertainment": f"Unwinds with {t1} and {t2}.",
                           "Shopping": f"Buys gear for {t1} second-hand when possible.",
                           "TravelDaily_Outings": f"Lives in {city}; explores it on foot."},
            "Travel": {"Business_Trips": "Rarely travels for work.",
                       "Leisure_Travel": f"Plans trips around {t1}."},
            "Social": f"A small circle of friends in {city}. {avoid_text}",
            "Productivity": {"Study_Work": f"Works as {article} {title}.",
                             "Fitness": "Walks every day."},
            "Content_Interests": [t1, t2],
        },
        # Machine-readable copy of the checkable preferences (read by rubric.py).
        "Checkable_Preferences": {
            "diet": diet, "max_words": max_words, "expertise": expertise, "register": register,
            "avoid": avoid, "interests": topics, "career": title, "city": city},
    }
    return persona


def make_personas(seed, n_train, n_eval):
    """Train and eval personas are different people (distinct names and user ids)."""
    rng = random.Random(seed)
    if n_train + n_eval > len(NAMES):
        raise SystemExit(f"at most {len(NAMES)} personas (names table); got {n_train + n_eval}")
    names = rng.sample(NAMES, n_train + n_eval)
    rows = []
    for i, (name, gender) in enumerate(names):
        split = "train" if i < n_train else "eval"
        user_id = f"pw_{split}_{i:03d}_{name.lower()}"
        rows.append({"user_id": user_id, "persona": make_persona(rng, name, gender),
                     "split": split})
    return rows


def make_questions(seed, row):
    """All questions of a persona, in a fixed order: (question, category, kind). The first few of
    each category get sampled answers (--gen_specific / --gen_general); prompts.jsonl holds all."""
    rng = random.Random(f"{seed}:{row['user_id']}")
    prefs = row["persona"]["Checkable_Preferences"]
    specific = [(q, "interest") for t in prefs["interests"] for q in INTERESTS[t]]
    specific += [(rng.choice(FOOD_QUESTIONS), "food"), (rng.choice(LEISURE_QUESTIONS), "leisure"),
                 (rng.choice(WORK_QUESTIONS), "work")]
    rng.shuffle(specific)
    general = [(q, "simple") for q in rng.sample(SIMPLE_QUESTIONS, 3)]
    general += [(q, "open") for q in rng.sample(OPEN_QUESTIONS, 2)]
    rng.shuffle(general)
    return ([(q, "specific", k) for q, k in specific] + [(q, "general", k) for q, k in general])


def pick_for_generation(questions, n_specific, n_general):
    spec = [q for q in questions if q[1] == "specific"][:n_specific]
    gen = [q for q in questions if q[1] == "general"][:n_general]
    return spec + gen

# ---------------------------------------------------------------------------------------------
# Rule-based variants of a sampled answer, so that every rubric rule shows up in the data


def sentence_cut(text, max_words):
    """The longest prefix of whole sentences within max_words (at least one sentence)."""
    from data.persona_world.rubric import sentences
    out = []
    for s in sentences(text):
        if out and len(" ".join(out + [s]).split()) > max_words:
            break
        out.append(s)
    return " ".join(out)


def trim_unfinished(text):
    """A sample that hit the token cap ends mid-sentence: cut it back to the end of its last
    finished sentence, keeping the text's own line breaks (the text itself when no sentence is
    finished). Without this two thirds of the samples end cut off and one critique sentence
    ("It stops in the middle of a sentence.") dominates the GRM data; the `cut` variant below
    keeps that rule in the data at a lower rate."""
    text = text.strip()
    ends = [m.end() for m in re.finditer(r"[a-z)\]'\"*][.!?]['\")*]*(?=\s)", text)]
    if not text or text[-1] in FINISHED_ENDINGS or not ends:
        return text
    return text[:ends[-1]]


def cleaned_edit(persona, question, text):
    """A mechanical post-edit: drop sentences the rubric faults (name, meta notes, forbidden
    food, things to avoid, repeats, an unfinished tail), then cut to the wanted length."""
    from data.persona_world.rubric import (find_terms, find_unnegated, sentences,
                                           SAFE_FOOD_PREFIXES)
    prefs = persona["Checkable_Preferences"]
    bad_words = list(DIETS[prefs["diet"]]["forbidden"])
    for a in prefs["avoid"]:
        bad_words += AVOIDS[a][3]
    keep, seen = [], set()
    for s in sentences(text):
        key = s.lower()
        if key in seen or persona["Name"] in s or find_terms(s, META_PHRASES):
            continue
        if find_unnegated(s, bad_words, SAFE_FOOD_PREFIXES):
            continue
        seen.add(key)
        s = s.lstrip("-*0123456789.) ").replace("!", ".")
        if s:
            keep.append(s)
    if keep and keep[-1][-1] not in ".?!":
        keep = keep[:-1]
    out = sentence_cut(" ".join(keep), prefs["max_words"]) if keep else ""
    return out


def make_variants(rng, persona, base, other_answer, n):
    """n of the degradations below (seeded choice), each as (kind, text). They exercise the
    rubric rules a 135M model rarely triggers on its own."""
    prefs = persona["Checkable_Preferences"]
    name = persona["Name"]
    demo = persona["Demographics"]
    t1, t2 = prefs["interests"]
    bad_food = (DIETS[prefs["diet"]]["forbidden"] or ["bacon"])[0]
    avoid_id = prefs["avoid"][0]
    avoid_text = {"emojis": "Have fun with it! \U0001F600\U0001F44D",
                  "exclamation": "You will love it! Good luck!",
                  "lists": "Quick recap:\n- start small\n- keep going\n- enjoy it",
                  "alcohol": "Afterwards, reward yourself with a glass of wine.",
                  "caffeine": "A strong coffee will keep you going.",
                  "social_media": "Share your progress on Instagram for motivation.",
                  "driving": "It is easiest if you drive there by car."}[avoid_id]
    all_variants = {
        "name": f"{name}, " + base[:1].lower() + base[1:],
        "meta": base + " This answer considers your background and preferences.",
        "stuffed": (f"As a {demo['Age']}-year-old {prefs['career']} from {prefs['city']} who "
                    f"loves {t1} and {t2}, here is my advice. " + base),
        "truncated": " ".join(base.split()[:5]),
        "cut": " ".join(base.split()[:max(9, len(base.split()) * 2 // 3)]).rstrip(".!?,;:"),
        "offtopic": other_answer,
        "padded": base + " " + " ".join(["In summary, it is important to note that every "
                                         "situation is different and you should consider all "
                                         "of the options carefully."] * 3),
        "diet_violation": base + f" For extra flavour, add some {bad_food}.",
        "avoid_violation": base + " " + avoid_text,
        "flowery": ("Embark on a journey through the rich tapestry of possibilities, a "
                    "symphony of ideas. " + base),
        "meta_name": f"Hi {name}! Based on your profile, " + base[:1].lower() + base[1:],
    }
    kinds = sorted(all_variants)
    return [(k, all_variants[k]) for k in rng.sample(kinds, min(n, len(kinds)))]

# ---------------------------------------------------------------------------------------------
# Files


def write_jsonl(path, rows):
    """Deterministic JSONL (sorted keys off, fixed separators), written atomically."""
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_static(args):
    """personas.jsonl and prompts.jsonl rows (no model)."""
    personas = make_personas(args.seed, args.n_train, args.n_eval)
    prompts = []
    for row in personas:
        if row["split"] != "train":
            continue
        for q, category, _ in make_questions(args.seed, row):
            prompts.append({"user_id": row["user_id"], "persona": row["persona"],
                            "question": q, "category": category})
    return personas, prompts


def generate_answers(args, model, tokenizer, requests, cache_path=None):
    """requests: list of (key, messages, temperature). Returns {key: text}. One seeded
    generate() call per batch of prompts that share a temperature. Finished batches are
    appended to cache_path, so an interrupted run resumes where it stopped with the same result
    (batches and their seeds do not depend on what is cached)."""
    import common
    stop = common.stop_token_ids(tokenizer)
    out = {}
    cached = {}
    generate_answers.n_cached = 0   # reported in manifest.json
    if cache_path and Path(cache_path).exists():
        for line in open(cache_path, encoding="utf-8"):
            if line.strip():
                k, text = json.loads(line)
                cached[k] = text
    by_temp = {}
    for key, messages, temp in requests:
        by_temp.setdefault(temp, []).append((key, common.chat_prompt_ids(tokenizer, messages)))
    n_done, t0 = 0, time.time()
    for bi_t, temp in enumerate(sorted(by_temp)):
        items = sorted(by_temp[temp], key=lambda kv: len(kv[1]))  # similar lengths batch well
        for b in range(0, len(items), args.batch_size):
            batch = items[b:b + args.batch_size]
            keys = [json.dumps(key) for key, _ in batch]
            if all(k in cached for k in keys):
                for (key, _), k in zip(batch, keys):
                    out[key] = cached[k]
                n_done += len(batch)
                generate_answers.n_cached += len(batch)
                continue
            gen = common.generate(model, [ids for _, ids in batch], args.max_new_tokens,
                                  temperature=temp, top_p=args.top_p, stop_ids=stop,
                                  seed=args.seed * 1000 + bi_t * 100 + b // args.batch_size)
            for (key, _), toks in zip(batch, gen.tokens):
                out[key] = tokenizer.decode(toks, skip_special_tokens=True).strip()
            if cache_path:
                with open(cache_path, "a", encoding="utf-8") as f:
                    for (key, _), k in zip(batch, keys):
                        f.write(json.dumps([k, out[key]], ensure_ascii=False) + "\n")
            n_done += len(batch)
            print(f"  generated {n_done}/{len(requests)} ({time.time() - t0:.0f}s)", flush=True)
    return out


def tier_of(gap):
    """Pair tier by weighted-score gap (SPEC 3 tiers by agreement; here by how clear it is)."""
    if gap >= 2.0:
        return "easy"
    if gap >= 1.0:
        return "medium"
    return "hard"


def draw_pair(rng, pairs, prefer_longer=False):
    """One (chosen, reject) of a tier's candidates (x[1] is the text); prefer_longer draws among the
    pairs whose chosen answer has more words, when there are any."""
    longer = [(a, b) for a, b in pairs if len(a[1].split()) > len(b[1].split())]
    return rng.choice(longer if prefer_longer and longer else pairs)


def main(argv=None, model_and_tokenizer=None):
    """Build the files. Tests pass argv and an already loaded (model, tokenizer)."""
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    personas, prompts = build_static(args)
    write_jsonl(out_dir / "personas.jsonl", personas)
    write_jsonl(out_dir / "prompts.jsonl", prompts)
    print(f"personas: {len(personas)}, RL prompts: {len(prompts)}")
    manifest = {"settings": {k: v for k, v in vars(args).items()
                             if k not in ("out_dir", "resume_cache")}}
    files = ["personas.jsonl", "prompts.jsonl"]
    if args.no_model:
        manifest["sha256"] = {f: sha256(out_dir / f) for f in files}
        (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        return

    # ---- prompts that get sampled answers
    import torch
    import common
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = []   # (row, question, category, kind)
    for split in ("train", "eval"):
        rows = [r for r in personas if r["split"] == split]
        if args.limit:
            rows = rows[:args.limit]
        for row in rows:
            n_spec, n_gen = args.gen_specific, args.gen_general
            if split == "eval" and args.eval_questions:
                n_spec, n_gen = args.eval_questions - args.eval_questions // 2, args.eval_questions // 2
            for q, category, kind in pick_for_generation(make_questions(args.seed, row), n_spec, n_gen):
                chosen.append((row, q, category, kind))
    temps = [float(t) for t in args.temperatures.split(",")]
    requests = []
    for i, (row, q, _, _) in enumerate(chosen):
        for s in range(args.samples_persona):
            requests.append((("p", i, s), common.persona_messages(row["persona"], q),
                             temps[s % len(temps)]))
    plain_questions = sorted({q for _, q, _, _ in chosen})
    for q in plain_questions:
        for s in range(args.samples_plain):
            requests.append((("q", q, s), [{"role": "user", "content": q}], temps[s % len(temps)]))
    print(f"prompts with answers: {len(chosen)}, generations: {len(requests)}")

    t0 = time.time()
    model, tokenizer = model_and_tokenizer or common.load_model(args.model or common.DEFAULT_MODEL)
    model.eval()
    t_load = time.time() - t0
    t0 = time.time()
    with torch.no_grad():
        answers = generate_answers(args, model, tokenizer, requests, args.resume_cache or None)
    t_gen = time.time() - t0

    # ---- candidates per prompt: samples, the cleaned edit, rule-based variants; rubric labels
    t0 = time.time()
    rng = random.Random(args.seed + 7)
    grm_rows, sft_rows, pair_rows, eval_rows = [], [], [], []
    kind_counts, rule_counts = {}, {}
    n_trimmed = 0   # samples cut at the token cap, trimmed to their whole sentences
    for i, (row, q, category, kind) in enumerate(chosen):
        persona, split = row["persona"], row["split"]
        cands = [("sample_persona", answers[("p", i, s)]) for s in range(args.samples_persona)]
        cands += [("sample_plain", answers[("q", q, s)]) for s in range(args.samples_plain)]
        trimmed = [(k, trim_unfinished(t)) for k, t in cands]
        n_trimmed += sum(t != raw.strip() for (_, t), (_, raw) in zip(trimmed, cands))
        cands = trimmed
        judged = [(k, t, rubric_judge(persona, q, t)) for k, t in cands if t.strip()]
        samples_by_score = sorted(judged, key=lambda x: -weighted_score(x[2][1]))
        base = samples_by_score[0][1] if samples_by_score else "I am not sure."
        edit = cleaned_edit(persona, q, base)
        if edit and edit != base:
            cands.append(("edit", edit))
        other_q = chosen[(i + len(chosen) // 2) % len(chosen)][1]
        other = trim_unfinished(answers.get(("q", other_q, 0), ""))
        if other_q == q or not other.strip():
            other = "The French Revolution began in 1789 and reshaped European politics."
        cands += make_variants(rng, persona, base, other, args.variants)
        seen, scored = set(), []
        for k, text in cands:
            text = text.strip()
            if not text or text in seen:
                continue
            seen.add(text)
            critique, scores = rubric_judge(persona, q, text)
            scored.append((k, text, critique, scores, weighted_score(scores)))
            kind_counts[k] = kind_counts.get(k, 0) + 1
            for rule_name, _ in rule_findings(make_case(persona, q, text)):
                rule_counts[rule_name] = rule_counts.get(rule_name, 0) + 1
            grm_rows.append({"persona": persona, "question": q, "response": text,
                             "critique": critique, "scores": scores,
                             "grm_output": common.format_grm_output(critique, scores),
                             "split": split, "kind": k})
        # the best model answer or post-edit (never a degraded variant); first of equals wins
        pool = [x for x in scored if x[0] in ("sample_persona", "sample_plain", "edit")]
        best = max(pool or scored, key=lambda x: x[4])
        if split == "train":
            sft_rows.append({"persona": persona, "question": q, "response": best[1]})
        else:
            eval_rows.append({"user_id": row["user_id"], "persona": persona, "question": q,
                              "response": best[1], "category": category})
        # pairs: at most one per tier, chosen strictly better (ties dropped, SPEC 1.1)
        by_tier = {}
        for a in scored:
            for b in scored:
                if a[4] > b[4]:
                    by_tier.setdefault(tier_of(a[4] - b[4]), []).append((a, b))
        for tier in ("easy", "medium", "hard")[:args.pairs_per_prompt]:
            if tier in by_tier:
                a, b = draw_pair(rng, by_tier[tier], args.pairs_prefer_longer)
                pair_rows.append({"user_id": row["user_id"], "persona": persona, "question": q,
                                  "chosen": a[1], "reject": b[1], "tier": tier,
                                  "category": category, "split": split})
    t_judge = time.time() - t0

    for name, rows in (("sft.jsonl", sft_rows), ("grm.jsonl", grm_rows),
                       ("pairs.jsonl", pair_rows), ("eval.jsonl", eval_rows)):
        write_jsonl(out_dir / name, rows)
        files.append(name)
    hist = {d: {} for d in ("Helpfulness", "Personalization", "Natural")}
    for r in grm_rows:
        for d, v in r["scores"].items():
            hist[d][str(v)] = hist[d].get(str(v), 0) + 1
    manifest.update({
        "counts": {"personas": len(personas), "prompts": len(prompts), "sft": len(sft_rows),
                   "grm": len(grm_rows), "pairs": len(pair_rows), "eval": len(eval_rows),
                   "generations": len(requests),
                   "generations_from_resume_cache": generate_answers.n_cached,
                   "samples_trimmed_to_whole_sentences": n_trimmed},
        "grm_kinds": kind_counts,
        "rules_fired": dict(sorted(rule_counts.items())),
        "pair_tiers": {t: sum(r["tier"] == t for r in pair_rows) for t in ("easy", "medium",
                                                                          "hard")},
        "score_histograms": {d: dict(sorted(h.items(), key=lambda kv: int(kv[0])))
                             for d, h in hist.items()},
        "seconds": {"load_model": round(t_load, 1), "generate": round(t_gen, 1),
                    "judge_and_write": round(t_judge, 1),
                    "total": round(time.time() - t_start, 1)},
        "torch_threads": torch.get_num_threads(),
        "sha256": {f: sha256(out_dir / f) for f in files},
    })
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps({k: manifest[k] for k in ("counts", "pair_tiers", "seconds")}))


if __name__ == "__main__":
    main()
