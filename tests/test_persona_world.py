"""Tests of the offline persona world (data/persona_world): every rubric rule on hand-written
responses, the GRM text format round trip, the committed data files against their schemas,
reproducibility of prepare.py, and the rubric agreeing with every committed pair."""
import copy
import hashlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.persona_world import prepare  # noqa: E402
from data.persona_world.rubric import (DIMENSIONS, make_case, question_profile,  # noqa: E402
                                       rubric_grm_output, rubric_judge, rule_avoid,
                                       rule_diet, rule_expertise, rule_flowery, rule_meta,
                                       rule_name, rule_off_topic, rule_persona_length,
                                       rule_register, rule_relevant_facts, rule_repetition,
                                       rule_simple_length, rule_simple_show_off, rule_stuffing,
                                       rule_findings, rule_substance, rule_too_short,
                                       rule_unfinished, weighted_score)

WORLD = ROOT / "data" / "persona_world"

PERSONA = {
    "Name": "Maya",
    "Demographics": {"Age": 34, "Gender": "Female", "Nationality": "British",
                     "Language": ["English"], "Career_Information": "Night-shift nurse."},
    "Personality": {"Extraversion_or_Introversion": "I", "Sensing_or_Intuition": "N",
                    "Thinking_or_Feeling": "F", "Judging_or_Perceiving": "J",
                    "Values_and_Interests": ["Passionate about hiking."]},
    "Preference": {"Local_Life": {"Food_Drinks": "Vegetarian."}, "Content_Interests": ["hiking"]},
    "Checkable_Preferences": {
        "diet": "vegetarian", "max_words": 50, "expertise": "beginner", "register": "casual",
        "avoid": ["alcohol", "exclamation"], "interests": ["hiking", "chess"], "career": "nurse",
        "city": "Leeds"},
}
FOOD_Q = "What should I cook for dinner tonight?"
LEISURE_Q = "What should I do this weekend?"
SIMPLE_Q = "What is photosynthesis?"
CHESS_Q = "How should I study chess openings?"
GOOD_CHESS = ("Pick one chess opening for white and one for black, and play them for a month. "
              "For example, try the Italian Game and learn its first 6 moves with their ideas.")


def case(response, question=CHESS_Q, persona=PERSONA):
    return make_case(persona, question, response)


def persona_with(**prefs):
    p = copy.deepcopy(PERSONA)
    p["Checkable_Preferences"].update(prefs)
    return p

# ---- one test per rule (SPEC 1.1) ------------------------------------------------------------


def test_off_topic():
    f = rule_off_topic(case("The French Revolution began in 1789 and changed European politics."))
    assert f is not None and f.cap["Helpfulness"] <= -3
    assert rule_off_topic(case(GOOD_CHESS)) is None
    _, s = rubric_judge(PERSONA, CHESS_Q, "The French Revolution began in 1789 in Paris.")
    assert s["Helpfulness"] <= -3
    # a food question answered with dishes but none of the question's words is on topic
    assert rule_off_topic(case("A lentil curry with rice and spinach.", FOOD_Q)) is None


def test_too_short():
    assert rule_too_short(case("Play more.")).delta == {"Helpfulness": -3, "Natural": -1}
    assert rule_too_short(case("Play more chess games every day.")) is not None
    assert rule_too_short(case(GOOD_CHESS)) is None


def test_unfinished():
    f = rule_unfinished(case(GOOD_CHESS + " Then you should also look at the"))
    assert f.delta == {"Helpfulness": -1, "Natural": -1} and "cut-off" in f.edit
    assert rule_unfinished(case(GOOD_CHESS)) is None


def test_repetition():
    s = "Play the Italian Game as white every day."
    f = rule_repetition(case(f"{s} Review your games. {s}"))
    assert f.delta == {"Helpfulness": -1, "Natural": -2}
    loop = " ".join(["you can play chess and"] * 10)
    assert rule_repetition(case(loop)) is not None
    assert rule_repetition(case(GOOD_CHESS)) is None


def test_simple_question_length_penalty():
    assert question_profile(SIMPLE_Q)["simple"] and not question_profile(FOOD_Q)["simple"]
    sentence = "Plants turn light, water and carbon dioxide into sugar and oxygen. "  # 11 words
    assert rule_simple_length(case(sentence * 5, SIMPLE_Q)) is None          # 55 words = 72 tok
    f = rule_simple_length(case(sentence * 10, SIMPLE_Q))                    # 143 tokens: +63
    assert f.delta == {"Helpfulness": -1, "Natural": -1}
    f = rule_simple_length(case(sentence * 20, SIMPLE_Q))                    # 286 tokens: +206
    assert f.delta == {"Helpfulness": -3, "Natural": -3}
    assert rule_simple_length(case(sentence * 20, CHESS_Q)) is None          # not simple


def test_simple_question_show_off():
    show = "As a nurse who loves hiking, you will enjoy this. Photosynthesis makes sugar."
    f = rule_simple_show_off(case(show, SIMPLE_Q))
    assert f.delta["Personalization"] == -2 and f.delta["Helpfulness"] == -3
    later = "Photosynthesis turns light into sugar. Nurses learn this too."
    f = rule_simple_show_off(case(later, SIMPLE_Q))
    assert f is None or f.delta["Helpfulness"] == 0
    assert rule_simple_show_off(case("Photosynthesis turns light into sugar.", SIMPLE_Q)) is None


def test_diet():
    bad = rule_diet(case("Roast a chicken with potatoes and carrots.", FOOD_Q))
    assert bad.delta == {"Personalization": -3, "Helpfulness": -1} and "chicken" in bad.note
    assert rule_diet(case("Make a vegetarian chilli with beans.", FOOD_Q)).delta == {
        "Personalization": 2}
    assert rule_diet(case("Make a chilli with beans and rice.", FOOD_Q)).delta == {
        "Personalization": 1}
    # negated or safely prefixed mentions are not violations
    assert rule_diet(case("Make a stir-fry without chicken, using tofu.", FOOD_Q)).delta[
        "Personalization"] > 0
    vegan = persona_with(diet="vegan")
    assert rule_diet(case("Use oat milk and vegan cheese.", FOOD_Q, vegan)).delta[
        "Personalization"] > 0
    assert rule_diet(case("Add milk and cheese.", FOOD_Q, vegan)).delta["Personalization"] == -3
    # outside food questions a violation still costs, a compliant answer earns nothing
    assert rule_diet(case(GOOD_CHESS + " Celebrate with a steak.")).delta == {
        "Personalization": -2, "Helpfulness": 0}
    assert rule_diet(case(GOOD_CHESS)) is None
    assert rule_diet(case("Roast a chicken.", FOOD_Q, persona_with(diet="none"))) is None


def test_avoid():
    f = rule_avoid(case(GOOD_CHESS + " Have fun!"))
    assert f.delta == {"Personalization": -2} and "exclamation" in f.note
    f = rule_avoid(case(GOOD_CHESS + " Relax with a glass of wine afterwards!"))
    assert f.delta == {"Personalization": -4}
    assert rule_avoid(case(GOOD_CHESS + " Play sober: avoid alcohol before games.")) is None
    listy = persona_with(avoid=["lists", "emojis"])
    f = rule_avoid(case("Study like this:\n- learn ideas\n- play games \U0001F600", persona=listy))
    assert f.delta == {"Personalization": -4}
    assert rule_avoid(case(GOOD_CHESS)) is None


def test_relevant_facts():
    f = rule_relevant_facts(case("Go for a hike on a trail near the city and pack a lunch.",
                                 LEISURE_Q))
    assert f.delta == {"Personalization": 2}
    f = rule_relevant_facts(case("Watch a film and tidy your flat.", LEISURE_Q))
    assert f.delta == {"Personalization": -1} and f.edit
    f = rule_relevant_facts(case("Plan short breaks between patients on the ward.",
                                 "How can I stay focused during long days at work?"))
    assert f.delta == {"Personalization": 2}
    assert rule_relevant_facts(case(GOOD_CHESS)) is None   # not a leisure or work question


def test_stuffing():
    stuffed = ("As a 34-year-old nurse from Leeds who loves hiking and chess, "
               "here is my advice. " + GOOD_CHESS)
    f = rule_stuffing(case(stuffed))
    assert f.cap == {"Personalization": -3} and f.delta == {"Natural": -1}
    _, s = rubric_judge(PERSONA, CHESS_Q, stuffed)
    assert s["Personalization"] <= -3
    assert rule_stuffing(case("As a nurse, " + GOOD_CHESS)) is None


def test_persona_length_preference():
    words = lambda n: " ".join(["word"] * (n - 1)) + " end."  # noqa: E731
    assert rule_persona_length(case(words(50))).delta == {"Personalization": 1}
    assert rule_persona_length(case(words(10))) is None                  # a fragment
    assert rule_persona_length(case(words(70))) is None                  # within 1.5x
    assert rule_persona_length(case(words(80))).delta == {"Personalization": -1}
    assert rule_persona_length(case(words(130))).delta == {"Personalization": -2}


def test_expertise():
    jargon = "Use a framework and a heuristic to study openings."
    assert rule_expertise(case(jargon)).delta == {"Personalization": -1}
    assert rule_expertise(case("Use a plan to study openings.")) is None
    expert = persona_with(expertise="expert")
    assert rule_expertise(case("In simple terms, openings are the first moves.",
                               persona=expert)).delta == {"Personalization": -1}
    assert rule_expertise(case(jargon, persona=expert)) is None


def test_register():
    stiff = "Furthermore, study openings daily. Moreover, review your games."
    assert rule_register(case(stiff)).delta == {"Personalization": -1}
    formal = persona_with(register="formal")
    chatty = "Hey, you're gonna love this, it's super easy and don't stress."
    assert rule_register(case(chatty, persona=formal)).delta == {"Personalization": -1}
    assert rule_register(case(stiff, persona=formal)) is None
    assert rule_register(case(GOOD_CHESS)) is None


def test_flowery():
    f = rule_flowery(case("Embark on a journey through the rich tapestry of chess openings."))
    assert f.delta == {"Personalization": -3}
    assert rule_flowery(case("Embark on a study plan for chess openings.")) is None


def test_name():
    assert rule_name(case("Maya, " + GOOD_CHESS)).delta == {"Natural": -1}
    assert rule_name(case(GOOD_CHESS)) is None
    _, a = rubric_judge(PERSONA, CHESS_Q, GOOD_CHESS)
    _, b = rubric_judge(PERSONA, CHESS_Q, "Maya, " + GOOD_CHESS)
    assert b["Natural"] < a["Natural"]


def test_meta_note():
    f = rule_meta(case(GOOD_CHESS + " This answer considers your background."))
    assert f.delta == {"Natural": -2}
    assert rule_meta(case(GOOD_CHESS)) is None
    _, a = rubric_judge(PERSONA, CHESS_Q, GOOD_CHESS)
    _, b = rubric_judge(PERSONA, CHESS_Q, GOOD_CHESS + " This answer considers your background.")
    assert a["Natural"] - b["Natural"] >= 2


def test_substance():
    assert rule_substance(case(GOOD_CHESS)).delta == {"Helpfulness": 2}
    assert rule_substance(case("Keep at it and you will get better over time.")).delta == {
        "Helpfulness": -1}
    assert rule_substance(case("Study chess openings a bit.")).delta == {"Helpfulness": 1}
    # a food answer that names no food earns no diet credit
    assert rule_diet(case("Eat something healthy and tasty to start the day.", FOOD_Q)) is None

# ---- the judge as a whole --------------------------------------------------------------------


RESPONSES = [GOOD_CHESS, "Play more.", "Maya, " + GOOD_CHESS + " Have fun!",
             "The French Revolution began in 1789.", GOOD_CHESS + " And then the",
             "As a 34-year-old nurse from Leeds who loves hiking and chess: " + GOOD_CHESS]


def test_judge_scores_and_critique_shape():
    for r in RESPONSES:
        critique, scores = rubric_judge(PERSONA, CHESS_Q, r)
        assert set(scores) == set(DIMENSIONS)
        assert all(isinstance(v, int) and -5 <= v <= 5 for v in scores.values())
        edits = [ln for ln in critique.splitlines() if ln[:2] in ("1.", "2.", "3.", "4.")]
        assert 2 <= len(edits) <= 3, critique
        assert rubric_judge(PERSONA, CHESS_Q, r) == (critique, scores)   # deterministic
    _, clean = rubric_judge(PERSONA, CHESS_Q, GOOD_CHESS)
    assert clean == {"Helpfulness": 4, "Personalization": 1, "Natural": 4}


def test_judge_accepts_json_string_and_plain_personafeedback_persona():
    a = rubric_judge(json.dumps(PERSONA), CHESS_Q, GOOD_CHESS)
    assert a == rubric_judge(PERSONA, CHESS_Q, GOOD_CHESS)
    pf = {"Name": "李鹏", "Demographics": {"Age": 30, "Nationality": "中国"},
          "Preference": {"Content_Interests": "未知"}}
    question, answer = "我应该做什么？", "多出去走走。"
    _, s = rubric_judge(json.dumps(pf, ensure_ascii=False), question, answer)
    assert all(-5 <= v <= 5 for v in s.values())
    _, s = rubric_judge("not json at all", CHESS_Q, GOOD_CHESS)
    assert s["Helpfulness"] >= 2


def test_grm_format_round_trip():
    common = pytest.importorskip("common")
    for r in RESPONSES:
        critique, scores = rubric_judge(PERSONA, CHESS_Q, r)
        text = rubric_grm_output(PERSONA, CHESS_Q, r)
        assert common.parse_grm_scores(text) == scores
        assert common.parse_grm_critique(text) == critique.strip()
        assert common.grm_reward(scores) == pytest.approx(weighted_score(scores))
    for h in range(-5, 6):
        scores = {"Helpfulness": h, "Personalization": -h, "Natural": (h * 3) % 11 - 5}
        assert common.parse_grm_scores(common.format_grm_output("x", scores)) == scores

# ---- personas, questions, reproducibility ----------------------------------------------------


def static_args(seed=1234, n_train=40, n_eval=12):
    return prepare.parser.parse_args(["--seed", str(seed), "--n_train", str(n_train),
                                      "--n_eval", str(n_eval)])


def test_personas_disjoint_and_complete():
    personas, prompts = prepare.build_static(static_args())
    train = [r for r in personas if r["split"] == "train"]
    evals = [r for r in personas if r["split"] == "eval"]
    assert len(train) == 40 and len(evals) == 12
    assert not {r["persona"]["Name"] for r in train} & {r["persona"]["Name"] for r in evals}
    assert len({r["user_id"] for r in personas}) == len(personas)
    for r in personas:
        p = r["persona"]
        assert set(p) >= {"Name", "Demographics", "Personality", "Preference"}
        assert set(p["Demographics"]) == {"Age", "Gender", "Nationality", "Language",
                                          "Career_Information"}
        assert set(p["Preference"]) == {"Local_Life", "Travel", "Social", "Productivity",
                                        "Content_Interests"}
    assert {r["user_id"] for r in prompts} == {r["user_id"] for r in train}
    assert {r["category"] for r in prompts} == {"specific", "general"}


def test_question_kinds_match_the_rubric_profile():
    for q in prepare.FOOD_QUESTIONS:
        assert question_profile(q)["food"], q
    for q in prepare.LEISURE_QUESTIONS:
        assert question_profile(q)["leisure"], q
    for q in prepare.WORK_QUESTIONS:
        assert question_profile(q)["work"], q
    for q in prepare.SIMPLE_QUESTIONS:
        assert question_profile(q)["simple"], q
    for q in prepare.OPEN_QUESTIONS:
        prof = question_profile(q)
        assert not prof["simple"] and not prof["food"], q


def test_static_files_reproduce_committed_checksums(tmp_path):
    manifest_path = WORLD / "manifest.json"
    if not manifest_path.exists():
        pytest.skip("data/persona_world/manifest.json not generated yet")
    manifest = json.loads(manifest_path.read_text())
    s = manifest["settings"]
    argv = ["--no_model", "--out_dir", str(tmp_path), "--seed", str(s["seed"]),
            "--n_train", str(s["n_train"]), "--n_eval", str(s["n_eval"])]
    prepare.main(argv)
    for name in ("personas.jsonl", "prompts.jsonl"):
        got = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        assert got == manifest["sha256"][name] == hashlib.sha256(
            (WORLD / name).read_bytes()).hexdigest(), name


def test_seed_changes_the_world():
    a, _ = prepare.build_static(static_args(seed=1))
    b, _ = prepare.build_static(static_args(seed=1))
    c, _ = prepare.build_static(static_args(seed=2))
    assert a == b and a != c


@pytest.fixture(scope="module")
def model_and_tokenizer(request):
    try:
        return request.getfixturevalue("smollm2")
    except pytest.FixtureLookupError:
        common = pytest.importorskip("common")
        try:
            return common.load_model(common.DEFAULT_MODEL)
        except RuntimeError as e:
            pytest.skip(f"embedded default model unavailable: {e}")


def test_tiny_generation_run_is_reproducible(tmp_path, model_and_tokenizer):
    """Two tiny runs with the real model give identical files (one train and one eval persona,
    one question each, 8 new tokens; one thread, which is fastest on a busy machine)."""
    import torch
    argv = ["--limit", "1", "--gen_specific", "1", "--gen_general", "0", "--samples_persona", "1",
            "--samples_plain", "1", "--max_new_tokens", "8", "--n_train", "4", "--n_eval", "2",
            "--threads", "1"]
    threads = torch.get_num_threads()
    outs = []
    try:
        for run in ("a", "b"):
            prepare.main(argv + ["--out_dir", str(tmp_path / run)], model_and_tokenizer)
            outs.append({f: (tmp_path / run / f).read_bytes() for f in
                         ("sft.jsonl", "grm.jsonl", "pairs.jsonl", "eval.jsonl")})
    finally:
        torch.set_num_threads(threads)
    assert outs[0] == outs[1]
    assert outs[0]["grm.jsonl"] and outs[0]["eval.jsonl"]
    validate_files(tmp_path / "a")

# ---- the committed data files ----------------------------------------------------------------


def rows_of(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def check_scores(scores):
    assert set(scores) == set(DIMENSIONS)
    assert all(isinstance(v, int) and -5 <= v <= 5 for v in scores.values())


def validate_files(folder):
    """Schemas of API.md, and the consistency the stages rely on."""
    folder = Path(folder)
    personas = rows_of(folder / "personas.jsonl")
    split_of = {r["user_id"]: r["split"] for r in personas}
    for r in personas:
        assert set(r) == {"user_id", "persona", "split"} and r["split"] in ("train", "eval")
    for r in rows_of(folder / "prompts.jsonl"):
        assert set(r) == {"user_id", "persona", "question", "category"}
        assert split_of[r["user_id"]] == "train" and r["category"] in ("specific", "general")
    for r in rows_of(folder / "sft.jsonl"):
        assert set(r) == {"persona", "question", "response"} and r["response"].strip()
        assert isinstance(r["persona"], dict)
    for r in rows_of(folder / "grm.jsonl"):
        assert set(r) >= {"persona", "question", "response", "critique", "scores", "grm_output",
                          "split"}
        check_scores(r["scores"])
        assert r["split"] in ("train", "eval")
    for r in rows_of(folder / "pairs.jsonl"):
        assert set(r) == {"user_id", "persona", "question", "chosen", "reject", "tier",
                          "category", "split"}
        assert r["tier"] in ("easy", "medium", "hard") and r["chosen"] != r["reject"]
        assert r["split"] == split_of[r["user_id"]]
    for r in rows_of(folder / "eval.jsonl"):
        assert set(r) == {"user_id", "persona", "question", "response", "category"}
        assert split_of[r["user_id"]] == "eval" and r["response"].strip()


committed = pytest.mark.skipif(not (WORLD / "grm.jsonl").exists(),
                               reason="data/persona_world/*.jsonl not generated yet "
                                      "(python data/persona_world/prepare.py)")


@committed
def test_committed_files_validate():
    validate_files(WORLD)
    sizes = sum((WORLD / f).stat().st_size for f in ("personas.jsonl", "prompts.jsonl",
                                                     "sft.jsonl", "grm.jsonl", "pairs.jsonl",
                                                     "eval.jsonl"))
    assert sizes < 12 * 2 ** 20, "the persona world must stay small"
    manifest = json.loads((WORLD / "manifest.json").read_text())
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((WORLD / name).read_bytes()).hexdigest() == digest, name


@committed
def test_committed_grm_rows_are_the_rubric_output():
    common = pytest.importorskip("common")
    for r in rows_of(WORLD / "grm.jsonl"):
        critique, scores = rubric_judge(r["persona"], r["question"], r["response"])
        assert (critique, scores) == (r["critique"], r["scores"])
        assert common.parse_grm_scores(r["grm_output"]) == r["scores"]


@committed
def test_rubric_prefers_the_chosen_side_of_every_committed_pair():
    pairs = rows_of(WORLD / "pairs.jsonl")
    assert {p["tier"] for p in pairs} == {"easy", "medium", "hard"}
    for p in pairs:
        chosen = weighted_score(rubric_judge(p["persona"], p["question"], p["chosen"])[1])
        reject = weighted_score(rubric_judge(p["persona"], p["question"], p["reject"])[1])
        assert chosen > reject, p["question"]


@committed
def test_the_main_rules_appear_in_the_grm_data():
    fired = {}
    for r in rows_of(WORLD / "grm.jsonl"):
        for name, _ in rule_findings(make_case(r["persona"], r["question"], r["response"])):
            fired[name] = fired.get(name, 0) + 1
    for name in ("rule_off_topic", "rule_too_short", "rule_unfinished", "rule_repetition",
                 "rule_simple_length", "rule_simple_show_off", "rule_diet", "rule_avoid",
                 "rule_relevant_facts", "rule_stuffing", "rule_persona_length", "rule_flowery",
                 "rule_name", "rule_meta", "rule_substance"):
        assert fired.get(name, 0) > 0, name
    manifest = json.loads((WORLD / "manifest.json").read_text())
    assert manifest["rules_fired"] == dict(sorted(fired.items()))


def test_rubric_runs_on_real_personafeedback_cases():
    data = ROOT.parent / "shared" / "data" / "personafeedback"
    if not (data / "general_easy.jsonl").exists():
        pytest.skip(f"real data not found at {data}")
    with open(data / "general_easy.jsonl", encoding="utf-8") as f:
        cases = [json.loads(next(f)) for _ in range(20)]
    for case_ in cases:
        path = data / "personas" / f"{case_['user_id']}.json"
        persona = path.read_text(encoding="utf-8") if path.exists() else "{}"
        for side in ("chosen", "reject"):
            _, s = rubric_judge(persona, case_["question"], case_[side])
            assert all(isinstance(v, int) and -5 <= v <= 5 for v in s.values())


def test_trim_unfinished_keeps_whole_sentences_and_line_breaks():
    assert prepare.trim_unfinished("Walk daily. Stretch after the walk and") == "Walk daily."
    assert prepare.trim_unfinished("1. Rest well.\n2. Eat well\n3. Sleep") == "1. Rest well."
    assert prepare.trim_unfinished("Done here.") == "Done here."          # finished: unchanged
    assert prepare.trim_unfinished("no sentence ends here") == "no sentence ends here"
    assert prepare.trim_unfinished("It costs 5. Then go and") == "It costs 5. Then go and"


@committed
def test_no_single_critique_opening_dominates_the_grm_data():
    """The failure this guards against: 152 of 461 training critiques once opened with "It stops
    in the middle of a sentence." (samples cut at the token cap), and a GRM trained on them wrote
    that sentence for every answer."""
    train = [r for r in rows_of(WORLD / "grm.jsonl") if r["split"] == "train"]
    openings = {}
    for r in train:
        first = r["critique"].split(".")[0]
        openings[first] = openings.get(first, 0) + 1
    assert max(openings.values()) < 0.2 * len(train), max(openings.items(), key=lambda kv: kv[1])
    unfinished = sum("middle of a sentence" in r["critique"] for r in train)
    assert 0 < unfinished < 0.15 * len(train)


def test_draw_pair_prefers_a_longer_chosen_answer_only_when_asked():
    """--pairs_prefer_longer (the ablation's world): the chosen side is the longer one whenever a
    tier has such a pair; without the flag the draw is the plain seeded choice it always was."""
    import random
    short, mid, long_ = ("a", "one two", 3.0), ("b", "one two three four", 2.0), ("c", "x " * 9, 1.0)
    pairs = [(short, mid), (short, long_), (mid, long_), (long_, short)]
    for seed in range(20):
        assert prepare.draw_pair(random.Random(seed), pairs, True) == (long_, short)
        assert prepare.draw_pair(random.Random(seed), pairs) == random.Random(seed).choice(pairs)
    no_longer = [(short, mid), (mid, long_)]
    assert prepare.draw_pair(random.Random(0), no_longer, True) == random.Random(0).choice(no_longer)


def test_eval_questions_sets_the_reference_answered_questions_per_eval_persona(tmp_path, model_and_tokenizer):
    import torch
    threads = torch.get_num_threads()
    try:
        prepare.main(["--limit", "1", "--gen_specific", "1", "--gen_general", "0", "--max_new_tokens", "4",
                      "--n_train", "2", "--n_eval", "2", "--threads", "1", "--eval_questions", "3",
                      "--variants", "0", "--out_dir", str(tmp_path)], model_and_tokenizer)
    finally:
        torch.set_num_threads(threads)
    evals, sft = rows_of(tmp_path / "eval.jsonl"), rows_of(tmp_path / "sft.jsonl")
    assert len(sft) == 1 and len(evals) == 3 and len({r["user_id"] for r in evals}) == 1
    assert [r["category"] for r in evals] == ["specific", "specific", "general"]
