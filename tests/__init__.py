"""The test suite, grouped like the package's layers, plus the library's promises.

- ``core/``: ``maxup_step`` against a loop reference, batch trees, options, views, dropout in the selection pass.
- ``augment/``: each augmentation against a per-row reference, and the statistics of its draws.
- ``training/``: the mixin and the ``MaxUp`` callback inside a real ``Trainer`` (precision, switch-on, errors,
  logged diagnostics, both Lightning namespaces, user scenarios).
- ``data/``: copies made in the DataLoader workers (``MultiView``).
- ``evaluation/``: worst-of-k accuracy and selection fidelity.
- ``callbacks/``: the selection monitor.
- ``certify/``: randomized-smoothing certification, its metric, tables and command.
- ``recipes/``: models, data modules, fine-tuning, the example configs, scripts and benchmarks.
- ``apps/``: the ``lightning-maxup`` command, the demo and the study.
- ``guarantees/``: the tests that ``docs/guide/guarantees.md`` cites (no host syncs, the whole-fit sync audit,
  device guarantees, selection state, DDP, sharding, multi-node, world-size invariance), the package layout, the
  documentation site, and a check that every test the guarantees page names exists.

Helpers shared by all folders stay here: ``conftest.py`` (fixtures, one torch thread), ``sync_counter.py`` (the
host-sync recorder), ``trainer_options.py`` (quiet ``Trainer`` options) and ``scripts/`` (entry points that tests
launch as separate processes).
"""
