"""The promotion gates (training/gates.py) against known answers, and the pieces of the fast path
they judge: the last-layer refit (training/refit.py), cached scoring with its runtime spot check
(training/scoring.py) and the decision record helpers (training/decisions.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from training import gates
from training.decisions import RunState, find_unfinished, json_safe, new_run_id, run_path, skipped_counts

RNG_SEED = 7


def _answers(n_per_class: int, k: int, accuracy_current: float, accuracy_candidate: float, overlap: float = 0.9,
             seed: int = RNG_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and two models' calls with the given per-class accuracies; the candidate's mistakes
    mostly fall on the images the current model also gets wrong (``overlap``), as real models do."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), n_per_class)
    n = len(labels)
    hard = rng.random(n)
    right_cur = hard < accuracy_current
    right_cand = np.where(rng.random(n) < overlap, hard < accuracy_candidate, rng.random(n) < accuracy_candidate)
    wrong = (labels + 1) % k

    def calls(right: np.ndarray) -> np.ndarray:
        return np.where(right, labels, wrong)

    return labels, calls(right_cur), calls(right_cand)


# ---- the paired bootstrap ------------------------------------------------------------------------------


def test_paired_bootstrap_of_identical_answers_is_exactly_zero():
    correct = np.array([1, 0, 1, 1, 0, 1], bool)
    assert gates.paired_bootstrap(correct, correct, np.array([0, 0, 1, 1, 2, 2])) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_all_wrong_to_all_right_is_exactly_one():
    n = 30
    assert gates.paired_bootstrap(np.zeros(n, bool), np.ones(n, bool), np.arange(n) % 3) == (1.0, 1.0, 1.0)


def test_paired_bootstrap_is_the_mean_of_per_stratum_differences_and_repeatable():
    strata = np.array([0] * 10 + [1] * 40)
    cur = np.array([1] * 5 + [0] * 5 + [1] * 20 + [0] * 20, bool)  # 0.5 and 0.5
    cand = np.array([1] * 8 + [0] * 2 + [1] * 20 + [0] * 20, bool)  # 0.8 and 0.5
    delta, lo, hi = gates.paired_bootstrap(cur, cand, strata)
    assert delta == pytest.approx((0.3 + 0.0) / 2)  # strata weigh equally, whatever their size
    assert lo <= delta <= hi
    assert gates.paired_bootstrap(cur, cand, strata) == (delta, lo, hi)  # fixed seed


def test_the_interval_narrows_with_more_images():
    widths = []
    for n in (20, 2000):
        labels, cur, cand = _answers(n, 5, 0.7, 0.68)
        _, lo, hi = gates.paired_bootstrap(cur == labels, cand == labels, labels)
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 5  # ~1/sqrt(100) = 1/10 of the width, with bootstrap noise


# ---- balanced accuracy ----------------------------------------------------------------------------------


def test_identical_models_pass_with_a_zero_difference():
    labels, cur, _ = _answers(30, 7, 0.7, 0.7)
    v = gates.balanced_accuracy_gate(labels, cur, cur)
    assert v.passed and v.numbers["difference"] == 0.0 and v.numbers["ci_low"] == 0.0
    assert v.numbers["current"] == pytest.approx(balanced_accuracy_score(labels, cur), abs=1e-4)
    assert "within the tolerated -0.02" in v.reason


def test_a_clearly_worse_candidate_is_refused_with_its_numbers():
    labels, cur, cand = _answers(200, 7, 0.75, 0.60)
    v = gates.balanced_accuracy_gate(labels, cur, cand)
    assert not v.passed
    assert v.numbers["difference"] == pytest.approx(v.numbers["candidate"] - v.numbers["current"], abs=2e-4)
    assert v.numbers["ci_high"] < -0.02 and "beyond the tolerated -0.02" in v.reason
    assert v.numbers["n"] == 1400 and v.numbers["classes"] == 7


def test_a_small_loss_passes_on_a_large_benchmark_and_not_on_a_small_one():
    """The tolerance accounts for the benchmark's size: the same one-point loss is shown to be
    within two points on 7,000 images, and cannot be shown so on 70."""
    big = gates.balanced_accuracy_gate(*_answers(1000, 7, 0.75, 0.74, overlap=0.97))
    small = gates.balanced_accuracy_gate(*_answers(10, 7, 0.75, 0.74, overlap=0.97, seed=3))
    assert big.passed, big.reason
    assert -0.02 < big.numbers["difference"] < 0.0
    assert not small.passed
    assert small.numbers["ci_low"] < -0.02 < small.numbers["ci_high"]


def test_a_better_candidate_passes():
    v = gates.balanced_accuracy_gate(*_answers(100, 7, 0.6, 0.8))
    assert v.passed and v.numbers["ci_low"] > 0


def test_answers_on_different_images_are_refused():
    with pytest.raises(ValueError, match="same images"):
        gates.balanced_accuracy_gate(np.zeros(5, int), np.zeros(5, int), np.zeros(4, int))


def test_an_empty_benchmark_never_passes():
    v = gates.balanced_accuracy_gate(np.zeros(0, int), np.zeros(0, int), np.zeros(0, int))
    assert not v.passed and "no benchmark images" in v.reason


# ---- malignant sensitivity ---------------------------------------------------------------------------------


MASK = np.array([True, False, False])  # class 0 malignant


def test_mcnemar_exact_on_known_discordant_counts():
    cur = np.array([1, 1, 1, 1, 1, 0, 1, 0], bool)
    cand = np.array([0, 0, 0, 0, 0, 1, 1, 0], bool)  # lost 5, gained 1
    t = gates.mcnemar_exact(cur, cand)
    assert (t["lost"], t["gained"]) == (5, 1)
    assert t["p_value"] == pytest.approx(14 / 64)  # P(X<=1) + P(X>=5), X ~ Bin(6, 1/2)
    assert t["p_worse"] == pytest.approx(7 / 64)  # P(X >= 5)
    assert gates.mcnemar_exact(cur, cur) == {"lost": 0, "gained": 0, "p_value": 1.0, "p_worse": 1.0}


def test_losing_many_flagged_cancers_is_refused():
    labels = np.array([0] * 100 + [1] * 100 + [2] * 100)
    cur = labels == 0
    cand = cur.copy()
    cand[:20] = False  # 20 of 100 cancers no longer flagged
    v = gates.sensitivity_gate(labels, MASK, cur, cand)
    assert not v.passed
    assert v.numbers["current"] == 1.0 and v.numbers["candidate"] == 0.8
    assert v.numbers["mcnemar"]["lost"] == 20 and v.numbers["mcnemar"]["gained"] == 0
    assert "20 malignant images flagged now would be missed" in v.reason


def test_flagging_the_same_cancers_passes_whatever_happens_to_benign_images():
    labels = np.array([0] * 50 + [1] * 50)
    cur = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    cand = np.ones(100, bool)  # also flags every benign one: sensitivity unchanged (specificity is not this gate)
    v = gates.sensitivity_gate(labels, MASK, cur, cand)
    assert v.passed and v.numbers["difference"] == 0.0 and v.numbers["n_malignant"] == 50


def test_no_malignant_image_means_no_verdict_but_a_refusal():
    v = gates.sensitivity_gate(np.array([1, 2, 1]), MASK, np.zeros(3, bool), np.zeros(3, bool))
    assert not v.passed and "no malignant images" in v.reason


# ---- calibration and int8 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("current", "candidate", "passed", "limit"), [
    (None, 0.04, True, 0.05),
    (0.03, 0.049, True, 0.05),
    (0.075, 0.08, True, 0.085),  # over 0.05 but within current + 0.01
    (0.02, 0.08, False, 0.05),
    (0.2, 0.25, False, 0.21),
    (0.02, float("nan"), False, 0.05),
])
def test_the_calibration_gate(current, candidate, passed, limit):
    v = gates.ece_gate(current, candidate)
    assert v.passed is passed and v.numbers["limit"] == pytest.approx(limit)
    assert ("within" if passed else "over") in v.reason


def test_the_int8_gate_counts_points_of_balanced_accuracy():
    labels = np.repeat(np.arange(4), 25)
    float_calls = labels.copy()
    int8_calls = labels.copy()
    int8_calls[:1] = 1  # one of 25 class-0 images: recall 0.96, balanced accuracy -1 point
    v = gates.int8_gate(labels, float_calls, int8_calls)
    assert v.passed and v.numbers["drop_points"] == pytest.approx(1.0)
    assert v.numbers["top1_agreement"] == pytest.approx(0.99)
    int8_calls[:2] = 1  # -2 points
    v = gates.int8_gate(labels, float_calls, int8_calls)
    assert not v.passed and "2.00 points over the allowed 1.5" in v.reason


# ---- the decision -----------------------------------------------------------------------------------------


def test_only_blocking_gates_decide_and_the_reason_names_each_failure():
    ok = gates.GateVerdict("a", True, "fine")
    bad = gates.GateVerdict("b", False, "too low")
    advisory = gates.GateVerdict("c", False, "few images", advisory=True)
    assert gates.decide([ok, advisory]).promote
    d = gates.decide([ok, bad, advisory])
    assert not d.promote and d.reason == "refused: b: too low"
    assert not gates.decide([advisory]).promote  # no blocking gate at all: nothing shows it is safe
    assert json.loads(json.dumps(d.to_json()))["gates"][1] == {"gate": "b", "passed": False, "reason": "too low",
                                                               "numbers": {}, "advisory": False}


# ---- the last-layer refit -----------------------------------------------------------------------------------


def _separable(n: int = 300, d: int = 20, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centres = rng.normal(0, 3, (k, d))
    return centres[y] + rng.normal(0, 1, (n, d)), y


def test_fit_head_learns_and_its_pull_keeps_it_near_the_current_layer():
    from training.refit import fit_head

    x, y = _separable()
    k, d = 3, x.shape[1]
    zero = (np.zeros((d, k)), np.zeros(k))
    a, c = fit_head(x, y, *zero, c=1.0)
    assert ((x @ a + c).argmax(1) == y).mean() > 0.95
    rng = np.random.default_rng(1)
    a0, c0 = rng.normal(size=(d, k)), rng.normal(size=k)
    near, _ = fit_head(x, y, a0, c0, c=1e-6)  # a prior this strong: hardly moves
    far, _ = fit_head(x, y, a0, c0, c=10.0)
    assert np.linalg.norm(near - a0) < 0.05 * np.linalg.norm(a0) < np.linalg.norm(far - a0)


def test_fit_head_does_not_depend_on_the_scale_of_a_feature():
    from training.refit import fit_head

    x, y = _separable()
    zero = (np.zeros((x.shape[1], 3)), np.zeros(3))
    a, c = fit_head(x, y, *zero, c=0.1)
    scaled = x.copy()
    scaled[:, 0] *= 1000.0
    a2, c2 = fit_head(scaled, y, *zero, c=0.1)
    np.testing.assert_allclose(x @ a + c, scaled @ a2 + c2, atol=1e-3)


def test_fit_head_refuses_a_single_class():
    from training.refit import RefitError, fit_head

    with pytest.raises(RefitError, match="fewer than two classes"):
        fit_head(np.ones((4, 2)), np.zeros(4, int), np.zeros((2, 2)), np.zeros(2))


def _ensemble(tmp_path):
    pytest.importorskip("keras")
    from training.assemble import ensemble_classifier, full_classifier

    rng = np.random.default_rng(0)
    head = (rng.normal(0, 0.05, (1280, 7)).astype(np.float32), rng.normal(0, 0.1, 7).astype(np.float32))
    a = full_classifier("tiny", 7, 1.5, head=head)
    b = full_classifier("tiny", 7, 2.0, head=head, size=48)
    model = ensemble_classifier(a, [b], 1.2)
    model.save(tmp_path / "e.keras")
    import keras

    return keras.models.load_model(tmp_path / "e.keras", compile=False, safe_mode=True)


def test_an_ensemble_is_a_linear_map_of_its_members_features_and_keeps_its_network(tmp_path):
    from training.refit import body_digest, open_head, probabilities

    model = _ensemble(tmp_path)
    head = open_head(model)
    assert len(head.members) == 2 and head.dims == [1280, 1280] and head.temperature == pytest.approx(1.2)
    x = np.random.default_rng(1).uniform(0, 255, (3, 64, 64, 3)).astype(np.float32)
    z = head.extractor()(x)
    a, c = head.linear()
    np.testing.assert_allclose(probabilities(z, a, c, head.temperature), model(x, training=False), atol=1e-5)
    digest = body_digest(head)
    rng = np.random.default_rng(2)
    a2, c2 = rng.normal(0, 0.05, a.shape), rng.normal(0, 1, c.shape)
    head.set_linear(a2, c2, 0.7)
    np.testing.assert_allclose(probabilities(z, a2, c2, 0.7), model(x, training=False), atol=1e-5)
    assert body_digest(head) == digest  # a refit keeps the network: every cached feature stays valid
    conv = model.get_layer("stem_conv")
    conv.set_weights([w + 0.01 for w in conv.get_weights()])
    assert body_digest(head) != digest


def test_a_model_without_a_refittable_layer_is_refused_with_the_way_out():
    keras = pytest.importorskip("keras")
    from training.refit import RefitError, open_head

    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    with pytest.raises(RefitError, match="--recipe train"):
        open_head(model)


def test_cached_scoring_matches_the_runtime_and_a_damaged_cache_is_caught(tmp_path):
    """A cloud model directory scored through cached features equals CloudModel (test-time views
    included); a feature file damaged behind the scorer's back fails the runtime spot check."""
    pytest.importorskip("keras")
    from dermaloop.model_dir import CloudModel, ModelDir
    from dermaloop.preprocess import load_image, to_model_input
    from dermaloop.risk import RiskPolicy
    from dermaloop.taxonomy import load_taxonomy
    from training.refit import EmbeddingCache
    from training.scoring import Image, ScoringError, score_float
    from training.synthetic import generate

    tax = load_taxonomy()
    root = tmp_path / "model"
    (root / "cloud").mkdir(parents=True)
    _ensemble(tmp_path).save(root / "cloud" / "model.keras")
    tax.save(root / "labels.json")
    policy = RiskPolicy(1.2, tuple(tax.malignant_mask), 0.3, 0.6)
    (root / "card.json").write_text(json.dumps({"version": "t-1", "cloud": {
        "preprocess": {"size": 64}, "risk": policy.to_dict(), "tta": ["flip"]}}))
    data = generate(tmp_path / "syn", per_class=1, size=(80, 60))
    images = [Image(f"{i:064x}", p) for i, p in enumerate(sorted((data / "images").glob("*.jpg")))]
    cache = EmbeddingCache(tmp_path / "cache")
    scores = score_float(root, "cloud", images, cache, progress=False)
    runtime = CloudModel(ModelDir.open(root))
    direct = runtime.predict(np.stack([to_model_input(load_image(im.path), config=runtime.preprocess)
                                       for im in images]))
    np.testing.assert_allclose(scores.probs, direct, atol=1e-4)
    assert scores.extra["spot_check"]["max_abs_difference"] < 1e-3
    again = score_float(root, "cloud", images, cache, progress=False)  # from the cache now
    np.testing.assert_allclose(again.probs, scores.probs, atol=1e-6)
    for f in (tmp_path / "cache").rglob("*.npy"):
        np.save(f, np.load(f) * 3.0)  # not what the network computes
    with pytest.raises(ScoringError, match="differ from the runtime"):
        score_float(root, "cloud", images, cache, progress=False)


def test_the_feature_cache_never_returns_a_damaged_file(tmp_path):
    from dermaloop.preprocess import PreprocessConfig
    from training.refit import EmbeddingCache

    cache = EmbeddingCache(tmp_path)
    folder = cache.folder("digest", PreprocessConfig(size=64), "orig")
    cache.put(folder, "ab" * 32, np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(cache.get(folder, "ab" * 32), np.arange(4))
    (folder / "ab" / f"{'ab' * 32}.npy").write_bytes(b"\x93NUMPY truncated")
    assert cache.get(folder, "ab" * 32) is None
    assert cache.get(folder, "cd" * 32) is None
    assert not list(folder.rglob(".*tmp*"))  # written through a temporary name, renamed


# ---- records -------------------------------------------------------------------------------------------------


def test_records_hold_only_what_the_database_stores():
    value = {"a.b": np.float32(0.5), "n": np.int64(3), "nan": math.nan, "list": [1.0, math.inf],
             "empty": {}, "ok": True, "nested": {"x/y": None}}
    assert json_safe(value) == {"a_b": 0.5, "n": 3, "list": [1.0, None], "ok": True}


def test_skipped_reasons_are_counted_without_naming_patients():
    skipped = [("c1", "no research consent: the patient did not agree"),
               ("c2", "no research consent: the patient did not agree"),
               ("c3", "its reviewer uid-abcdefghijklmnopqrstuvwxyz does not hold the dermatologist role now"),
               ("c4", "image missing in Storage (cases/u1/c4/image.jpg)")]
    counts = skipped_counts(skipped)
    assert counts["no research consent: the patient did not agree"] == 2
    assert not any("abcdefghijklmnop" in k or "u1/c4" in k for k in counts)


def test_run_state_survives_a_restart_and_the_newest_unfinished_run_is_found(tmp_path):
    runs = tmp_path / "runs"
    older, newer = new_run_id(1_700_000_000), new_run_id(1_700_000_100)
    assert run_path(newer).startswith("retrainRuns/")
    with pytest.raises(ValueError):
        run_path("../x")
    a = RunState(older, runs / older, 1, "me", {"dataset": "ds-1"})
    a.mark("dataset", "ds-1")
    b = RunState(newer, runs / newer, 2, "me", {"dataset": "ds-2"})
    b.mark("candidate", "v")
    assert find_unfinished(runs).run_id == newer
    b.finished = True
    b.save()
    found = find_unfinished(runs)
    assert found.run_id == older and found.steps == {"dataset": "ds-1"} and found.inputs == {"dataset": "ds-1"}
    (runs / older / "state.json").write_text("{broken")
    assert find_unfinished(runs) is None
