"""The laptop demo: small generated Decathlon-format tasks and the summary of the demo's results.

:mod:`demo.data` writes the tasks (``python -m demo.data``); :mod:`demo.summary` scores every mode's
test predictions against their labels and writes ``summary.csv`` (``python -m demo.summary``);
:mod:`demo.lane` runs a lane of the demo's commands (training, export, prediction scripts) in one warm
Python process (``python -m demo.lane``). ``bash train_models.sh --demo`` runs the whole pipeline with them.

Imports: ``utils``, ``models`` and ``inference``; never ``training`` (the demo drives training through
the scripts; :mod:`demo.lane` only pre-imports the scripts' modules by name, to run them warm).
"""
