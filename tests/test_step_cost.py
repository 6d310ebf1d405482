"""The step-cost model: the features a step is priced by, the fit, its file, and the engine's
own measured steps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvstore.sampling_params import SamplingParams
from workers import Engine, EngineConfig
from workers.block_pool import BlockPool
from workers.kv_cache import KVCacheManager
from workers.request import Request
from workers.scheduler import Scheduler, SchedulerConfig
from workers.step_cost import (
    DEFAULT_STEP_COST_PATH,
    NUM_BUCKETS,
    BucketedStepCost,
    ScaledStepCost,
    StepCostModel,
    StepFeatures,
    seq_bucket,
    speed_factors,
    step_features,
)


def test_features_count_prefill_decode_and_attention_pairs():
    kv = KVCacheManager(BlockPool(64), 4)
    sched = Scheduler(SchedulerConfig(8, 64, 256), kv)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    sched.add_request(Request("a", list(range(10)), params, 0.0, block_size=4))
    out = sched.schedule()
    f = step_features(out)
    assert (f.prefill_tokens, f.decode_tokens, f.num_seqs) == (10, 0, 1)
    assert f.context_tokens == 10 * 11 // 2  # token i attends to positions 0..i
    sched.update_from_output(out, [[5]])
    sched.add_request(Request("b", list(range(100, 106)), params, 0.0, block_size=4))
    out = sched.schedule()  # a decodes its 11th token beside b's prompt
    f = step_features(out)
    assert (f.prefill_tokens, f.decode_tokens, f.num_seqs) == (6, 1, 2)
    assert f.context_tokens == 11 + 6 * 7 // 2


def test_fit_recovers_the_coefficients_and_never_goes_negative():
    rng = np.random.default_rng(0)
    truth = StepCostModel(a=3e-3, b_prefill=5e-5, c_decode=1e-4, d_context=2e-7, e_seqs=1e-4)
    features = [
        StepFeatures(int(p), int(d), int(c), int(s))
        for p, d, c, s in rng.integers([0, 0, 0, 1], [2000, 64, 500_000, 64], size=(200, 4))
    ]
    seconds = [truth.seconds(f) for f in features]
    fitted = StepCostModel.fit(features, seconds)
    for name in ("a", "b_prefill", "c_decode", "d_context", "e_seqs"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6)
    assert fitted.relative_error(features, seconds) < 1e-9
    # Times that fall with the decode count: a negative slope is dropped, not kept.
    falling = [max(1e-4, truth.seconds(f) - 5e-5 * f.decode_tokens) for f in features]
    refitted = StepCostModel.fit(features, falling)
    assert min(refitted.a, refitted.b_prefill, refitted.c_decode, refitted.d_context) >= 0.0
    assert refitted.e_seqs >= 0.0 and refitted.c_decode < truth.c_decode


def test_file_round_trips_and_bad_files_are_named(tmp_path):
    model = StepCostModel(a=1e-3, b_prefill=2e-5, c_decode=3e-5, d_context=0.0, e_seqs=1e-6)
    path = tmp_path / "cost.json"
    model.save(path, model_dir="somewhere")
    assert StepCostModel.load(path) == model
    assert isinstance(StepCostModel.load(DEFAULT_STEP_COST_PATH), StepCostModel)
    path.write_text(json.dumps({"step_cost": {"a": 1.0}}))
    with pytest.raises(ValueError, match="cost.json"):
        StepCostModel.load(path)
    negative = {"a": -1.0, "b_prefill": 0, "c_decode": 0, "d_context": 0, "e_seqs": 0}
    path.write_text(json.dumps({"step_cost": negative}))
    with pytest.raises(ValueError, match=">= 0"):
        StepCostModel.load(path)
    with pytest.raises(ValueError, match="at least"):
        StepCostModel.fit([StepFeatures(1, 0, 1, 1)], [0.1])


def test_batch_size_buckets():
    assert [seq_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 500)] == [
        0, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]  # fmt: skip
    assert seq_bucket(0) == 0 and NUM_BUCKETS == 7


def test_residual_tables_take_up_the_jumps_a_line_cannot():
    """Steps that cost a line plus a jump (small decode batches cheaper, a step with prefill
    dearer, as kernels change path): the tables bring the error far below the line's."""
    rng = np.random.default_rng(1)
    line = StepCostModel(a=4e-3, b_prefill=6e-5, c_decode=2e-5, d_context=2e-7, e_seqs=2e-4)

    def truth(f: StepFeatures) -> float:
        jump = -3e-3 if f.prefill_tokens == 0 and f.num_seqs <= 2 else 0.0
        return line.seconds(f) + jump + (3e-3 if f.prefill_tokens else 0.0)

    features = []
    for _ in range(2000):
        seqs = int(rng.integers(1, 48))
        prefill = int(rng.integers(16, 1024)) if rng.random() < 0.4 else 0
        decode = seqs - (prefill > 0)
        features.append(StepFeatures(prefill, decode, prefill * prefill // 2 + 300 * decode, seqs))
    seconds = [truth(f) * rng.uniform(0.97, 1.03) for f in features]
    fit, held = slice(0, None, 2), slice(1, None, 2)
    bucketed = BucketedStepCost.fit(features[fit], seconds[fit])
    plain = bucketed.linear.relative_error(features[held], seconds[held])
    assert bucketed.relative_error(features[held], seconds[held]) < 0.3 * plain
    assert bucketed.decode_residuals[0] < 0 < bucketed.prefill_residuals[3]


def test_bucketed_file_round_trips_and_older_files_load(tmp_path):
    line = StepCostModel(a=1e-3, b_prefill=2e-5, c_decode=3e-5, d_context=0.0, e_seqs=1e-6)
    cost = BucketedStepCost(line, tuple(range(NUM_BUCKETS)), (0.5,) * NUM_BUCKETS)
    path = tmp_path / "cost.json"
    cost.save(path, model_dir="somewhere")
    assert BucketedStepCost.load(path) == cost
    assert StepCostModel.load(path) == line  # the policies' part of the same file
    line.save(path)  # written before the tables: none of them
    assert BucketedStepCost.load(path) == BucketedStepCost(line)
    assert isinstance(BucketedStepCost.load(DEFAULT_STEP_COST_PATH), BucketedStepCost)
    record = json.loads(path.read_text())
    record["residuals"] = {"decode": [0.0], "prefill": [0.0] * NUM_BUCKETS}
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="cost.json: bad residual tables"):
        BucketedStepCost.load(path)


def test_engine_reports_each_steps_features_and_time(tiny_model):
    engine = Engine(
        EngineConfig(model=tiny_model, num_blocks=64, max_num_batched_tokens=8, max_num_seqs=8)
    )
    engine.add_request(list(range(1, 13)), SamplingParams(max_tokens=3, ignore_eos=True))
    seen = []
    while engine.has_unfinished():
        engine.step()
        features, seconds = engine.last_step
        assert seconds > 0
        seen.append((features.prefill_tokens, features.decode_tokens))
    assert seen == [(8, 0), (4, 0), (0, 1), (0, 1)]  # a chunked prompt, then two decodes


def test_calibration_fits_the_engines_own_steps(tiny_model):
    """`manta bench calibrate` (and `benchmarks.scheduling --calibrate`): the engine's steps of
    every shape and a short replay of each policy, a fit that prices them, its held-out error."""
    from benchmarks.calibrate import calibrate

    result = calibrate(tiny_model, threads=1, replay_s=1.0)
    cost = result["step_cost"]
    assert isinstance(cost, BucketedStepCost) and result["steps"] > 500
    assert cost.linear.a > 0 and any(cost.decode_residuals) and any(cost.prefill_residuals)
    assert 0 <= result["held_out_relative_error"] < 1
    assert result["held_out_relative_error"] <= result["held_out_relative_error_linear"] + 0.05
    assert result["held_out_total_error"] < 0.2


def test_a_scaled_cost_carries_a_calibration_to_the_speed_of_the_moment():
    """Decode-only steps and steps with prefill scale apart; the factors measured against a
    cost already carried to the steps' speed are 1."""
    line = StepCostModel(a=0.002, b_prefill=1e-5, c_decode=1e-4, d_context=0.0, e_seqs=1e-4)
    decode = StepFeatures(prefill_tokens=0, decode_tokens=8, context_tokens=800, num_seqs=8)
    prefill = StepFeatures(prefill_tokens=512, decode_tokens=0, context_tokens=9000, num_seqs=1)
    steps = [(decode, 1.5 * line.seconds(decode)), (prefill, 1.2 * line.seconds(prefill))]
    assert speed_factors(line, steps) == pytest.approx((1.5, 1.2))
    scaled = ScaledStepCost(line, 1.5, 1.2)
    assert scaled.seconds(decode) == pytest.approx(1.5 * line.seconds(decode))
    assert speed_factors(scaled, steps) == pytest.approx((1.0, 1.0))
    assert speed_factors(line, steps[:1]) == pytest.approx((1.5, 1.0))  # no prefill step seen


def test_the_speed_probe_times_the_engine_against_a_calibration(tiny_model):
    """The probe the scheduling suite runs before each real replay: a few seconds of steps
    on a fresh engine, priced by the calibration, give finite positive factors."""
    from benchmarks.calibrate import probe_speed

    cost = BucketedStepCost.load(DEFAULT_STEP_COST_PATH)
    decode, prefill = probe_speed(tiny_model, cost)
    assert 0 < decode < 100 and 0 < prefill < 100
    assert decode != 1.0 and prefill != 1.0  # both kinds of step were run and timed
