"""code/reproduce.py's parts (docs/REPRODUCE.md): rows.py (the tables' rows, as data), runs.py (a run: its folder,
state and commands; the plan), local.py and slurm.py (the launchers), progress.py (what the launchers tell),
aggregate.py (the tables), plots.py, readme.py (README.md's status block)."""
