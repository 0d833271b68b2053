"""Research diagnostics: tools for studying the method, not part of it.

Nothing in the Flow-OPD stages (pretraining, teachers, cold start, distillation) imports these.

    probe   GRPO probes: diagnostic rewards, gradient cosines, a gradient line search and a probe
            distillation (the measurements behind docs/findings.md)
            python -m flowopd_lib.diagnostics.probe {train,cosine,distill,linesearch} ...
    bench   wall time of one Flow-OPD update vs one GRPO update on the same batch
            python -m flowopd_lib.diagnostics.bench
    compare paired differences between rows of a finished study's summary (its evaluation cache)
            python -m flowopd_lib.diagnostics.compare <run_dir> <row> ... <reference row>
    ocr_errors  what an OCR model writes wrong (order / glyphs / count), and how little the frozen
            text encoders encode glyph order
            python -m flowopd_lib.diagnostics.ocr_errors --adapter <dir> --out <dir>
    schedule  a run's measured stage times replayed under --jobs's rule for a spec's stage order
            python -m flowopd_lib.diagnostics.schedule <run log> <spec> --jobs 2
    curves  learning curves of runs side by side; A+B chains a run B that continued A on one axis
            python -m flowopd_lib.diagnostics.curves <run_dir>[+<continued run_dir>] ... --out fig.png

Import them by name (`from flowopd_lib.diagnostics import probe`): importing `probe` registers its
two diagnostic rewards.
"""
