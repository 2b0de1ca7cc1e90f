"""Real training on tiny configurations: every factor reaches the model; populations equal lone runs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lstm_sweep.config import TrialConfig
from lstm_sweep.errors import ConfigError
from lstm_sweep.metrics import VERDICTS
from lstm_sweep.population import Population
from lstm_sweep.step_parts import StepParts
from lstm_sweep.tasks import build_data
from lstm_sweep.train import TrainerCallback, TrialResult, _population_for, train, train_population

SEED_VARIANCE = 143 / 12

# Raw-code regression, seq_len 1, 192 training symbols in 16 lanes: 12 steps an epoch. Every train() of this
# layout with state_size 16 reuses one compiled population, so variants cost milliseconds.
TINY = TrialConfig(stream_length=240, epochs=3)
# Windows of 4 in 8 lanes (6 steps an epoch), so the recurrent kernel and the forget gate matter; standardised
# inputs and targets so that modest learning rates make visible progress in 4 epochs.
TINY4 = TrialConfig(
    stream_length=240, epochs=4, seq_len=4, batch_size=8, input_encoding="scaled", target_scale="scaled"
)

RECORD_KEYS = (
    "train_loss",
    "val_loss",
    "baseline_loss",
    "skill",
    "symbol_accuracy",
    "distinct_symbols",
    "pred_std_ratio",
    "gate_saturation",
    "hidden_spread",
    "noise_to_grad",
    "grad_norm_input_kernel",
    "grad_norm_recurrent_kernel",
    "grad_norm_bias",
    "grad_norm_readout",
)


def curve(result: TrialResult, key: str = "val_loss") -> np.ndarray:
    return np.array([r[key] for r in result.history], dtype=np.float64)


def same_history(a: TrialResult, b: TrialResult) -> bool:
    if len(a.history) != len(b.history):
        return False
    for ra, rb in zip(a.history, b.history, strict=True):
        if ra.keys() != rb.keys():
            return False
        for key in ra:
            x, y = ra[key], rb[key]
            if not (x == y or (math.isnan(x) and math.isnan(y))):
                return False
    return True


@pytest.fixture(scope="module")
def pop4() -> Population:
    """A two-member population of the TINY4 layout, driven directly (reloaded by each test)."""
    return Population(build_data(TINY4), TINY4, 2, TINY4.state_size, xla=False)


def snapshot(pop: Population) -> dict[str, np.ndarray]:
    return {name: var.numpy().astype(np.float64) for name, var in pop.params.items()}


def change_norms(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> np.ndarray:
    """Per-member global norm of the parameter change."""
    sq = sum(np.square(after[n] - before[n]).reshape(after[n].shape[0], -1).sum(axis=1) for n in before)
    return np.sqrt(sq)


# --- the seed and its way out ----------------------------------------------------------------------------


def test_seed_configuration_plateaus_at_the_mean() -> None:
    result = train(TrialConfig())
    final = result.final
    assert len(result.history) == 20
    assert final["baseline_loss"] == pytest.approx(SEED_VARIANCE, abs=1e-9)
    assert final["val_loss"] == pytest.approx(SEED_VARIANCE, rel=0.01)
    assert abs(final["skill"]) < 0.01
    assert result.verdict == "plateau"
    assert result.escape_epoch is None
    assert result.diverged_step is None
    assert final["distinct_symbols"] == 1
    assert final["pred_std_ratio"] < 0.1
    assert result.pred in ("f" * 40, "g" * 40)
    assert result.actual == ("bcdefghijkla" * 4)[:40]
    summary = result.summary()
    assert summary["verdict"] == "plateau"
    assert summary["loss"] == final["val_loss"]


def test_onehot_classification_escapes() -> None:
    cfg = TrialConfig(input_encoding="onehot", output_framing="classification", learning_rate=0.1)
    result = train(cfg)
    final = result.final
    assert final["baseline_loss"] == pytest.approx(math.log(12), abs=1e-6)
    assert final["symbol_accuracy"] >= 0.95
    assert final["skill"] > 0.5
    assert result.verdict == "escaped"
    assert result.escape_epoch is not None and 1 <= result.escape_epoch <= 20
    assert math.isnan(final["pred_std_ratio"])  # regression-only measure
    assert result.pred == result.actual


# --- each factor reaches the model -----------------------------------------------------------------------


def test_readout_only_freezes_the_lstm_but_trains_the_readout(pop4: Population) -> None:
    bptt = TINY4.replace(grad_noise=0.01)
    frozen = bptt.replace(recurrent_training="readout_only")
    pop = pop4
    pop.load([bptt, frozen])
    before = snapshot(pop)
    stats = {k: v.numpy() for k, v in pop.train_epoch().items()}
    after = snapshot(pop)
    lstm = [n for n in pop.names if n.startswith("l0_")]
    assert lstm == ["l0_input_kernel", "l0_recurrent_kernel", "l0_bias"]
    for name in lstm:
        np.testing.assert_array_equal(after[name][1], before[name][1], err_msg=name)  # frozen, noise included
        assert not np.array_equal(after[name][0], before[name][0]), name  # bptt moves them
    for name in ("readout_kernel", "readout_bias"):
        assert not np.array_equal(after[name][1], before[name][1]), name
    # diagnostics: the frozen member's LSTM gradient groups are zero, its readout's is not
    norms = stats["grad_norms"]  # (members, [input_kernel, recurrent_kernel, bias, readout])
    assert np.all(norms[1, :3] == 0.0)
    assert norms[1, 3] > 0.0
    assert np.all(norms[0] > 0.0)


def test_grad_clip_bounds_the_update() -> None:
    # 32 training symbols in 32 lanes: exactly one optimizer step per epoch
    one_step = TrialConfig(stream_length=40, batch_size=32, epochs=1, momentum=0.0, grad_noise=0.0, learning_rate=0.1)
    clip = 1.0
    clipped, free = one_step.replace(grad_clip=clip), one_step.replace(grad_clip=0.0)
    data = build_data(one_step)
    assert data.train.x.shape[0] == 1
    pop = Population(data, one_step, 2, one_step.state_size, xla=False)
    pop.load([clipped, free])
    before = snapshot(pop)
    pop.train_epoch()
    after = snapshot(pop)
    norms = change_norms(before, after)
    bound = one_step.learning_rate * clip
    assert norms[0] <= bound * (1 + 1e-4)
    assert norms[0] >= bound * (1 - 1e-3)  # the raw-code gradient is far above the clip: clipping is active
    assert norms[1] > bound * (1 + 1e-4)
    # same seed, same gradient: clipping rescales it without turning it
    d_clip = np.concatenate([(after[n][0] - before[n][0]).ravel() for n in before])
    d_free = np.concatenate([(after[n][1] - before[n][1]).ravel() for n in before])
    cosine = d_clip @ d_free / (np.linalg.norm(d_clip) * np.linalg.norm(d_free))
    assert cosine == pytest.approx(1.0, abs=1e-5)


def test_recurrent_gradient_needs_a_history() -> None:
    one = train(TINY.replace(grad_noise=0.0))
    four = train(TINY4.replace(grad_noise=0.0, state_size=16))
    assert np.all(curve(one, "grad_norm_recurrent_kernel") == 0.0)  # seq_len 1 from a zero state
    assert np.all(curve(one, "grad_norm_input_kernel") > 0.0)
    assert np.all(curve(four, "grad_norm_recurrent_kernel") > 0.0)


def test_gradient_noise_changes_the_trajectory() -> None:
    quiet = train(TINY.replace(grad_noise=0.0))
    noisy = train(TINY.replace(grad_noise=0.5))
    assert not np.array_equal(curve(quiet), curve(noisy))
    assert np.all(curve(quiet, "noise_to_grad") == 0.0)
    assert np.all(curve(noisy, "noise_to_grad") > 0.0)


def test_training_is_deterministic_per_seed() -> None:
    cfg = TINY.replace(grad_noise=0.5)
    a, b = train(cfg), train(cfg)
    assert same_history(a, b)
    assert a.pred == b.pred
    other = train(cfg.replace(seed=1))
    assert not same_history(a, other)
    assert not np.array_equal(curve(a), curve(other))


@pytest.mark.parametrize("schedule", ["seed", "annealed"])
def test_the_replicate_seed_reaches_the_noise(pop4: Population, schedule: str) -> None:
    """Two identical members; then the same two with only the noise seed changed (initial weights kept)."""
    noisy = TINY4.replace(grad_noise=0.5, grad_noise_schedule=schedule)
    quiet = noisy.replace(grad_noise=0.0)
    pop4.load([noisy.replace(seed=5), noisy.replace(seed=9)])
    np.testing.assert_array_equal(pop4.seeds.numpy(), [5, 9])  # load takes each member's seed
    for cfg, seeds, expect_equal in ((noisy, [0, 0], True), (noisy, [0, 1], False), (quiet, [0, 1], True)):
        pop4.load([cfg, cfg])
        pop4.seeds.assign(np.asarray(seeds, np.uint32))
        pop4.train_epoch()
        after = snapshot(pop4)
        equal = all(np.array_equal(after[n][0], after[n][1]) for n in after)
        assert equal == expect_equal, (cfg.grad_noise, seeds)


def test_annealed_schedule_differs_from_seed_schedule() -> None:
    seed_sched = train(TINY.replace(grad_noise=0.01, grad_noise_schedule="seed"))
    annealed = train(TINY.replace(grad_noise=0.01, grad_noise_schedule="annealed"))
    assert not np.array_equal(curve(seed_sched), curve(annealed))
    assert not np.array_equal(curve(seed_sched, "noise_to_grad"), curve(annealed, "noise_to_grad"))


def test_adam_ignores_momentum_and_momentum_matters_otherwise() -> None:
    adam_a = train(TINY.replace(optimizer="adam", momentum=0.9, learning_rate=0.01))
    adam_b = train(TINY.replace(optimizer="adam", momentum=0.0, learning_rate=0.01))
    assert same_history(adam_a, adam_b)
    sgd_a = train(TINY.replace(optimizer="momentum", momentum=0.9, learning_rate=0.01))
    sgd_b = train(TINY.replace(optimizer="momentum", momentum=0.0, learning_rate=0.01))
    assert not np.array_equal(curve(sgd_a), curve(sgd_b))
    assert not np.array_equal(curve(adam_a), curve(sgd_a))


def test_learning_rate_changes_results() -> None:
    slow = train(TINY.replace(learning_rate=1e-4))
    fast = train(TINY.replace(learning_rate=1e-2))
    assert not np.array_equal(curve(slow), curve(fast))


def test_forget_bias_matters_only_with_a_history() -> None:
    # seq_len 1 from a zero state: the forget gate multiplies c = 0, so the loss cannot depend on it
    one_a = train(TINY.replace(forget_bias=1.0))
    one_b = train(TINY.replace(forget_bias=-3.0))
    np.testing.assert_array_equal(curve(one_a), curve(one_b))
    np.testing.assert_array_equal(curve(one_a, "train_loss"), curve(one_b, "train_loss"))
    four_a = train(TINY4.replace(forget_bias=1.0, state_size=16))
    four_b = train(TINY4.replace(forget_bias=-3.0, state_size=16))
    assert not np.array_equal(curve(four_a), curve(four_b))
    assert not np.array_equal(curve(four_a, "train_loss"), curve(four_b, "train_loss"))


def test_stateful_changes_results_on_mirror() -> None:
    mirror = TrialConfig(
        task="mirror",
        stream_length=440,
        epochs=3,
        input_encoding="onehot",
        output_framing="classification",
        learning_rate=0.05,
        grad_noise=0.0,
    )
    stateless = train(mirror)
    stateful = train(mirror.replace(stateful=True))
    assert not np.array_equal(curve(stateless), curve(stateful))
    # a carried state gives the recurrent kernel a gradient even with windows of one symbol
    assert np.all(curve(stateless, "grad_norm_recurrent_kernel") == 0.0)
    assert np.all(curve(stateful, "grad_norm_recurrent_kernel") > 0.0)


def test_two_layers_run_and_have_more_parameters() -> None:
    cfg = TINY.replace(num_layers=2, state_size=8)
    result = train(cfg)
    assert len(result.history) == cfg.epochs
    assert result.verdict in VERDICTS
    assert all(math.isfinite(r["val_loss"]) for r in result.history)

    def real_params(c: TrialConfig) -> int:
        pop = Population(build_data(c), c, 1, c.state_size, xla=False)
        pop.load([c])
        return int(sum(float(m.numpy().sum()) for m in pop.masks.values()))

    n = 8
    one_layer = 4 * n * (1 + n + 1) + n + 1  # input, recurrent, bias; readout kernel and bias
    assert real_params(cfg.replace(num_layers=1)) == one_layer
    assert real_params(cfg) == one_layer + 4 * n * (n + n + 1)


def test_huge_learning_rate_diverges_without_raising() -> None:
    result = train(TINY.replace(learning_rate=1e3))
    assert result.verdict == "diverged"
    assert result.diverged_step is not None and result.diverged_step >= 1
    final = result.final
    assert not math.isfinite(final["val_loss"]) or final["val_loss"] > 1000 * final["baseline_loss"]
    assert result.summary()["verdict"] == "diverged"


# --- callbacks -------------------------------------------------------------------------------------------


class Recorder(TrainerCallback):
    def __init__(self) -> None:
        self.epochs: list[tuple[int, dict[str, float]]] = []
        self.ends: list[tuple[int, TrialResult]] = []

    def on_epoch_end(self, member: int, record: dict[str, float]) -> None:
        self.epochs.append((member, dict(record)))

    def on_train_end(self, member: int, result: TrialResult) -> None:
        self.ends.append((member, result))


def test_callbacks_get_every_epoch_then_the_end() -> None:
    recorder = Recorder()
    result = train(TINY, callbacks=[recorder])
    assert [m for m, _ in recorder.epochs] == [0] * TINY.epochs
    assert [r["epoch"] for _, r in recorder.epochs] == list(range(1, TINY.epochs + 1))
    for _, record in recorder.epochs:
        missing = [k for k in RECORD_KEYS if k not in record]
        assert not missing
        assert all(isinstance(record[k], float) for k in RECORD_KEYS)
    assert [r for _, r in recorder.epochs] == result.history
    assert len(recorder.ends) == 1
    assert recorder.ends[0][0] == 0 and recorder.ends[0][1] is result


def test_callbacks_per_member_in_a_population() -> None:
    recorder = Recorder()
    configs = [TINY, TINY.replace(seed=3)]
    results = train_population(configs, callbacks=[recorder])
    assert sorted(m for m, _ in recorder.epochs) == [0] * TINY.epochs + [1] * TINY.epochs
    assert sorted(m for m, _ in recorder.ends) == [0, 1]
    assert {m: r for m, r in recorder.ends} == dict(enumerate(results))


# --- populations -----------------------------------------------------------------------------------------


def test_population_equals_lone_training_and_survives_a_diverging_member() -> None:
    members = [
        TINY4.replace(state_size=4, learning_rate=3e-2, seed=0),
        TINY4.replace(state_size=8, learning_rate=1e-2, seed=1, optimizer="adam", grad_noise_schedule="annealed"),
        TINY4.replace(state_size=16, learning_rate=1e-1, seed=2, forget_bias=0.0, grad_clip=1.0),
    ]
    exploding = TINY4.replace(state_size=8, learning_rate=1e3, seed=3)
    together = train_population([members[0], exploding, members[1], members[2]])
    assert together[1].verdict == "diverged"
    assert together[1].diverged_step is not None
    pooled = [together[0], together[2], together[3]]
    for cfg, mate in zip(members, pooled, strict=True):
        alone = train(cfg)
        assert mate.config == cfg
        assert len(mate.history) == len(alone.history) == cfg.epochs
        assert alone.diverged_step is None and mate.diverged_step is None
        assert np.all(np.isfinite(curve(alone)))
        assert curve(alone, "skill")[-1] > curve(alone, "skill")[0] + 0.05  # it learned: not constants compared
        for key in alone.history[0]:
            np.testing.assert_allclose(curve(mate, key), curve(alone, key), rtol=1e-4, atol=1e-5, err_msg=key)
        assert mate.verdict == alone.verdict
        assert mate.pred == alone.pred
    # the members really differ from each other
    assert not np.allclose(curve(pooled[0]), curve(pooled[1]))
    assert not np.allclose(curve(pooled[1]), curve(pooled[2]))


QUIET = TINY4.replace(grad_noise=0.0)  # the seed's default has noise
ADAM, NOISY = QUIET.replace(optimizer="adam"), QUIET.replace(grad_noise=0.1)


@pytest.mark.parametrize(
    ("configs", "expected"),
    [
        ([QUIET], StepParts()),
        ([ADAM, ADAM], StepParts(adam="all")),
        ([QUIET, ADAM], StepParts(adam="some")),
        ([QUIET, NOISY], StepParts(seeded_noise=True)),
        ([NOISY.replace(grad_noise_schedule="annealed")], StepParts(annealed_noise=True)),
        ([NOISY, NOISY.replace(grad_noise_schedule="annealed")], StepParts(seeded_noise=True, annealed_noise=True)),
        ([QUIET.replace(grad_noise_schedule="annealed")], StepParts()),  # a schedule without noise adds nothing
        ([QUIET, QUIET.replace(grad_clip=1.0)], StepParts(clip=True)),
    ],
)
def test_step_parts_name_the_optional_parts_some_member_needs(configs: list[TrialConfig], expected: StepParts) -> None:
    assert StepParts.of(configs) == expected


@pytest.mark.parametrize("xla", [False, True])
def test_a_population_reloaded_with_other_step_parts_trains_them(xla: bool) -> None:
    """Each combination of optional parts is its own compiled epoch: reloading must switch to the right one, and a
    member trains alike whichever parts its mates need (bit for bit as a plain graph; XLA may fuse the member's
    arithmetic differently beside other parts, so there within float tolerance)."""
    pop = Population(build_data(QUIET), QUIET, 2, QUIET.state_size, xla=xla)
    mates = (ADAM, NOISY, NOISY.replace(grad_noise_schedule="annealed"), QUIET.replace(grad_clip=1e-3), QUIET)
    runs = []
    for first in mates:
        pop.load([first, QUIET])
        pop.train_epoch()
        runs.append(snapshot(pop))
    assert set(pop._train_epochs) == {StepParts.of([first, QUIET]) for first in mates}
    assert len(pop._train_epochs) == len(mates)
    *mated, plain = runs
    for run in mated:
        for name, value in plain.items():  # the plain member trains alike whatever its mate needs
            if xla:
                np.testing.assert_allclose(run[name][1], value[1], rtol=1e-6, atol=1e-7, err_msg=name)
            else:
                np.testing.assert_array_equal(run[name][1], value[1], err_msg=name)
        assert change_norms(plain, run)[0] > 1e-4  # and the mate's own part acted


def test_a_population_refuses_step_parts_its_members_would_lack(pop4: Population) -> None:
    with pytest.raises(ValueError, match="lack"):
        pop4.load([ADAM, QUIET], StepParts())
    pop4.load([QUIET, QUIET], StepParts(adam="some", clip=True))  # more than needed is fine: a sweep's parts
    assert pop4.parts == StepParts(adam="some", clip=True)


def test_seq_len_one_leaves_the_recurrent_kernel_idle() -> None:
    """One step from a zero state: the recurrent kernel cannot reach the output, so it is not trained (no update,
    no noise) and no value of it changes the outputs. With a carried state it is trained."""
    cfg = TINY.replace(grad_noise=0.5)
    pop = Population(build_data(cfg), cfg, 1, cfg.state_size, xla=False)
    pop.load([cfg])
    assert pop.idle_names == ["l0_recurrent_kernel"]
    before = snapshot(pop)
    pop.train_epoch()
    after = snapshot(pop)
    np.testing.assert_array_equal(after["l0_recurrent_kernel"], before["l0_recurrent_kernel"])
    assert not np.array_equal(after["l0_input_kernel"], before["l0_input_kernel"])
    outputs = pop.evaluate()["outputs"].numpy()
    pop.idle.assign(np.random.default_rng(0).normal(size=pop.idle.shape).astype(np.float32))
    np.testing.assert_array_equal(pop.evaluate()["outputs"].numpy(), outputs)
    stateful = cfg.replace(stateful=True)
    assert Population(build_data(stateful), stateful, 1, cfg.state_size, xla=False).idle_names == []


def test_equal_shapes_share_one_graph_without_mixing_data() -> None:
    scaled = TINY.replace(input_encoding="scaled", grad_noise=0.0)
    raw = scaled.replace(input_encoding="raw")
    first = train(scaled)
    other = train(raw)
    assert _population_for([raw], 1) is _population_for([scaled], 1)  # raw and scaled codes: one feature each
    again = train(scaled)
    assert same_history(first, again)  # the raw data trained in between did not stay behind
    assert not same_history(first, other)


@pytest.mark.parametrize("xla", ["0", "1"])
def test_population_matches_lone_training_with_and_without_xla(monkeypatch: pytest.MonkeyPatch, xla: str) -> None:
    monkeypatch.setenv("LSTM_SWEEP_XLA", xla)
    members = [TINY4.replace(state_size=4, learning_rate=3e-2, seed=0), TINY4.replace(state_size=16, seed=2)]
    together = train_population(members)
    assert _population_for(members, 1).xla == (xla == "1")
    for cfg, mate in zip(members, together, strict=True):
        alone = train(cfg)
        for key in alone.history[0]:
            np.testing.assert_allclose(curve(mate, key), curve(alone, key), rtol=1e-4, atol=1e-5, err_msg=key)


def test_population_rejects_mixed_layouts() -> None:
    with pytest.raises(ConfigError) as info:
        train_population([TINY, TINY.replace(seq_len=2)])
    assert info.value.key == "population"
    assert "seq_len" in str(info.value)


def test_empty_population() -> None:
    assert train_population([]) == []
