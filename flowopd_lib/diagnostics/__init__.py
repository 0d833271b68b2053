"""Research diagnostics: tools for studying the method, not part of it.

Nothing in the Flow-OPD stages (pretraining, teachers, cold start, distillation) imports these.

    probe   GRPO probes: diagnostic rewards, gradient cosines, a gradient line search and a probe
            distillation (the measurements behind docs/findings.md)
            python -m flowopd_lib.diagnostics.probe {train,cosine,distill,linesearch} ...
    bench   wall time of one Flow-OPD update vs one GRPO update on the same batch
            python -m flowopd_lib.diagnostics.bench
    compare paired differences between rows of a finished study's summary (its evaluation cache)
            python -m flowopd_lib.diagnostics.compare <run_dir> <row> ... <reference row>

Import them by name (`from flowopd_lib.diagnostics import probe`): importing `probe` registers its
two diagnostic rewards.
"""
