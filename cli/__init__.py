"""The commands of ``analyze.py``, one module per family; ``analyze.main`` dispatches to them.

- ``options``: the parsers (engine options generated from ``EngineConfig``), presets;
- ``inputs``: the probe, model, weights digest and problem of the options;
- ``analysis``: sobol | shapley | variance | contrast through Lightning's Trainer;
- ``statistics``: contrast-stats | correlation | lda | report on a results file;
- ``masking``: masking | single-class with the maps of a stored analysis;
- ``reporting``: the "Outputs:" lines, the W&B run and the exit status of every command.
"""
