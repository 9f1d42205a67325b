"""Benchmark harness and simulator (`smartspec bench`, `smartspec simulate`).

Modules, one job each:

- `arrivals`: seeded Poisson / gamma / phased arrival times.
- `datasets`: offline prompt sets (summarise, code-edit, chat, mixed) with their provenance.
- `loadgen`: open-loop sending against a worker, per-request outcomes -> point metrics.
- `report`: metric definitions, JSON / markdown / PNG outputs shared by bench and simulate.
- `workload`, `acceptance_models`, `step_models`: what the simulator is asked to replay.
- `simulator`: discrete-event worker model running the controller's own policy code.
- `calibrate`: replay a measured bench run in the simulator, predicted vs measured.
- policy specs (`fixed:3` -> ("fixed", {"k": 3})) are read by `smartspec.core.policy_spec`, as everywhere.
- `controller_trace`, `controller_load`: simulated worker streams against real controllers
  (round trip, decision time, steps/s).
- `cli`, `simulate_cli`, `loadtest_cli`: the subcommands.
"""
