"""The production manager driven by the simulator (simulated provider, server and clock)."""

from __future__ import annotations

import logging

from openweights.cluster.manager import ManagerConfig
from openweights.cluster.sim import make_workload, simulate

WORLD = {"preempt_per_hour": 0.05, "outages": {"1x A100": [(0, 3600)]}, "capacity": {"1x H200": 4}}


def test_simulated_burst_runs_every_job_once_leaks_no_pod_and_beats_one_pod_per_job(caplog):
    caplog.set_level(logging.ERROR)
    config = ManagerConfig(max_workers=10, idle_s=60, max_wait_s=60)
    manager = simulate(make_workload(300, 2, seed=3), config=config, world_kwargs=WORLD)
    baseline = simulate(
        make_workload(300, 2, seed=3), policy="one-pod-per-job", config=config, world_kwargs=WORLD
    )
    for r in (manager, baseline):
        assert r.completed == r.jobs == 300 and r.lost == 0
        assert r.pods_leaked == 0
        assert r.gpu_hours_busy <= r.gpu_hours_billed
    # every pod's billed time is on record: launched, and terminated (preempted ones included)
    assert manager.pods_unrecorded == 0
    assert manager.runs_lost_to_preemption > 0  # preemptions happened and were recovered
    # workers that take the next job need far fewer pods and wait less under a worker cap
    assert manager.pods_launched < baseline.pods_launched / 2
    assert manager.wait_p50_s < baseline.wait_p50_s
    assert manager.utilization >= 0.9
