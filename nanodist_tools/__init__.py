"""The tools around nanodist, outside the library: the planner's command line
(planner.py: rank layouts, `--calibrate` this machine (calibrate.py), `--validate` the
model against real and simulated runs (validate.py, simulate.py)), and what the
benchmarks measure (measure.py). The planner's model itself is the library's
(nanodist/planner/plan.py, cost.py, traffic.py, hardware.py: train.py consults it). The tools use
the library through its public objects and the injection points of
`Trainer(cfg, comm=..., model_cls=...)`, never by patching it."""
