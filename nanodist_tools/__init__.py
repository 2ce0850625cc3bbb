"""The tools around nanodist, outside the library: the cost model (cost.py, traffic.py),
the planner (plan.py: `python -m nanodist_tools.plan`), what the benchmarks measure
(measure.py), and the planner's validation against real and simulated runs
(validate.py, simulate.py). They use the library through its public objects and the
injection points of `Trainer(cfg, comm=..., model_cls=...)`, never by patching it."""
