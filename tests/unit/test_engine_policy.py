"""The adaptive speculation policy on its own (``eyas.engine.policy``, ``eyas.engine.costs``):
candidates, the round-time model, acceptance learning, the choice, exploration, records.

Rounds are fed as observations from a synthetic machine (``Machine``): the engine would time
the same phases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from eyas.engine.costs import CostModel, PhaseCost, RoundShape
from eyas.engine.policy import (
    PLAIN,
    Acceptance,
    AdaptivePolicy,
    PolicyConfig,
    RoundRecords,
    Setting,
    candidate_settings,
)

TREE = (5, 4, 8)
PENDING = 2  # tokens each request waits with for the draft extend


@dataclass
class Machine:
    """Phase seconds of a synthetic engine: verify = fixed + per_token * B * T, draft steps
    and extend per position, accept per tree token."""

    fixed: float = 10e-3
    per_token: float = 0.0
    step: float = 0.2e-3
    accept: float = 0.01e-3

    def seconds(self, shape: RoundShape) -> tuple[float, ...]:
        B, T = shape.batch, shape.tokens
        tail = (self.fixed + self.per_token * B * T, self.accept * B * T)
        if shape.steps == 0:
            return tail
        return (self.step * B * shape.pending, self.step * B * shape.steps * shape.topk, *tail)


def run_round(policy: AdaptivePolicy, machine: Machine, setting: Setting, slots: np.ndarray,
              accepted: int) -> None:
    """Time one round of ``setting`` on ``machine``; every request accepts ``accepted`` draft
    tokens (at most the setting's depth)."""
    shape = policy.shape(setting, len(slots), PENDING)
    eagle = np.full(len(slots), min(accepted, setting.num_steps))
    policy.observe(setting, slots, shape, machine.seconds(shape), eagle, eagle)


def trained(machine: Machine, accepted: int, batch: int, rounds: int = 30,
            cfg: PolicyConfig | None = None) -> AdaptivePolicy:
    """A policy after every setting ran ``rounds`` times on ``machine`` for ``batch`` requests
    that accept ``accepted`` draft tokens per round."""
    policy = AdaptivePolicy(candidate_settings(*TREE), num_slots=64, cfg=cfg)
    slots = np.arange(batch)
    for slot in slots:
        policy.acceptance.admit(int(slot))
    for _ in range(rounds):
        for setting in policy.settings:
            run_round(policy, machine, setting, slots, accepted)
    return policy


# ----------------------------------------------------------------------------- candidates


def test_candidates_are_plain_chains_and_the_configured_tree():
    names = [s.name for s in candidate_settings(*TREE)]
    assert names == ["plain", *(f"chain {d}/1/{d + 1}" for d in range(1, 6)), "tree 5/4/8"]
    assert [s.name for s in candidate_settings(3, 1, 4)] == ["plain", "chain 1/1/2",
                                                             "chain 2/1/3", "chain 3/1/4"]
    # chains never need more tree tokens than the configured D (the cache's slack)
    assert [s.name for s in candidate_settings(6, 2, 4)] == ["plain", "chain 1/1/2", "chain 2/1/3",
                                                             "chain 3/1/4", "tree 6/2/4"]
    assert PLAIN.plain and not PLAIN.chain and Setting(5, 4, 8).name == "tree 5/4/8"


# ----------------------------------------------------------------------------- costs


def test_phase_cost_prefers_its_own_shape_then_interpolates_over_sizes():
    cost = PhaseCost(alpha=0.5)
    assert cost.predict((1, 1), 1) is None
    cost.observe((2, 1), 2, 1.0)
    cost.observe((2, 4), 8, 3.0)
    assert cost.predict((1, 2), 2) == 1.0  # size 2 was measured (by another shape)
    assert cost.predict((4, 1), 4) == pytest.approx(1.0 + 2.0 * 2 / 6)  # between sizes 2 and 8
    assert cost.predict((4, 4), 16) == pytest.approx(6.0)  # past the largest: proportional
    assert cost.predict((1, 1), 1) == 1.0  # below the smallest: flat
    assert cost.predict((2, 3), 6) == pytest.approx(1.0 + 2.0 * 4 / 6)  # below (2, 4): 3.0


def test_a_shape_is_never_slower_than_a_larger_one_of_its_batch():
    cost = PhaseCost()
    cost.observe((2, 1), 2, 80.0)  # plain, timed in a stalled round
    cost.observe((2, 4), 8, 3.0)
    cost.observe((4, 1), 4, 80.0)  # another batch: no bound
    assert cost.predict((2, 1), 2) == 3.0 and cost.predict((2, 2), 4) == 3.0
    assert cost.predict((4, 1), 4) == 80.0
    assert cost.predict((2, 8), 16) == pytest.approx(6.0)  # larger: not bounded
    for _ in range(3):  # settled: its own timings, though a larger sibling measured less
        cost.observe((2, 2), 4, 3.5)
    assert cost.predict((2, 2), 4) == 3.5
    grow = PhaseCost()  # keys (B, K, S): chains bound shallower chains, not trees
    grow.observe((2, 1, 5), 10, 2.0)
    grow.observe((2, 1, 2), 4, 9.0)
    grow.observe((2, 4, 1), 8, 7.0)
    assert grow.predict((2, 1, 2), 4) == 2.0 and grow.predict((2, 4, 1), 8) == 7.0


def test_timings_keep_the_least_first_then_average_with_clipped_spikes():
    cost = PhaseCost(alpha=0.25)
    for seconds in (40.0, 2.0, 3.0):  # a first call is slow: the least of the first three
        cost.observe((1, 1), 1, seconds)
    assert cost.predict((1, 1), 1) == 2.0
    cost.observe((1, 1), 1, 3.0)
    assert cost.predict((1, 1), 1) == pytest.approx(0.75 * 2.0 + 0.25 * 3.0)
    cost.observe((1, 1), 1, 300.0)  # a stalled round counts as twice the estimate
    assert cost.predict((1, 1), 1) == pytest.approx(0.75 * 2.25 + 0.25 * 4.5)


def test_round_prediction_is_the_sum_of_its_measured_phases():
    costs = CostModel()
    spec = RoundShape(batch=4, steps=3, topk=1, tokens=4, pending=2)
    assert costs.predict(spec) is None and costs.predict(RoundShape(4)) is None
    costs.observe(spec, (1e-3, 2e-3, 5e-3, 0.5e-3))
    assert costs.predict(spec) == pytest.approx(8.5e-3)
    # plain = verify + accept with T = 1; neither was measured for 4 x 1 tokens: sizes decide
    assert costs.predict(RoundShape(4)) == pytest.approx(5.5e-3)
    costs.observe(RoundShape(4), (4e-3, 0.1e-3))
    assert costs.predict(RoundShape(4)) == pytest.approx(4.1e-3)
    with pytest.raises(ValueError, match="2 phase timings"):
        costs.observe(spec, (1e-3, 2e-3))


def test_a_rare_setting_follows_the_machine_speed_the_frequent_one_measures():
    """The machine slows down (drift, longer contexts) while only plain rounds run: the
    prediction of a speculative round not run since still moves with it."""
    costs = CostModel()
    plain, spec = RoundShape(1), RoundShape(batch=1, steps=3, topk=1, tokens=4, pending=1)
    for _ in range(5):
        costs.observe(plain, (10e-3, 0.1e-3))
        costs.observe(spec, (1e-3, 2e-3, 12e-3, 0.2e-3))
    assert costs.predict(spec) == pytest.approx(15.2e-3)
    for _ in range(40):  # 1.5x slower from here on
        costs.observe(plain, (15e-3, 0.15e-3))
    assert costs.predict(plain) == pytest.approx(15.15e-3, rel=0.02)
    assert costs.predict(spec) == pytest.approx(1.5 * 15.2e-3, rel=0.05)
    costs.observe(spec, (1.5e-3, 3e-3, 18e-3, 0.3e-3))  # and it is right
    assert costs.predict(spec) == pytest.approx(22.8e-3, rel=0.05)


def test_policy_predicts_the_round_it_chooses():
    machine = Machine(per_token=0.05e-3)
    policy = trained(machine, accepted=3, batch=8)
    choice = policy.choose(np.arange(8), pending=2)
    assert choice.predicted_s == pytest.approx(sum(machine.seconds(choice.shape)))


def test_branch_width_is_learned_per_batch_size_from_the_configured_maximum():
    """Before a batch size speculates, its rounds are priced with the full branch width (the
    widest row pads the batch); rounds of one batch size do not move another's width."""
    policy = AdaptivePolicy(candidate_settings(3, 1, 4), num_slots=8, max_branch=4)
    chain = Setting(3, 1, 4)
    assert policy.shape(chain, 1, PENDING).tokens == 4 + 4
    for _ in range(40):  # single requests whose lookup never matches: no branch nodes
        shape = RoundShape(1, 3, 1, 4, PENDING)
        policy.observe(chain, np.arange(1), shape, Machine().seconds(shape), np.zeros(1, int),
                       np.zeros(1, int))
    assert policy.shape(chain, 1, PENDING).tokens == 4
    assert policy.shape(chain, 8, PENDING).tokens == 4 + 4
    assert policy.shape(PLAIN, 8, PENDING).tokens == 1


# ----------------------------------------------------------------------------- acceptance


def test_acceptance_learns_per_depth_per_request_and_globally():
    cfg = PolicyConfig(prior=0.5, alpha_request=0.5, alpha_global=0.5)
    acc = Acceptance(num_slots=4, depth=3, cfg=cfg)
    for slot in (0, 1):
        acc.admit(slot)
    chain3 = Setting(3, 1, 4)
    for _ in range(20):  # slot 0 accepts everything, slot 1 nothing
        acc.observe(np.array([0, 1]), chain3, np.array([3, 0]), np.array([3, 0]))
    np.testing.assert_allclose(acc.chain[0], 1.0, atol=1e-5)
    assert acc.chain[1, 0] == pytest.approx(0.0, abs=1e-5)
    assert (acc.chain[1, 1:] == 0.5).all()  # depths 2, 3 were never tried by slot 1
    np.testing.assert_allclose(acc.global_chain, [0.5, 1.0, 1.0], atol=1e-5)
    acc.admit(2)  # a new request starts from the global estimate
    np.testing.assert_allclose(acc.chain[2], acc.global_chain)
    plain, chain1, chain3_tokens = acc.expected_tokens(np.array([0, 1]),
                                                       [PLAIN, Setting(1, 1, 2), chain3])
    assert plain == 2.0
    assert chain1 == pytest.approx(3.0, abs=1e-4) and chain3_tokens == pytest.approx(5.0, abs=1e-4)


def test_the_global_prior_counts_as_one_observation_a_request_learns_slowly():
    """The prior moves at once (it is a guess); a request's start, the global estimate, is
    worth 1 / alpha_request of its own rounds (a few misses do not switch it off)."""
    acc = Acceptance(num_slots=2, depth=2, cfg=PolicyConfig(prior=0.8, alpha_request=0.1))
    acc.admit(0)
    acc.observe(np.array([0]), Setting(2, 1, 3), eagle=np.array([0]), total=np.array([0]))
    assert acc.global_chain[0] == pytest.approx(0.4)
    assert acc.chain[0, 0] == pytest.approx(0.72)
    assert acc.chain[0, 1] == 0.8  # depth 2 was not tried
    acc.admit(1)
    assert acc.chain[1, 0] == pytest.approx(0.4)


def test_tree_uses_its_observed_acceptance_and_branches_add_theirs():
    acc = Acceptance(num_slots=2, depth=5, cfg=PolicyConfig(prior=0.5, alpha_request=0.5))
    acc.admit(0)
    tree = Setting(*TREE)
    before = acc.expected_tokens(np.array([0]), [Setting(5, 1, 6), tree])
    assert before[1] == pytest.approx(before[0])  # no tree round yet: the deepest chain's guess
    acc.observe(np.array([0]), tree, eagle=np.array([4]), total=np.array([6]))
    tokens = acc.expected_tokens(np.array([0]), [PLAIN, tree])
    assert tokens[1] == pytest.approx(1 + 4 + 0.5 * 2)  # branch: 1st round, weight 1/2 vs 0
    assert acc.global_tree == 4.0


def test_plain_rounds_bring_a_request_back_toward_the_global_estimate():
    """A request that rejected every draft while the others accepted is decoded plainly; its
    plain rounds measure nothing, so its estimate drifts back to the global one until a
    speculative round is worth trying again (without this it stayed plain for good)."""
    cfg = PolicyConfig(explore_budget=0.0, max_explore_interval=10**9)  # no probe rounds
    machine, chain5 = Machine(per_token=1e-3), Setting(5, 1, 6)  # each tree token costs
    policy = AdaptivePolicy(candidate_settings(5, 1, 6), num_slots=4, cfg=cfg)
    for slot in (0, 1):
        policy.acceptance.admit(slot)
    for setting in policy.settings:  # both requests accept everything
        run_round(policy, machine, setting, np.arange(2), accepted=5)
    for _ in range(30):  # then request 0 rejects every draft, request 1 keeps accepting
        shape = policy.shape(chain5, 2, PENDING)
        policy.observe(chain5, np.arange(2), shape, machine.seconds(shape),
                       np.array([0, 5]), np.array([0, 5]))
    lone = np.array([0])
    assert policy.choose(lone, pending=PENDING).setting == PLAIN
    global_before = policy.acceptance.global_chain.copy()
    rounds = 0
    while policy.choose(lone, pending=PENDING).setting == PLAIN:
        shape = policy.shape(PLAIN, 1, PENDING)
        policy.observe(PLAIN, lone, shape, machine.seconds(shape))
        rounds += 1
        assert rounds < 50, "a plain round never brought the request back"
    assert rounds > 1  # what it showed still counts for a while
    np.testing.assert_array_equal(policy.acceptance.global_chain, global_before)


# ----------------------------------------------------------------------------- the choice


def test_plain_wins_when_drafts_are_rejected():
    policy = trained(Machine(), accepted=0, batch=4)
    assert policy.choose(np.arange(4), pending=PENDING).setting == PLAIN


def test_plain_wins_when_verification_is_compute_bound():
    """Every token of the forward costs the same: even 2 accepted of 5 cannot pay."""
    policy = trained(Machine(fixed=0.0, per_token=1e-3), accepted=2, batch=32)
    assert policy.choose(np.arange(32), pending=PENDING).setting == PLAIN


def test_deep_speculation_wins_when_acceptance_is_high_and_verification_cheap():
    policy = trained(Machine(per_token=0.01e-3), accepted=5, batch=2)
    best = policy.choose(np.arange(2), pending=PENDING).setting
    assert best.name in ("chain 5/1/6", "tree 5/4/8")


def test_the_choice_follows_the_batch_size():
    """A moderately good draft: speculate for a small batch, decode plainly for a large one
    (the forward turns compute-bound)."""
    machine = Machine(fixed=10e-3, per_token=0.2e-3)
    policy = trained(machine, accepted=2, batch=2)
    assert not policy.choose(np.arange(2), pending=PENDING).setting.plain
    for _ in range(30):
        for setting in policy.settings:
            run_round(policy, machine, setting, np.arange(48), accepted=2)
    assert policy.choose(np.arange(48), pending=PENDING).setting == PLAIN


def test_cold_start_runs_every_setting_once_deepest_first():
    policy = AdaptivePolicy(candidate_settings(3, 1, 4), num_slots=4)
    assert policy.choose(np.arange(2), pending=PENDING).predicted_s is None  # nothing measured
    order = []
    for _ in range(4):
        choice = policy.choose(np.arange(2), pending=PENDING)
        order.append(choice.setting.name)
        run_round(policy, Machine(), choice.setting, np.arange(2), accepted=0)
    assert order == ["chain 3/1/4", "chain 2/1/3", "chain 1/1/2", "plain"]


def drive(policy: AdaptivePolicy, machine: Machine, slots: np.ndarray, rounds: int,
          accepted: int) -> list[str]:
    """Let the policy choose ``rounds`` rounds on ``machine``; the names of its picks."""
    picks = []
    for _ in range(rounds):
        choice = policy.choose(slots, pending=PENDING)
        picks.append(choice.setting.name)
        run_round(policy, machine, choice.setting, slots, accepted=accepted)
    return picks


def test_exploration_measures_the_probes_within_its_budget():
    """Plain wins, yet the deepest chain and the tree still run: each once its rounds since
    the last run, times the budget share of the plain round's time, cover its regret."""
    machine = Machine(fixed=2e-3, per_token=1e-3)
    policy = trained(machine, accepted=1, batch=8)
    picks = drive(policy, machine, np.arange(8), rounds=2000, accepted=1)
    assert picks.count("plain") > 0.9 * len(picks)
    probes = [name for name in picks if name in ("chain 5/1/6", "tree 5/4/8")]
    assert set(probes) == {"chain 5/1/6", "tree 5/4/8"}
    # regret: a probe's round time minus plain's time for the 2 tokens per request it yields
    t_plain = sum(machine.seconds(RoundShape(8)))
    regret = {s.name: sum(machine.seconds(policy.shape(s, 8, PENDING))) - 2 * t_plain
              for s in policy.probes}
    spent = sum(regret[name] for name in probes)
    assert 0 < spent <= policy.cfg.explore_budget * t_plain * len(picks) + max(regret.values())


# ----------------------------------------------------------------------------- records


def test_round_records_give_shares_and_prediction_error():
    rec = RoundRecords()
    rec.add("plain", None, 2.0)  # a round without prediction (cold start, fixed mode)
    rec.add("plain", 1.0, 1.0)
    rec.add("chain 3/1/4", 1.5, 1.0)
    rec.add("chain 3/1/4", 2.5, 3.0)
    snap = rec.snapshot()
    assert snap["plain"]["share"] == 0.5 and snap["chain 3/1/4"]["rounds"] == 2
    assert snap["chain 3/1/4"]["predicted_ms"] == 2000.0
    assert snap["chain 3/1/4"]["measured_ms"] == 2000.0
    assert snap["chain 3/1/4"]["error_pct"] == pytest.approx(100 * 1.0 / 4.0)
    assert snap["plain"]["measured_ms"] == 1000.0  # over the predicted round only
    overall = rec.overall()
    assert overall["rounds"] == 4 and overall["predicted_ms"] == pytest.approx(5000 / 3)
    rec.reset()
    assert rec.snapshot() == {}


def test_a_probe_far_behind_still_runs_every_max_explore_interval():
    machine = Machine(fixed=0.0, per_token=1e-3, step=1e-3)
    policy = trained(machine, accepted=0, batch=32, cfg=PolicyConfig(max_explore_interval=50))
    picks = drive(policy, machine, np.arange(32), rounds=120, accepted=0)
    assert picks.count("tree 5/4/8") == 2 and picks.count("chain 5/1/6") == 2
